"""What ``fedpeft simulate --json`` prints: one JSON object per stdout line, nothing else there, and the run
ends with its report written. (The default table and summary, and ``--quiet``: test_simulation.py, on its
runs.)"""

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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_json_lines_and_the_report_written_at_the_end(tmp_path: Path, tiny_model_dir: Path,
                                                       small_data: Path) -> None:
    out = tmp_path / "run"
    proc = simulate(out, tiny_model_dir, small_data, "--json")
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # every stdout line is JSON
    assert [e["event"] for e in events] == ["start", "round", "round", "round", "end"]
    assert [e["round"] for e in events[1:4]] == [0, 1, 2] and all(e["seconds"] >= 0 for e in events[1:4])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["final"] == metrics[-1] and events[-1]["report"] == str(out / "report.md")
    report = (out / "report.md").read_text()
    assert "2 of 2 rounds, finished" in report
    for name in ("quality", "traffic", "residual"):
        assert (out / "report" / f"{name}.png").stat().st_size > 10_000
