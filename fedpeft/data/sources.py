"""Where a run's examples come from, read afresh on every call (whoever holds them keeps them: a
:class:`fedpeft.site.Site`, the coordinator's evaluator).

- the run's data file, split into training rows and the seeded held-out test split (:func:`load_split`),
  the training rows cut into the simulated clients' partitions (:func:`partition_rows`);
- a deployed site's own file, every row for training, its labels numbered as the run numbers them
  (:func:`local_table`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.data import DEFAULT_DATA, LabelledTable, partition_indices, split_test
from fedpeft.errors import FedPeftError
from fedpeft.tasks import TASKS


def data_path(cfg: Any) -> str:
    """The data file a config names ("" means the bundled default)."""
    return cfg.data or str(DEFAULT_DATA)


def load_split(cfg: Any) -> tuple[LabelledTable, LabelledTable]:
    """``(train, test)`` of the configured data, with the seeded test hold-out."""
    table = TASKS.get(cfg.task).read(data_path(cfg), text_column=cfg.text_column, label_column=cfg.label_column)
    return split_test(table, test_fraction=cfg.test_fraction, seed=cfg.seed)


def partition_rows(cfg: Any, train: LabelledTable, num_partitions: int) -> list[np.ndarray]:
    """Row positions in ``train`` of every simulated client's partition."""
    return partition_indices(train, cfg.partition, num_clients=num_partitions, seed=cfg.seed)


def local_table(cfg: Any, path: str | Path, *, label_names: Sequence[str]) -> LabelledTable:
    """A site's own data file, every row for training, its labels numbered as the run numbers them
    (conversations for ``causal-lm``: no labels).

    Raises
    ------
    FedPeftError
        A missing or unreadable file, a missing column, or labels the run does not know.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FedPeftError(f"site data file not found: {file}")
    table = TASKS.get(cfg.task).read(file, text_column=cfg.text_column, label_column=cfg.label_column,
                                     min_classes=1)
    if not table.label_names:
        return table
    unknown = sorted(set(table.label_names) - set(label_names))
    if unknown:
        raise FedPeftError(
            f"{file.name} has labels {unknown[:5]} that the run does not know; the run's labels: {list(label_names)}"
        )
    ids = np.array([list(label_names).index(name) for name in table.label_names], dtype=np.int64)
    return dataclasses.replace(table, labels=ids[table.labels], label_names=tuple(label_names))
