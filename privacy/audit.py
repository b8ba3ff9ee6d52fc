"""``fedpeft audit``: verify a run's privacy ledger and recompute every ε it claims.

What is checked, and what counts as a **violation** (the audit then exits non-zero):

1. **Integrity** (:func:`privacy.ledger.verify_chain`): sequence, hash chain, content hashes,
   Ed25519 signatures, one key per site (or the pinned key), each site's entry count. Also the chain
   head the coordinator wrote to ``metrics.jsonl`` after every round must be a line of the ledger,
   and the last one its final line (a truncated or extended ledger fails here).
2. **Recomputation**: per site, the history (σ, q, steps) is rebuilt from its entries alone, and at
   every entry ε is recomputed at the entry's δ
   - with the accountant the site claims to use (Opacus ``rdp`` / ``prv``): it must reproduce the
     claim (relative difference ≤ 1e-6) — otherwise the site mis-reported;
   - with dp-accounting's PLD accountant, an implementation independent of Opacus: near-tight, so
     it must not exceed the claim by more than the tolerance (default 5 %) — otherwise ε was
     under-counted. RDP is an upper bound that is typically 10-20 % above PLD; that gap is
     conservative and is reported, not flagged.
   - at each site's last entry, Opacus's PRV (also near-tight) and PLD must agree within the
     tolerance — two independent near-tight accountants disagreeing means one of them is wrong.
3. **Budget**: no entry may claim (or recompute to) more ε than its budget.

Central DP entries (``central-gaussian``, one per release, signed by the coordinator) are recomputed
with dp-accounting's RDP accountant directly (the same library Flower's accountant wraps, reached
without Flower) under the recorded sampling model.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from privacy.accounting import epsilon
from privacy.ledger import LedgerError, read_lines, verify_chain
from privacy.server import LEDGER_FILE

DEFAULT_TOLERANCE = 0.05
CLAIM_TOLERANCE = 1e-6


@dataclass
class EntryCheck:
    """One ledger entry, recomputed."""

    line: int
    site: str
    round: int
    status: str
    steps: int
    delta: float
    budget: float | None
    claimed: float
    recomputed: float  # by the claimed accountant (or dp-accounting RDP for central entries)
    independent: float  # dp-accounting PLD (local) / RDP (central)
    prv: float | None = None  # at a site's last entry


@dataclass
class SiteSummary:
    site: str
    mechanism: str
    accountant: str
    rounds_trained: int
    rounds_refused: int
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int
    delta: float
    budget: float | None
    epsilon: float
    epsilon_independent: float
    epsilon_prv: float | None


@dataclass
class AuditReport:
    run_dir: str
    lines: int
    tolerance: float
    violations: list[str] = field(default_factory=list)
    sites: list[SiteSummary] = field(default_factory=list)
    entries: list[EntryCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"ok": self.ok}, indent=2, sort_keys=True, default=_json_default) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return None
    raise TypeError(type(value))


def audit_run(
    run_dir: str | Path, *, pinned_keys: dict[str, str] | None = None, tolerance: float = DEFAULT_TOLERANCE
) -> AuditReport:
    """Audit ``run_dir`` (see the module docstring).

    Raises
    ------
    FileNotFoundError
        No ledger in ``run_dir``.
    LedgerError
        A ledger line that is not a JSON object.
    """
    run_dir = Path(run_dir)
    path = run_dir / LEDGER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {LEDGER_FILE} in {run_dir}: was the run made with --dp?")
    lines = read_lines(path)
    report = AuditReport(run_dir=str(run_dir), lines=len(lines), tolerance=tolerance)
    report.violations += [f"ledger line {n}: {what}" for n, what in verify_chain(lines, pinned_keys=pinned_keys)]
    report.violations += _check_heads(run_dir, lines)

    by_site: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for number, line in enumerate(lines, start=1):
        entry = line.get("entry")
        if isinstance(entry, dict):
            by_site[str(entry.get("site"))].append((number, entry))
    for site in sorted(by_site):
        try:
            _audit_site(report, site, by_site[site], tolerance)
        except (KeyError, TypeError, ValueError) as err:
            report.violations.append(f"{site}: entries cannot be recomputed ({err})")
    return report


def _check_heads(run_dir: Path, lines: list[dict[str, Any]]) -> list[str]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return ["metrics.jsonl is missing: the ledger's recorded heads cannot be checked"]
    heads = []
    for text in metrics.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            return ["metrics.jsonl has a line that is not JSON"]
        if "ledger_head" in record:
            heads.append((record.get("round"), record["ledger_head"]))
    hashes = [line.get("hash") for line in lines]
    problems = [f"round {r}: recorded ledger head {h[:12]} is not in the ledger" for r, h in heads if h not in hashes]
    if heads and hashes and heads[-1][1] != hashes[-1] and heads[-1][1] in hashes:
        extra = len(hashes) - 1 - hashes.index(heads[-1][1])
        problems.append(f"the ledger has {extra} line(s) after the head recorded at round {heads[-1][0]}")
    if heads and not hashes:
        problems.append("the ledger is empty but metrics.jsonl recorded ledger heads")
    return problems


def _audit_site(report: AuditReport, site: str, entries: list[tuple[int, dict[str, Any]]], tol: float) -> None:
    mechanism = str(entries[0][1].get("mechanism"))
    history: list[tuple[float, float, int]] = []
    checks: list[EntryCheck] = []
    for number, e in entries:
        delta = float(e["delta"])
        if mechanism == "central-gaussian":
            history.append((float(e["noise_multiplier"]), 0.0, 1))
            recomputed = independent = _central(history, e, delta)
        else:
            if e["status"] == "trained":
                history.append((float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])))
            recomputed = epsilon(history, delta=delta, accountant=str(e["accountant"]))
            independent = epsilon(history, delta=delta, accountant="pld")
        check = EntryCheck(
            line=number,
            site=site,
            round=int(e["round"]),
            status=str(e["status"]),
            steps=int(e.get("steps", 1)),
            delta=delta,
            budget=e.get("budget"),
            claimed=float(e["epsilon"]),
            recomputed=recomputed,
            independent=independent,
        )
        _flag_entry(report, check, tol=tol, central=mechanism == "central-gaussian")
        checks.append(check)
    last = checks[-1]
    if mechanism != "central-gaussian" and history:
        last.prv = epsilon(history, delta=last.delta, accountant="prv")
        if abs(last.prv - last.independent) > tol * max(last.independent, 1e-12):
            report.violations.append(
                f"{site}: independent accountants disagree beyond {tol:.0%}: "
                f"PRV {last.prv:.4f} vs PLD {last.independent:.4f}"
            )
    report.entries += checks
    final = entries[-1][1]
    report.sites.append(
        SiteSummary(
            site=site,
            mechanism=mechanism,
            accountant=str(final.get("accountant")),
            rounds_trained=sum(1 for c in checks if c.status in ("trained", "released")),
            rounds_refused=sum(1 for c in checks if c.status == "refused"),
            noise_multiplier=final.get("noise_multiplier"),
            sample_rate=final.get("sample_rate"),
            steps=sum(c.steps for c in checks if c.status in ("trained", "released")),
            delta=last.delta,
            budget=final.get("budget"),
            epsilon=last.claimed,
            epsilon_independent=last.independent,
            epsilon_prv=last.prv,
        )
    )


def _flag_entry(report: AuditReport, c: EntryCheck, *, tol: float, central: bool) -> None:
    where = f"{c.site} round {c.round} (ledger line {c.line})"
    if abs(c.claimed - c.recomputed) > CLAIM_TOLERANCE * max(1.0, abs(c.recomputed)):
        report.violations.append(
            f"{where}: claims epsilon {c.claimed:.6f}, its accountant's recomputation gives {c.recomputed:.6f}"
        )
    if not central and c.independent > c.claimed * (1 + tol):
        report.violations.append(
            f"{where}: under-counted: independent PLD epsilon {c.independent:.4f} exceeds the claimed "
            f"{c.claimed:.4f} by more than {tol:.0%}"
        )
    if c.budget is not None and max(c.claimed, c.recomputed) > float(c.budget) * (1 + 1e-9):
        report.violations.append(f"{where}: over budget: epsilon {max(c.claimed, c.recomputed):.4f} > {c.budget:g}")


def _central(history: list[tuple[float, float, int]], entry: dict[str, Any], delta: float) -> float:
    """ε of central releases with dp-accounting's RDP accountant, called directly."""
    # deferred: heavy (dp_accounting, ~1 s) on `fedpeft audit`'s path; needed only for central DP
    import dp_accounting
    from dp_accounting import privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    n, m = int(entry["population"]), int(entry["sample_size"])
    amplified = entry["sampling"] == "without-replacement"
    relation = privacy_accountant.NeighboringRelation
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=relation.REPLACE_ONE if amplified else relation.ADD_OR_REMOVE_ONE
    )
    for sigma, _, _ in history:
        event: Any = dp_accounting.GaussianDpEvent(sigma)
        if amplified:
            event = dp_accounting.SampledWithoutReplacementDpEvent(n, m, event)
        accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def load_pinned_keys(path: str | Path) -> dict[str, str]:
    """A JSON object ``{site: base64 public key}``."""
    try:
        keys = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise LedgerError(f"cannot read pinned keys from {path}: {err}") from None
    if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        raise LedgerError(f"{path} must hold a JSON object of site name to base64 public key")
    return keys
