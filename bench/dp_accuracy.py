"""Final accuracy of ``fedpeft simulate --dp`` (the preset) at several ε, against the non-DP main job,
over several seeds.

    python bench/dp_accuracy.py                              # docs/privacy.md's table: ε 8, 3, 1 and no DP, seeds 0-2
    python bench/dp_accuracy.py --epsilons 8 --seeds 0 --no-baseline --extra "--probe-rounds 5"
    python bench/dp_accuracy.py --epsilons 8 --out-root runs/bench-dp-airline \
        --common "--data bench/data/airline_tweets.jsonl --partition natural:airline"   # the second dataset

Every run is a real ``fedpeft simulate`` on the default data and model, in its own process, one after
the other (two at once would fight over the cores). The DP runs are ``--dp --dp-epsilon E --seed S``
(δ 1e-5, the preset's) plus ``--extra``; the baseline is the main job, ``fedpeft simulate --seed S``.
``--common`` goes to every run, the baseline included (another data set and its partition).
The seed changes the split, the partition and the initial head; DP runs also draw fresh noise. Prints
one row per run and a summary (mean ± half-range over seeds, ratio to the baseline's mean) and writes
the rows to ``--out-root/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import time
from pathlib import Path

from simulation import simulate


def run(out: Path, flags: list[str]) -> dict:
    records, seconds = simulate(out, flags)
    return {
        "final_accuracy": records[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in records),
        "epsilon_max": records[-1].get("epsilon_max"),
        "seconds": round(seconds, 1),
    }


def summary(rows: list[dict]) -> None:
    settings: dict[str, list[dict]] = {}
    for r in rows:
        settings.setdefault(r["setting"], []).append(r)
    base = settings.get("no DP (main job)")
    base_mean = statistics.mean(r["final_accuracy"] for r in base) if base else None
    print(f"\n{'setting':24} {'seeds':>5} {'final accuracy':>17} {'min':>7} {'max':>7} {'÷ no DP':>8} "
          f"{'eps spent':>9} {'seconds':>8}")
    for name, group in settings.items():
        accs = [r["final_accuracy"] for r in group]
        mean, half = statistics.mean(accs), (max(accs) - min(accs)) / 2
        ratio = f"{mean / base_mean:8.3f}" if base_mean else f"{'-':>8}"
        spent = [r["epsilon_max"] for r in group if r["epsilon_max"] is not None]
        print(f"{name:24} {len(group):5d} {mean:9.4f} ± {half:.4f} {min(accs):7.4f} {max(accs):7.4f} {ratio} "
              f"{max(spent) if spent else float('nan'):9.3f} {statistics.mean(r['seconds'] for r in group):8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="8,3,1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--extra", default="", help="more flags for every DP run, e.g. '--probe-rounds 5'")
    parser.add_argument("--common", default="", help="flags for every run, the baseline included, e.g. '--data F'")
    parser.add_argument("--out-root", default="runs/bench-dp-accuracy")
    parser.add_argument("--no-baseline", action="store_true", help="skip the runs without DP")
    args = parser.parse_args()
    root = Path(args.out_root)
    root.mkdir(parents=True, exist_ok=True)
    extra, common = shlex.split(args.extra), shlex.split(args.common)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    settings = [] if args.no_baseline else [("no DP (main job)", None, [*common])]
    settings += [(f"--dp, epsilon {e}", float(e), [*common, "--dp", "--dp-epsilon", e, *extra])
                 for e in args.epsilons.split(",") if e]
    rows = []
    for name, eps, flags in settings:
        for seed in seeds:
            out = root / f"{'nodp' if eps is None else f'eps{eps:g}'}-s{seed}-{int(time.time())}"
            row = {"setting": name, "epsilon": eps, "seed": seed, "flags": flags, **run(out, [*flags, "--seed",
                                                                                              str(seed)])}
            rows.append(row)
            with open(root / "results.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    summary(rows)


if __name__ == "__main__":
    main()
