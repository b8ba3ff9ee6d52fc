"""``fedpeft report RUN_DIR``: figures and a ``report.md`` for a run, from its records alone.

Reads ``config.json``, ``metrics.jsonl``, ``traffic.jsonl`` and (with DP) ``privacy_ledger.jsonl``;
writes ``RUN_DIR/report/*.png`` (:mod:`server.plots`) and ``RUN_DIR/report.md``, which embeds them with
the configuration, the final metrics, and the communication, reliability and privacy summaries. The
server writes it at the end of every run; the command redraws it for any run, finished or not.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.runlog import atomic_write_text
from privacy.empirical import RESULT_FILE as EMPIRICAL_FILE
from server import plots

REPORT_FILE = "report.md"
FIGURE_DIR = "report"


@dataclass(frozen=True)
class RunRecords:
    """What a run directory holds, parsed."""

    run_dir: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    traffic: list[dict[str, Any]]
    ledger: list[dict[str, Any]]  # the entries (signed content) of the privacy ledger, in order


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise FedPeftError(f"{path} line {number} is not JSON; the file is damaged") from None
        if not isinstance(row, dict):
            raise FedPeftError(f"{path} line {number} is not a JSON object; the file is damaged")
        rows.append(row)
    return rows


def load_run(run_dir: str | Path) -> RunRecords:
    """The records of the run in ``run_dir``.

    Raises
    ------
    FedPeftError
        No run there (no ``config.json`` or no round in ``metrics.jsonl``), or a damaged file.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedPeftError(f"run directory not found: {run_dir}")
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedPeftError(f"{run_dir} holds no run (config.json missing)") from None
    except (OSError, ValueError) as err:
        raise FedPeftError(f"{run_dir / 'config.json'} is unreadable ({err})") from None
    metrics = _jsonl(run_dir / "metrics.jsonl")
    if not metrics:
        raise FedPeftError(f"{run_dir} holds no completed round yet (metrics.jsonl is empty or missing)")
    ledger = [line.get("entry", {}) for line in _jsonl(run_dir / "privacy_ledger.jsonl")]
    return RunRecords(run_dir, config, metrics, _jsonl(run_dir / "traffic.jsonl"), ledger)


def empirical_audit(run_dir: Path) -> dict[str, Any] | None:
    """``empirical_audit.json`` of a run with canaries, or None."""
    path = run_dir / EMPIRICAL_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise FedPeftError(f"{path} is damaged") from None


def write_report(run_dir: str | Path) -> Path:
    """Draw the figures and write ``report.md`` (atomically); return its path."""
    run = load_run(run_dir)
    figures = run.run_dir / FIGURE_DIR
    audit = empirical_audit(run.run_dir)
    drawn = {
        "quality": plots.plot_quality(run.metrics, figures / "quality.png"),
        "traffic": plots.plot_traffic(run.metrics, figures / "traffic.png"),
        "residual": plots.plot_residual(run.metrics, figures / "residual.png"),
        "epsilon": plots.plot_epsilon(run.ledger, figures / "epsilon.png"),
        "canaries": None if audit is None else plots.plot_canary_roc(
            audit["scores"], audit["members"], figures / "canaries.png",
            title=f"canary membership from the final model's loss — epsilon >= {audit['epsilon']:.2f}"),
    }
    for name, path in drawn.items():  # a figure the run no longer has must not linger from an earlier draw
        if path is None:
            (figures / f"{name}.png").unlink(missing_ok=True)
    text = render(run, {k: v.relative_to(run.run_dir).as_posix() for k, v in drawn.items() if v is not None})
    out = run.run_dir / REPORT_FILE
    atomic_write_text(out, text)
    return out


# --- report.md -------------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def best_record(metrics: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The round with the best held-out quality: highest accuracy, or lowest perplexity (a causal LM)."""
    if "perplexity" in metrics[0]:
        return min(metrics, key=lambda r: r["perplexity"])
    return max(metrics, key=lambda r: r["accuracy"])


def _results(metrics: Sequence[Mapping[str, Any]]) -> str:
    rows = [("start", metrics[0]), ("final", metrics[-1]), ("best", best_record(metrics))]
    if "perplexity" in metrics[0]:
        return _table(["", "round", "test perplexity", "test loss", "next-token accuracy"],
                      [[name, r["round"], f"{r['perplexity']:.3f}", f"{r['loss']:.4f}", f"{r['accuracy']:.4f}"]
                       for name, r in rows])
    return _table(["", "round", "test accuracy", "test loss"],
                  [[name, r["round"], f"{r['accuracy']:.4f}", f"{r['loss']:.4f}"] for name, r in rows])


def render(run: RunRecords, figures: Mapping[str, str]) -> str:
    """The text of ``report.md``."""
    cfg, metrics = run.config, run.metrics
    last, rounds = metrics[-1], [r for r in metrics if r["round"] > 0]
    status = "finished" if last["round"] >= int(cfg.get("rounds", 0)) else "not finished (resume it with --resume)"
    out = [
        f"# fedpeft run `{cfg.get('run_id', '?')}`",
        "",
        f"{last['round']} of {cfg.get('rounds')} rounds, {status}. {cfg.get('clients')} clients, "
        f"{cfg.get('fraction')} sampled per round; {cfg.get('peft')} with `{cfg.get('strategy')}`; "
        f"codec up `{cfg.get('codec')}`{'' if cfg.get('error_feedback', True) else ' without error feedback'}, "
        f"down `{cfg.get('downlink_codec')}`{' (each change)' if cfg.get('downlink_delta') else ''}; "
        f"DP `{cfg.get('dp')}`.",
        "",
        "## Results",
        "",
        _results(metrics),
        "",
        f"![accuracy and loss per round]({figures['quality']})",
        "",
        "## Communication",
        "",
    ]
    up = [r["bytes_up_per_client"] for r in rounds if r.get("bytes_up_per_client")]
    down = [r["bytes_down_per_client"] for r in rounds if r.get("bytes_down_per_client")]
    ratio_up = [r["compression_ratio"] for r in rounds if r.get("compression_ratio")]
    ratio_down = [r["compression_ratio_down"] for r in rounds if r.get("compression_ratio_down")]
    errors = [r["codec_error"] for r in rounds if "codec_error" in r]
    out += [
        _table(["", "up (site → server)", "down (server → site)"], [
            ["total", human_bytes(sum(r.get("bytes_up", 0) for r in rounds)),
             human_bytes(sum(r.get("bytes_down", 0) for r in rounds))],
            ["mean per client-round", human_bytes(_mean(up)), human_bytes(_mean(down))],
            ["compression ratio (raw fp32 / wire)", f"{_mean(ratio_up):.2f}", f"{_mean(ratio_down):.2f}"],
        ]),
        "",
        f"Raw adapter size {human_bytes(last.get('adapter_bytes', 0))}."
        + (f" Mean relative codec error {_mean(errors):.3g}." if errors and cfg.get("codec") != "none" else ""),
        "",
        f"![bytes per round]({figures['traffic']})",
        "",
    ]
    if "residual" in figures:
        res = [r["agg_residual_mean"] for r in rounds if "agg_residual_mean" in r]
        out += ["## Aggregation", "",
                f"Residual of `{cfg.get('strategy')}` (how far the new global factors are from the exact "
                f"average of the clients' products): mean {_mean(res):.4g}, last {res[-1]:.4g}.", "",
                f"![aggregation residual per round]({figures['residual']})", ""]
    out += _reliability(run)
    out += _site_time(run)
    if cfg.get("dp", "off") != "off":
        out += _privacy(run, figures.get("epsilon"))
    audit = empirical_audit(run.run_dir)
    if audit is not None:
        claim = audit.get("accountant_epsilon")
        verdict = ("no DP claim to compare with" if claim is None else
                   f"**VIOLATION**: above the accountant's {claim:.3f}" if audit["violation"] else
                   f"within the accountant's {claim:.3f}")
        out += ["## Empirical privacy audit", "",
                f"{audit['canaries']} canaries (random texts, random labels), each trained on with probability "
                f"1/2; {audit['correct']} of {audit['guesses']} membership guesses right (loss below / above "
                f"the rest). One-run lower bound (Steinke, Nasr & Jagielski 2023): **epsilon >= "
                f"{audit['epsilon']:.3f}** at {100 * audit['confidence']:.0f}% confidence, delta "
                f"{audit['delta']:g} — {verdict}.", "",
                f"![canary ROC]({figures['canaries']})", ""]
    out += _configuration(cfg)
    return "\n".join(out) + "\n"


def _reliability(run: RunRecords) -> list[str]:
    rounds = [r for r in run.metrics if r["round"] > 0]
    statuses = Counter(t.get("status", "?") for t in run.traffic)
    skipped = [str(r["round"]) for r in rounds if r.get("skipped")]
    reasons = Counter(t["reason"] for t in run.traffic if t.get("reason") and t.get("status") != "accepted")
    lines = ["## Reliability", "",
             "Client-rounds: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())) + "."
             + (f" Skipped rounds: {', '.join(skipped)}." if skipped else " No round was skipped."), ""]
    if reasons:
        lines += [_table(["reason (traffic.jsonl)", "client-rounds"],
                         [[reason.replace("|", "/")[:160], n] for reason, n in reasons.most_common(10)]), ""]
    return lines


SITE_SECONDS = (("seconds_wait", "waiting for the worker"), ("seconds_load", "loading"), ("seconds_train", "training"))


def _site_time(run: RunRecords) -> list[str]:
    """Per site, the median seconds of its accepted client-rounds by phase (traffic.jsonl's ``seconds_*``)."""
    by_site: dict[str, list[dict[str, Any]]] = {}
    for row in run.traffic:
        if row.get("status") == "accepted" and any(key in row for key, _ in SITE_SECONDS):
            by_site.setdefault(str(row.get("site")), []).append(row)
    if not by_site:
        return []
    keys = [(key, name) for key, name in SITE_SECONDS if any(key in r for rows in by_site.values() for r in rows)]
    table = [[site, len(rows), *(f"{statistics.median(float(r[k]) for r in rows if k in r):.2f}"
                                 if any(k in r for r in rows) else "" for k, _ in keys)]
             for site, rows in sorted(by_site.items())]
    return ["## Where the sites' time went", "",
            "Median seconds per accepted client-round (`seconds_*` in traffic.jsonl); a deployed site with a "
            "site worker also reports its wait and Flower's per-message process.", "",
            _table(["site", "client-rounds", *(name for _, name in keys)], table), ""]


def _privacy(run: RunRecords, figure: str | None) -> list[str]:
    last: dict[str, dict[str, Any]] = {}
    trained, refused = Counter(), Counter()
    for e in run.ledger:
        site = str(e.get("site"))
        last[site] = e
        trained[site] += e.get("status") in ("trained", "released")
        refused[site] += e.get("status") == "refused"
    lines = ["## Privacy", ""]
    if not last:
        return lines + ["No privacy ledger entries yet.", ""]
    rows = [[site, trained[site], refused[site], f"{float(e['epsilon']):.4f}", f"{float(e['delta']):g}",
             "none" if e.get("budget") is None else f"{float(e['budget']):g}"] for site, e in sorted(last.items())]
    head = run.metrics[-1].get("ledger_head", "")
    lines += [
        f"Mechanism: `{run.config.get('dp')}` DP. Epsilon as each site claims in its signed ledger entries "
        f"({len(run.ledger)} entries; head `{head[:16]}`). Verify with `fedpeft audit {run.run_dir}`.",
        "",
        _table(["site", "rounds trained", "rounds refused", "epsilon spent", "delta", "budget"], rows),
        "",
    ]
    if figure:
        lines += [f"![epsilon per site and round]({figure})", ""]
    return lines


def _configuration(cfg: Mapping[str, Any]) -> list[str]:
    defaults = FedPeftConfig().to_dict()
    changed = [[f"`{k}`", f"`{v!r}`", f"`{defaults[k]!r}`"] for k, v in sorted(cfg.items())
               if k in defaults and v != defaults[k]]
    return ["## Configuration", "",
            "Settings that differ from the defaults (all of them are in `config.json`):", "",
            _table(["setting", "this run", "default"], changed) if changed else "(none)", ""]
