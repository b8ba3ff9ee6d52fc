"""Short rounds in a real simulation: a round whose replies are all rejected is skipped (the global adapter
stays as it was, the run completes and says why), or stops the run with the reasons when asked to; and
load: 100 simulated clients x 3 rounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def simulate(out: Path, model: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--model", str(model), "--data", str(data),
           "--clients", "3", "--rounds", "2", "--fraction", "1", "--max-local-steps", "2", "--batch-size", "8",
           "--client-cpus", "1", "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_a_round_with_every_reply_rejected_is_skipped(tmp_path: Path, tiny_model_dir: Path, small_data: Path) -> None:
    proc = simulate(tmp_path / "run", tiny_model_dir, small_data, "--max-update-norm", "1e-12")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["skipped"] is True and r["clients"] == 0 and r["rejected"] == 3
        assert r["accuracy"] == records[0]["accuracy"] and r["loss"] == records[0]["loss"]  # nothing changed
    traffic = [json.loads(x) for x in (tmp_path / "run" / "traffic.jsonl").read_text().splitlines()]
    assert len(traffic) == 6 and all(t["status"] == "rejected" for t in traffic)
    assert all("exceeds the bound 1e-12" in t["reason"] for t in traffic)
    assert proc.stderr.count("fewer than min_clients=1 valid replies") == 2  # one clear line per skipped round
    assert "skipping it: the global adapter stays as it was" in proc.stderr


def test_short_round_stop_ends_the_run_naming_each_site(tmp_path: Path, tiny_model_dir: Path,
                                                        small_data: Path) -> None:
    proc = simulate(tmp_path / "run", tiny_model_dir, small_data, "--max-update-norm", "1e-12",
                    "--short-round", "stop")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("fedpeft: error: round 1: fewer than min_clients=1 valid replies (partition-00000: ")
    assert err[-1].count("exceeds the bound 1e-12") == 3 and "Traceback" not in proc.stderr


def test_load_100_clients_3_rounds(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Every one of 100 simulated clients in every one of 3 rounds (bench/load.py times it)."""
    from fedpeft.data import DEFAULT_DATA

    corpus = DEFAULT_DATA.read_text(encoding="utf-8").splitlines()
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(corpus[:2300]) + "\n")  # 20+ training rows per client after the 10 % hold-out
    cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--model", str(tiny_model_dir), "--data", str(data),
           "--clients", "100", "--rounds", "3", "--fraction", "1", "--max-local-steps", "1", "--batch-size", "8",
           "--client-cpus", "1", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in records[1:]] == [100, 100, 100]
    assert all(r["failures"] == 0 and r["rejected"] == 0 for r in records[1:])
    traffic = [json.loads(x) for x in (tmp_path / "run" / "traffic.jsonl").read_text().splitlines()]
    assert len(traffic) == 300 and {t["status"] for t in traffic} == {"accepted"}
    assert len({t["site"] for t in traffic}) == 100


def test_a_robust_run(tmp_path: Path, tiny_model_dir: Path, small_data: Path) -> None:
    proc = simulate(tmp_path / "run", tiny_model_dir, small_data, "--robust", "trimmed:0.34", "--max-norm-ratio", "50",
                    "--clip-update-norm", "1e-4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients"] for r in records[1:]] == [3, 3] and all(r["rejected"] == 0 for r in records[1:])
    assert [r["clipped"] for r in records[1:]] == [3, 3]  # norm bounding: every update scaled down, none dropped
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["robust"] == "trimmed:0.34" and config["max_norm_ratio"] == 50.0
