"""The site worker's one way in (``python -m client.worker``): it says it is ready only once the training stack
is imported, takes tasks until SIGTERM, and leaves no ready file of its own behind."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import client.worker as worker
from fedpeft import __version__
from fedpeft.state_dir import worker_ready_path

ROOT = Path(__file__).resolve().parents[3]


class Loop:
    """Stands in for TaskLoop: records what it was given and what the ready file said while it ran."""

    made: list[Loop] = []

    def __init__(self, address: str, handler: Any, state_dir: Path, *, secret: bytes | None = None) -> None:
        self.address, self.handler, self.state_dir, self.secret = address, handler, state_dir, secret
        self.done, self.stopped, self.ready_seen, self.should_stop = 0, False, None, False
        Loop.made.append(self)

    def stopping(self) -> None:
        self.stopped = True

    def run(self, should_stop: Callable[[], bool]) -> None:
        path = worker_ready_path(self.state_dir)
        self.ready_seen = json.loads(path.read_text()), stat.S_IMODE(path.stat().st_mode)
        self.should_stop = should_stop()


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """client.local without torch, the task loop without a SuperNode; the signal handlers main installs undone."""
    local = types.ModuleType("client.local")
    local.app = lambda msg, ctx: msg  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "client.local", local)
    monkeypatch.setattr(worker, "TaskLoop", Loop)
    monkeypatch.setattr(worker, "fail_abandoned_task", lambda *args: False)
    Loop.made.clear()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield local
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def test_the_worker_says_it_is_ready_then_takes_tasks_and_removes_the_file_when_it_stops(
        tmp_path: Path, stand_ins: types.ModuleType) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3cret")
    assert worker.main(["--state-dir", str(tmp_path / "st"), "--runtime-api", "127.0.0.1:9", "--secret-file",
                        str(secret)]) == 0
    (loop,) = Loop.made
    assert loop.address == "127.0.0.1:9" and loop.secret == b"s3cret" and loop.handler is stand_ins.app
    assert loop.ready_seen == ({"pid": os.getpid(), "version": __version__}, 0o600)
    assert stat.S_IMODE((tmp_path / "st" / "worker").stat().st_mode) == 0o700
    assert not worker_ready_path(tmp_path / "st").exists()


def test_sigterm_finishes_the_task_in_hand_then_stops(tmp_path: Path, stand_ins: types.ModuleType,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    original = Loop.run

    def run(self: Loop, should_stop: Callable[[], bool]) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # to the handler main installed: not an exit, a request to stop
        original(self, should_stop)

    monkeypatch.setattr(Loop, "run", run)
    assert worker.main(["--state-dir", str(tmp_path), "--runtime-api", "127.0.0.1:9"]) == 0
    (loop,) = Loop.made
    assert loop.stopped and loop.should_stop  # the loop was told (pushes tried once) and asked to stop


def test_a_successors_ready_file_is_left_alone(tmp_path: Path, stand_ins: types.ModuleType,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ready = worker_ready_path(tmp_path)
    original = Loop.run

    def run(self: Loop, should_stop: Callable[[], bool]) -> None:
        original(self, should_stop)
        ready.write_text(json.dumps({"pid": os.getpid() + 1, "version": __version__}))  # a new worker's

    monkeypatch.setattr(Loop, "run", run)
    assert worker.main(["--state-dir", str(tmp_path), "--runtime-api", "127.0.0.1:9"]) == 0
    assert json.loads(ready.read_text())["pid"] == os.getpid() + 1


def test_a_missing_secret_is_one_line_and_no_ready_file(tmp_path: Path, stand_ins: types.ModuleType,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert worker.main(["--state-dir", str(tmp_path), "--runtime-api", "127.0.0.1:9", "--secret-file",
                        str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.startswith("fedpeft worker: ") and not Loop.made
    assert not worker_ready_path(tmp_path).exists()


def test_the_runtime_api_is_required(tmp_path: Path, stand_ins: types.ModuleType) -> None:
    with pytest.raises(SystemExit) as exited:
        worker.main(["--state-dir", str(tmp_path)])
    assert exited.value.code == 2


def test_importing_the_worker_imports_nothing_heavy() -> None:
    code = "import sys, client.worker; print(sorted(m for m in ('torch', 'transformers', 'opacus', 'peft') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
