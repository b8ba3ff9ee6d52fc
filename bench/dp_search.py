"""The search behind the ``--dp`` preset: federated DP-SGD on the classification head alone, on the
frozen encoder's features, for many settings at once (seconds per setting instead of minutes).

    python bench/dp_search.py --epsilons 8 --seeds 0,1     # docs/privacy.md's search rows
    python bench/dp_search.py --epsilons 8 --seeds 0 --grid quick   # mean pooling vs the [CLS] pooler

This is the probe rounds of ``fedpeft simulate --dp`` without Flower: the same features
(:func:`fedpeft.probe.head_inputs` of the same model, data split and partition), the same DP-SGD code
(:func:`privacy.dpsgd.dp_train_local` on :class:`fedpeft.probe.HeadProbe`, Poisson sampling, per-example
clipping, noise, empty batches as noise-only steps), σ calibrated per site by the same accountant over
the whole planned run, and FedAvg of the heads weighted by examples, every site every round. What it
cannot show is the adapter: rows with adapter rounds need real runs (``bench/dp_accuracy.py --extra``).
Prints one row per setting: mean ± half-range of the final test accuracy over seeds, and the seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.config import FedPeftConfig  # noqa: E402
from fedpeft.data.sources import load_split  # noqa: E402
from fedpeft.probe import HeadProbe, head_inputs, head_module, probe_plan  # noqa: E402
from fedpeft.site import Sites  # noqa: E402
from fedpeft.tasks import TASKS  # noqa: E402
from fedpeft.training import HeadInputs  # noqa: E402
from privacy.accounting import noise_for_budget  # noqa: E402
from privacy.dpsgd import DPSGD, dp_train_local, poisson_plan  # noqa: E402

GRIDS = {
    # (pooling, batch (0: full), steps per round, lr, clip norm)
    "quick": [("mean", 256, 20, 0.1, 1.0), ("cls", 256, 20, 0.1, 1.0)],
    "preset": [("mean", 256, 20, 0.1, 1.0)],
    "readme": [
        ("mean", 64, 5, 0.1, 1.0),
        ("mean", 256, 5, 0.1, 1.0),
        ("mean", 256, 20, 0.03, 1.0),
        ("mean", 256, 20, 0.3, 1.0),
        ("mean", 256, 20, 0.1, 0.3),
        ("mean", 0, 20, 0.1, 1.0),
    ],
}


def features(cfg: FedPeftConfig, clients: int, cache: Path | None = None) -> tuple[list[HeadInputs], HeadInputs, dict]:
    """Every site's head inputs and the test split's, from the run's own model and partition (kept in
    ``cache/<pooling>.pt`` when given: the encoder pass is most of the time)."""
    file = cache / f"{cfg.pooling}-{clients}.pt" if cache else None
    if file is not None and file.exists():
        return torch.load(file, weights_only=False)
    train, test_rows = load_split(cfg)
    holder = Sites()  # the simulated sites as the ClientApp builds them, sharing one model
    shared = holder.model(cfg, len(train.label_names))
    model = shared.model
    sites = [head_inputs(model, holder.site(cfg, {"partition-id": pid, "num-partitions": clients},
                                            label_names=train.label_names).data, batch_size=64)
             for pid in range(clients)]
    # the test split tokenized as the coordinator's evaluator (server.evaluation) does it
    test = head_inputs(model, TASKS.get(cfg.task).encode(shared.tokenizer, test_rows, max_length=cfg.max_length),
                       batch_size=64)
    head = head_module(model)
    result = sites, test, {k: v.detach().clone() for k, v in head.state_dict().items()}
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(result, file)
    return result


def federated_probe(sites: list[HeadInputs], test: HeadInputs, init: dict, *, epsilon: float | None, rounds: int,
                    batch: int, steps: int, lr: float, clip: float, seed: int) -> float:
    """Final test accuracy of ``rounds`` rounds of DP (or plain, ``epsilon`` None) head training at every site."""
    width, classes = init["weight"].shape[1], init["weight"].shape[0]
    global_state = {k: v.clone() for k, v in init.items()}
    plans = [probe_plan(len(s), batch_size=batch, steps=steps) for s in sites]
    sigmas = []
    for s, plan in zip(sites, plans, strict=True):
        q, n = poisson_plan(len(s), batch_size=plan["batch_size"], epochs=plan["epochs"], max_steps=plan["max_steps"])
        sigmas.append(0.0 if epsilon is None else noise_for_budget(epsilon_budget=epsilon, delta=1e-5,
                                                                   sample_rate=q, steps=n * rounds, accountant="prv"))
    torch.manual_seed(seed)
    for rnd in range(rounds):
        total = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for pid, (s, plan, sigma) in enumerate(zip(sites, plans, sigmas, strict=True)):
            head = torch.nn.Linear(width, classes)
            head.load_state_dict(global_state)
            probe = HeadProbe(head)
            if epsilon is None:
                from fedpeft.training import train_local

                train_local(probe, s, **plan, lr=lr, weight_decay=0.0, seed=seed * 1000 + rnd * 100 + pid)
            else:
                dp_train_local(probe, s, dp=DPSGD(sigma, clip), **plan, lr=lr, weight_decay=0.0,
                               generator_seed=seed * 1000 + rnd * 100 + pid)
            for k, v in head.state_dict().items():
                total[k] += v * len(s)
        global_state = {k: v / sum(len(s) for s in sites) for k, v in total.items()}
    head = torch.nn.Linear(width, classes)
    head.load_state_dict(global_state)
    with torch.no_grad():
        predictions = head(test.features).argmax(-1).numpy()
    return float((predictions == test.labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="8,3,1", help="comma-separated; 'none' for no DP")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--grid", default="readme", choices=sorted(GRIDS))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this JSONL file")
    parser.add_argument("--cache", type=Path, help="keep the features here between invocations")
    args = parser.parse_args()
    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    epsilons = [None if e == "none" else float(e) for e in args.epsilons.split(",")]
    cache: dict[str, tuple] = {}
    print(f"{'pooling':7} {'batch':>5} {'steps':>5} {'lr':>5} {'C':>4} {'eps':>5}  accuracy (mean ± half-range)  "
          "seconds")
    for (pooling, batch, steps, lr, clip), eps in itertools.product(GRIDS[args.grid], epsilons):
        if pooling not in cache:
            cache[pooling] = features(dataclasses.replace(FedPeftConfig(), pooling=pooling), args.clients, args.cache)
        sites, test, init = cache[pooling]
        start = time.monotonic()
        accs = [federated_probe(sites, test, init, epsilon=eps, rounds=args.rounds, batch=batch, steps=steps, lr=lr,
                                clip=clip, seed=seed) for seed in seeds]
        seconds = (time.monotonic() - start) / len(seeds)
        row = {"pooling": pooling, "batch": batch or "full", "steps": steps, "lr": lr, "clip": clip, "epsilon": eps,
               "accuracy": accs, "mean": float(np.mean(accs)), "half_range": float(np.ptp(accs) / 2),
               "seconds_per_seed": round(seconds, 1)}
        print(f"{pooling:7} {str(row['batch']):>5} {steps:5d} {lr:5g} {clip:4g} {str(eps):>5}  "
              f"{row['mean']:.4f} ± {row['half_range']:.4f}  {seconds:7.1f}", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
