"""``fedpeft simulate --ray-address``: the clients run on an existing Ray cluster, not a local Ray.

The test starts a real two-node cluster on loopback (``ray start --head``, then a second ``ray start`` that
joins it, one CPU each), runs a short simulation on it, and checks that the clients ran inside that
cluster's session and that the results equal the same run on the local Ray ``fedpeft simulate`` starts
itself. An unreachable address and a cluster too small for one client fail in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    """``ray start --block``: the command stays in the foreground and stops its raylet on SIGTERM."""
    with open(log, "ab") as fh:
        return subprocess.Popen(["ray", "start", "--block", *args], stdout=fh, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)


def cluster_state(address: str) -> dict:
    """Alive nodes and CPUs as a fresh driver process sees them (this process never joins the cluster)."""
    probe = (f"import json, ray; ray.init(address={address!r}, logging_level='ERROR'); "
             "print(json.dumps({'nodes': sum(n['Alive'] for n in ray.nodes()), "
             "'cpus': ray.cluster_resources().get('CPU', 0)}))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=ENV)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"nodes": 0, "cpus": 0}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A head node and one worker node on loopback; yields (address, the cluster's session directory root)."""
    logs = tmp_path_factory.mktemp("ray-logs")
    temp = Path(tempfile.mkdtemp(prefix="fpray", dir="/tmp"))  # short: Ray's Unix socket paths are limited
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes = [start(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"], logs / "head.log")]
    try:
        deadline = time.monotonic() + 120
        while cluster_state(address)["nodes"] < 1:
            assert time.monotonic() < deadline, (logs / "head.log").read_text()[-3000:]
            time.sleep(1)
        nodes.append(start([f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0"],
                           logs / "worker.log"))
        while cluster_state(address) != {"nodes": 2, "cpus": 2.0}:
            assert time.monotonic() < deadline, (logs / "worker.log").read_text()[-3000:]
            time.sleep(1)
        yield address, temp
    finally:
        for proc in reversed(nodes):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def simulate(out: Path, model: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--model", str(model), "--data", str(data),
           "--clients", "3", "--rounds", "2", "--fraction", "0.67", "--max-local-steps", "3", "--batch-size", "8",
           "--client-cpus", "1", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def test_a_run_on_an_existing_cluster_equals_the_local_run(ray_cluster: tuple[str, Path], tiny_model_dir: Path,
                                                           small_data: Path, tmp_path: Path) -> None:
    address, session_root = ray_cluster
    before = {p.name for p in session_root.glob("session_*/logs/worker-*.out")}
    # A lossy codec: each site keeps its error-feedback residual in its state directory, which the
    # cluster's actors (started by the raylets, not by this process) only find through the job's environment.
    codec = ("--codec", "topk:0.5")
    remote = simulate(tmp_path / "cluster", tiny_model_dir, small_data, *codec, "--ray-address", address)
    assert remote.returncode == 0, remote.stdout[-3000:] + remote.stderr[-3000:]
    # The clients ran in the cluster's worker processes (their logs live in its session directory).
    started = {p.name for p in session_root.glob("session_*/logs/worker-*.out")} - before
    assert started, "no worker process started in the cluster's session"
    local = simulate(tmp_path / "local", tiny_model_dir, small_data, *codec)
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    assert (tmp_path / "cluster" / "metrics.jsonl").read_text() == (tmp_path / "local" / "metrics.jsonl").read_text()
    for name in ("adapter_model.safetensors", "fedpeft.json"):
        assert (tmp_path / "cluster" / "adapter" / name).read_bytes() == \
            (tmp_path / "local" / "adapter" / name).read_bytes()
    # Each site's state stayed beside the run, as on the local Ray.
    sites = sorted(p.parent.name for p in (tmp_path / "local").glob("sites/*/codec-residual-*.npz"))
    assert sites, "the local run kept no residual: the check below would be empty"
    assert sorted(p.parent.name for p in (tmp_path / "cluster").glob("sites/*/codec-residual-*.npz")) == sites
    # The cluster is still there for the next job.
    assert cluster_state(address) == {"nodes": 2, "cpus": 2.0}


def test_a_cluster_too_small_or_unreachable_fails_in_one_line(ray_cluster: tuple[str, Path], tiny_model_dir: Path,
                                                              small_data: Path, tmp_path: Path) -> None:
    address, _ = ray_cluster
    small = simulate(tmp_path / "big", tiny_model_dir, small_data, "--ray-address", address, "--client-cpus", "4")
    assert small.returncode == 2, small.stdout[-2000:] + small.stderr[-2000:]
    assert "Traceback" not in small.stderr
    assert f"the Ray cluster at {address!r} has 2 CPUs in all; each client asks for 4" in small.stderr
    gone = simulate(tmp_path / "gone", tiny_model_dir, small_data, "--ray-address", f"127.0.0.1:{free_port()}")
    assert gone.returncode == 2, gone.stdout[-2000:] + gone.stderr[-2000:]
    assert "Traceback" not in gone.stderr
    assert "fedpeft: error: cannot join the Ray cluster at '127.0.0.1:" in gone.stderr
    assert not (tmp_path / "gone" / "metrics.jsonl").exists()
    bad = simulate(tmp_path / "bad", tiny_model_dir, small_data, "--ray-address", "head-without-port")
    assert bad.returncode == 2 and "give HOST:PORT of the cluster's head" in bad.stderr, bad.stderr[-2000:]
