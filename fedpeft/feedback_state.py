"""A site's error-feedback residual on disk: what its lossy codec has not yet sent (and, stored the same
way, its SCAFFOLD control variate: :func:`control_path`).

The residual (:func:`fedpeft.codecs.compress`) must outlive the process, or a restarted site would
silently drop what it owed the federation. It is kept per site and run as
``<state_dir>/<site>/codec-residual-<run_id>.npz``, written atomically before the reply leaves.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedpeft.runlog import atomic_write_bytes, safe_name


def residual_path(state_dir: str | Path, site: str, run_id: str) -> Path:
    return Path(state_dir) / safe_name(site) / f"codec-residual-{safe_name(run_id)}.npz"


def control_path(state_dir: str | Path, site: str, run_id: str) -> Path:
    """Where a site keeps its SCAFFOLD control variate c_i for a run (:func:`load_control`)."""
    return Path(state_dir) / safe_name(site) / f"scaffold-variate-{safe_name(run_id)}.npz"


_ROUND = "__round__"


def load_control(path: str | Path, server_round: int) -> dict[str, np.ndarray]:
    """A site's SCAFFOLD variate c_i as it stood before round ``server_round`` (empty: zero).

    The file keeps c_i after the last round the site trained and before it: a round that the coordinator
    never committed (it crashed) is sent again after the resume, and the site then starts it from the
    same c_i as the first time, so a resumed run trains exactly as the uninterrupted one.

    Raises
    ------
    ValueError
        The file exists but cannot be read.
    """
    saved = load_residual(path)
    if saved is None:
        return {}
    last = int(saved.pop(_ROUND)[0]) if _ROUND in saved else 0
    part = "after/" if server_round > last else "before/"
    return {k[len(part):]: v for k, v in saved.items() if k.startswith(part)}


def save_control(path: str | Path, server_round: int, before: Mapping[str, np.ndarray],
                 after: Mapping[str, np.ndarray]) -> None:
    """Keep c_i before and after round ``server_round``, atomically (see :func:`load_control`)."""
    save_residual(path, {_ROUND: np.array([server_round], dtype=np.float32),
                         **{f"before/{k}": v for k, v in before.items()},
                         **{f"after/{k}": v for k, v in after.items()}})


def load_residual(path: str | Path) -> dict[str, np.ndarray] | None:
    """The saved residual, or None if there is none.

    Raises
    ------
    ValueError
        The file exists but cannot be read.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: np.asarray(data[key], dtype=np.float32) for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"error-feedback residual {path} is unreadable ({err})") from None


def save_residual(path: str | Path, residual: Mapping[str, np.ndarray]) -> None:
    """Write the residual atomically (an empty one removes the file)."""
    path = Path(path)
    if not residual:
        path.unlink(missing_ok=True)
        return
    buffer = io.BytesIO()
    np.savez(buffer, **{key: np.asarray(value, dtype=np.float32) for key, value in residual.items()})
    atomic_write_bytes(path, buffer.getvalue())
