"""How much wall time Flower + Ray add to a federated run, compared with the same work done bare.

What is measured
----------------
Two whole subprocesses are timed from outside (``time.perf_counter`` around ``subprocess.run``), so
Python start-up, imports, model loading and data tokenization count on both sides:

* **federated**: ``python -m fedpeft.cli.main simulate ... --out <fresh dir>``, i.e. ``fedpeft
  simulate`` (the console script's own code, run with this interpreter so that a pyenv/venv shim's
  start-up is not charged to Flower): Flower's simulation engine on Ray, a ServerApp running
  :func:`server.run.run_federation` and ``cfg.clients`` simulated ClientApps.
* **bare**: ``python bench/overhead.py --bare-worker ...`` (:func:`run_bare`): the same computation in
  one process, with neither Flower nor Ray imported. It loads the model once (a
  :class:`fedpeft.site.Sites` holder, as the client process keeps one, shared by every site), evaluates
  the initial adapter (round 0), then per round samples the same sites with
  :func:`strategies.sampling.sample_sites`, and for each sampled site (in site-key order) loads the
  global adapter, runs :func:`fedpeft.client_round.train_client_round` (the very function the client
  calls, seed ``derive_seed(seed, round, partition)``, the site's own head-feature cache), collects the
  adapter state and ``len(partition)`` as its weight, aggregates with the configured registered
  aggregator (``strategies.AGGREGATORS``), and evaluates the new global adapter on the test split. At
  the end it saves the adapter with ``save_pretrained`` as the federated run does.

The bare side deliberately includes the server-side evaluations (round 0 and after every round) and
the final save: they are work the federated run does too, and they are not federation overhead.
With them on both sides, ``federated / bare`` isolates what federation adds: Ray start-up and actor
processes, Flower's message routing, serialization of adapters and configs, node discovery, the
strategy's bookkeeping and aggregation, plus a second copy of the model (server and client processes
each load one).

Both sides compute the same numbers, so their final test accuracies must agree (they are identical
when the thread counts match); the table reports both and their difference as a correctness check
of the comparison.

The order alternates per repeat (bare→federated, then federated→bare, ...) to reduce the effect
of drift (page cache, thermal state). The reported figure is the median ratio.

Running it
----------
From the repository root::

    python bench/overhead.py                        # the README's default run, once
    python bench/overhead.py --repeats 3            # three pairs, median ratio
    python bench/overhead.py --clients 2 --rounds 2 --max-local-steps 5   # a quick check

Options default to :class:`fedpeft.config.FedPeftConfig`'s defaults. ``--out DIR`` keeps the run
directories (one fresh sub-directory per measurement); without it they go to a temporary directory
that is removed at the end. This script is a benchmark, not a test: it prints results and asserts
nothing about the ratio (the target is <= 1.10).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULT_TAG = "OVERHEAD-BARE-RESULT "

# FedPeftConfig fields exposed as options (and forwarded to both sides).
KNOBS = (
    "clients",
    "rounds",
    "fraction",
    "max_local_steps",
    "batch_size",
    "seed",
    "local_epochs",
    "lr",
    "partition",
    "client_cpus",
)

# bench/strategies.py would shadow the `strategies` package: drop this folder from the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


# --------------------------------------------------------------------------------------------------
# bare: the federated computation in one process, without Flower or Ray
# --------------------------------------------------------------------------------------------------
def run_bare(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Do exactly what ``fedpeft simulate`` computes, in this process; return accuracies and timings."""
    t0 = time.perf_counter()
    import torch

    from fedpeft.adapters import adapter_state, load_adapter_state
    from fedpeft.client_round import train_client_round
    from fedpeft.data.sources import load_split
    from fedpeft.site import Sites
    from fedpeft.tasks import TASKS
    from fedpeft.training import evaluate
    from strategies import AGGREGATORS, AggregationOptions
    from strategies.sampling import sample_sites

    aggregator = AGGREGATORS.get(cfg.strategy)
    if aggregator.frozen:
        raise SystemExit(f"bare mode does not implement frozen factors ({cfg.strategy!r})")
    options = AggregationOptions(lam=cfg.fair_lambda, ab_iterations=cfg.fair_iterations, seed=cfg.seed)
    torch.set_num_threads(cfg.client_cpus)  # as client/local.py does

    # --- server set-up (server/run.py) -------------------------------------------------------------
    train, test_rows = load_split(cfg)
    label_names = list(train.label_names)
    holder = Sites()  # the client process's sites (client/sites.py), one model shared by all
    shared = holder.model(cfg, len(label_names))
    model = shared.model
    state = adapter_state(model)  # the seeded initial adapter
    test = TASKS.get(cfg.task).encode(shared.tokenizer, test_rows, max_length=cfg.max_length)  # server/evaluation.py
    sites = {f"partition-{pid:05d}": pid for pid in range(cfg.clients)}  # site keys (fedpeft.site.node_identity)
    t_setup = time.perf_counter() - t0

    train_s = eval_s = 0.0
    records: list[dict[str, Any]] = []

    def record_round(rnd: int) -> None:
        nonlocal eval_s
        t = time.perf_counter()
        load_adapter_state(model, state)
        ev = evaluate(model, test, batch_size=cfg.eval_batch_size)
        eval_s += time.perf_counter() - t
        records.append({"round": rnd, "accuracy": ev["accuracy"], "loss": ev["loss"]})

    record_round(0)
    for rnd in range(1, cfg.rounds + 1):
        chosen = sample_sites(list(sites), cfg.fraction, seed=cfg.seed, server_round=rnd)  # sorted
        t = time.perf_counter()
        states, weights = [], []
        for key in chosen:  # the strategy aggregates replies in site-key order
            pid = sites[key]
            node = {"partition-id": pid, "num-partitions": cfg.clients}
            site = holder.site(cfg, node, label_names=label_names)  # tokenized on first use, then held
            load_adapter_state(model, state)  # the broadcast global adapter
            train_client_round(cfg, model, site.data, server_round=rnd, partition_id=pid, features=site.features)
            states.append(adapter_state(model))
            weights.append(float(len(site.data)))  # the client's num-examples
        state, _ = aggregator(states, weights, previous=state, options=options)
        train_s += time.perf_counter() - t
        record_round(rnd)

    # the final save (server/run.py: save_adapter), so both sides write the adapter
    load_adapter_state(model, state)
    model.save_pretrained(str(run_dir / "adapter"))
    with open(run_dir / "metrics.jsonl", "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)

    return {
        "accuracies": [r["accuracy"] for r in records],
        "final_accuracy": records[-1]["accuracy"],
        "setup_s": t_setup,
        "train_s": train_s,
        "eval_s": eval_s,
        "flower_imported": "flwr" in sys.modules,
        "ray_imported": "ray" in sys.modules,
    }


def bare_worker(args: argparse.Namespace) -> int:
    from fedpeft.config import FedPeftConfig

    cfg = FedPeftConfig(**{k: getattr(args, k) for k in KNOBS})
    run_dir = Path(args.worker_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result = run_bare(cfg, run_dir)
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------------------------------
# driver: time both sides as subprocesses
# --------------------------------------------------------------------------------------------------
def _knob_flags(args: argparse.Namespace) -> list[str]:
    flags: list[str] = []
    for name in KNOBS:
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # what server/simulate.py sets for the federated side; the same for the bare side
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _run_timed(cmd: list[str], what: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.stderr.write(
            f"\n{what} run failed with exit status {proc.returncode}\n$ {' '.join(cmd)}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}\n"
        )
        raise SystemExit(1)
    return seconds, proc


def measure_bare(args: argparse.Namespace, run_dir: Path) -> tuple[float, dict[str, Any]]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--bare-worker",
        "--worker-dir",
        str(run_dir),
        *_knob_flags(args),
    ]
    seconds, proc = _run_timed(cmd, "bare")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if not lines:
        sys.stderr.write(
            f"bare run printed no result line\n--- stdout ---\n{proc.stdout[-6000:]}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}\n"
        )
        raise SystemExit(1)
    return seconds, json.loads(lines[-1][len(RESULT_TAG) :])


def measure_federated(args: argparse.Namespace, run_dir: Path) -> tuple[float, dict[str, Any]]:
    cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", *_knob_flags(args), "--out", str(run_dir)]
    seconds, proc = _run_timed(cmd, "federated")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        sys.stderr.write(
            f"federated run wrote no {metrics}\n--- stdout ---\n{proc.stdout[-6000:]}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}\n"
        )
        raise SystemExit(1)
    records = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    if len(records) != args.rounds + 1:
        sys.stderr.write(f"federated run logged {len(records)} rounds, expected {args.rounds + 1}\n")
        raise SystemExit(1)
    return seconds, {"accuracies": [r["accuracy"] for r in records], "final_accuracy": records[-1]["accuracy"]}


def build_parser() -> argparse.ArgumentParser:
    from fedpeft.config import FedPeftConfig, field_help

    parser = argparse.ArgumentParser(
        description="Wall time of `fedpeft simulate` divided by the same computation run bare in one process."
    )
    defaults, helps = FedPeftConfig(), field_help()
    for name in KNOBS:
        default = getattr(defaults, name)
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=type(default),
            default=default,
            help=f"{helps[name]} (default: {default!r})",
        )
    parser.add_argument("--repeats", type=int, default=1, help="measurement pairs (default: 1)")
    parser.add_argument(
        "--out", default="", help="keep run directories under DIR (default: a temporary directory, removed at the end)"
    )
    parser.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-dir", default="", help=argparse.SUPPRESS)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if args.bare_worker:
        return bare_worker(args)
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    from fedpeft.config import FedPeftConfig

    FedPeftConfig(**{k: getattr(args, k) for k in KNOBS})  # fail fast on invalid settings

    if args.out:
        root = Path(args.out)
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="fedpeft-overhead-"))
    settings = ", ".join(f"{k.replace('_', '-')}={getattr(args, k)}" for k in KNOBS)
    print(
        f"overhead: {settings}; {args.repeats} repeat(s); {os.cpu_count()} CPUs; python {sys.version.split()[0]}",
        flush=True,
    )
    rows: list[tuple[int, float, float, str]] = []
    bare_res: dict[str, Any] = {}
    fed_res: dict[str, Any] = {}
    try:
        for rep in range(1, args.repeats + 1):
            order = ("bare", "federated") if rep % 2 == 1 else ("federated", "bare")
            times: dict[str, float] = {}
            for side in order:
                run_dir = Path(tempfile.mkdtemp(dir=root, prefix=f"{side}-r{rep}-"))
                if side == "bare":
                    times[side], bare_res = measure_bare(args, run_dir)
                else:
                    times[side], fed_res = measure_federated(args, run_dir)
                print(f"  repeat {rep}: {side:<9} {times[side]:8.2f} s", flush=True)
            rows.append((rep, times["bare"], times["federated"], " -> ".join(order)))
            if bare_res["accuracies"] != fed_res["accuracies"]:
                diff = max(abs(a - b) for a, b in zip(bare_res["accuracies"], fed_res["accuracies"], strict=True))
                print(f"  repeat {rep}: per-round accuracies differ (max |diff| {diff:.6f})", flush=True)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"{'repeat':>6}  {'bare s':>9}  {'federated s':>11}  {'ratio':>6}  order")
    ratios = []
    for rep, bare_s, fed_s, order in rows:
        ratios.append(fed_s / bare_s)
        print(f"{rep:>6}  {bare_s:>9.2f}  {fed_s:>11.2f}  {fed_s / bare_s:>6.3f}  {order}")
    median = statistics.median(ratios)
    print(f"median ratio federated/bare: {median:.3f} (target <= 1.10: {'met' if median <= 1.10 else 'NOT met'})")
    print(
        f"bare in-process breakdown (last repeat): setup {bare_res['setup_s']:.2f} s, "
        f"training+aggregation {bare_res['train_s']:.2f} s, evaluation {bare_res['eval_s']:.2f} s; "
        f"flwr imported: {bare_res['flower_imported']}, ray imported: {bare_res['ray_imported']}"
    )
    fa, ba = fed_res["final_accuracy"], bare_res["final_accuracy"]
    print(f"final accuracy: federated {fa:.6f}, bare {ba:.6f}, difference {fa - ba:+.6f}")
    print("per-round accuracy federated: " + " ".join(f"{a:.4f}" for a in fed_res["accuracies"]))
    print("per-round accuracy bare:      " + " ".join(f"{a:.4f}" for a in bare_res["accuracies"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
