"""The one place that defines how adapter tensors and run settings are packed into Flower records.

Client and server both pack and unpack through these functions, so the formats cannot drift. Only
record *types* from ``flwr.app`` are used here; sending and receiving stay in ``client/`` and
``server/``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpeft.config import FedPeftConfig

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key; every reply carries it
PRIVACY = "privacy"  # ConfigRecord of a DP reply: round status and the site's signed ledger entry
TRAINED, REFUSED = "trained", "refused"


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


def privacy_record(*, status: str, entry: Mapping[str, Any], signature: str, public_key: str, reason: str = "") -> Any:
    """A site's privacy report for one round: ``status`` (trained/refused), the signed entry, why."""
    from flwr.app import ConfigRecord

    return ConfigRecord(
        {
            "status": status,
            "entry": json.dumps(dict(entry), sort_keys=True),
            "signature": signature,
            "public-key": public_key,
            "reason": reason,
        }
    )


def read_privacy(content: Any) -> dict[str, Any] | None:
    """Inverse of :func:`privacy_record` for a reply's RecordDict; None when the reply has none.

    Raises
    ------
    ValueError
        A privacy record that is not well formed.
    """
    if PRIVACY not in content.config_records:
        return None
    record = content.config_records[PRIVACY]
    try:
        entry = json.loads(str(record["entry"]))
        out = {
            "status": str(record["status"]),
            "entry": entry,
            "signature": str(record["signature"]),
            "public_key": str(record["public-key"]),
            "reason": str(record.get("reason", "")),
        }
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"malformed privacy record: {err}") from None
    if not isinstance(entry, dict) or out["status"] not in (TRAINED, REFUSED):
        raise ValueError("malformed privacy record")
    return out
