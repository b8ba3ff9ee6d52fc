"""Where a site keeps what must outlive its process (privacy accounts, ledger keys, the site worker's files).

Light on purpose (no numpy, no torch): ``fedpeft node`` reads it before anything heavy is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STATE_DIR_ENV = "FEDPEFT_STATE_DIR"


def state_dir(node_config: Mapping[str, Any] | None = None) -> Path:
    """A node's ``state-dir`` node config, else ``$FEDPEFT_STATE_DIR``, else ``~/.fedpeft/state``."""
    configured = (node_config or {}).get("state-dir") or os.environ.get(STATE_DIR_ENV)
    return Path(str(configured)).expanduser() if configured else Path.home() / ".fedpeft" / "state"


def worker_dir(directory: Path) -> Path:
    """The site worker's own directory, ``<state dir>/worker`` (0700: its files are the site user's alone)."""
    return Path(directory) / "worker"


def worker_ready_path(directory: Path) -> Path:
    """Where a site worker says it is ready (its pid and fedpeft version), for ``fedpeft node`` to wait on."""
    return worker_dir(directory) / "ready.json"


def worker_secret_path(directory: Path) -> Path:
    """The SuperExec secret ``fedpeft node`` gives its SuperNode and its worker (0600, in the worker directory)."""
    return worker_dir(directory) / "superexec.secret"


def worker_task_path(directory: Path) -> Path:
    """Where a worker notes the task in hand (token, message envelope), for answering it if the worker dies."""
    return worker_dir(directory) / "task.json"
