"""Read a labelled text table (JSONL, JSON, CSV or TSV, optionally gzip-compressed).

Any columns besides the text and label columns are kept (they can drive a ``natural:<column>``
partition). Labels of any type are mapped to class ids in sorted order of their string form, so the
mapping does not depend on row order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedpeft.errors import FedPeftError

_READERS = {
    ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
    ".json": lambda p: pd.read_json(p, dtype=False),
    ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False),
    ".tsv": lambda p: pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False),
}


@dataclass(frozen=True)
class LabelledTable:
    """A table with integer class ids in ``labels`` aligned with its rows.

    Attributes
    ----------
    frame : pandas.DataFrame
        All columns of the file, rows with empty text or label dropped, index reset.
    texts : list[str]
        The text column.
    labels : numpy.ndarray
        int64 class ids, ``label_names[labels[i]]`` is row i's label.
    label_names : tuple[str, ...]
        Class names in id order.
    """

    frame: pd.DataFrame
    texts: list[str]
    labels: np.ndarray
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: np.ndarray) -> LabelledTable:
        """The rows ``rows`` (positions), keeping the label mapping."""
        rows = np.asarray(rows, dtype=np.int64)
        return LabelledTable(
            frame=self.frame.iloc[rows].reset_index(drop=True),
            texts=[self.texts[i] for i in rows],
            labels=self.labels[rows],
            label_names=self.label_names,
        )


def read_table(path: str | Path) -> pd.DataFrame:
    """Read ``path`` into a DataFrame, choosing the reader from its extension."""
    path = Path(path)
    if not path.is_file():
        raise FedPeftError(f"data file not found: {path}")
    suffixes = [s.lower() for s in path.suffixes]
    ext = suffixes[-2] if suffixes and suffixes[-1] == ".gz" and len(suffixes) > 1 else (suffixes or [""])[-1]
    reader = _READERS.get(ext)
    if reader is None:
        raise FedPeftError(f"cannot read {path.name}: use .jsonl, .json, .csv or .tsv (optionally .gz)")
    try:
        frame = reader(path)
    except Exception as err:  # pandas raises many types for malformed files
        raise FedPeftError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
    if frame.empty:
        raise FedPeftError(f"data file {path} has no rows")
    return frame


def load_labelled_table(
    path: str | Path, *, text_column: str, label_column: str, min_classes: int = 2
) -> LabelledTable:
    """Read ``path`` and check that it can train a classifier (a site's own file may hold one class:
    ``min_classes=1``).

    Raises
    ------
    FedPeftError
        Missing file, unreadable format, unknown column (the available ones are listed), or fewer
        than two distinct labels.
    """
    frame = read_table(path)
    for kind, column in (("text", text_column), ("label", label_column)):
        if column not in frame.columns:
            available = ", ".join(map(str, frame.columns))
            raise FedPeftError(f"{kind} column {column!r} not in {Path(path).name}; columns: {available}")
    present = (frame[text_column].notna() & frame[label_column].notna()).to_numpy()
    frame = frame.loc[present].reset_index(drop=True)
    text = frame[text_column].astype(str).str.strip()
    label = _label_strings(frame[label_column])
    keep = ((text != "") & (label != "")).to_numpy()
    frame = frame.loc[keep].reset_index(drop=True)
    text, label = text[keep].reset_index(drop=True), label[keep].reset_index(drop=True)
    label_names = tuple(sorted(label.unique()))
    if len(label_names) < min_classes:
        found = f"one ({label_names[0]})" if label_names else "none"
        raise FedPeftError(f"label column {label_column!r} needs at least {min_classes} classes, found {found}")
    ids = {name: i for i, name in enumerate(label_names)}
    return LabelledTable(
        frame=frame,
        texts=text.tolist(),
        labels=label.map(ids).to_numpy(dtype=np.int64),
        label_names=label_names,
    )


def _label_strings(column: pd.Series) -> pd.Series:
    """Labels as stripped strings; integral floats (ints upcast by pandas around missing values) lose ".0"."""

    def one(value: object) -> str:
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value).strip()

    return column.map(one)


def split_test(table: LabelledTable, *, test_fraction: float, seed: int) -> tuple[LabelledTable, LabelledTable]:
    """Hold out a seeded random ``test_fraction`` of rows: returns ``(train, test)``."""
    order = np.random.default_rng(seed).permutation(len(table))
    n_test = int(round(len(table) * test_fraction))
    if n_test < 1 or n_test >= len(table):
        raise FedPeftError(f"test_fraction {test_fraction} of {len(table)} examples leaves no test or no training data")
    return table.subset(np.sort(order[n_test:])), table.subset(np.sort(order[:n_test]))
