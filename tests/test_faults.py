"""Faulty clients in a real simulation (Ray worker processes): one raises mid-run, one answers a round
too late. Every round completes with the others, and the logs say what became of each site."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent


def test_a_client_that_raises_and_a_straggler(tmp_path: Path, tiny_model_dir: Path,
                                                         small_data: Path) -> None:
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import logging, sys
        sys.path.insert(0, {str(TESTS)!r})
        from faulty_client import app
        from fedpeft.config import FedPeftConfig
        from server.simulate import simulate
        logging.basicConfig(level=logging.WARNING)
        cfg = FedPeftConfig(model={str(tiny_model_dir)!r}, data={str(small_data)!r}, clients=4, rounds=3,
                            fraction=1.0, max_local_steps=2, batch_size=8, client_cpus=1, round_timeout=8.0,
                            min_clients=2, out={str(out)!r})
        simulate(cfg, client_app=app)
        print("run completed")
    """)
    started = time.monotonic()
    env = {**__import__("os").environ, "PYTHONPATH": str(TESTS)}  # Ray workers import faulty_client too
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0 and "run completed" in proc.stdout, proc.stderr[-4000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert [r["clients"] for r in records[1:]] == [3, 3, 4]  # round 1 without the straggler, 2 without the fault
    assert [r["failures"] for r in records[1:]] == [0, 1, 0] and not any(r.get("skipped") for r in records)
    traffic = [json.loads(x) for x in (out / "traffic.jsonl").read_text().splitlines()]
    status = {(t["round"], t["site"]): t for t in traffic}
    assert status[(2, "partition-00001")]["status"] == "failed"
    assert "injected fault: the site's disk is full" in status[(2, "partition-00001")]["reason"]
    assert status[(1, "partition-00002")]["status"] == "no reply"
    assert status[(3, "partition-00002")]["status"] == "accepted"  # the late round-1 reply did not confuse it
    assert all(status[(r, "partition-00000")]["status"] == "accepted" for r in (1, 2, 3))
    assert "injected fault" in proc.stderr  # the failure is logged with its reason
    assert elapsed < 300, f"the run took {elapsed:.0f} s"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
