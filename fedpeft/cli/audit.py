"""``fedpeft audit RUN_DIR`` and ``fedpeft site-key SITE``: the auditor's commands."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fedpeft.errors import FedPeftError
from fedpeft.state_dir import state_dir
from privacy.ledger import LedgerError, load_or_create_key, public_key_b64
from privacy.state import account_path


def run_audit(args: argparse.Namespace) -> int:
    """Audit a run; print a table (or JSON) and draw the ε plot. 0: clean, 1: violations."""
    # deferred: heavy (flwr) on `fedpeft site-key`'s path, which imports this module too
    from privacy.audit import audit_run, load_pinned_keys

    if not 0 < args.tolerance < 1:
        raise FedPeftError(f"--tolerance must be in (0, 1), got {args.tolerance}")
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FedPeftError(f"run directory not found: {run_dir}")
    if args.empirical:
        return _print_empirical(run_dir, as_json=args.json)
    try:
        keys = load_pinned_keys(args.keys) if args.keys else None
        report = audit_run(run_dir, pinned_keys=keys, tolerance=args.tolerance)
    except (FileNotFoundError, LedgerError) as err:
        raise FedPeftError(str(err)) from None
    plot = Path(args.plot) if args.plot else run_dir / "privacy_epsilon.png"
    if report.entries:
        from privacy.plots import plot_epsilon  # deferred: heavy (matplotlib, flwr), as above

        plot_epsilon(report, plot)
    if args.json:
        sys.stdout.write(report.to_json())
    else:
        _print_table(report, plot if report.entries else None)
    return 0 if report.ok else 1


def _print_table(report, plot: Path | None) -> None:  # noqa: ANN001 - an AuditReport
    console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 150)
    table = Table(title=f"privacy audit of {report.run_dir} ({report.lines} ledger lines)")
    for column in ("site", "trained", "refused", "sigma", "q", "steps", "delta", "epsilon", "PLD", "PRV", "budget"):
        table.add_column(column, justify="left" if column == "site" else "right")
    for s in report.sites:
        table.add_row(
            s.site,
            str(s.rounds_trained),
            str(s.rounds_refused),
            _num(s.noise_multiplier, ".3f"),
            _num(s.sample_rate, ".4f"),
            str(s.steps),
            f"{s.delta:g}",
            f"{s.epsilon:.4f}",
            f"{s.epsilon_independent:.4f}",
            _num(s.epsilon_prv, ".4f"),
            "-" if s.budget is None else f"{s.budget:g}",
        )
    console.print(table)
    if report.ok:
        console.print(
            f"audit: OK — chain, signatures and budgets verify; accountants agree within {report.tolerance:.0%}"
        )
    else:
        console.print(f"audit: {len(report.violations)} violation(s):", style="bold red")
        for v in report.violations:
            console.print(f"  - {v}", highlight=False)
    if plot is not None:
        console.print(f"audit: epsilon per round drawn in {plot}")


def _print_empirical(run_dir: Path, *, as_json: bool) -> int:
    """The empirical audit's result (``--canaries``); 1 when the bound exceeds the accountant's epsilon."""
    from server.report import empirical_audit  # deferred: heavy (scipy, matplotlib) on `fedpeft site-key`'s path

    audit = empirical_audit(run_dir)
    if audit is None:
        raise FedPeftError(f"{run_dir} has no empirical audit; run with --canaries M (e.g. 200) to make one")
    summary = {k: v for k, v in audit.items() if k not in ("scores", "members")}
    if as_json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        claim = audit["accountant_epsilon"]
        print(f"empirical epsilon >= {audit['epsilon']:.3f} at {100 * audit['confidence']:.0f}% confidence "
              f"(delta {audit['delta']:g}; {audit['canaries']} canaries, {audit['correct']} of {audit['guesses']} "
              f"guesses right); accountant: {'no DP' if claim is None else f'epsilon {claim:.3f}'}")
        if audit["violation"]:
            print("audit: VIOLATION — the measured lower bound is above the accountant's epsilon")
    return 1 if audit["violation"] else 0


def _num(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def print_site_key(args: argparse.Namespace) -> int:
    """Print the public key a site signs its ledger entries with."""
    root = Path(args.state_dir).expanduser() if args.state_dir else state_dir()
    try:
        key = load_or_create_key(account_path(root, args.site, "x").parent)
    except (LedgerError, ValueError) as err:
        raise FedPeftError(str(err)) from None
    print(public_key_b64(key))
    return 0
