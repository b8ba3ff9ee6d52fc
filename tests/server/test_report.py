"""``fedpeft report``: figures and report.md from a small recorded run (tests/data/recorded_run: 3 sites,
4 rounds, local DP, resumed once after a crash), and the console's machine and quiet outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedpeft.cli.main import main
from fedpeft.errors import FedPeftError
from server.console import JsonLines, Quiet, make_reporter, summary_table
from server.report import load_run, write_report

RECORDED = Path(__file__).parents[1] / "data" / "recorded_run"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    return Path(shutil.copytree(RECORDED, tmp_path / "run"))


def assert_real_png(path: Path) -> None:
    """A valid PNG of a drawn figure: right signature, decodes, sizeable, and not one flat colour."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 600
    rgb = pixels[..., :3].reshape(-1, 3)
    assert float(rgb.std()) > 0.05  # lines and text, not a blank canvas
    assert len(np.unique((rgb * 255).astype(np.uint8), axis=0)) > 20  # several colours were drawn
    assert path.stat().st_size > 10_000


def test_report_draws_every_figure_and_embeds_it(run: Path) -> None:
    report = write_report(run)
    text = report.read_text()
    for name in ("quality", "traffic", "residual", "epsilon"):
        assert_real_png(run / "report" / f"{name}.png")
        assert f"](report/{name}.png)" in text
    for heading in ("## Results", "## Communication", "## Aggregation", "## Reliability", "## Privacy",
                    "## Configuration"):
        assert heading in text
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert f"| final | 4 | {metrics[-1]['accuracy']:.4f} | {metrics[-1]['loss']:.4f} |" in text
    assert "4 of 4 rounds, finished" in text
    assert "| partition-00000 | 4 | 1 | 7.9967 | 1e-05 | 8 |" in text  # trained twice in round 3, then refused
    assert "Client-rounds: 10 accepted, 2 refused." in text and "budget: this round would spend" in text
    assert "| `strategy` | `'ffa-lora'` | `'fedit'` |" in text
    assert not list(run.glob("report/.*"))  # no temporary files left


def test_a_run_without_dp_or_residual_has_neither_figure(run: Path) -> None:
    write_report(run)  # an earlier report's figures must not linger
    (run / "privacy_ledger.jsonl").unlink()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "dp": "off"}))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if not k.startswith("agg_")})
                                               + "\n" for r in rows[:3]))
    text = write_report(run).read_text()
    assert "## Privacy" not in text and "## Aggregation" not in text
    assert not (run / "report" / "epsilon.png").exists() and not (run / "report" / "residual.png").exists()
    assert "2 of 4 rounds, not finished (resume it with --resume)" in text
    assert_real_png(run / "report" / "quality.png")


def test_damaged_or_missing_runs_are_one_line_errors(run: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 5, "accu')
    with pytest.raises(FedPeftError, match="metrics.jsonl line 6 is not JSON"):
        load_run(run)
    for path, expected in ((tmp_path / "none", "run directory not found"), (tmp_path, "holds no run")):
        assert main(["report", str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0]


def test_report_command(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run)]) == 0
    assert f"report written to {run / 'report.md'}" in capsys.readouterr().out


def test_json_output_is_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    with make_reporter("json", 2, dp=False) as reporter:
        assert isinstance(reporter, JsonLines)
        reporter({"round": 0, "accuracy": 0.5, "loss": 0.7}, 1.23456)
        reporter({"round": 1, "accuracy": 0.6, "loss": 0.6}, 2.0)
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(x) for x in lines] == [
        {"event": "round", "round": 0, "accuracy": 0.5, "loss": 0.7, "seconds": 1.235},
        {"event": "round", "round": 1, "accuracy": 0.6, "loss": 0.6, "seconds": 2.0},
    ]
    with make_reporter("quiet", 2, dp=False) as quiet:
        assert isinstance(quiet, Quiet)
        quiet({"round": 0, "accuracy": 0.5, "loss": 0.7}, 1.0)
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="output must be one of table, json, quiet"):
        make_reporter("xml", 2, dp=False)


def test_summary_names_the_results_and_files(run: Path) -> None:
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(summary_table(run))
    text = console.export_text()
    assert "4 of 4" in text and "2 refused" in text and "epsilon 7.997 at delta 1e-05" in text
    assert str(run / "report.md") in text and str(run / "adapter") in text


def test_quiet_and_json_exclude_each_other() -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--quiet", "--json"])
    assert exit_info.value.code == 2


def test_an_empirical_audit_is_reported_and_shown(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    members = [bool(x) for x in rng.random(40) < 0.5]
    audit = {"epsilon": 1.234, "confidence": 0.95, "delta": 1e-5, "canaries": 40, "guesses": 20, "correct": 18,
             "guesses_in": 10, "guesses_out": 10, "accountant_epsilon": 0.5, "violation": True,
             "scores": [0.1 if m else 2.0 for m in members], "members": members}
    (run / "empirical_audit.json").write_text(json.dumps(audit))
    text = write_report(run).read_text()
    assert "**epsilon >= 1.234** at 95% confidence" in text and "**VIOLATION**: above the accountant's 0.500" in text
    assert_real_png(run / "report" / "canaries.png")
    assert main(["audit", str(run), "--empirical"]) == 1  # a bound above the claim fails the audit
    out = capsys.readouterr().out
    assert "empirical epsilon >= 1.234" in out and "VIOLATION" in out
    (run / "empirical_audit.json").unlink()
    assert main(["audit", str(run), "--empirical"]) == 2
    assert "run with --canaries M" in capsys.readouterr().err


def test_where_the_sites_time_went_is_the_median_of_their_accepted_rounds(run: Path) -> None:
    assert "Where the sites' time went" not in write_report(run).read_text()  # a run without timings
    rows = [json.loads(x) for x in (run / "traffic.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row |= {"seconds_load": 0.01 * (i + 1), "seconds_train": 10.0 + i}
        if row["site"] == "partition-00000":  # a deployed site with a worker says more
            row |= {"seconds_wait": 0.5}
    rows[0]["status"] = "failed"  # not an accepted round: left out
    (run / "traffic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(run).read_text()
    section = text.split("## Where the sites' time went", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert table[0] == "| site | client-rounds | waiting for the worker | loading | training |"
    accepted = {s: [(i, r) for i, r in enumerate(rows) if r["site"] == s and r["status"] == "accepted"]
                for s in sorted({r["site"] for r in rows})}
    for line, (site, mine) in zip(table[1:], accepted.items(), strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:2] == [site, str(len(mine))]
        assert cells[4] == f"{float(np.median([10.0 + i for i, _ in mine])):.2f}"
        assert cells[2] == ("0.50" if site == "partition-00000" else "")
