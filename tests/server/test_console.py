"""The console's round rows: fixed widths, and an epsilon column only in DP runs."""

from __future__ import annotations

import io

from rich.console import Console

from server.console import RoundReporter, human_bytes


def rows(dp: bool, records: list[dict]) -> list[str]:
    out = io.StringIO()
    reporter = RoundReporter(2, Console(file=out, width=200, color_system=None), dp=dp)
    with reporter:
        for record in records:
            reporter(record, 1.25)
    return [line for line in out.getvalue().splitlines() if line.strip()]


RECORDS = [{"round": 0, "loss": 0.69, "accuracy": 0.5},
           {"round": 1, "loss": 0.6, "accuracy": 0.7, "train_loss": 0.65, "clients": 3, "bytes_up": 3072,
            "epsilon_max": 2.5, "agg_residual_mean": 0.1}]


def test_dp_runs_show_the_largest_epsilon() -> None:
    header, first, second = rows(True, RECORDS)
    assert header.split()[-2:] == ["eps", "max"]
    assert first.split()[-1] == "-" and second.split()[-1] == "2.500"
    assert len(header) == len(first) == len(second)


def test_runs_without_dp_have_no_epsilon_column() -> None:
    header, _, second = rows(False, RECORDS)
    assert "eps" not in header and second.split()[-1] == "1.2"


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (12, 1536, 3 * 1024**2)] == ["12 B", "1.5 KiB", "3.0 MiB"]
