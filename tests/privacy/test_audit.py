"""`fedpeft audit`: a clean ledger passes; edits, deletions, reordering, forged signatures, truncation,
under-counted and over-budget claims are each caught; ε agrees with Opacus within the tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from privacy.accounting import epsilon
from privacy.audit import audit_run
from privacy.ledger import Ledger, line_hash, load_or_create_key, public_key_b64, read_lines, sign_entry
from privacy.server import LEDGER_FILE

SIGMA, Q, STEPS, DELTA = 1.1, 0.1, 5, 1e-5


def make_run(
    tmp_path: Path,
    *,
    rounds: int = 3,
    sites: tuple[str, ...] = ("partition-00000", "partition-00001"),
    budget: float | None = 8.0,
    claim=None,
) -> Path:  # noqa: ANN001
    """A run directory with a real ledger and metrics.jsonl, as a DP run writes them (no training)."""
    run = tmp_path / "run"
    run.mkdir()
    ledger = Ledger(run / LEDGER_FILE)
    history: dict[str, list] = {s: [] for s in sites}
    with open(run / "metrics.jsonl", "w") as metrics:
        for rnd in range(1, rounds + 1):
            for site in sites:
                history[site].append((SIGMA, Q, STEPS))
                eps = epsilon(history[site], delta=DELTA, accountant="prv")
                entry = {
                    "version": 1,
                    "mechanism": "dp-sgd",
                    "run_id": "r",
                    "site": site,
                    "round": rnd,
                    "site_seq": rnd,
                    "status": "trained",
                    "accountant": "prv",
                    "noise_multiplier": SIGMA,
                    "sample_rate": Q,
                    "steps": STEPS,
                    "max_grad_norm": 1.0,
                    "delta": DELTA,
                    "epsilon": claim(eps) if claim else eps,
                    "budget": budget,
                }
                key = load_or_create_key(tmp_path / "sites" / site)
                ledger.admit(entry, sign_entry(key, entry), public_key_b64(key))
            metrics.write(json.dumps({"round": rnd, "ledger_head": ledger.head}) + "\n")
    return run


def rewrite(run: Path, lines: list[dict]) -> None:
    (run / LEDGER_FILE).write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines))


@pytest.fixture()
def clean(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def test_clean_run_passes_and_agrees_with_opacus(clean: Path) -> None:
    report = audit_run(clean)
    assert report.ok, report.violations
    assert [s.site for s in report.sites] == ["partition-00000", "partition-00001"]
    from opacus.accountants import PRVAccountant

    opacus = PRVAccountant()
    opacus.history = [(SIGMA, Q, STEPS * 3)]
    reference = opacus.get_epsilon(delta=DELTA)
    for s in report.sites:
        assert s.rounds_trained == 3 and s.steps == 15
        assert s.epsilon == pytest.approx(reference, rel=1e-6)
        assert s.epsilon_independent == pytest.approx(reference, rel=0.05)  # PLD within the tolerance
        assert s.epsilon_prv == pytest.approx(reference, rel=1e-6)
    assert len(report.entries) == 6


def test_edited_line_is_caught(clean: Path) -> None:
    lines = read_lines(clean / LEDGER_FILE)
    lines[2]["entry"]["epsilon"] *= 0.5
    rewrite(clean, lines)
    report = audit_run(clean)
    assert not report.ok
    assert any("line 3" in v and "edited" in v for v in report.violations)


def test_deleted_line_is_caught(clean: Path) -> None:
    lines = read_lines(clean / LEDGER_FILE)
    rewrite(clean, lines[:2] + lines[3:])
    assert any("deleted" in v for v in audit_run(clean).violations)


def test_reordered_lines_are_caught(clean: Path) -> None:
    lines = read_lines(clean / LEDGER_FILE)
    rewrite(clean, [lines[1], lines[0], *lines[2:]])
    assert any("moved" in v for v in audit_run(clean).violations)


def test_truncated_tail_is_caught(clean: Path) -> None:
    lines = read_lines(clean / LEDGER_FILE)
    rewrite(clean, lines[:-1])  # the chain itself still verifies
    report = audit_run(clean)
    assert any("not in the ledger" in v for v in report.violations)


def test_forged_signature_is_caught(tmp_path: Path, clean: Path) -> None:
    lines = read_lines(clean / LEDGER_FILE)
    key = load_or_create_key(tmp_path / "forger")
    for line in lines:  # the forger even re-signs and re-chains everything with its own key for one site
        if line["entry"]["site"] == "partition-00001":
            line["signature"], line["public_key"] = sign_entry(key, line["entry"]), public_key_b64(key)
    prev = "0" * 64
    for line in lines:
        line["prev"] = prev
        line["hash"] = prev = line_hash(line)
    rewrite(clean, lines)
    (clean / "metrics.jsonl").write_text(json.dumps({"round": 3, "ledger_head": prev}) + "\n")
    assert audit_run(clean).ok  # self-consistent: without pinned keys a full rewrite cannot be told apart
    real = public_key_b64(load_or_create_key(tmp_path / "sites" / "partition-00001"))
    report = audit_run(clean, pinned_keys={"partition-00001": real})
    assert any("pinned" in v for v in report.violations)

    bad = read_lines(clean / LEDGER_FILE)
    bad[0]["signature"] = bad[1]["signature"]
    rewrite(clean, bad)
    assert any("signature" in v for v in audit_run(clean).violations)


def test_under_counted_claim_is_caught(tmp_path: Path) -> None:
    run = make_run(tmp_path, claim=lambda eps: eps * 0.8)  # properly signed, but the numbers are wrong
    report = audit_run(run)
    assert any("recomputation gives" in v for v in report.violations)
    assert any("under-counted" in v for v in report.violations)


def test_over_budget_is_caught(tmp_path: Path) -> None:
    run = make_run(tmp_path, budget=1.0)
    report = audit_run(run)
    assert any("over budget" in v for v in report.violations)


def test_cli_exit_codes_json_and_plot(clean: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fedpeft.cli.main", "audit", str(clean)]
    ok = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["ok"] is True and len(data["sites"]) == 2
    png = (clean / "privacy_epsilon.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    table = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and "audit: OK" in table.stdout and "partition-00001" in table.stdout

    lines = read_lines(clean / LEDGER_FILE)
    lines[0]["entry"]["steps"] = 1
    rewrite(clean, lines)
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "violation" in bad.stdout and "Traceback" not in bad.stderr

    missing = subprocess.run([*cmd[:-1], str(tmp_path / "nope")], capture_output=True, text=True, timeout=300)
    assert (
        missing.returncode == 2 and missing.stderr.startswith("fedpeft: error:") and "Traceback" not in missing.stderr
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    no_ledger = subprocess.run([*cmd[:-1], str(empty)], capture_output=True, text=True, timeout=300)
    assert no_ledger.returncode == 2 and "--dp" in no_ledger.stderr
