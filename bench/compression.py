"""Bytes on the wire and final accuracy per update codec, against ``none``, on the default data and model.

    python bench/compression.py                                  # docs/compression.md's table (about 50 min, 2 cores)
    python bench/compression.py --codecs none,topk:0.1+int8 --seeds 0,1
    python bench/compression.py --extra "--downlink-codec int8"
    python bench/compression.py --decode --codecs int4,topk:0.3+int4,ternary,compeft:0.25   # 7B-shaped timing

Every run is a real ``fedpeft simulate`` with the default settings (the README's main job) plus
``--codec C --seed S``, in its own process, one after the other (two at once would fight over the
cores). Bytes are what the server measured on the wire: the serialized reply of each client-round
(``bytes_up_per_client``), and the ratio of the update's raw fp32 bytes to them
(``compression_ratio``, framing included). The accuracy loss is against ``none`` at the same seed.
Prints one row per run and writes them to ``--out-root/results.jsonl``.

``--decode`` runs no federation: it encodes one update shaped like LoRA r 16 on q, k, v, o of a 32-layer
d 4096 model (Llama-2-7B, as ``bench/aggregation.py``) with each codec through the product's wire format,
and times one site's encode and the server's decode of 100 such payloads, with the payload's size as
Flower serialises it and its ratio to the fp32 tensors.
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


def decode_bench(codecs: list[str], *, sites: int = 100, layers: int = 32, dim: int = 4096, rank: int = 16) -> None:
    """One 7B-shaped update per codec: encode seconds (one site), decode seconds (``sites`` payloads), bytes."""
    import sys

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flwr.app import RecordDict

    from fedpeft.codecs import parse_codec
    from fedpeft.wire import decode_payload, payload_records, raw_nbytes, record_nbytes

    rng = np.random.default_rng(0)
    update = {}
    for layer in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            update[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.01, (rank, dim)).astype(np.float32)
            update[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.01, (dim, rank)).astype(np.float32)
    shapes = {k: v.shape for k, v in update.items()}
    raw = raw_nbytes(shapes)
    print(f"{'codec':16} {'bytes':>11} {'ratio':>6} {'encode s':>8} {f'decode x{sites} s':>14}")
    for spec in codecs:
        codec = parse_codec(spec)
        started = time.perf_counter()
        content = RecordDict(payload_records(codec, {k: codec.encode(v) for k, v in update.items()}, shapes))
        encoded = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(sites):
            decode_payload(content, shapes)
        decoded = time.perf_counter() - started
        size = record_nbytes(content)
        print(f"{spec:16} {size:>11} {raw / size:>6.2f} {encoded:>8.2f} {decoded:>14.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", default=DEFAULT_CODECS, help="comma-separated codec specs; none is the baseline")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--extra", default="", help="more flags for every run, e.g. '--downlink-codec int8'")
    parser.add_argument("--out-root", default="runs/bench-compression")
    parser.add_argument("--skip-none", action="store_true", help="do not add the none baseline (no loss column)")
    parser.add_argument("--decode", action="store_true", help="time encode and decode of a 7B-shaped update instead")
    args = parser.parse_args()
    if args.decode:
        return decode_bench([c for c in args.codecs.split(",") if c])
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
