"""Bytes on the wire and final accuracy per update codec, against ``none``, on the default data and model.

    python bench/compression.py                                  # docs/compression.md's table (about 50 min, 2 cores)
    python bench/compression.py --codecs none,topk:0.1+int8 --seeds 0,1
    python bench/compression.py --extra "--downlink-codec int8"

Every run is a real ``fedpeft simulate`` with the default settings (the README's main job) plus
``--codec C --seed S``, in its own process, one after the other (two at once would fight over the
cores). Bytes are what the server measured on the wire: the serialized reply of each client-round
(``bytes_up_per_client``), and the ratio of the update's raw fp32 bytes to them
(``compression_ratio``, framing included). The accuracy loss is against ``none`` at the same seed.
Prints one row per run and writes them to ``--out-root/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from simulation import simulate

DEFAULT_CODECS = "none,fp16,int8,int4,topk:0.1,topk:0.5+int4,topk:0.25+int8,topk:0.3+int4,topk:0.1+int8,ternary"


def run(out: Path, flags: list[str]) -> dict:
    records, seconds = simulate(out, flags)
    rounds = records[1:]
    mean = lambda key: sum(r[key] for r in rounds) / len(rounds)  # noqa: E731
    return {
        "bytes_up_per_client": round(mean("bytes_up_per_client")),
        "bytes_down_per_client": round(mean("bytes_down_per_client")),
        "compression_ratio": round(mean("compression_ratio"), 2),
        "compression_ratio_down": round(mean("compression_ratio_down"), 2),
        "codec_error": round(mean("codec_error"), 3) if all("codec_error" in r for r in rounds) else None,
        "final_accuracy": rounds[-1]["accuracy"],
        "accuracy_by_round": [round(r["accuracy"], 4) for r in rounds],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", default=DEFAULT_CODECS, help="comma-separated codec specs; none is the baseline")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--extra", default="", help="more flags for every run, e.g. '--downlink-codec int8'")
    parser.add_argument("--out-root", default="runs/bench-compression")
    parser.add_argument("--skip-none", action="store_true", help="do not add the none baseline (no loss column)")
    args = parser.parse_args()
    root = Path(args.out_root)
    root.mkdir(parents=True, exist_ok=True)
    codecs = [c for c in args.codecs.split(",") if c]
    if "none" not in codecs and not args.skip_none:
        codecs.insert(0, "none")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        for codec in codecs:
            name = f"{codec.replace(':', '_').replace('+', '-')}-seed{seed}-{int(time.time())}"
            row = {"codec": codec, "seed": seed, **run(root / name, ["--codec", codec, "--seed", str(seed),
                                                                       *shlex.split(args.extra)])}
            rows.append(row)
            with open(root / "results.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    base = {r["seed"]: r["final_accuracy"] for r in rows if r["codec"] == "none"}
    print(f"\n{'codec':16} {'seed':>4} {'B up/client':>11} {'ratio':>6} {'B down/client':>13} {'final acc':>9} "
          f"{'loss (pt)':>9} {'seconds':>7}")
    for r in rows:
        loss = f"{100 * (base[r['seed']] - r['final_accuracy']):9.2f}" if r["seed"] in base else " " * 8 + "-"
        print(f"{r['codec']:16} {r['seed']:>4} {r['bytes_up_per_client']:>11} {r['compression_ratio']:>6.2f} "
              f"{r['bytes_down_per_client']:>13} {r['final_accuracy']:9.4f} {loss} {r['seconds']:7.0f}")


if __name__ == "__main__":
    main()
