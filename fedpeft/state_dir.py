"""Where a site keeps what must outlive its process (privacy accounts, ledger keys, the worker's socket).

Light on purpose (no numpy, no torch): the per-message relay process reads it too.
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


def worker_socket_path(directory: Path) -> Path:
    """Where a site's worker listens: ``<state dir>/worker/worker.sock`` (the directory 0700, the socket 0600)."""
    return Path(directory) / "worker" / "worker.sock"


def worker_secret_path(directory: Path) -> Path:
    """The SuperExec secret ``fedpeft node`` gives its SuperNode and its worker (0600, in the worker directory)."""
    return Path(directory) / "worker" / "superexec.secret"


def worker_task_path(directory: Path) -> Path:
    """Where a worker notes the task in hand (token, message envelope), for answering it if the worker dies."""
    return Path(directory) / "worker" / "task.json"
