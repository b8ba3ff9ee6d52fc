"""Split the training rows among clients with flwr-datasets partitioners.

Specs: ``iid`` (equal random shares), ``dirichlet:<alpha>`` (label shares per client drawn from
Dir(alpha); small alpha = strongly non-IID) and ``natural:<column>`` (one client per distinct value
of a column, e.g. a site id).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedpeft.data.loading import LabelledTable
from fedpeft.errors import FedPeftError

_ROW = "__fedpeft_row__"
_LABEL = "__fedpeft_label__"
# Dirichlet partitions smaller than this are redrawn (flwr-datasets retries, then gives up).
_MIN_DIRICHLET_PARTITION = 2


@dataclass(frozen=True)
class PartitionSpec:
    """A parsed partition spec: ``kind`` and its argument (alpha or column name)."""

    kind: str
    alpha: float = 0.0
    column: str = ""


def parse_partition_spec(spec: str) -> PartitionSpec:
    """Parse ``iid``, ``dirichlet:<alpha>`` or ``natural:<column>``."""
    kind, _, arg = spec.strip().partition(":")
    if kind == "iid" and not arg:
        return PartitionSpec("iid")
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = -1.0
        if not alpha > 0:
            raise FedPeftError(f"partition {spec!r}: dirichlet needs a positive alpha, e.g. dirichlet:0.5")
        return PartitionSpec("dirichlet", alpha=alpha)
    if kind == "natural" and arg:
        return PartitionSpec("natural", column=arg)
    raise FedPeftError(f"unknown partition spec {spec!r}; use iid, dirichlet:<alpha> or natural:<column>")


def natural_client_count(table: LabelledTable, spec: PartitionSpec) -> int:
    """Number of clients a ``natural:<column>`` spec gives: distinct values of the column."""
    _check_column(table, spec.column)
    return int(table.frame[spec.column].astype(str).nunique())


def partition_indices(
    table: LabelledTable, spec: str | PartitionSpec, *, num_clients: int, seed: int
) -> list[np.ndarray]:
    """Row positions of each client's partition, sorted, one array per client.

    Raises
    ------
    FedPeftError
        When the table cannot give every client at least one example under the spec.
    """
    # deferred: heavy (datasets, flwr_datasets) on the CLI start-up path (fedpeft simulate's preflight checks)
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    spec = parse_partition_spec(spec) if isinstance(spec, str) else spec
    if num_clients > len(table):
        raise FedPeftError(f"{num_clients} clients but only {len(table)} training examples; use fewer clients")
    columns = {_ROW: np.arange(len(table)), _LABEL: table.labels}
    if spec.kind == "natural":
        found = natural_client_count(table, spec)
        if found != num_clients:
            raise FedPeftError(
                f"partition natural:{spec.column} gives {found} clients (distinct values), not {num_clients};"
                f" pass --clients {found}"
            )
        # Map values to codes in sorted order so client i is the same site across runs.
        values = table.frame[spec.column].astype(str)
        codes = {v: i for i, v in enumerate(sorted(values.unique()))}
        columns[spec.column] = values.map(codes).to_numpy()
        partitioner = NaturalIdPartitioner(partition_by=spec.column)
    elif spec.kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=_LABEL,
            alpha=spec.alpha,
            min_partition_size=min(_MIN_DIRICHLET_PARTITION, len(table) // num_clients),
            self_balancing=False,
            seed=seed,
        )
    else:
        partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = (
        Dataset.from_dict(columns).shuffle(seed=seed) if spec.kind == "iid" else Dataset.from_dict(columns)
    )
    try:
        parts = [np.sort(np.asarray(partitioner.load_partition(i)[_ROW], dtype=np.int64)) for i in range(num_clients)]
    except ValueError as err:
        raise FedPeftError(
            f"partition {spec.kind} cannot give {num_clients} clients enough examples ({err}); "
            "use fewer clients or a larger alpha"
        ) from None
    if spec.kind == "natural":
        # Client i must be the i-th value in sorted order; make that explicit rather than rely on
        # NaturalIdPartitioner's own numbering.
        parts.sort(key=lambda rows: int(columns[spec.column][rows[0]]))
    if any(len(p) == 0 for p in parts):
        raise FedPeftError(f"partition {spec.kind} left a client without examples; use fewer clients")
    return parts


def _check_column(table: LabelledTable, column: str) -> None:
    if column not in table.frame.columns:
        available = ", ".join(map(str, table.frame.columns))
        raise FedPeftError(f"partition column {column!r} not in the data; columns: {available}")
