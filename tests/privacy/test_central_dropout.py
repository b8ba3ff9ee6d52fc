"""Central DP end to end, and surviving a dropout: of five sampled sites one raises in round 2 and one
answers round 1 after the round timeout (tests/faulty_client.py); every round aggregates the others over
the fixed cohort, traffic.jsonl names both, and the coordinator's ledger accounts every round at the full
noise multiplier (audit clean). Updates travel int4-encoded: the server clips what it decodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent.parent


def test_a_failed_and_a_silent_site_do_not_void_a_central_dp_round(
    tmp_path: Path, tiny_model_dir: Path, small_data: Path
) -> None:
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import logging, sys
        sys.path.insert(0, {str(TESTS)!r})
        from faulty_client import app
        from fedpeft.config import FedPeftConfig
        from server.simulate import simulate
        logging.basicConfig(level=logging.WARNING)
        cfg = FedPeftConfig(model={str(tiny_model_dir)!r}, data={str(small_data)!r}, clients=5, rounds=2,
                            fraction=1.0, max_local_steps=1, batch_size=8, client_cpus=1, round_timeout=8.0,
                            dp="central", dp_noise_multiplier=1.0, dp_delta=1e-5, dp_max_grad_norm=0.5,
                            codec="int4", out={str(out)!r})
        simulate(cfg, client_app=app)
        print("run completed")
    """)
    started = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0 and "run completed" in proc.stdout, proc.stderr[-4000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert [r["clients"] for r in records[1:]] == [4, 4], records  # round 1 without the straggler, 2 without the fault
    assert not any(r.get("skipped") for r in records)
    assert [(r["failures"], r["no_reply"]) for r in records[1:]] == [(0, 1), (1, 0)]
    assert [r["dp_noise_std"] for r in records[1:]] == [pytest.approx(1.0 * 0.5 / 5)] * 2  # σC / m, m = 5 sampled
    assert all(r["compression_ratio"] > 2 and 0 <= r["reclipped"] <= 4 for r in records[1:])
    traffic = {(t["round"], t["site"]): t for t in map(json.loads, (out / "traffic.jsonl").read_text().splitlines())}
    assert traffic[(1, "partition-00002")]["status"] == "no reply"
    assert traffic[(2, "partition-00001")]["status"] == "failed"
    assert "injected fault: the site's disk is full" in traffic[(2, "partition-00001")]["reason"]
    assert sum(t["status"] == "accepted" for t in traffic.values()) == 8
    entries = [json.loads(x)["entry"] for x in (out / "privacy_ledger.jsonl").read_text().splitlines()]
    assert [(e["mechanism"], e["round"], e["replies"], e["sample_size"], e["sampling"]) for e in entries] == [
        ("central-gaussian", 1, 4, 5, "none"), ("central-gaussian", 2, 4, 5, "none")]  # fmt: skip
    assert [e["noise_multiplier"] for e in entries] == [1.0, 1.0]  # not discounted for the absent sites
    assert 0 < records[1]["epsilon_max"] < records[2]["epsilon_max"] == entries[-1]["epsilon"]
    audit = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "audit", str(out), "--json"],
                           capture_output=True, text=True, timeout=300)
    report = json.loads(audit.stdout)
    assert audit.returncode == 0 and report["ok"], report
    assert elapsed < 420, f"the run took {elapsed:.0f} s"  # a hang would wait out timeouts
