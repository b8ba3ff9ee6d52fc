"""bench/gpu_client.py stays runnable where there is no GPU: its tiny shape runs on the CPU end to end and
reports both comparisons (the numbers are not judged here: benchmarks report ratios, tests do not time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("clipping", ["hooks", "ghost"])
def test_gpu_benchmark_runs_on_cpu(tmp_path: Path, clipping: str) -> None:
    out = tmp_path / "result.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_client.py"
    proc = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--device", "cpu", "--steps", "2",
                           "--seq", "32", "--repeats", "1", "--dp-clipping", clipping, "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "CPU" and result["precision"] == "fp32" and result["steps"] == 2
    for part in ("plain", "dp"):
        assert result[part]["fedpeft_tokens_per_s"] > 0 and result[part]["bare_tokens_per_s"] > 0
        assert result[part]["ratio"] > 0
    assert "ratio" in proc.stdout and "DP " + clipping in proc.stdout
