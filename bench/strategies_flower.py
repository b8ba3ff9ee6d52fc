"""Accuracy per round of every aggregation strategy under a strongly non-IID split, through real Flower runs.

The fast in-process benchmark that separates the rules is ``bench/strategies.py``; this one runs the
real simulation. (Until issue 24, ``lora-fair`` meant today's ``lora-fair-ridge``.)

What is run
-----------
For each seed and each strategy, one whole ``fedpeft simulate`` subprocess (the real Flower + Ray
simulation) on the bundled data and model, with the same settings for every strategy: Dirichlet
α = 0.1 label skew over ``--clients`` sites (most sites hold nearly one class), every site trained
every round (``--fraction 1``), ``--rounds`` rounds of at most ``--max-local-steps`` local steps. The
seed changes the data split, the partition, the initial adapter and the local batch order.
``--extra name:key=value,...`` adds variants (e.g. ``lora-fair-ab:fair-lambda=1``) run on the first
seed only.

What is printed
---------------
Per strategy and round: test accuracy mean ± half-range over seeds, then the final accuracy and the
mean aggregation residual (``agg_residual_mean``, averaged over rounds). ``--json FILE`` writes every
run's ``metrics.jsonl`` records and the summary.

Running it (about 3–4 minutes per run on 2 cores)::

    python bench/strategies_flower.py                            # 5 strategies × 3 seeds
    python bench/strategies_flower.py --strategies fedit,exact-svd --seeds 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STRATEGIES = "fedit,lora-fair,lora-fair-ab,ffa-lora,exact-svd"


def run_one(out: Path, strategy: str, seed: int, args: argparse.Namespace, extra: dict[str, str]) -> list[dict]:
    metrics = out / "metrics.jsonl"
    if metrics.exists() and (out / "adapter").is_dir():  # finished earlier: reuse (resumable)
        return [json.loads(line) for line in metrics.read_text().splitlines()]
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [
        sys.executable, "-m", "fedpeft.cli.main", "simulate",
        "--strategy", strategy, "--seed", str(seed), "--partition", f"dirichlet:{args.alpha}",
        "--clients", str(args.clients), "--fraction", "1", "--rounds", str(args.rounds),
        "--max-local-steps", str(args.max_local_steps), "--out", str(out),
    ]  # fmt: skip
    for key, value in extra.items():
        cmd += [f"--{key}", value]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"  {strategy} {extra or ''} seed {seed}: final accuracy {records[-1]['accuracy']:.4f} "
          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    return records


def parse_variant(spec: str) -> tuple[str, str, dict[str, str]]:
    """``"lora-fair-ab:fair-lambda=1"`` → (label, strategy, {"fair-lambda": "1"})."""
    strategy, _, params = spec.partition(":")
    extra = dict(p.split("=", 1) for p in params.split(",") if p)
    return spec, strategy, extra


def summarise(runs: dict[str, list[list[dict]]], rounds: int) -> list[dict]:
    rows = []
    for label, per_seed in runs.items():
        acc = np.array([[r["accuracy"] for r in recs] for recs in per_seed])  # seeds × (rounds+1)
        res = [np.mean([r.get("agg_residual_mean", 0.0) for r in recs[1:]]) for recs in per_seed]
        rows.append(
            {
                "strategy": label,
                "seeds": len(per_seed),
                "accuracy_mean": acc.mean(0).round(4).tolist(),
                "accuracy_halfrange": ((acc.max(0) - acc.min(0)) / 2).round(4).tolist(),
                "final_mean": float(acc[:, -1].mean()),
                "final_min": float(acc[:, -1].min()),
                "final_max": float(acc[:, -1].max()),
                "residual_mean": float(np.mean(res)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategies", default=STRATEGIES)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--extra", default="", help="semicolon-separated variants run on the first seed")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-local-steps", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("runs/bench-strategies"),
        help="run directories; finished runs found here are reused",
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [(s, s, {}) for s in args.strategies.split(",") if s]
    extras = [parse_variant(v) for v in args.extra.split(";") if v]

    runs: dict[str, list[list[dict]]] = {}
    tag = f"a{args.alpha}-c{args.clients}-r{args.rounds}-m{args.max_local_steps}"
    for seed in seeds:
        for label, strategy, extra in variants + (extras if seed == seeds[0] else []):
            out = args.work / f"{tag}-{label.replace(':', '_').replace('=', '-')}-s{seed}"
            runs.setdefault(label, []).append(run_one(out, strategy, seed, args, extra))
    rows = summarise(runs, args.rounds)

    print(f"\nDirichlet alpha={args.alpha}, {args.clients} clients (all each round), {args.rounds} rounds, "
          f"<= {args.max_local_steps} local steps; seeds {seeds}")  # fmt: skip
    header = "strategy".ljust(34) + "".join(f"r{r:<13}" for r in range(args.rounds + 1)) + "residual"
    print(header)
    for row in rows:
        pairs = zip(row["accuracy_mean"], row["accuracy_halfrange"], strict=True)
        cells = "".join(f"{m:.3f}±{h:.3f}".ljust(14) for m, h in pairs)
        print(f"{row['strategy']:<34}{cells}{row['residual_mean']:.4f}")
    if args.json:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"settings": settings, "summary": rows,
                                         "runs": runs}, indent=1) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
