"""DP end to end through `fedpeft simulate` (Flower simulation engine): local DP-SGD with its ledger and
audit, a budget that refuses every round, and a central-DP combination that is refused (a central-DP run
end to end, with a failed and a silent site: test_central_dropout.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


CENTRAL = ("--dp", "central", "--dp-delta", "1e-5")


def simulate(out: Path, model: Path, data: Path, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "fedpeft.cli.main",
        "simulate",
        "--model",
        str(model),
        "--data",
        str(data),
        "--clients",
        "3",
        "--rounds",
        "2",
        "--fraction",
        "1",
        "--batch-size",
        "16",
        "--max-local-steps",
        "3",
        "--client-cpus",
        "1",
        "--out",
        str(out),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def audit(out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "fedpeft.cli.main", "audit", str(out), "--json"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def test_local_dp_run_ledgers_every_client_round_and_audits_clean(
    tmp_path: Path, tiny_model_dir: Path, small_data: Path
) -> None:
    out = tmp_path / "local"
    # round 1 a DP probe round (the head alone, on mean-pooled features), round 2 the adapter: one budget
    proc = simulate(out, tiny_model_dir, small_data, "--dp", "--dp-epsilon", "4", "--dp-delta", "1e-5",
                    "--probe-rounds", "1", "--pooling", "mean",
                    "--codec", "int8")  # compression after the noise: post-processing
    # int8 rounds every update (the tiny r=1 adapter is smaller than the signed entry beside it)
    assert all(0 < r["codec_error"] < 0.05 and r["failures"] == 0 for r in records(out)[1:])
    assert "local DP-SGD at every site: epsilon 4 at delta 1e-05" in proc.stdout
    assert "the first 1 round(s) a linear probe of the head" in proc.stdout
    rs = records(out)
    assert [r["clients"] for r in rs[1:]] == [3, 3] and all(r["refused"] == 0 for r in rs[1:])
    assert 0 < rs[1]["epsilon_max"] < rs[2]["epsilon_max"] <= 4.0
    config = json.loads((out / "config.json").read_text())
    assert config["strategy"] == "ffa-lora" and config["run_id"]  # the --dp defaults
    lines = (out / "privacy_ledger.jsonl").read_text().splitlines()
    assert len(lines) == 6
    entries = [json.loads(line)["entry"] for line in lines]
    assert {e["site"] for e in entries} == {f"partition-{i:05d}" for i in range(3)}
    assert all(e["run_id"] == config["run_id"] and e["status"] == "trained" for e in entries)
    probe_steps = {(e["round"], e["sample_rate"], e["steps"]) for e in entries if e["round"] == 1}
    assert {(q, n) for _, q, n in probe_steps} == {(1.0, config["probe_steps"])}  # full batch: ~130 < 256 examples
    assert all(e["steps"] == 3 and e["sample_rate"] < 1 for e in entries if e["round"] == 2)
    assert json.loads((out / "adapter" / "fedpeft.json").read_text())["pooling"] == "mean"
    for site in ("partition-00000", "partition-00001", "partition-00002"):  # each site's own account
        account = json.loads((out / "sites" / site / f"privacy-{config['run_id']}.json").read_text())
        assert len(account["rounds"]) == 2
        assert (out / "sites" / site / f"codec-residual-{config['run_id']}.npz").exists()
    report = audit(out)
    assert report["ok"], report["violations"]
    assert max(s["epsilon"] for s in report["sites"]) == pytest.approx(rs[-1]["epsilon_max"])


def test_exhausted_budget_refuses_every_round_and_spends_nothing(
    tmp_path: Path, tiny_model_dir: Path, small_data: Path
) -> None:
    out = tmp_path / "refused"
    simulate(
        out,
        tiny_model_dir,
        small_data,
        "--dp",
        "local",
        "--dp-epsilon",
        "0.5",
        "--dp-delta",
        "1e-5",
        "--dp-noise-multiplier",
        "0.3",
    )
    rs = records(out)
    assert [r["refused"] for r in rs[1:]] == [3, 3] and [r["clients"] for r in rs[1:]] == [0, 0]
    assert rs[1]["accuracy"] == rs[0]["accuracy"] == rs[2]["accuracy"]  # nothing trained, nothing changed
    assert all(r["epsilon_max"] == 0.0 for r in rs[1:])
    report = audit(out)
    assert report["ok"] and all(s["rounds_refused"] == 2 and s["epsilon"] == 0 for s in report["sites"])


def test_central_dp_refuses_a_non_linear_strategy(tmp_path: Path, tiny_model_dir: Path, small_data: Path) -> None:
    out = tmp_path / "x"
    proc = simulate(out, tiny_model_dir, small_data, *CENTRAL, "--dp-epsilon", "8", "--strategy", "lora-fair", expect=2)
    assert "not post-processing" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
