"""bench/cross_device.py stays runnable: its CI-sized form (2,000 users, a cohort of 20, two DP-DyLoRA rounds
at epsilon 8 through the product's rank draw, projection, central release, accountant and server step)
runs end to end and reports a calibrated noise level (accuracy is not judged here: one tiny run proves
nothing, and benchmarks report, tests do not time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_cross_device_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cd.jsonl"
    script = Path(__file__).resolve().parents[1] / "bench" / "cross_device.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["row"], row["epsilon"], row["cohort"], row["population"], row["rounds"]) == ("dylora-r16", 8.0, 20,
                                                                                           2000, 2)
    assert row["sigma"] > 0 and 0 <= row["accuracy"] <= 1
    bad = subprocess.run([sys.executable, str(script), "--rows", "lora-r99"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown rows ['lora-r99']" in bad.stderr and "Traceback" not in bad.stderr
