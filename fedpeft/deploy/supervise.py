"""``fedpeft node`` with a site worker: start the worker, then the SuperNode; restart the worker if it dies.

The worker (``python -m client.worker``) holds the site's model and data for the whole life of the node.
The SuperNode runs with ``--isolation process`` (no SuperExec, no per-message process): the worker takes the
node's ClientApp tasks from the SuperNode's Runtime API itself (``client/executor.py``), authenticated by a
secret made fresh for each life of the node (``<state-dir>/worker/superexec.secret``, 0600). This module
only manages the two processes:

- the worker starts first, and the SuperNode only once the worker's socket answers, so no message
  arrives before the model is loaded;
- a worker that exits is started again (the message it held is answered as failed by the new worker, see
  ``client/executor.py``; the next round trains); one that dies within ``quick_death`` seconds of starting
  ``max_quick_deaths`` times in a row is a fault to report, not to retry: the node stops with status 1;
- SIGTERM or Ctrl-C stops the SuperNode first (no new messages), then the worker, which finishes the
  message in hand (its privacy spend is on disk before any reply leaves); either gets ``grace`` seconds;
- when the SuperNode exits on its own, the worker is stopped and its status is the node's.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedpeft.errors import FedPeftError
from fedpeft.runlog import atomic_write_bytes
from fedpeft.state_dir import worker_secret_path, worker_socket_path


def answers(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def worker_command(state_dir: Path, runtime_api: str | None = None) -> list[str]:
    """The worker's command line; with ``runtime_api`` it takes the SuperNode's tasks itself (client/executor.py)."""
    cmd = [sys.executable, "-m", "client.worker", "--state-dir", str(state_dir)]
    if runtime_api is not None:
        cmd += ["--runtime-api", runtime_api, "--secret-file", str(worker_secret_path(state_dir))]
    return cmd


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
        socket_path: Path,
        *,
        ready_timeout: float = 300.0,
        grace: float = 60.0,
        quick_death: float = 10.0,
        max_quick_deaths: int = 3,
        poll: float = 0.2,
        say: Callable[[str], None] = lambda line: print(f"fedpeft node: {line}", file=sys.stderr, flush=True),
    ) -> None:
        self.supernode_cmd, self.worker_cmd, self.socket = list(supernode), list(worker), Path(socket_path)
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
        proc = subprocess.Popen(self.worker_cmd)
        self.say(f"site worker started (pid {proc.pid})")
        return proc

    def _wait_ready(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while not answers(self.socket):
            if proc.poll() is not None:
                raise FedPeftError(f"the site worker exited with status {proc.returncode} before it was ready")
            if self._stop:
                return
            if time.monotonic() > deadline:
                raise FedPeftError(f"the site worker did not open {self.socket} within {self.ready_timeout:.0f} s")
            time.sleep(self.poll)

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


def supervise(supernode: Sequence[str], state_dir: Path, runtime_api: str | None = None) -> int:
    """Run the node until it ends; SIGTERM and SIGINT stop it cleanly. With ``runtime_api`` (the SuperNode runs
    with ``--isolation process``) the worker takes the SuperNode's tasks, with a secret made for this run."""
    if runtime_api is not None:
        new_secret(worker_secret_path(state_dir))
    supervisor = NodeSupervisor(supernode, worker_command(state_dir, runtime_api), worker_socket_path(state_dir))
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    return supervisor.run()
