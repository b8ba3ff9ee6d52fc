"""A site's error-feedback residual on disk: what its lossy codec has not yet sent.

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
