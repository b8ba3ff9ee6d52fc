"""Shared by the accuracy benchmarks: one ``fedpeft simulate`` run in its own process."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def simulate(out: Path, flags: list[str], *, resume: bool = False) -> tuple[list[dict], float]:
    """Run ``fedpeft simulate --out OUT FLAGS`` (``resume``: ``fedpeft simulate --resume OUT``, a stopped run
    going on from its last completed round under its own config); return its ``metrics.jsonl`` records and
    wall seconds.

    Exits with the run's stderr if it fails.
    """
    cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate",
           *(["--resume", str(out)] if resume else ["--out", str(out), *flags])]
    print("$", " ".join(shlex.quote(c) for c in cmd[2:]), flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], seconds
