"""Aggregation residual against λ for lora-fair and lora-fair-ab, on real client factors.

What is run
-----------
In one process (no Flower): the bundled model and data, a Dirichlet α = 0.1 split over ``--clients``
sites; every site trains one round (``--max-local-steps``) from the same seeded initial adapter,
exactly as :func:`fedpeft.client_round.train_client_round` does in a federated run. For ``--rounds`` > 1
the next round starts from the fedit aggregate, so the factors include the drift of A that builds
up over rounds. On the last round's client factors every rule is applied, and the printed numbers are the
mean over LoRA layers of ‖ΔW − B'A'‖_F / ‖ΔW‖_F (ΔW = Σ p_k B_k A_k) and of the same for the
*update*: the same residual over ‖ΔW − B_0A_0‖ (B_0A_0 the broadcast product), what the round adds.

Running it::

    python bench/fair_lambda.py                # 10 clients, 2 rounds of 10 local steps
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-local-steps", type=int, default=10)
    parser.add_argument("--lambdas", default="1e-6,1e-4,1e-2,1e-1,1,10,100")
    args = parser.parse_args()

    import torch

    from fedpeft.adapters import adapter_state, load_adapter_state
    from fedpeft.client_round import train_client_round
    from fedpeft.config import FedPeftConfig
    from fedpeft.data.sources import load_split
    from fedpeft.site import Sites
    from strategies import AGGREGATORS, AggregationOptions
    from strategies.aggregator import lora_layers, normalised
    from strategies.residual import residual_traces

    torch.set_num_threads(2)
    cfg = FedPeftConfig(partition="dirichlet:0.1", clients=args.clients, max_local_steps=args.max_local_steps)
    label_names = load_split(cfg)[0].label_names
    sites = Sites()  # the simulated sites as the ClientApp builds them, sharing one model
    shared = sites.model(cfg, len(label_names))
    model, state = shared.model, dict(shared.initial)
    for rnd in range(1, args.rounds + 1):
        states, weights = [], []
        for pid in range(cfg.clients):
            site = sites.site(cfg, {"partition-id": pid, "num-partitions": cfg.clients}, label_names=label_names)
            load_adapter_state(model, state)
            train_client_round(cfg, model, site.data, server_round=rnd, partition_id=pid, features=site.features)
            states.append(adapter_state(model))
            weights.append(len(site.data))
        if rnd < args.rounds:
            state, _ = AGGREGATORS.get("fedit")(states, weights, previous=state)
    p = normalised(weights)
    pairs, _ = lora_layers(state.keys())
    # float64 for the residuals: the update's norm is a small difference of large Gram traces
    states = [{k: v.astype(np.float64) for k, v in s.items()} for s in states]
    state = {k: v.astype(np.float64) for k, v in state.items()}

    def residuals(name: str, lam: float) -> tuple[float, float]:
        out, _ = AGGREGATORS.get(name)(states, weights, previous=state, options=AggregationOptions(lam=lam))
        full, update = [], []
        for a_key, b_key in pairs:
            As, Bs = [s[a_key] for s in states], [s[b_key] for s in states]
            A0, B0 = state[a_key], state[b_key]
            ideal, cross, ours = residual_traces(As, Bs, p, out[a_key], out[b_key])
            absolute = np.sqrt(max(ideal - 2 * cross + ours, 0.0))
            full.append(absolute / np.sqrt(ideal))
            # what the round adds: ‖ΔW − B_0A_0‖ (B_0A_0 stacked as one more client of weight 1)
            added = residual_traces([*As, A0], [*Bs, -B0], np.append(p, 1.0), A0, np.zeros_like(B0))[0]
            update.append(absolute / np.sqrt(added) if added > 0 else 0.0)
        return float(np.mean(full)), float(np.mean(update))

    print(f"{cfg.clients} clients, Dirichlet 0.1, round {args.rounds}, <= {args.max_local_steps} local steps")
    print(f"{'rule':<16}{'lambda':>10}{'residual (product)':>20}{'residual (update)':>20}")
    for name in ("fedit", "exact-svd"):
        print(f"{name:<16}{'-':>10}" + "".join(f"{v:>20.4f}" for v in residuals(name, 0.0)))
    for lam in (float(x) for x in args.lambdas.split(",")):
        for name in ("lora-fair", "lora-fair-ridge", "lora-fair-ab"):
            print(f"{name:<16}{lam:>10g}" + "".join(f"{v:>20.4f}" for v in residuals(name, lam)))


if __name__ == "__main__":
    main()
