"""DP-SGD step time ÷ non-DP step time: same model, same adapter, same (expected) batch, one process.

    python bench/dp_step.py                    # all-MiniLM-L6-v2 + LoRA r=8 (the default run's model)
    python bench/dp_step.py --batch-size 64 --lora-r 1 --ffa   # the --dp regime's shape

For each mode — plain (fedpeft.training.train_local), DP hooks, DP ghost — it times a client-round of
``--long`` steps and one of ``--short`` steps, alternating modes within each repeat so that machine
noise hits all of them alike. The marginal cost of a step is (t_long − t_short) / (long − short): it
leaves out the once-per-round set-up (Opacus wrapping, optimizer creation), which the whole-round
ratio at ``--long`` steps shows separately. DP batches are Poisson-sampled with the plain run's batch
size as their expectation, so both see the same number of examples on average.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fedpeft.adapters import adapter_state, load_adapter_state  # noqa: E402
from fedpeft.client_round import frozen_parameters  # noqa: E402
from fedpeft.config import FedPeftConfig  # noqa: E402
from fedpeft.data.sources import load_split  # noqa: E402
from fedpeft.site import Sites  # noqa: E402
from fedpeft.training import train_local  # noqa: E402
from privacy.dpsgd import DPSGD, dp_train_local  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--long", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--ffa", action="store_true", help="freeze LoRA A, as ffa-lora (and the --dp regime) do")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    cfg = FedPeftConfig(lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r)
    labels = load_split(cfg)[0].label_names  # the default data's two
    first = Sites().site(cfg, {"partition-id": 0, "num-partitions": cfg.clients}, label_names=labels)  # as a client
    model, data = first.model.model, first.data
    init = adapter_state(model)
    settings = {"epochs": 100, "batch_size": args.batch_size, "lr": 1e-3, "weight_decay": 0.0}

    frozen = ("lora_A",) if args.ffa else ()

    def plain(steps: int) -> None:
        with frozen_parameters(model, frozen):
            train_local(model, data, max_steps=steps, seed=0, **settings)

    def private(mode: str):
        def run(steps: int) -> None:
            with frozen_parameters(model, frozen):
                dp_train_local(model, data, dp=DPSGD(1.0, 1.0, mode), max_steps=steps, generator_seed=0, **settings)

        return run

    modes = {"plain": plain, "dp-hooks": private("hooks"), "dp-ghost": private("ghost")}
    times: dict[str, dict[int, list[float]]] = {m: {args.short: [], args.long: []} for m in modes}
    for _ in range(args.repeats + 1):  # the first pass warms up and is dropped
        for steps in (args.short, args.long):
            for name, fn in modes.items():
                load_adapter_state(model, init)
                start = time.perf_counter()
                fn(steps)
                times[name][steps].append(time.perf_counter() - start)
    print(
        f"model all-MiniLM-L6-v2 + LoRA r={args.lora_r}{' (A frozen)' if args.ffa else ''}, "
        f"batch {args.batch_size}, {args.threads} threads, "
        f"{args.repeats} repeats (median)"
    )
    base_step = base_round = None
    print(f"{'mode':10} {'s/step':>8} {'÷ plain':>8} {'round s':>8} {'÷ plain':>8}")
    for name in modes:
        long_t = statistics.median(times[name][args.long][1:])
        short_t = statistics.median(times[name][args.short][1:])
        per_step = (long_t - short_t) / (args.long - args.short)
        if base_step is None:
            base_step, base_round = per_step, long_t
        print(f"{name:10} {per_step:8.3f} {per_step / base_step:8.2f} {long_t:8.2f} {long_t / base_round:8.2f}")


if __name__ == "__main__":
    main()
