"""The coordinator's checkpoint: what a crashed run needs to go on from its last completed round.

After every round (and after round 0, the initial adapter) the server writes ``RUN_DIR/checkpoint.npz``
with one atomic rename — the *commit point* of the round. It holds the global adapter and, as JSON:

- ``round``: the last completed round;
- ``seed``: the sampling seed (secret under central DP, hence the file is 0600);
- ``population``: how many sites the run has (central DP's accountant depends on it);
- ``ledger``: the privacy ledger's line count and head hash at the commit (the ledger is append-only:
  lines after it belong to a round that did not commit, and stay — those sites spent that budget);
- ``logs``: the byte length of ``metrics.jsonl`` and ``traffic.jsonl`` at the commit (lines after it
  belong to the round that did not commit and are cut on resume, so no round appears twice).

Beside the adapter (arrays ``a/<name>``) it holds the coordinator's other state: the server optimizer's
moments (``o/<moment>/<name>``, :mod:`strategies.server_opt`) and SCAFFOLD's control variate c
(``c/<name>``, :mod:`strategies.scaffold`), and under the delta broadcast the last broadcast (``b/<name>``),
the broadcast each site holds and the last changes as sent (``h/<i>``, :mod:`fedpeft.downlink`).

Sampling and every site's training generator are derived from ``(seed, round)``, so the seed is the
whole RNG state: a run without DP resumed after a crash ends where the uninterrupted run ends.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.runlog import atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.npz"
LOG_FILES = ("metrics.jsonl", "traffic.jsonl")
VERSION = 1
_META = "__checkpoint__"
_ARRAYS = {"state": "a/", "optimizer": "o/", "control": "c/", "broadcast": "b/",
           "broadcast_payloads": "h/"}  # field → array-name prefix


@dataclass(frozen=True)
class Checkpoint:
    """A committed round (see the module docstring)."""

    run_id: str
    round: int
    seed: int
    population: int
    ledger_count: int = 0
    ledger_head: str = ""
    logs: dict[str, int] = field(default_factory=dict)  # file name → its length in bytes at the commit
    state: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    optimizer: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # server optimizer moments
    control: dict[str, np.ndarray] | None = field(default=None, repr=False)  # SCAFFOLD's c; None: no SCAFFOLD
    # the delta broadcast (strategies.flower.Broadcasts): the last broadcast (None: no delta broadcast), the
    # digest each site holds, the initial adapter's, and the last changes as sent (their payloads by position)
    broadcast: dict[str, np.ndarray] | None = field(default=None, repr=False)
    broadcast_held: dict[str, str] = field(default_factory=dict)
    broadcast_origin: str | None = None
    broadcast_changes: list[dict[str, Any]] = field(default_factory=list)  # base, digest, header
    broadcast_payloads: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def meta(self) -> dict[str, Any]:
        data = asdict(self)
        for name in _ARRAYS:
            data.pop(name)
        return {"version": VERSION, **data, "scaffold": self.control is not None, "delta": self.broadcast is not None}


def log_sizes(run_dir: Path) -> dict[str, int]:
    """The current byte length of each round log (0 for one not written yet)."""
    return {name: (run_dir / name).stat().st_size if (run_dir / name).exists() else 0 for name in LOG_FILES}


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Write ``RUN_DIR/checkpoint.npz`` atomically, readable by the owner only."""
    buffer = io.BytesIO()
    meta = np.frombuffer(json.dumps(checkpoint.meta(), sort_keys=True).encode("utf-8"), dtype=np.uint8)
    arrays = {f"{prefix}{k}": np.asarray(v) for name, prefix in _ARRAYS.items()
              for k, v in (getattr(checkpoint, name) or {}).items()}
    np.savez(buffer, **{_META: meta}, **arrays)
    atomic_write_bytes(run_dir / CHECKPOINT_FILE, buffer.getvalue(), mode=0o600)


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The last committed round of the run in ``run_dir``.

    Raises
    ------
    FedPeftError
        No run there, no checkpoint, or one that cannot be read.
    """
    path = run_dir / CHECKPOINT_FILE
    if not path.exists():
        what = "no run" if not (run_dir / "config.json").exists() else "a run without a checkpoint"
        raise FedPeftError(f"cannot resume {run_dir}: it holds {what} ({CHECKPOINT_FILE} missing)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data[_META]).decode("utf-8"))
            arrays = {name: {k[len(prefix):]: np.array(data[k]) for k in data.files if k.startswith(prefix)}
                      for name, prefix in _ARRAYS.items()}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as err:
        raise FedPeftError(f"cannot resume {run_dir}: {CHECKPOINT_FILE} is unreadable ({err})") from None
    if meta.pop("version", None) != VERSION:
        raise FedPeftError(f"cannot resume {run_dir}: {CHECKPOINT_FILE} was written by another fedpeft version")
    if not meta.pop("scaffold", False):
        arrays["control"] = None
    if not meta.pop("delta", False):
        arrays["broadcast"] = None
    try:
        return Checkpoint(**meta, **arrays)
    except TypeError as err:
        raise FedPeftError(f"cannot resume {run_dir}: {CHECKPOINT_FILE} is malformed ({err})") from None


def rewind_logs(run_dir: Path, sizes: Mapping[str, int]) -> dict[str, int]:
    """Cut each round log back to its length at the commit; return how many bytes each lost.

    Raises
    ------
    FedPeftError
        A log is shorter than at the commit: it was edited or truncated, and resuming would lose rounds.
    """
    cut = {}
    for name, size in sizes.items():
        path = run_dir / name
        now = path.stat().st_size if path.exists() else 0
        if now < size:
            raise FedPeftError(f"cannot resume {run_dir}: {name} is shorter than at the last checkpoint "
                               f"({now} < {size} bytes); it was truncated or edited")
        if now > size:
            with open(path, "r+b") as fh:
                fh.truncate(size)
                fh.flush()
                os.fsync(fh.fileno())
            cut[name] = now - size
    return cut


def resumed_config(cfg: FedPeftConfig) -> FedPeftConfig:
    """The config of the run in ``cfg.resume``: its own ``config.json``, with ``out`` pointing there.

    A resumed run goes on under the config it started with (σ, sampling and the sites' accounts depend
    on it). Any other field ``cfg`` sets away from its default must agree with the run's, so that a
    changed setting is never silently ignored.

    Raises
    ------
    FedPeftError
        No readable ``config.json`` there, or a setting that differs from the run's.
    """
    run_dir = Path(cfg.resume)
    path = run_dir / "config.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored, dict):
            raise ValueError("not a JSON object")
        stored.pop("resume", None)
        stored.pop("out", None)
        run = FedPeftConfig.from_mapping(stored)
    except FileNotFoundError:
        raise FedPeftError(f"cannot resume {run_dir}: no run there (config.json missing)") from None
    except (OSError, ValueError) as err:
        raise FedPeftError(f"cannot resume {run_dir}: config.json is unreadable ({err})") from None
    defaults = FedPeftConfig()
    differ = [
        f"{name} (given {getattr(cfg, name)!r}, the run's {getattr(run, name)!r})"
        for name in cfg.to_dict()
        if name not in ("resume", "out")
        and getattr(cfg, name) != getattr(defaults, name)
        and getattr(cfg, name) != getattr(run, name)
    ]
    if differ:
        raise FedPeftError(f"a resumed run keeps its own config; these differ: {'; '.join(differ)}")
    if not run.run_id:
        raise FedPeftError(f"cannot resume {run_dir}: its config.json has no run_id")
    return dataclasses.replace(run, out=str(run_dir), resume=str(run_dir))
