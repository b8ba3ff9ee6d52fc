"""``--canaries M`` in a real simulation: the coordinator draws the canaries (secret, 0600), each site trains on
exactly its member canaries on top of its own data, and the end of the run scores every canary, bounds
epsilon and reports it (empirical_audit.json, report.md, ``fedpeft audit --empirical``)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_canaries_reach_their_sites_and_are_scored(tmp_path: Path, tiny_model_dir: Path, small_data: Path) -> None:
    out = tmp_path / "run"
    base = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--model", str(tiny_model_dir), "--data",
            str(small_data), "--clients", "3", "--rounds", "2", "--fraction", "1", "--max-local-steps", "2",
            "--batch-size", "8", "--client-cpus", "1"]
    plain = subprocess.run([*base, "--out", str(tmp_path / "plain")], capture_output=True, text=True, timeout=600)
    proc = subprocess.run([*base, "--out", str(out), "--canaries", "30"], capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0 and proc.returncode == 0, proc.stderr[-3000:]
    canaries = [json.loads(x) for x in (out / "canaries.jsonl").read_text().splitlines()]
    assert stat.S_IMODE(os.stat(out / "canaries.jsonl").st_mode) == 0o600 and len(canaries) == 30
    members = Counter(c["site"] for c in canaries if c["member"])
    without = [json.loads(x) for x in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r, w in zip(records[1:], without[1:], strict=True):  # every site trained on its members, and only them
        assert r["num_examples"] == w["num_examples"] + sum(members.values())
    audit = json.loads((out / "empirical_audit.json").read_text())
    assert audit["canaries"] == 30 and len(audit["scores"]) == 30
    assert audit["members"] == [c["member"] for c in canaries]
    assert audit["accountant_epsilon"] is None and audit["violation"] is False and audit["epsilon"] >= 0
    report = (out / "report.md").read_text()
    assert "## Empirical privacy audit" in report and (out / "report" / "canaries.png").stat().st_size > 10_000
    shown = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "audit", str(out), "--empirical"],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and f"empirical epsilon >= {audit['epsilon']:.3f}" in shown.stdout
