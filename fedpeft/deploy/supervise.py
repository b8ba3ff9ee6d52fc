"""``fedpeft node`` with a site worker: start the worker, then the SuperNode; restart the worker if it dies.

The worker (``python -m client.worker``) holds the site's model and data for the whole life of the node.
The SuperNode runs with ``--isolation process`` (no SuperExec, no per-message process): the worker takes the
node's ClientApp tasks from the SuperNode's Runtime API itself (``client/worker/tasks.py``), authenticated by a
secret made fresh for each life of the node (``<state-dir>/worker/superexec.secret``, 0600). This module
only manages the two processes:

- the worker starts first, and the SuperNode only once the worker has written ``<state-dir>/worker/ready.json``
  (its pid and fedpeft version, see :func:`write_ready`). The worker writes it once it has imported the
  training stack (torch, transformers, the handlers) and read its secret, so no message waits for those. The
  model and the site's data are not loaded yet (the run names them): the run's first message, the
  coordinator's query, loads them, and they stay loaded for the rounds that follow;
- a worker that exits is started again (the message it held is answered as failed by the new worker, see
  ``client/worker/tasks.py``; the next round trains); one that dies within ``quick_death`` seconds of starting
  ``max_quick_deaths`` times in a row is a fault to report, not to retry: the node stops with status 1;
- SIGTERM or Ctrl-C stops the SuperNode first (no new messages), then the worker, which finishes the
  message in hand (its privacy spend is on disk before any reply leaves); either gets ``grace`` seconds;
- when the SuperNode exits on its own, the worker is stopped and its status is the node's.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedpeft import __version__
from fedpeft.errors import FedPeftError
from fedpeft.runlog import atomic_write_bytes
from fedpeft.state_dir import worker_ready_path, worker_secret_path


def write_ready(path: Path) -> None:
    """Say that this process, a site worker, is ready: ``{"pid", "version"}``, written atomically (0600)."""
    atomic_write_bytes(path, json.dumps({"pid": os.getpid(), "version": __version__}).encode(), mode=0o600)


def read_ready(path: Path) -> dict[str, Any] | None:
    """What a worker wrote with :func:`write_ready`; None while there is nothing (or nothing whole) to read."""
    try:
        ready = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return ready if isinstance(ready, dict) else None


def worker_command(state_dir: Path, runtime_api: str) -> list[str]:
    """The worker's command line: it takes the tasks of the SuperNode whose Runtime API is ``runtime_api``."""
    return [sys.executable, "-m", "client.worker", "--state-dir", str(state_dir), "--runtime-api", runtime_api,
            "--secret-file", str(worker_secret_path(state_dir))]


def new_secret(path: Path) -> None:
    """A fresh random SuperExec secret for this node's life: 0600 in a 0700 directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    atomic_write_bytes(path, secrets.token_hex(32).encode(), mode=0o600)


class NodeSupervisor:
    def __init__(
        self,
        supernode: Sequence[str],
        worker: Sequence[str],
        ready_path: Path,
        *,
        version: str = __version__,
        ready_timeout: float = 300.0,
        grace: float = 60.0,
        quick_death: float = 10.0,
        max_quick_deaths: int = 3,
        poll: float = 0.2,
        say: Callable[[str], None] = lambda line: print(f"fedpeft node: {line}", file=sys.stderr, flush=True),
    ) -> None:
        self.supernode_cmd, self.worker_cmd, self.ready = list(supernode), list(worker), Path(ready_path)
        self.version = version
        self.ready_timeout, self.grace, self.poll = ready_timeout, grace, poll
        self.quick_death, self.max_quick_deaths = quick_death, max_quick_deaths
        self.say = say
        self.worker: subprocess.Popen | None = None
        self.supernode: subprocess.Popen | None = None
        self.worker_starts = 0
        self._stop = False

    def request_stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        self._stop = True

    def _start_worker(self) -> subprocess.Popen:
        self.worker_starts += 1
        self.ready.unlink(missing_ok=True)  # a dead worker's: only the new one's says it is ready
        proc = subprocess.Popen(self.worker_cmd)
        self.say(f"site worker started (pid {proc.pid})")
        return proc

    def _wait_ready(self, proc: subprocess.Popen) -> None:
        """Wait until ``proc`` wrote the ready file; a worker of another fedpeft version is refused."""
        deadline = time.monotonic() + self.ready_timeout
        while (ready := read_ready(self.ready)) is None or ready.get("pid") != proc.pid:
            if proc.poll() is not None:
                raise FedPeftError(f"the site worker exited with status {proc.returncode} before it was ready")
            if self._stop:
                return
            if time.monotonic() > deadline:
                raise FedPeftError(f"the site worker did not write {self.ready} within {self.ready_timeout:.0f} s")
            time.sleep(self.poll)
        if ready.get("version") != self.version:
            raise FedPeftError(f"the site worker runs fedpeft {ready.get('version')}, this node {self.version}; "
                               "reinstall fedpeft so that both are the same")

    def run(self) -> int:
        """Run until the SuperNode exits or a stop is requested; the node's exit status."""
        try:
            self.worker = self._start_worker()
            self._wait_ready(self.worker)
            if self._stop:
                return 0
            self.supernode = subprocess.Popen(self.supernode_cmd)
            self.say(f"SuperNode started (pid {self.supernode.pid}); the site worker answers its messages")
            return self._watch()
        finally:
            self._shutdown()

    def _watch(self) -> int:
        assert self.worker is not None and self.supernode is not None
        started, quick = time.monotonic(), 0
        while not self._stop:
            code = self.supernode.poll()
            if code is not None:
                self.say(f"the SuperNode exited with status {code}; stopping the site worker")
                return code
            if self.worker.poll() is not None:
                lived = time.monotonic() - started
                quick = quick + 1 if lived < self.quick_death else 0
                self.say(f"the site worker exited with status {self.worker.returncode} after {lived:.0f} s")
                if quick >= self.max_quick_deaths:
                    self.say(f"the site worker died {quick} times within {self.quick_death:.0f} s of starting; "
                             "giving up (see its log above)")
                    return 1
                self.worker, started = self._start_worker(), time.monotonic()
            time.sleep(self.poll)
        return 0

    def _shutdown(self) -> None:
        for name, proc in (("SuperNode", self.supernode), ("site worker", self.worker)):
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(self.grace)
            except subprocess.TimeoutExpired:
                self.say(f"the {name} did not stop within {self.grace:.0f} s; killing it")
                proc.kill()
                proc.wait()


def supervise(supernode: Sequence[str], state_dir: Path, runtime_api: str) -> int:
    """Run the node until it ends; SIGTERM and SIGINT stop it cleanly. The SuperNode runs with ``--isolation
    process``; the worker takes its tasks from ``runtime_api``, with a secret made for this life of the node."""
    new_secret(worker_secret_path(state_dir))
    supervisor = NodeSupervisor(supernode, worker_command(state_dir, runtime_api), worker_ready_path(state_dir))
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    return supervisor.run()
