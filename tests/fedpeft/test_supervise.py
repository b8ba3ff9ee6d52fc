"""`fedpeft node`'s supervisor with stand-in processes: the worker first, restarts, giving up, stopping."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedpeft.deploy.supervise import NodeSupervisor, answers
from fedpeft.errors import FedPeftError

# a stand-in worker: listens on the socket (after an optional delay), then lives for `life` seconds
WORKER = """
import socket, sys, time
path, delay, life = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
time.sleep(delay)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
import os
if os.path.exists(path): os.unlink(path)
s.bind(path); s.listen(8)
open(sys.argv[4], "a").write("start\\n")
time.sleep(life)
"""
# a stand-in SuperNode: records whether the worker answered when it started, then lives for `life` seconds
SUPERNODE = """
import socket, sys, time
probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    probe.connect(sys.argv[1]); state = "ready"
except OSError:
    state = "early"
open(sys.argv[2], "w").write(state)
time.sleep(float(sys.argv[3]))
sys.exit(int(sys.argv[4]))
"""


@pytest.fixture
def place() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def supervisor(place: Path, *, delay: float = 0.5, life: float = 60.0, node_life: float = 60.0, node_code: int = 0,
               **kwargs: object) -> NodeSupervisor:
    sock = place / "w.sock"
    worker = [sys.executable, "-c", WORKER, str(sock), str(delay), str(life), str(place / "starts")]
    node = [sys.executable, "-c", SUPERNODE, str(sock), str(place / "node"), str(node_life), str(node_code)]
    return NodeSupervisor(node, worker, sock, poll=0.05, grace=5.0, say=lambda line: None, **kwargs)


def in_thread(sup: NodeSupervisor) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(sup.run()))
    thread.start()
    return thread, result


def wait(condition, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_supernode_starts_only_once_the_worker_answers(place: Path) -> None:
    sup = supervisor(place, delay=1.0)
    thread, result = in_thread(sup)
    wait(lambda: (place / "node").exists() and (place / "node").read_text() != "")
    assert (place / "node").read_text() == "ready"
    sup.request_stop()
    thread.join(20)
    assert result == [0]


def test_a_dead_worker_is_restarted_and_a_stop_ends_both(place: Path) -> None:
    sup = supervisor(place)
    thread, result = in_thread(sup)
    wait(lambda: sup.supernode is not None and sup.worker is not None)
    first = sup.worker
    assert first is not None
    time.sleep(0.3)
    os.kill(first.pid, signal.SIGKILL)  # kill -9 mid-run
    wait(lambda: sup.worker_starts == 2)
    wait(lambda: (place / "starts").read_text().count("start") == 2)  # the new worker listens again
    assert answers(place / "w.sock")
    node, worker = sup.supernode, sup.worker
    sup.request_stop()
    thread.join(20)
    assert result == [0]
    assert node is not None and node.poll() is not None and worker is not None and worker.poll() is not None


def test_a_worker_that_keeps_dying_at_once_stops_the_node(place: Path) -> None:
    sup = supervisor(place, delay=0.0, life=0.3, quick_death=5.0, max_quick_deaths=3)
    thread, result = in_thread(sup)
    thread.join(60)
    assert result == [1]
    assert sup.worker_starts == 3
    assert sup.supernode is not None and sup.supernode.poll() is not None  # the SuperNode was stopped too


def test_the_supernodes_exit_status_is_the_nodes_and_stops_the_worker(place: Path) -> None:
    sup = supervisor(place, node_life=0.5, node_code=3)
    thread, result = in_thread(sup)
    thread.join(60)
    assert result == [3]
    assert sup.worker is not None and sup.worker.poll() is not None


def test_a_worker_that_exits_before_it_is_ready_is_a_clear_error(place: Path) -> None:
    sock = place / "w.sock"
    sup = NodeSupervisor([sys.executable, "-c", "pass"], [sys.executable, "-c", "raise SystemExit(4)"], sock,
                         poll=0.05, say=lambda line: None)
    with pytest.raises(FedPeftError, match="exited with status 4 before it was ready"):
        sup.run()
    assert sup.supernode is None  # never started
