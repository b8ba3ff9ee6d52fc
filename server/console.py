"""What a person (or a script) watching a run sees.

``table`` (default): a progress bar over rounds, a row per round, and a summary at the end;
``json``: one JSON object per line on stdout (``{"event": "round", ...}``), nothing else there;
``quiet``: nothing (errors still reach stderr, and the exit status says how it went).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.report import REPORT_FILE, best_record, empirical_audit, human_bytes, load_run

COLUMNS = ("round", "clients", "train loss", "test loss", "accuracy", "agg bias", "bytes up", "bytes down", "seconds")
WIDTHS = (5, 7, 10, 9, 10, 8, 10, 10, 7)
DP_COLUMN, DP_WIDTH = "eps max", 8  # shown only in DP runs: the largest epsilon any site has spent


def format_row(cells: tuple[str, ...]) -> str:
    """Cells right-aligned in the table's fixed widths (plus the DP column when there is one)."""
    widths = WIDTHS + (DP_WIDTH,) * (len(cells) - len(WIDTHS))
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))


OUTPUTS = ("table", "json", "quiet")


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout, flushed (the ``json`` output)."""
    print(json.dumps({"event": event, **fields}, sort_keys=True, default=str), file=sys.stdout, flush=True)


class JsonLines:
    """``{"event": "round", ...metrics.jsonl record, "seconds": s}`` per round."""

    def __enter__(self) -> JsonLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def __call__(self, record: Mapping[str, Any], seconds: float) -> None:
        emit("round", **record, seconds=round(seconds, 3))


class Quiet(JsonLines):
    """Says nothing."""

    def __call__(self, record: Mapping[str, Any], seconds: float) -> None:
        return None


def make_reporter(output: str, rounds: int, *, dp: bool) -> Any:
    """The round reporter of an output mode (see the module docstring)."""
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    if output == "json":
        return JsonLines()
    if output == "quiet":
        return Quiet()
    return RoundReporter(rounds, dp=dp)


def summary_table(run_dir: str | Path) -> Table:
    """The end-of-run summary: where the run stands and where its files are."""
    run = load_run(run_dir)
    last, first = run.metrics[-1], run.metrics[0]
    best = best_record(run.metrics)
    rounds = [r for r in run.metrics if r["round"] > 0]
    table = Table(title="fedpeft run summary", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")  # a long path wraps whole, never cut short
    table.add_row("rounds", f"{last['round']} of {run.config.get('rounds')}")
    what = "perplexity" if "perplexity" in first else "accuracy"
    table.add_row(what, f"{last[what]:.4f} final · {best[what]:.4f} best (round {best['round']}) · "
                  f"{first[what]:.4f} start")
    table.add_row("traffic", f"{human_bytes(sum(r.get('bytes_up', 0) for r in rounds))} up, "
                  f"{human_bytes(sum(r.get('bytes_down', 0) for r in rounds))} down")
    problems = {k: sum(int(r.get(k, 0)) for r in rounds) for k in ("failures", "rejected", "refused")}
    problems["skipped"] = sum(1 for r in rounds if r.get("skipped"))
    table.add_row("client-rounds not used", ", ".join(f"{v} {k}" for k, v in problems.items()))
    if "epsilon_max" in last:
        table.add_row("privacy", f"epsilon {last['epsilon_max']:.3f} at delta {last['delta']:g} (largest of any "
                      f"site); verify: fedpeft audit {run.run_dir}")
    audit = empirical_audit(run.run_dir)
    if audit is not None:
        table.add_row("empirical audit", f"epsilon >= {audit['epsilon']:.3f} ({100 * audit['confidence']:.0f}% "
                      f"confidence, {audit['canaries']} canaries)" + (" — VIOLATION" if audit["violation"] else ""))
    table.add_row("adapter", str(run.run_dir / "adapter"))
    table.add_row("report", str(run.run_dir / REPORT_FILE))
    return table


class RoundReporter:
    """Prints one table row per round under a live progress bar."""

    def __init__(self, rounds: int, console: Console | None = None, *, dp: bool = False) -> None:
        self.dp = dp
        self.console = console or Console(stderr=False, soft_wrap=True)  # rows never wrap in a pipe
        self.progress = Progress(
            TextColumn("[bold]federated rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.task = self.progress.add_task("rounds", total=rounds)
        self.rows: list[tuple[str, ...]] = []
        self.columns = self.header({})  # fixed by the first record (a causal LM's shows perplexity)

    def __enter__(self) -> RoundReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def __call__(self, record: Mapping[str, Any], seconds: float) -> None:
        row = (
            str(record["round"]),
            str(record.get("clients", 0)),
            f"{record['train_loss']:.4f}" if "train_loss" in record else "-",
            f"{record['loss']:.4f}",
            f"{record['perplexity']:.3f}" if "perplexity" in record else f"{record['accuracy']:.4f}",
            f"{record['agg_residual_mean']:.4f}" if "agg_residual_mean" in record else "-",
            human_bytes(record.get("bytes_up", 0)),
            human_bytes(record.get("bytes_down", 0)),
            f"{seconds:.1f}",
        )
        if self.dp:
            row += (f"{record['epsilon_max']:.3f}" if "epsilon_max" in record else "-",)
        self.rows.append(row)
        if len(self.rows) == 1:
            self.columns = self.header(record)
            self.progress.console.print(format_row(self.columns), style="bold", highlight=False)
        self.progress.console.print(format_row(row), highlight=False)
        self.progress.update(self.task, completed=record["round"])  # a resumed run starts part-way

    def header(self, record: Mapping[str, Any]) -> tuple[str, ...]:
        """The column names: a causal LM's quality column is its perplexity."""
        columns = tuple("perplexity" if c == "accuracy" and "perplexity" in record else c for c in COLUMNS)
        return columns + ((DP_COLUMN,) if self.dp else ())

    def table(self) -> Table:
        """All rows so far as a rich table."""
        table = Table(*self.columns, title="fedpeft run")
        for row in self.rows:
            table.add_row(*row)
        return table
