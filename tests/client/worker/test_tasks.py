"""The site worker's task loop (client/worker/tasks.py), against a stand-in for the SuperNode's Runtime API.

The real Runtime API is exercised end to end by tests/test_deployment.py; here each decision of one task is
checked on its own: the reply pushed, the task's final status, the note of the task in hand (and that it is
gone after), a refused version, a handler that raises, and answering the message a dead worker held."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict
from replies import incoming

import client.worker.tasks as worker_tasks
from client.worker.handling import ERROR_CODE
from fedpeft import __version__
from fedpeft.deploy.flower_compat import SubStatus
from fedpeft.state_dir import worker_task_path

pytestmark = pytest.mark.usefixtures("server_identity")  # to build the incoming instruction as a grid would


@pytest.fixture
def state_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="fx-", dir="/tmp"))
    (path / "worker").mkdir(mode=0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class SuperNode:
    """What the worker's Runtime API calls did: the task's input it hands out, and what was pushed back."""

    def __init__(self, msg: Message, fab_version: str = __version__) -> None:
        self.msg, self.fab_version = msg, fab_version
        self.context = Context(run_id=3, node_id=7, node_config={"site": "a"}, state=RecordDict(), run_config={})
        self.pushed: list[Message] = []
        self.outputs: list[tuple[str, str]] = []
        self.tokens: list[str] = []
        self.closed = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        node = self

        class Client:
            def __init__(self, token: str) -> None:
                node.tokens.append(token)

            def PullObject(self, request: Any) -> Any:  # noqa: N802 — Flower's name; pull_task_input is faked
                raise AssertionError("not called")

            def close(self) -> None:
                node.closed += 1

        class Heartbeat:
            def __init__(self, fn: Any) -> None:
                self.is_running = False

            def start(self) -> None:
                self.is_running = True

            def stop(self) -> None:
                self.is_running = False

        monkeypatch.setattr(worker_tasks, "_task_client", lambda address, token, retry=None: Client(token))
        monkeypatch.setattr(worker_tasks, "HeartbeatSender", Heartbeat)
        monkeypatch.setattr(worker_tasks, "pull_task_input", lambda client: (
            self.msg, self.context, SimpleNamespace(fab_id="fedpeft/fedpeft", fab_version=self.fab_version), None))
        monkeypatch.setattr(worker_tasks, "push_message", lambda client, reply, context: self.pushed.append(reply))
        monkeypatch.setattr(worker_tasks, "push_task_output", lambda client, context, sub_status, details:
                            self.outputs.append((sub_status, details)))


def task(pending: float = 1.5) -> SimpleNamespace:
    pending_at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - pending)) + "+00:00"
    return SimpleNamespace(task_id=11, pending_at=pending_at)


def test_a_task_is_answered_in_process_and_its_note_removed(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = SuperNode(incoming())
    node.install(monkeypatch)
    seen: dict[str, Any] = {}

    def handler(msg: Message, ctx: Context) -> Message:
        note = worker_task_path(state_dir)  # while it trains, the task in hand is noted, private to the site
        seen["mode"] = stat.S_IMODE(note.stat().st_mode)
        seen["note"] = json.loads(note.read_text())
        seen["site"] = ctx.node_config["site"]
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5})}), reply_to=msg)

    loop = worker_tasks.TaskLoop("127.0.0.1:1", handler, state_dir)
    loop.execute("tok-1", task())
    assert seen["mode"] == 0o600 and seen["note"]["token"] == "tok-1" and seen["site"] == "a"
    assert not worker_task_path(state_dir).exists()
    (reply,) = node.pushed
    assert not reply.has_error() and reply.metadata.reply_to_message_id == node.msg.metadata.message_id
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 5 and 1.0 <= metrics["seconds-wait"] < 60  # since the task was pending
    assert node.outputs == [(SubStatus.COMPLETED, "")] and node.tokens == ["tok-1"] and loop.done == 1


def test_a_run_of_another_fedpeft_version_is_refused_with_the_reason(state_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    node = SuperNode(incoming(), fab_version="9.9.9")
    node.install(monkeypatch)
    calls: list[Message] = []
    worker_tasks.TaskLoop("127.0.0.1:1", lambda m, c: calls.append(m) or m, state_dir).execute("t", task())
    (reply,) = node.pushed
    assert not calls  # nothing trained
    assert reply.has_error() and reply.error.code == ERROR_CODE
    assert "9.9.9" in reply.error.reason and __version__ in reply.error.reason and "site worker" in reply.error.reason


def test_a_handler_that_raises_is_an_error_reply_and_the_worker_goes_on(state_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    node = SuperNode(incoming())
    node.install(monkeypatch)

    def broken(msg: Message, ctx: Context) -> Message:
        raise ValueError("no rows in the site's file")

    loop = worker_tasks.TaskLoop("127.0.0.1:1", broken, state_dir)
    loop.execute("t1", task())
    loop.execute("t2", task())
    assert [r.error.reason for r in node.pushed] == ["ValueError: no rows in the site's file"] * 2
    assert node.outputs == [(SubStatus.COMPLETED, "")] * 2 and not worker_task_path(state_dir).exists()


def test_a_runtime_api_that_fails_mid_task_ends_the_task_as_failed(state_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    node = SuperNode(incoming())
    node.install(monkeypatch)

    def gone(client: Any) -> Any:
        raise ConnectionError("the SuperNode went away")

    monkeypatch.setattr(worker_tasks, "pull_task_input", gone)
    worker_tasks.TaskLoop("127.0.0.1:1", lambda m, c: m, state_dir).execute("t", task())
    assert not node.pushed and node.outputs == [(SubStatus.FAILED, "site worker: the SuperNode went away")]
    assert node.closed == 1


def test_the_message_a_dead_worker_held_is_answered_as_failed(state_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed mid-task leaves its note (SIGKILL runs no clean-up); the next worker answers from it."""
    node = SuperNode(incoming(3))
    node.install(monkeypatch)
    worker_tasks.TaskLoop("127.0.0.1:1", lambda m, c: m, state_dir)._hold("tok-dead", node.msg)
    assert worker_tasks.fail_abandoned_task(state_dir, "127.0.0.1:1", "the worker died")
    (reply,) = node.pushed
    assert reply.has_error() and reply.error.reason == "site worker: the worker died"
    assert reply.metadata.reply_to_message_id == node.msg.metadata.message_id
    assert reply.metadata.dst_node_id == node.msg.metadata.src_node_id
    assert node.outputs == [(SubStatus.FAILED, "the worker died")] and node.tokens[-1] == "tok-dead"
    assert not worker_task_path(state_dir).exists()
    assert not worker_tasks.fail_abandoned_task(state_dir, "127.0.0.1:1", "again")  # nothing held any more


def test_an_unreadable_note_is_dropped_not_trusted(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    node = SuperNode(incoming())
    node.install(monkeypatch)
    worker_task_path(state_dir).write_text("{not json")
    assert not worker_tasks.fail_abandoned_task(state_dir, "127.0.0.1:1", "x")
    assert not node.pushed and not worker_task_path(state_dir).exists()


def test_the_loop_waits_for_a_supernode_not_up_yet_and_stops_when_asked(state_dir: Path) -> None:
    """No Runtime API listens: the loop keeps trying (the SuperNode starts after the worker) and stops cleanly."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    stop = threading.Event()
    loop = worker_tasks.TaskLoop(f"127.0.0.1:{port}", lambda m, c: m, state_dir, poll=0.05)
    thread = threading.Thread(target=loop.run, kwargs={"should_stop": stop.is_set})
    thread.start()
    time.sleep(0.6)
    assert thread.is_alive()
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and loop.done == 0


def test_an_idle_loop_asks_sooner_just_after_a_task(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supernode.runtime import run_clientapp  # the module flower_compat changes

    from fedpeft.deploy.objects import FIRST_RETRY

    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree",
                        run_clientapp.pull_and_inflate_object_from_tree)  # restored after the test
    loop = worker_tasks.TaskLoop("127.0.0.1:1", lambda m, c: m, state_dir, poll=0.25)
    # a task taken before the SuperNode holds its objects: asked for again after 0.05 s, not Flower's 1 s
    assert run_clientapp.pull_and_inflate_object_from_tree.keywords == {"initial_backoff": FIRST_RETRY}
    assert loop.idle_wait() == 0.25  # no task yet: the idle pace
    loop.finished = time.monotonic()  # a reply just went out: the next round's message is due soon
    assert loop.idle_wait() == worker_tasks.EAGER_POLL < 0.25
    loop.finished -= worker_tasks.EAGER_SECONDS
    assert loop.idle_wait() == 0.25


def test_a_task_whose_message_the_supernode_dropped_ends_once_it_holds_a_newer_one() -> None:
    """The run stopped while the SuperNode pulled the message's objects: they never come. Flower would retry for
    two hours; the task ends as soon as the SuperNode holds a newer task (the next run's query)."""
    from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_objects

    pending: list[str] = []
    looked: list[float] = []

    def newer_task() -> bool:
        looked.append(time.monotonic())
        return bool(pending)

    def missing(request: PullObjectRequest) -> PullObjectResponse:  # preregistered, never stored
        return PullObjectResponse(object_found=True, object_available=False)

    pull = worker_tasks.watched_pulls(missing, newer_task, every=0.0)
    request = PullObjectRequest(object_id="ab" * 32)
    assert not pull(request).object_available and len(looked) == 1  # nothing newer: keep waiting
    pending.append("query of the next run")
    fn = make_pull_object_fn_protobuf(pull, Node(node_id=1), run_id=7)
    with pytest.raises(ObjectPullError, match="dropped this message"):
        pull_objects(["ab" * 32], fn, initial_backoff=0.01, backoff_cap=0.01, max_tries_per_object=20)

    looked.clear()
    slow = worker_tasks.watched_pulls(missing, newer_task, every=60.0)
    pending.clear()
    slow(request), slow(request), slow(request)
    assert len(looked) == 1  # asked at most once a minute here (once a second by default)

    def stored(request: PullObjectRequest) -> PullObjectResponse:
        return PullObjectResponse(object_found=True, object_available=True, object_content=b"x")

    looked.clear()
    pending.append("newer")
    assert worker_tasks.watched_pulls(stored, newer_task, every=0.0)(request).object_content == b"x"
    assert not looked  # an object that is there is never a reason to look


def test_newer_task_asks_the_supernode_and_never_guesses_yes(state_dir: Path) -> None:
    loop = worker_tasks.TaskLoop("127.0.0.1:1", lambda m, c: m, state_dir)
    assert not loop.newer_task()  # not running: no SuperNode to ask
    tasks: list[object] = []

    class Node:
        def PullPendingTasks(self, request: object) -> SimpleNamespace:  # noqa: N802 — Flower's name
            if tasks == ["boom"]:
                raise RuntimeError("the SuperNode went away")
            return SimpleNamespace(tasks=list(tasks))

    loop._node = Node()  # type: ignore[assignment]
    assert not loop.newer_task()
    tasks.append("a task")
    assert loop.newer_task()
    tasks[:] = ["boom"]
    assert not loop.newer_task()  # not knowing keeps the task


class Refusing:
    """An HTTP stand-in for a SuperNode that no longer holds the task: every call is answered ``status``."""

    def __init__(self, status: int) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        paths = self.paths = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 — http.server's name
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                paths.append(self.path)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status", [403, 401])
def test_a_task_the_supernode_no_longer_holds_ends_the_task_not_the_worker(
        status: int, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped while its message trained (403) or a token made void by a SuperNode restart (401): Flower's
    own retries raise a BaseException for the one and interrupt the process for the other, which ended the
    worker. Here the real client, retries and pushes meet a Runtime API that refuses: the task ends, its
    note is gone, each refused call is tried once, and the worker takes the next task."""
    node = Refusing(status)
    msg = incoming()
    context = Context(run_id=3, node_id=7, node_config={"site": "a"}, state=RecordDict(), run_config={})
    monkeypatch.setattr(worker_tasks, "pull_task_input", lambda client: (
        msg, context, SimpleNamespace(fab_id="fedpeft/fedpeft", fab_version=__version__), None))
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    trained: list[Message] = []
    loop = worker_tasks.TaskLoop(node.address, lambda m, c: trained.append(m) or
                             Message(RecordDict({"metrics": MetricRecord({"num-examples": 5})}), reply_to=m), state_dir)
    try:
        for token in ("t1", "t2"):
            loop.execute(token, task())  # returns: nothing escapes it, not even Flower's RunNotRunningException
    finally:
        node.close()
        signal.signal(signal.SIGINT, previous)
    assert len(trained) == 2 and loop.done == 0 and not interrupted
    assert not worker_task_path(state_dir).exists()
    pushes = [p for p in node.paths if p != "/v1/runtime/send-task-heartbeat"]
    assert len(pushes) == len(set(pushes)) * 2 and len(pushes) <= 6, node.paths  # each refused call tried once


def test_a_heartbeat_the_supernode_refuses_marks_the_task_lost_and_raises_no_signal() -> None:
    import httpx

    def client(result: Any) -> Any:
        def send(request: Any) -> Any:
            if isinstance(result, int):
                response = httpx.Response(result, request=httpx.Request("POST", "http://x"))
                raise httpx.HTTPStatusError("refused", request=response.request, response=response)
            return result
        return SimpleNamespace(SendTaskHeartbeat=send)

    cases = [(SimpleNamespace(success=True), True, False), (SimpleNamespace(success=False), True, True),
             (403, True, True), (401, True, True), (503, False, False)]
    for result, answered, lost_expected in cases:  # (what the SuperNode says, the beat's value, task lost)
        lost = threading.Event()
        assert worker_tasks.heartbeat_fn(client(result), lost)() is answered, result
        assert lost.is_set() is lost_expected, result


@pytest.mark.parametrize(("stamp", "expected"), [("2026-12-04T10:00:00+00:00", 5.0), ("2026-12-04T10:00:00", 5.0),
                                                 ("garbage", None), ("", None)])
def test_seconds_since_a_task_was_pending(stamp: str, expected: float | None) -> None:
    import datetime

    now = datetime.datetime(2026, 12, 4, 10, 0, 5, tzinfo=datetime.UTC).timestamp()
    assert worker_tasks.seconds_since(stamp, now) == expected
