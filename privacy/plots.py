"""The audit's picture: ε spent per site over rounds, against each budget (matplotlib, Agg backend)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fedpeft.runlog import save_figure
from privacy.audit import AuditReport


def plot_epsilon(report: AuditReport, path: str | Path) -> Path:
    """Draw ε (claimed, solid; independent recomputation, dotted) per site over rounds; write a PNG."""
    matplotlib.use("Agg")  # no display: a no-op once set
    path = Path(path)
    series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for c in report.entries:
        series[c.site].append((c.round, c.claimed, c.independent))
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    budgets = set()
    for i, site in enumerate(sorted(series)):
        rounds, claimed, independent = zip(*series[site], strict=True)
        color = colors[i % len(colors)]
        ax.plot(rounds, claimed, marker="o", ms=3, color=color, label=site if len(series) <= 12 else None)
        ax.plot(rounds, independent, ls=":", color=color)
    for s in report.sites:
        if s.budget is not None:
            budgets.add(float(s.budget))
    for b in sorted(budgets):
        ax.axhline(b, color="crimson", ls="--", lw=1)
        ax.annotate(
            f"budget {b:g}",
            (ax.get_xlim()[0], b),
            textcoords="offset points",
            xytext=(4, 3),
            color="crimson",
            fontsize=8,
        )
    delta = report.sites[0].delta if report.sites else None
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(f"epsilon spent (delta = {delta:g})" if delta else "epsilon spent")
    status = "no violations" if report.ok else f"{len(report.violations)} violation(s)"
    ax.set_title(f"privacy spent per site — solid: claimed, dotted: independent PLD — {status}", fontsize=9)
    ax.grid(alpha=0.3)
    if len(series) <= 12:
        ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)
