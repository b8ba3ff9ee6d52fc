"""Crash and resume with real processes: ``fedpeft simulate`` (server, Ray and its client workers) is killed
with SIGKILL mid-run, as a whole process group, and ``fedpeft simulate --resume RUN_DIR`` finishes it.

Without DP the resumed run ends exactly where an uninterrupted run with the same config ends (rounds,
traffic, adapter bytes): no round lost or repeated, also with a server optimizer and SCAFFOLD, and under
secure aggregation. Under
local DP the kill lands after a site has signed (and counted) its entry for the round in flight but before
the coordinator ledgered it; after the resume that entry is in the ledger, every site's ledger matches its
own account, and ``fedpeft audit`` is clean.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from privacy.ledger import read_lines

pytestmark = pytest.mark.slow


def command(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--model", str(model), "--data", str(data),
            "--clients", "3", "--rounds", "4", "--fraction", "0.67", "--max-local-steps", "20", "--batch-size", "8",
            "--client-cpus", "1", "--out", str(out), *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def site_entries(run: Path) -> dict[str, int]:
    """Site → entries its own account has signed so far (unreadable while being replaced: skipped)."""
    out = {}
    for path in (run / "sites").glob("*/privacy-*.json"):
        try:
            out[path.parent.name] = json.loads(path.read_text())["entries"]
        except (OSError, ValueError, KeyError):
            pass
    return out


def kill_when(cmd: list[str], ready, *, timeout: float = 300.0) -> None:
    """Start ``cmd`` in its own session, SIGKILL the whole group once ``ready()``; check nothing survives."""
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the point to kill it"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    time.sleep(1.0)
    alive = []
    for p in psutil.process_iter(["pid", "status", "cmdline"]):
        try:
            if os.getsid(p.pid) == proc.pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.info["cmdline"])
        except (ProcessLookupError, psutil.Error):
            pass
    assert alive == [], f"left running after SIGKILL: {alive}"


def untimed(rows: list[dict]) -> list[dict]:
    """``rows`` without the seconds a site spent (wall-clock timings differ from run to run)."""
    return [{k: v for k, v in row.items() if not k.startswith("seconds_")} for row in rows]


def resume(run: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "simulate", "--resume", str(run)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# The coordinator's own state rides in the checkpoint: a server optimizer's moments, SCAFFOLD's c; each
# site's c_i is kept before and after its last round, so a round the crash undid starts again from the same c_i.
# Under secure aggregation the masks are fresh randomness every round, but the sum they hide is exact: the
# resumed run ends on the same bytes. Two runs cover the paths (the suite's minutes are few): LoRA with the
# default recipe plus both pieces of coordinator state, DP-DyLoRA's drawn ranks (a resumed round must draw
# the rank the lost one drew) and the delta broadcast (the coordinator's last broadcast and who holds it are in
# the checkpoint; a site keeps the base of its last change, which a round sent again names), and FedIns' SSF
# pool summed securely.
RECIPES = {"lora-server-opt-and-scaffold": ("--server-opt", "adam", "--server-lr", "0.01", "--drift", "scaffold:head",
                                            "--lora-dynamic-rank", "--downlink-delta", "--downlink-codec", "compeft"),
           "fedins-pool-secure-aggregation": ("--peft", "ssf-pool", "--ssf-pool-size", "3", "--ssf-pool-select", "2",
                                              "--secure-aggregation")}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_sigkill_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path: Path, tiny_model_dir: Path,
                                                                 small_data: Path, recipe: str) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    extra = RECIPES[recipe]
    done = subprocess.run(command(tiny_model_dir, small_data, ref, *extra), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    # killed within ~10 ms of round 2's metrics line: before, during or just after its commit
    kill_when(command(tiny_model_dir, small_data, run, *extra), lambda: len(lines(run / "metrics.jsonl")) >= 3)
    assert len(lines(run / "metrics.jsonl")) < 5, "the run finished before the kill"
    out = resume(run)
    assert "resuming" in out.stdout and "Traceback" not in out.stderr
    assert [r["round"] for r in lines(run / "metrics.jsonl")] == [0, 1, 2, 3, 4]  # none lost, none twice
    assert lines(run / "metrics.jsonl") == lines(ref / "metrics.jsonl")
    assert untimed(lines(run / "traffic.jsonl")) == untimed(lines(ref / "traffic.jsonl"))
    adapter = "adapter/adapter_model.safetensors"
    assert (run / adapter).read_bytes() == (ref / adapter).read_bytes()
    again = resume(run)  # a finished run: nothing to do, nothing changed
    assert "nothing to resume" in again.stdout
    assert lines(run / "metrics.jsonl") == lines(ref / "metrics.jsonl")


def test_sigkill_under_local_dp_loses_no_spend(tmp_path: Path, tiny_model_dir: Path, small_data: Path) -> None:
    run = tmp_path / "run"
    cmd = command(tiny_model_dir, small_data, run, "--dp", "--fraction", "1")

    def signed_not_ledgered() -> bool:  # round 2 committed, and a site has signed its round-3 entry
        return len(lines(run / "metrics.jsonl")) >= 3 and max(site_entries(run).values(), default=0) >= 3

    kill_when(cmd, signed_not_ledgered)
    assert len(read_lines(run / "privacy_ledger.jsonl")) == 6  # rounds 1-2 of three sites: round 3 unledgered
    resume(run)
    records = lines(run / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    entries = [line["entry"] for line in read_lines(run / "privacy_ledger.jsonl")]
    rounds = Counter((e["site"], e["round"]) for e in entries)
    assert any(rounds[(site, 3)] == 2 for site in site_entries(run)), "no site's lost round-3 entry was resent"
    for path in (run / "sites").glob("*/privacy-*.json"):
        account = json.loads(path.read_text())
        mine = [e for e in entries if e["site"] == account["site"]]
        assert [e["site_seq"] for e in mine] == list(range(1, account["entries"] + 1))  # every signed entry
        assert sum(e["status"] == "trained" for e in mine) == len(account["rounds"])  # every spend
        assert mine[-1] == account["signed"][-1]["entry"]
    assert records[-1]["epsilon_max"] == max(e["epsilon"] for e in entries)
    audit = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "audit", str(run)], capture_output=True,
                           text=True, timeout=300)
    assert audit.returncode == 0, audit.stdout[-3000:]
