"""Seconds and peak memory of every aggregation strategy on 100 clients × a 7B-shaped LoRA adapter.

What is measured
----------------
The adapter is shaped like LoRA r=16 on q, k, v, o of a 32-layer model with d = n = 4096 (Llama-2-7B):
128 layer pairs, 16.8 M parameters (67 MB in float32) per client, 6.7 GB for 100 clients — more
than the 2 GB target, so the clients' states are *lazy*: a mapping that generates a tensor
(seeded by client and key) only when the aggregator asks for it, as a server streaming replies
from disk or the network would. The driver (:func:`strategies.aggregator.aggregate`) asks layer by
layer, so only one layer of every client (100 × 1 MB) is alive at a time.

Every strategy runs in its own subprocess (so ``ru_maxrss`` is its own peak) and prints the wall
time of one whole aggregation, including the aggregation-bias metric (Gram traces). A further
subprocess (``generate``) only generates and touches every tensor in the same order; its time is
what data generation costs inside the others, and ``aggregate s`` = total − that. ``CPU s`` is the
worker's process time over the same span (data generation included): on a shared machine it is the
fairer figure.

``--server-opts`` also times each named server optimizer's step on one aggregate of that shape (the
broadcast and a new global adapter, both materialised; the second of two steps, when the moments
exist) and prints it beside fedit's aggregation: the share of the round a server optimizer adds.

Running it::

    python bench/aggregation.py                       # 100 clients, 7B shape, every strategy
    python bench/aggregation.py --clients 20 --layers 4   # quicker
    python bench/aggregation.py --strategies fedit --server-opts avgm,adagrad,adam,yogi
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

# bench/strategies.py would shadow the `strategies` package: drop this folder from the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: strategies/, fedpeft/

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
AGGREGATORS_RUN = ("fedit", "lora-fair", "lora-fair-ridge", "lora-fair-ab", "ffa-lora", "rolora", "exact-svd")


def keys(layers: int) -> list[str]:
    out = []
    for layer in range(layers):
        for proj in PROJECTIONS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            out += [f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"]
    return out


class LazyClient(Mapping[str, np.ndarray]):
    """One client's LoRA state, generated per tensor on access (float32, seeded by client and key)."""

    def __init__(self, client: int, names: list[str], *, dim: int, rank: int) -> None:
        self.client, self.names, self.dim, self.rank = client, names, dim, rank
        self.index = {name: i for i, name in enumerate(names)}

    def __getitem__(self, key: str) -> np.ndarray:
        rng = np.random.default_rng([self.client, self.index[key]])
        if key.endswith("lora_A.weight"):
            return (rng.random((self.rank, self.dim), dtype=np.float32) - 0.5) * np.float32(0.03)
        return (rng.random((self.dim, self.rank), dtype=np.float32) - 0.5) * np.float32(0.01)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def server_opt_worker(name: str, args: argparse.Namespace) -> dict:
    """Seconds of one server-optimizer step on an aggregate of the bench's shape (its second step)."""
    from strategies.server_opt import SERVER_OPTIMIZERS, ServerOptSettings, server_step

    names = keys(args.layers)
    previous = dict(LazyClient(args.clients, names, dim=args.dim, rank=args.rank))
    new = dict(LazyClient(args.clients + 1, names, dim=args.dim, rank=args.rank))
    opt, settings = SERVER_OPTIMIZERS.get(name), ServerOptSettings(lr=0.1)
    _, moments, _ = server_step(opt, previous, new, {}, settings=settings)
    started, cpu_started = time.perf_counter(), time.process_time()
    server_step(opt, previous, new, moments, settings=settings)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"strategy": f"server-opt {name}", "seconds": seconds, "cpu_seconds": cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker(name: str, args: argparse.Namespace) -> dict:
    if name.startswith("server-opt:"):
        return server_opt_worker(name.split(":", 1)[1], args)
    from strategies import AGGREGATORS, AggregationOptions
    from strategies.aggregator import lora_layers

    names = keys(args.layers)
    previous = dict(LazyClient(args.clients, names, dim=args.dim, rank=args.rank))  # the broadcast
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rule = None if name == "generate" else AGGREGATORS.get(name).for_round(1)  # rolora: its B round
    frozen = () if rule is None else rule.fixed
    client_names = [k for k in names if not any(c in k.split(".") for c in frozen)]
    clients = [LazyClient(k, client_names, dim=args.dim, rank=args.rank) for k in range(args.clients)]
    weights = np.random.default_rng(0).integers(50, 500, size=args.clients).astype(float)
    started, cpu_started = time.perf_counter(), time.process_time()
    metrics: dict = {}
    if name == "generate":
        pairs, _ = lora_layers(previous.keys())
        for a_key, b_key in pairs:
            for c in clients:
                if a_key in c:
                    float(c[a_key].sum())
                float(c[b_key].sum())
    else:
        _, metrics = rule(clients, weights, previous=previous, options=AggregationOptions())
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"strategy": name, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak,
            "rss_before_mb": rss_before, **metrics}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--layers", type=int, default=32, help="transformer layers (4 LoRA pairs each)")
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--strategies", default="fedit,lora-fair,lora-fair-ridge,lora-fair-ab,ffa-lora,rolora,exact-svd"
    )
    parser.add_argument("--server-opts", default="", help="server optimizers whose step to time, e.g. adam,yogi")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    common = ["--clients", str(args.clients), "--layers", str(args.layers), "--dim", str(args.dim),
              "--rank", str(args.rank)]  # fmt: skip
    results = []
    opts = [f"server-opt:{o}" for o in args.server_opts.split(",") if o]
    for name in ["generate", *args.strategies.split(","), *opts]:
        proc = subprocess.run([sys.executable, __file__, "--worker", name, *common], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    gen = results[0]["seconds"]
    per_client_mb = args.layers * len(PROJECTIONS) * 2 * args.dim * args.rank * 4 / 2**20
    pairs = args.layers * len(PROJECTIONS)
    print(f"{args.clients} clients × {pairs} LoRA pairs (d = n = {args.dim}, r = {args.rank}): "
          f"{per_client_mb:.0f} MB per client, {per_client_mb * args.clients / 1024:.1f} GB in all")  # fmt: skip
    print(f"{'strategy':<16}{'total s':>9}{'aggregate s':>13}{'CPU s':>8}{'peak RSS MB':>13}{'residual mean':>15}"
          f"{'max':>8}")  # fmt: skip
    rounds = {r["strategy"]: r["seconds"] - gen for r in results if r["strategy"] in AGGREGATORS_RUN}
    for r in results:
        if r["strategy"].startswith("server-opt"):
            base = rounds.get("fedit")
            share = f" ({100 * r['seconds'] / base:.2f} % of fedit's aggregation)" if base else ""
            print(f"{r['strategy']:<16}{r['seconds']:>9.2f}{'':>13}{r['cpu_seconds']:>8.2f}{r['peak_rss_mb']:>13.0f}"
                  f"{share}")
            continue
        agg = r["seconds"] - gen if r["strategy"] != "generate" else float("nan")
        res = r.get("agg_residual_mean", float("nan"))
        print(f"{r['strategy']:<16}{r['seconds']:>9.1f}{agg:>13.1f}{r['cpu_seconds']:>8.1f}"
              f"{r['peak_rss_mb']:>13.0f}{res:>15.4f}"
              f"{r.get('agg_residual_max', float('nan')):>8.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
