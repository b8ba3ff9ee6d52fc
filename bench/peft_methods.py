"""LoRA vs SSF on the default data and model at equal rounds: trainable parameters, bytes per round, accuracy.

    python bench/peft_methods.py                      # docs/ssf.md's table (about 20 minutes, 2 cores)
    python bench/peft_methods.py --seeds 0,1
    python bench/peft_methods.py --methods "lora=;ssf=--peft ssf --lr 0.01"

Every run is a real ``fedpeft simulate`` with the default settings (the README's main job: MiniLM,
10 clients, 5 of them per round, 5 rounds) plus the method's flags and ``--seed S``, in its own
process, one after the other. Trainable parameters are the adapter's tensors (what travels: the
method's own tensors + the 770-entry head); bytes are what the server measured on the wire per
client-round. Prints one row per run and writes them to ``--out-root/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from simulation import simulate

# name=flags; LoRA at the defaults (r 8 on query/value, lr 1e-3), SSF after every Linear and LayerNorm
# at the same lr and at a higher one (SSF's γ is multiplicative: one step moves a feature by ~lr)
DEFAULT_METHODS = "lora=;ssf=--peft ssf;ssf lr 3e-3=--peft ssf --lr 0.003;ssf lr 1e-2=--peft ssf --lr 0.01"


def run(out: Path, flags: list[str]) -> dict:
    records, seconds = simulate(out, flags)
    rounds = records[1:]
    return {
        "trainable_params": records[0]["adapter_bytes"] // 4,
        "bytes_up_per_client": round(sum(r["bytes_up_per_client"] for r in rounds) / len(rounds)),
        "bytes_down_per_client": round(sum(r["bytes_down_per_client"] for r in rounds) / len(rounds)),
        "final_accuracy": rounds[-1]["accuracy"],
        "final_loss": rounds[-1]["loss"],
        "accuracy_by_round": [round(r["accuracy"], 4) for r in records],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS, help="semicolon-separated name=flags")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out-root", default="runs/bench-peft")
    args = parser.parse_args()
    root = Path(args.out_root)
    root.mkdir(parents=True, exist_ok=True)
    methods = [tuple(m.split("=", 1)) for m in args.methods.split(";") if m]
    rows = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for name, flags in methods:
            out = root / f"{name.replace(' ', '_')}-seed{seed}-{int(time.time())}"
            row = {"method": name, "seed": seed, **run(out, [*shlex.split(flags), "--seed", str(seed)])}
            rows.append(row)
            with open(root / "results.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(f"\n{'method':14} {'seed':>4} {'trainable':>9} {'B up/client':>11} {'B down/client':>13} {'final acc':>9} "
          f"{'loss':>6} {'seconds':>7}")
    for r in rows:
        print(f"{r['method']:14} {r['seed']:>4} {r['trainable_params']:>9} {r['bytes_up_per_client']:>11} "
              f"{r['bytes_down_per_client']:>13} {r['final_accuracy']:9.4f} {r['final_loss']:6.3f} {r['seconds']:7.0f}")


if __name__ == "__main__":
    main()
