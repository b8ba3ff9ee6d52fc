"""The run report's figures, drawn from a run directory's records (matplotlib, Agg backend).

Each function takes the parsed records and a path, writes one PNG atomically and returns the path, or
returns None when the run has nothing to draw (no residual for exact strategies, no ε without DP).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from fedpeft.runlog import save_figure

Record = Mapping[str, Any]


def _pyplot() -> Any:
    matplotlib.use("Agg")  # no display: a no-op once set
    return plt


def _rounds_axis(ax: Any) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)


def plot_quality(metrics: Sequence[Record], path: Path) -> Path:
    """Test accuracy (left axis) and test / train loss (right axis) per round."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    rounds = [r["round"] for r in metrics]
    what = "next-token accuracy" if "perplexity" in metrics[0] else "accuracy"  # a causal LM's
    ax.plot(rounds, [r["accuracy"] for r in metrics], marker="o", ms=3, color="tab:blue", label=f"test {what}")
    ax.set_ylabel(what, color="tab:blue")
    loss = ax.twinx()
    loss.plot(rounds, [r["loss"] for r in metrics], marker="s", ms=3, color="tab:red", label="test loss")
    train = [(r["round"], r["train_loss"]) for r in metrics if "train_loss" in r]
    if train:
        loss.plot(*zip(*train, strict=True), ls="--", color="tab:orange", label="train loss (clients)")
    loss.set_ylabel("loss", color="tab:red")
    skipped = [r["round"] for r in metrics if r.get("skipped")]
    for rnd in skipped:
        ax.axvspan(rnd - 0.4, rnd + 0.4, color="grey", alpha=0.15)
    handles = ax.get_legend_handles_labels()[0] + loss.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="best")
    _rounds_axis(ax)
    ax.set_title("accuracy and loss per round" + (" (grey: skipped rounds)" if skipped else ""), fontsize=10)
    return save_figure(fig, path)


def plot_traffic(metrics: Sequence[Record], path: Path) -> Path:
    """Bytes up and down per round (bars) and, when a codec compressed them, the compression ratios."""
    plt = _pyplot()
    rows = [r for r in metrics if r["round"] > 0]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    rounds = [r["round"] for r in rows]
    ax.bar([x - 0.2 for x in rounds], [r.get("bytes_up", 0) / 1024 for r in rows], width=0.4, label="up (replies)")
    ax.bar([x + 0.2 for x in rounds], [r.get("bytes_down", 0) / 1024 for r in rows], width=0.4,
           label="down (broadcast)")
    ax.set_ylabel("KiB per round, all sites")
    handles = ax.get_legend_handles_labels()[0]
    ratios = [(r["round"], r.get("compression_ratio", 0.0), r.get("compression_ratio_down", 0.0)) for r in rows]
    if any(abs(up - 1) > 0.05 or abs(down - 1) > 0.05 for _, up, down in ratios if up or down):
        twin = ax.twinx()
        twin.plot(rounds, [r[1] or float("nan") for r in ratios], marker="o", color="black", label="ratio up")
        twin.plot(rounds, [r[2] or float("nan") for r in ratios], marker="x", ls=":", color="black",
                  label="ratio down")
        twin.set_ylabel("compression ratio (raw fp32 / wire)")
        twin.set_ylim(bottom=0)
        handles += twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4)
    _rounds_axis(ax)
    ax.set_title("traffic per round", fontsize=10)
    return save_figure(fig, path)


def plot_residual(metrics: Sequence[Record], path: Path) -> Path | None:
    """The aggregation residual (bias of averaging LoRA factors) per round; None for exact strategies."""
    rows = [r for r in metrics if "agg_residual_mean" in r]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    rounds = [r["round"] for r in rows]
    ax.plot(rounds, [r["agg_residual_mean"] for r in rows], marker="o", ms=3, label="mean over layers")
    ax.plot(rounds, [r.get("agg_residual_max", float("nan")) for r in rows], ls="--", label="max over layers")
    ax.set_ylabel("relative residual ‖ΣpₖBₖAₖ − B′A′‖ / ‖ΣpₖBₖAₖ‖")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    _rounds_axis(ax)
    ax.set_title("aggregation residual per round", fontsize=10)
    return save_figure(fig, path)


def plot_epsilon(entries: Sequence[Record], path: Path) -> Path | None:
    """ε each site (or the coordinator, for central DP) has spent after each round, against its budget."""
    if not entries:
        return None
    plt = _pyplot()
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    budgets: set[float] = set()
    for e in entries:
        series[str(e["site"])].append((int(e["round"]), float(e["epsilon"])))
        if e.get("budget") is not None:
            budgets.add(float(e["budget"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for site in sorted(series):
        rounds, eps = zip(*series[site], strict=True)
        ax.plot(rounds, eps, marker="o", ms=3, label=site if len(series) <= 12 else None)
    for budget in sorted(budgets):
        ax.axhline(budget, color="crimson", ls="--", lw=1, label=f"budget {budget:g}")
    top = max([eps for points in series.values() for _, eps in points] + list(budgets))
    ax.set_ylim(0, top * 1.12)
    ax.set_ylabel(f"epsilon spent (delta = {float(entries[0]['delta']):g})")
    if len(series) <= 12:
        ax.legend(fontsize=7, ncol=2)
    _rounds_axis(ax)
    ax.set_title("privacy spent per site and round (ledger)", fontsize=10)
    return save_figure(fig, path)


def plot_canary_roc(scores: Sequence[float], members: Sequence[bool], path: Path, *, title: str) -> Path:
    """ROC of guessing "trained on" for canaries whose loss is below a threshold, with its AUC."""
    s, truth = np.asarray(scores, dtype=np.float64), np.asarray(members, dtype=bool)
    order = np.argsort(s, kind="stable")  # lowest loss first: the most confident "in"
    tpr = np.concatenate([[0.0], np.cumsum(truth[order]) / max(1, truth.sum())])
    fpr = np.concatenate([[0.0], np.cumsum(~truth[order]) / max(1, (~truth).sum())])
    auc = float(np.trapezoid(tpr, fpr))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    ax.plot(fpr, tpr, color="tab:purple", label=f"canaries (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance")
    ax.set_xlabel("false positive rate (guessed in, was out)")
    ax.set_ylabel("true positive rate (guessed in, was in)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
