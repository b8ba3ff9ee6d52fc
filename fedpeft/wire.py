"""The one place that defines how adapter tensors and run settings are packed into Flower records.

Client and server both pack and unpack through these functions, so the formats cannot drift. Only
record *types* from ``flwr.app`` are used here; sending and receiving stay in ``client/`` and
``server/``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpeft.config import FedPeftConfig

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key; every reply carries it


def to_array_record(state: Mapping[str, np.ndarray]) -> Any:
    """Pack a name → array mapping; bf16 has no numpy dtype, so callers pass fp16/fp32."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in state.items()})  # keeps 0-d shapes


def from_array_record(record: Any) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into name → numpy array, keeping its order."""
    return {key: array.numpy() for key, array in record.items()}


# Settings only the coordinator uses; never sent to sites (``out`` is a path on the coordinator).
SERVER_ONLY = frozenset({"out"})


def config_record(cfg: FedPeftConfig, **extra: Any) -> Any:
    """The run config (minus :data:`SERVER_ONLY` fields, plus ``extra`` keys) as a ConfigRecord."""
    from flwr.app import ConfigRecord

    values: dict[str, Any] = {f"fedpeft.{k}": v for k, v in cfg.to_dict().items() if k not in SERVER_ONLY}
    values.update(extra)
    return ConfigRecord(values)


def config_from_record(record: Mapping[str, Any]) -> FedPeftConfig:
    """Inverse of :func:`config_record` (extra keys are ignored)."""
    prefix = "fedpeft."
    return FedPeftConfig.from_mapping({k[len(prefix) :]: v for k, v in record.items() if k.startswith(prefix)})


def record_nbytes(content: Any) -> int:
    """Serialized size in bytes of a message's RecordDict, as it is framed for the wire."""
    from flwr.common.serde import recorddict_to_proto

    return int(recorddict_to_proto(content).ByteSize())
