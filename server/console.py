"""What a person watching a run sees: a progress bar over rounds and a row per round."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

COLUMNS = ("round", "clients", "train loss", "test loss", "accuracy", "agg bias", "bytes up", "bytes down", "seconds")
WIDTHS = (5, 7, 10, 9, 8, 8, 10, 10, 7)
DP_COLUMN, DP_WIDTH = "eps max", 8  # shown only in DP runs: the largest epsilon any site has spent


def format_row(cells: tuple[str, ...]) -> str:
    """Cells right-aligned in the table's fixed widths (plus the DP column when there is one)."""
    widths = WIDTHS + (DP_WIDTH,) * (len(cells) - len(WIDTHS))
    return "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


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
            f"{record['accuracy']:.4f}",
            f"{record['agg_residual_mean']:.4f}" if "agg_residual_mean" in record else "-",
            human_bytes(record.get("bytes_up", 0)),
            human_bytes(record.get("bytes_down", 0)),
            f"{seconds:.1f}",
        )
        if self.dp:
            row += (f"{record['epsilon_max']:.3f}" if "epsilon_max" in record else "-",)
        self.rows.append(row)
        if len(self.rows) == 1:
            header = COLUMNS + ((DP_COLUMN,) if self.dp else ())
            self.progress.console.print(format_row(header), style="bold", highlight=False)
        self.progress.console.print(format_row(row), highlight=False)
        self.progress.update(self.task, completed=record["round"])  # a resumed run starts part-way

    def table(self) -> Table:
        """All rows so far as a rich table."""
        table = Table(*(COLUMNS + ((DP_COLUMN,) if self.dp else ())), title="fedpeft run")
        for row in self.rows:
            table.add_row(*row)
        return table
