"""The site worker and its relay over a real Unix socket: replies, refusals, a stale socket, a worker that dies."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from replies import incoming

from client.worker import ERROR_CODE, SiteWorker, WorkerError, relay, socket_path

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("server_identity")  # to build the incoming instruction as a grid would


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fw-", dir="/tmp"))  # short: a socket path holds at most 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def context() -> Context:
    return Context(run_id=3, node_id=7, node_config={"data-path": "/data/site.jsonl"}, state=RecordDict(),
                   run_config={"rounds": 2})


def echo(msg: Message, ctx: Context) -> Message:
    rnd = int(msg.content["config"]["server-round"])
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 10 * rnd, "worker-pid": os.getpid(),
                                                        "node-config-seen": len(ctx.node_config)})}), reply_to=msg)


class Running:
    def __init__(self, worker: SiteWorker) -> None:
        self.worker, self.stop = worker, threading.Event()
        worker.bind()
        self.thread = threading.Thread(target=worker.serve, kwargs={"should_stop": self.stop.is_set, "poll": 0.05})
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


@pytest.fixture
def serving(state_dir: Path) -> Iterator[Running]:
    running = Running(SiteWorker(socket_path(state_dir), echo))
    yield running
    running.close()


def test_relay_returns_the_workers_reply_addressed_to_the_message(serving: Running, state_dir: Path) -> None:
    for rnd in (1, 2, 3):
        msg = incoming(rnd)
        reply = relay(msg, context(), socket_path(state_dir), timeout=10)
        assert not reply.has_error()
        metrics = reply.content["metrics"]
        assert metrics["num-examples"] == 10 * rnd and metrics["node-config-seen"] == 1
        assert metrics["worker-pid"] == os.getpid()  # the worker's own process (here: a thread of this one)
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        assert reply.metadata.dst_node_id == msg.metadata.src_node_id
    assert serving.worker.served == 3


def test_the_socket_is_0600_in_a_0700_directory_and_removed_on_stop(state_dir: Path) -> None:
    path = socket_path(state_dir)
    running = Running(SiteWorker(path, echo))
    try:
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.lstat().st_mode) == 0o700
    finally:
        running.close()
    assert not path.exists()


def test_a_socket_others_could_open_is_refused(serving: Running, state_dir: Path) -> None:
    path = socket_path(state_dir)
    os.chmod(path, 0o666)
    reply = relay(incoming(), context(), path, timeout=10)
    assert reply.has_error() and reply.error.code == ERROR_CODE
    assert "mode 0600" in reply.error.reason
    assert serving.worker.served == 0
    os.chmod(path, 0o600)
    os.chmod(path.parent, 0o755)
    assert "mode 0700" in relay(incoming(), context(), path, timeout=10).error.reason


def test_no_worker_is_a_failed_reply_naming_the_socket(state_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = socket_path(state_dir)
    reply = relay(incoming(), context(), path, timeout=10)
    assert reply.has_error() and f"no site worker listens at {path}" in reply.error.reason
    assert any("site worker" in r.getMessage() for r in caplog.records)


def test_a_stale_socket_is_replaced_never_trusted(state_dir: Path) -> None:
    path = socket_path(state_dir)
    path.parent.mkdir(mode=0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # the file stays: a worker that was killed
    os.chmod(path, 0o600)
    assert "no site worker answers" in relay(incoming(), context(), path, timeout=10).error.reason
    running = Running(SiteWorker(path, echo))
    try:
        assert not relay(incoming(), context(), path, timeout=10).has_error()
    finally:
        running.close()


def test_a_second_worker_does_not_take_a_live_workers_socket(serving: Running, state_dir: Path) -> None:
    with pytest.raises(WorkerError, match="already serves"):
        SiteWorker(socket_path(state_dir), echo).bind()
    assert not relay(incoming(), context(), socket_path(state_dir), timeout=10).has_error()


def test_a_relay_of_another_version_is_refused_with_the_reason(serving: Running, state_dir: Path) -> None:
    serving.worker.version = "0.0.0-other"
    reply = relay(incoming(), context(), socket_path(state_dir), timeout=10)
    assert reply.has_error() and "fedpeft version mismatch" in reply.error.reason
    assert serving.worker.served == 0


def test_a_handler_that_raises_is_a_failed_reply_and_the_worker_goes_on(state_dir: Path) -> None:
    def flaky(msg: Message, ctx: Context) -> Message:
        if int(msg.content["config"]["server-round"]) == 1:
            raise RuntimeError("disk full")
        return echo(msg, ctx)

    running = Running(SiteWorker(socket_path(state_dir), flaky))
    try:
        first = relay(incoming(1), context(), socket_path(state_dir), timeout=10)
        assert first.has_error() and first.error.reason == "RuntimeError: disk full"
        assert not relay(incoming(2), context(), socket_path(state_dir), timeout=10).has_error()
    finally:
        running.close()


def test_a_worker_killed_mid_round_is_a_failed_reply(state_dir: Path) -> None:
    """kill -9 while the worker trains: the relay answers at once with the reason, not a hang."""
    script = ("import sys, time\n"
              "from client.worker import SiteWorker\n"
              "w = SiteWorker(sys.argv[1], lambda m, c: time.sleep(60))\n"
              "w.bind(); print('ready', flush=True); w.serve()\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(socket_path(state_dir))], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        threading.Timer(1.0, os.kill, (proc.pid, signal.SIGKILL)).start()
        started = time.monotonic()
        reply = relay(incoming(), context(), socket_path(state_dir), timeout=60)
        assert time.monotonic() - started < 30
        assert reply.has_error() and "broke off the exchange" in reply.error.reason
    finally:
        proc.kill()
        proc.wait(10)


def test_a_train_reply_says_how_long_it_waited_for_the_worker_and_how_old_the_relay_was(state_dir: Path) -> None:
    """One training at a time: a message that arrives while another trains waits, and its reply says so."""
    def slow(msg: Message, ctx: Context) -> Message:
        time.sleep(1.5 if int(msg.content["config"]["server-round"]) == 1 else 0)
        return echo(msg, ctx)

    running = Running(SiteWorker(socket_path(state_dir), slow))
    replies: dict[int, Message] = {}
    try:
        first = threading.Thread(target=lambda: replies.update({1: relay(incoming(1), context(),
                                                                         socket_path(state_dir), timeout=10)}))
        first.start()
        time.sleep(0.3)  # the first message is being trained on
        replies[2] = relay(incoming(2), context(), socket_path(state_dir), timeout=10)
        first.join(10)
    finally:
        running.close()
    waits = {rnd: replies[rnd].content["metrics"]["seconds-wait"] for rnd in (1, 2)}
    assert waits[1] < 0.5 and 0.8 < waits[2] < 5, waits
    # the relay's process (this test's interpreter) had run for a while before it sent the message
    assert replies[2].content["metrics"]["seconds-relay"] > 0
    query = Message(RecordDict({"config": ConfigRecord({"server-round": 0})}), dst_node_id=7,
                    message_type=MessageType.QUERY)
    query.metadata.__dict__["_message_id"] = query.object_id
    running = Running(SiteWorker(socket_path(state_dir), echo))
    try:  # only a train reply carries the training's seconds
        reply = relay(query, context(), socket_path(state_dir), timeout=10)
    finally:
        running.close()
    assert "seconds-wait" not in reply.content["metrics"]


def test_a_state_directory_too_long_for_a_socket_is_a_clear_error(state_dir: Path) -> None:
    deep = state_dir / ("d" * 120)
    with pytest.raises(WorkerError, match="shorter state directory"):
        SiteWorker(socket_path(deep), echo).bind()


def test_the_relay_imports_nothing_heavy() -> None:
    code = "import sys, client.worker; print(sorted(m for m in ('torch', 'transformers', 'opacus', 'peft') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
