"""Which aggregation rule wins where: a fast in-process federated LoRA simulation that separates them.

What is run
-----------
No Flower, no transformer: one frozen layer with LoRA and a numpy SGD loop, so a whole federation
takes about a second and the grid can cover the regimes where aggregation bias is said to matter
(many clients, strong skew, several local epochs, few rounds, low rank). The aggregation itself is
the product's: every rule is called from :data:`strategies.AGGREGATORS` exactly as the server does.

* Task: 10-class Gaussian mixture in n = 64 dimensions (class means of norm ``--separation`` in a
  random 16-dim subspace, unit noise). Balanced test set of 2,000 examples: majority class = 10 %.
* Model: logits = H · tanh(W0 x + (B A) x); W0 (d × n, d = 64) and the read-out H (10 × d) are
  frozen and random, so the LoRA factors are the only thing trained and aggregated (no averaged head
  to hide the difference between rules). A is drawn like PEFT's (Kaiming-uniform), B = 0, shared
  by every client (one seed), as in fedpeft.
* Federation: ``--clients`` sites of ``--per-client`` examples, all sites every round, ``--rounds``
  rounds of ``--epochs`` local epochs (batch 16, plain SGD at ``--lr``). Splits: ``dir0.1`` and
  ``dir0.01`` (each site draws its label mix from Dirichlet(α) over the 10 classes: at 0.01 nearly
  one class a site), and ``natural`` (each site has its own feature shift, a random offset of norm
  ``--shift``, and a mild label mix, Dirichlet(1); the test set mixes every site's shift).
* Rules: ``ffa-lora`` keeps A at the shared init and trains B only; ``rolora`` trains only B in odd
  rounds and only A in even ones (the other held); the others train both.
* Reference: the same model trained centrally on the union of the sites' data for rounds × epochs
  epochs at the same learning rate and batch size.

What is printed
---------------
Per split and rank, for every rule: final test accuracy mean ± half-range over seeds and per-seed
values, and per round (mean over seeds) the accuracy, the residual ‖ΔW − B'A'‖/‖ΔW‖, cos(ΔW, B'A')
and ‖B' − B̄‖/‖B̄‖ (the driver's ``agg_*_mean``); with the time each cell took. ``--json`` keeps it all.

Running it::

    nice -n 10 python bench/strategies.py                       # docs/strategies.md's grid
    nice -n 10 python bench/strategies.py --splits dir0.01 --ranks 4 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strategies import AGGREGATORS, AggregationOptions  # noqa: E402

RULES = "fedit,lora-fair,lora-fair-ridge,lora-fair-ab,exact-svd,ffa-lora,rolora"
A_KEY, B_KEY = "layer.lora_A.weight", "layer.lora_B.weight"
CLASSES, N_IN, D_HID, SUBSPACE, N_TEST, BATCH = 10, 64, 64, 16, 2000, 16


@dataclass(frozen=True)
class Federation:
    """One seed's data and frozen model: per-site training sets, a test set, W0, H and the LoRA init."""

    sites: list[tuple[np.ndarray, np.ndarray]]
    X_test: np.ndarray
    y_test: np.ndarray
    W0: np.ndarray
    H: np.ndarray
    A0: np.ndarray


def make_federation(split: str, rank: int, seed: int, args: argparse.Namespace) -> Federation:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(N_IN, SUBSPACE)))[0].T  # SUBSPACE × N_IN, orthonormal rows
    means = rng.normal(size=(CLASSES, SUBSPACE))
    means *= args.separation / np.linalg.norm(means, axis=1, keepdims=True)
    means = means @ basis
    natural = split == "natural"
    alpha = 1.0 if natural else float(split.removeprefix("dir"))
    shifts = rng.normal(size=(args.clients, N_IN)) * (args.shift / np.sqrt(N_IN)) if natural else None

    def draw(labels: np.ndarray, shift: np.ndarray | float) -> np.ndarray:
        return means[labels] + rng.normal(size=(len(labels), N_IN)) + shift

    sites = []
    for k in range(args.clients):
        mix = rng.dirichlet(np.full(CLASSES, alpha))
        labels = rng.choice(CLASSES, size=args.per_client, p=mix)
        sites.append((draw(labels, shifts[k] if natural else 0.0), labels))
    y_test = np.arange(N_TEST) % CLASSES
    test_shift = shifts[rng.integers(0, args.clients, size=N_TEST)] if natural else 0.0
    X_test = draw(y_test, test_shift)
    W0 = rng.normal(size=(D_HID, N_IN)) / np.sqrt(N_IN)
    H = rng.normal(size=(CLASSES, D_HID)) / np.sqrt(D_HID)
    bound = 1.0 / np.sqrt(N_IN)  # PEFT's kaiming_uniform_(a=√5) on a (rank × n) weight
    A0 = rng.uniform(-bound, bound, size=(rank, N_IN))
    return Federation(sites, X_test, y_test, W0, H, A0)


def accuracy(fed: Federation, A: np.ndarray, B: np.ndarray) -> float:
    logits = np.tanh(fed.X_test @ fed.W0.T + (fed.X_test @ A.T) @ B.T) @ fed.H.T
    return float((logits.argmax(1) == fed.y_test).mean())


def local_training(
    fed: Federation,
    X: np.ndarray,
    y: np.ndarray,
    A: np.ndarray,
    B: np.ndarray,
    *,
    train: str,
    epochs: int,
    lr: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """SGD on softmax cross-entropy; ``train`` is ``AB``, ``A`` or ``B`` (the factors that move)."""
    A, B = A.copy(), B.copy()
    onehot = np.eye(CLASSES)[y]
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), BATCH):
            idx = order[start : start + BATCH]
            Xb, Yb = X[idx], onehot[idx]
            U = Xb @ A.T
            h = np.tanh(Xb @ fed.W0.T + U @ B.T)
            logits = h @ fed.H.T
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            dz = ((p - Yb) / len(idx)) @ fed.H * (1.0 - h * h)
            if "A" in train:
                gA = (dz @ B).T @ Xb
            if "B" in train:
                B -= lr * (dz.T @ U)
            if "A" in train:
                A -= lr * gA
    return A, B


def run_federation(fed: Federation, rule: str, seed: int, args: argparse.Namespace) -> list[dict]:
    A, B = fed.A0.copy(), np.zeros((D_HID, fed.A0.shape[0]))
    weights = [len(y) for _, y in fed.sites]
    options = AggregationOptions(lam=args.fair_lambda, seed=seed)
    registered = AGGREGATORS.get(rule)
    records = [{"round": 0, "accuracy": accuracy(fed, A, B)}]
    for t in range(1, args.rounds + 1):
        agg = registered.for_round(t)
        fixed = agg.fixed
        train = "".join(f for f in "AB" if f"lora_{f}" not in fixed)
        states = []
        for k, (X, y) in enumerate(fed.sites):
            rng = np.random.default_rng([seed, t, k])
            A_k, B_k = local_training(fed, X, y, A, B, train=train, epochs=args.epochs, lr=args.lr, rng=rng)
            states.append({key: value for key, value in ((A_KEY, A_k), (B_KEY, B_k)) if key.split(".")[1] not in fixed})
        out, metrics = agg(states, weights, previous={A_KEY: A, B_KEY: B}, options=options)
        A, B = out[A_KEY], out[B_KEY]
        records.append({"round": t, "accuracy": accuracy(fed, A, B),
                        **{k.removeprefix("agg_").removesuffix("_mean"): v for k, v in metrics.items()
                           if k.endswith("_mean")}})  # fmt: skip
    return records


def central(fed: Federation, seed: int, args: argparse.Namespace) -> float:
    X = np.concatenate([X for X, _ in fed.sites])
    y = np.concatenate([y for _, y in fed.sites])
    A, B = local_training(fed, X, y, fed.A0, np.zeros((D_HID, fed.A0.shape[0])), train="AB",
                          epochs=args.rounds * args.epochs, lr=args.lr, rng=np.random.default_rng(seed))  # fmt: skip
    return accuracy(fed, A, B)


def spread(values: list[float]) -> str:
    return f"{np.mean(values):.3f}±{(max(values) - min(values)) / 2:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", default=RULES)
    parser.add_argument("--splits", default="dir0.1,dir0.01,natural")
    parser.add_argument("--ranks", default="2,4,8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--per-client", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--separation", type=float, default=3.0)
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument("--fair-lambda", type=float, default=1e-2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rules = [r for r in args.rules.split(",") if r]
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    print(f"{args.clients} clients x {args.per_client} examples, all every round, {args.rounds} rounds x "
          f"{args.epochs} local epochs, lr {args.lr}, seeds {seeds}; test majority class 0.100")  # fmt: skip
    for split in args.splits.split(","):
        for rank in (int(r) for r in args.ranks.split(",")):
            started = time.perf_counter()
            feds = {seed: make_federation(split, rank, seed, args) for seed in seeds}
            cell = {"split": split, "rank": rank, "central": [central(feds[s], s, args) for s in seeds], "rules": {}}
            for rule in rules:
                cell["rules"][rule] = [run_federation(feds[s], rule, s, args) for s in seeds]
            cell["seconds"] = time.perf_counter() - started
            results.append(cell)
            report(cell, args.rounds)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=1) + "\n")


def report(cell: dict, rounds: int) -> None:
    print(f"\n== {cell['split']}, rank {cell['rank']}: central {spread(cell['central'])} "
          f"({' / '.join(f'{a:.3f}' for a in cell['central'])}); cell took {cell['seconds']:.0f} s")  # fmt: skip
    print(f"{'rule':<16}{'final acc':<14}{'per seed':<22}" + "".join(f"r{t:<20}" for t in range(1, rounds + 1)))
    for rule, per_seed in cell["rules"].items():
        finals = [records[-1]["accuracy"] for records in per_seed]
        per_round = []
        for t in range(1, rounds + 1):
            acc = np.mean([records[t]["accuracy"] for records in per_seed])
            res = np.mean([records[t].get("residual", 0.0) for records in per_seed])
            cos = np.mean([records[t].get("cosine", 1.0) for records in per_seed])
            cor = np.mean([records[t].get("correction", 0.0) for records in per_seed])
            per_round.append(f"{acc:.2f} {res:.2f}/{cos:.3f}/{cor:.2f}".ljust(21))
        print(f"{rule:<16}{spread(finals):<14}{' / '.join(f'{a:.3f}' for a in finals):<22}" + "".join(per_round))
    print("(per round: mean accuracy, then residual / cosine / correction of B, means over seeds)")


if __name__ == "__main__":
    main()
