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

from fedpeft import __version__
from fedpeft.deploy.supervise import NodeSupervisor, read_ready, write_ready
from fedpeft.errors import FedPeftError

# a stand-in worker: says it is ready as the real one does (after an optional delay), then lives `life` seconds
WORKER = """
import sys, time
from pathlib import Path
from fedpeft.deploy.supervise import write_ready
path, delay, life = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
time.sleep(delay)
write_ready(path)
open(sys.argv[4], "a").write("start\\n")
time.sleep(life)
"""
# a stand-in SuperNode: records whether the worker was ready when it started, then lives for `life` seconds
SUPERNODE = """
import os, sys, time
state = "ready" if os.path.exists(sys.argv[1]) else "early"
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
    ready = place / "worker" / "ready.json"
    worker = [sys.executable, "-c", WORKER, str(ready), str(delay), str(life), str(place / "starts")]
    node = [sys.executable, "-c", SUPERNODE, str(ready), str(place / "node"), str(node_life), str(node_code)]
    return NodeSupervisor(node, worker, ready, poll=0.05, grace=5.0, say=lambda line: None, **kwargs)


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


def test_the_supernode_starts_only_once_the_worker_is_ready(place: Path) -> None:
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
    wait(lambda: (place / "starts").read_text().count("start") == 2)  # the new worker is ready again
    assert (read_ready(place / "worker" / "ready.json") or {}).get("pid") == sup.worker.pid
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
    sup = NodeSupervisor([sys.executable, "-c", "pass"], [sys.executable, "-c", "raise SystemExit(4)"],
                         place / "ready.json", poll=0.05, say=lambda line: None)
    with pytest.raises(FedPeftError, match="exited with status 4 before it was ready"):
        sup.run()
    assert sup.supernode is None  # never started


def test_a_ready_file_left_by_an_earlier_worker_is_not_trusted(place: Path) -> None:
    """A worker killed with SIGKILL leaves its ready file: the supervisor waits for the new worker's own."""
    stale = place / "worker" / "ready.json"
    write_ready(stale)  # this process's pid: not the worker's
    sup = supervisor(place, delay=1.0)
    thread, result = in_thread(sup)
    wait(lambda: (place / "node").exists() and (place / "node").read_text() != "")
    assert (place / "starts").read_text().count("start") == 1  # the SuperNode waited for the worker itself
    sup.request_stop()
    thread.join(20)
    assert result == [0]


def test_a_worker_of_another_fedpeft_version_is_refused(place: Path) -> None:
    sup = supervisor(place, delay=0.0, version="0.0.0-other")
    with pytest.raises(FedPeftError, match=f"site worker runs fedpeft {__version__}, this node 0.0.0-other"):
        sup.run()
    assert sup.supernode is None  # never started
    assert sup.worker is not None and sup.worker.poll() is not None  # stopped
