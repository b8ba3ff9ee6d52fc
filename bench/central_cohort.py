"""User-level (central) DP-FedAvg with many small clients: the cohort size at which it keeps accuracy.

    python bench/central_cohort.py                                  # the README's table (about 2 minutes, 2 cores)
    python bench/central_cohort.py --partition dirichlet:0.5        # label-skewed clients
    python bench/central_cohort.py --tune                           # the non-DP grid the fixed settings came from

A fast in-process model of ``--dp central`` (DP-FedAvg, McMahan, Ramage, Talwar, Zhang, ICLR 2018,
arXiv 1710.06963, with client-side clipping): the default data's training split (the project's reader
and seeded hold-out, ``fedpeft.site.load_split``) is cut into N small clients (``--clients``, 1000 by
default, about 11 rows each; the project's ``partition_indices``). The model is tiny on purpose: a
linear classifier (weights and bias, 770 parameters) on frozen, mean-pooled, L2-normalised
all-MiniLM-L6-v2 sentence embeddings, computed once and cached under ``--out``.

Each round every client is sampled independently with probability q = m/N (Poisson; m is the
*expected* cohort). A sampled client takes ``--local-steps`` full-batch gradient steps from the global
head; its update is clipped to L2 norm C; the server sums the clipped updates, adds N(0, σ²C²) per
coordinate, divides by the fixed m (not by how many answered: the sensitivity stays C/m) and applies it
(server lr 1, optional server momentum). σ meets (ε, δ) over all T rounds by the project's RDP
accountant (``privacy.accounting.noise_for_budget``, sampling rate q, T steps): one user is one client.
Next to it, at the same m and seeds: non-private FedAvg (no clipping, no noise, mean over the clients
that answered) and the same DP run with clipping but σ = 0, which separates the cost of clipping from
the cost of noise.

Fixed settings (chosen once with ``--tune`` on the non-DP run, then kept for every m and ε): see
:data:`SETTINGS`. Prints a table and writes ``--out/results.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass(frozen=True)
class Settings:
    """What one simulated federation does; fixed across m and ε."""

    rounds: int = 100
    local_steps: int = 5
    local_lr: float = 2.0
    clip: float = 1.0
    server_momentum: float = 0.0


SETTINGS = Settings()


# ----------------------------------------------------------------------------------------------- data


def embed(texts: list[str], *, model_path: str, max_length: int = 128, batch: int = 128) -> np.ndarray:
    """Mean-pooled (over the attention mask), L2-normalised sentence embeddings, float32, one row per text."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval()
    order = np.argsort([len(t) for t in texts])  # similar lengths together: less padding
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            rows = order[start : start + batch]
            enc = tokenizer(
                [texts[i] for i in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    return out


def load_data(out: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, object]:
    """``(train_x, train_y, test_x, test_y, train_table)`` of the default data; embeddings cached in ``out``."""
    from fedpeft.config import FedPeftConfig
    from fedpeft.models import resolve_model_path
    from fedpeft.site import load_split

    cfg = FedPeftConfig()
    train, test = load_split(cfg)
    texts = list(train.texts) + list(test.texts)
    key = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:12]
    cache = out / f"embeddings-minilm-mean-{key}.npy"
    if cache.is_file():
        x = np.load(cache)
    else:
        started = time.perf_counter()
        x = embed(texts, model_path=resolve_model_path(cfg.model))
        out.mkdir(parents=True, exist_ok=True)
        np.save(cache, x)
        print(f"embedded {len(texts)} texts in {time.perf_counter() - started:.0f} s -> {cache}", flush=True)
    return x[: len(train)], train.labels, x[len(train) :], test.labels, train


def client_tensors(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]):
    """Clients padded to one tensor: features with a constant 1 (bias) ``[N, R, D+1]``, labels, row mask."""
    import torch

    rows = max(len(p) for p in parts)
    feats = np.zeros((len(parts), rows, x.shape[1] + 1), dtype=np.float32)
    labels = np.zeros((len(parts), rows), dtype=np.int64)
    mask = np.zeros((len(parts), rows), dtype=np.float32)
    for k, p in enumerate(parts):
        feats[k, : len(p), :-1], feats[k, : len(p), -1] = x[p], 1.0
        labels[k, : len(p)], mask[k, : len(p)] = y[p], 1.0
    return torch.from_numpy(feats), torch.from_numpy(labels), torch.from_numpy(mask)


# ------------------------------------------------------------------------------------------ simulation


def local_updates(w, feats, labels, mask, *, steps: int, lr: float):
    """Each client's update after ``steps`` full-batch gradient steps of cross-entropy from ``w``: ``[n, D+1, K]``."""
    import torch

    onehot = torch.nn.functional.one_hot(labels, w.shape[1]).to(feats.dtype) * mask.unsqueeze(-1)
    count = mask.sum(1).clamp(min=1).view(-1, 1, 1)
    local = w.expand(feats.shape[0], *w.shape).clone()
    for _ in range(steps):
        probs = torch.softmax(torch.bmm(feats, local), dim=-1) * mask.unsqueeze(-1)
        local -= lr * torch.bmm(feats.transpose(1, 2), probs - onehot) / count
    return local - w


def federate(
    data, test, *, settings: Settings, cohort: float, sigma: float | None, seed: int, trace: bool = False
) -> dict:
    """One run. ``sigma=None``: non-private FedAvg (no clipping, mean over repliers); else DP-FedAvg with
    clipping to C and N(0, σ²C²) on the sum, divided by the expected cohort ``cohort``."""
    import torch

    feats, labels, mask = data
    test_x, test_y = test
    n_clients, dim, classes = feats.shape[0], feats.shape[2], int(labels.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    q = min(1.0, cohort / n_clients)
    w = torch.zeros(dim, classes)
    velocity = torch.zeros_like(w)
    answered, clipped, curve = [], [], []
    for t in range(settings.rounds):
        picked = torch.nonzero(torch.rand(n_clients, generator=gen) < q).flatten() if q < 1 else torch.arange(n_clients)
        answered.append(len(picked))
        if len(picked):
            delta = local_updates(w, feats[picked], labels[picked], mask[picked], steps=settings.local_steps,
                                  lr=settings.local_lr)
        else:
            delta = torch.zeros(0, dim, classes)
        if sigma is None:
            if not len(picked):
                continue
            step = delta.mean(0)
        else:
            norms = delta.flatten(1).norm(dim=1)
            clipped.append(float((norms > settings.clip).float().mean()) if len(picked) else 0.0)
            scale = (settings.clip / norms.clamp(min=1e-12)).clamp(max=1.0)
            total = (delta * scale.view(-1, 1, 1)).sum(0)
            step = (total + sigma * settings.clip * torch.randn(total.shape, generator=gen)) / cohort
        velocity = settings.server_momentum * velocity + step
        w = w + velocity
        if trace and (t + 1) % 10 == 0:
            curve.append(round(accuracy(w, test_x, test_y), 4))
    result = {"accuracy": accuracy(w, test_x, test_y), "mean_cohort": float(np.mean(answered))}
    if clipped:
        result["clipped_share"] = float(np.mean(clipped))
    if trace:
        result["curve_every_10"] = curve
    return result


def accuracy(w, test_x, test_y) -> float:
    return float(((test_x @ w[:-1] + w[-1]).argmax(1) == test_y).float().mean())


def calibrate(*, epsilon: float, delta: float, q: float, rounds: int) -> float:
    """σ whose T Poisson rounds at rate q spend at most ε at δ (RDP, the project's accountant)."""
    from privacy.accounting import noise_for_budget

    return noise_for_budget(epsilon_budget=epsilon, delta=delta, sample_rate=q, steps=rounds, accountant="rdp")


# ----------------------------------------------------------------------------------------------- main


def median_update_norm(data, test, settings: Settings, cohort: float, seed: int) -> float:
    """Median L2 norm of the clients' first-round updates (from the zero head): what C is set against."""
    import torch

    feats, labels, mask = data
    w = torch.zeros(feats.shape[2], int(labels.max()) + 1)
    rows = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(seed))[: int(cohort)]
    delta = local_updates(w, feats[rows], labels[rows], mask[rows], steps=settings.local_steps, lr=settings.local_lr)
    return float(delta.flatten(1).norm(dim=1).median())


def tune(data, test, *, cohort: float) -> None:
    """The non-DP grid over local lr, local steps and rounds at one cohort (prints; one seed)."""
    for steps in (1, 5, 20):
        for lr in (0.5, 2.0, 8.0):
            for rounds in (30, 100, 300):
                s = replace(SETTINGS, local_steps=steps, local_lr=lr, rounds=rounds)
                acc = federate(data, test, settings=s, cohort=cohort, sigma=None, seed=0)["accuracy"]
                med = median_update_norm(data, test, s, cohort, 0)
                print(f"steps {steps:>2}  lr {lr:>4}  rounds {rounds:>3}: non-DP {acc:.4f}  median |Δ| {med:.3f}",
                      flush=True)


def spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "runs": [round(v, 4) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000, help="N, the number of clients (users)")
    parser.add_argument("--cohorts", default="10,30,100,300,1000", help="expected clients per round m (q = m/N)")
    parser.add_argument("--epsilons", default="8,3")
    parser.add_argument("--delta", type=float, default=1e-5, help="must be below 1/N")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--partition", default="iid", help="iid | dirichlet:<alpha> (label skew)")
    for field, value in asdict(SETTINGS).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--tune", action="store_true", help="print the non-DP grid at m = 100 and stop")
    parser.add_argument("--out", default="runs/bench-central-cohort")
    args = parser.parse_args()

    from fedpeft.data import partition_indices

    started = time.perf_counter()
    out = Path(args.out)
    if not args.delta < 1 / args.clients:
        parser.error(f"--delta {args.delta} must be below 1/N = {1 / args.clients}")
    train_x, train_y, test_x, test_y, train_table = load_data(out)
    import torch

    torch.set_num_threads(1)
    test = (torch.from_numpy(test_x), torch.from_numpy(test_y))
    settings = Settings(**{f: getattr(args, f) for f in asdict(SETTINGS)})
    cohorts = [float(m) for m in args.cohorts.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    majority = float(np.bincount(test_y).max() / len(test_y))
    seeds = list(range(args.seeds))
    parts = {s: partition_indices(train_table, args.partition, num_clients=args.clients, seed=s) for s in seeds}
    data = {s: client_tensors(train_x, train_y, parts[s]) for s in seeds}
    sizes = [len(p) for p in parts[0]]
    print(f"{args.clients} clients ({args.partition}), {min(sizes)}-{max(sizes)} rows each (median "
          f"{int(np.median(sizes))}); test {len(test_y)} rows, majority class {majority:.4f}; {settings}", flush=True)
    if args.tune:
        tune(data[0], test, cohort=100.0)
        return
    median_norm = median_update_norm(data[0], test, settings, 100.0, 0)
    print(f"median first-round update norm {median_norm:.3f} (C = {settings.clip})", flush=True)

    rows = []
    header = f"{'m':>6} {'q':>6} {'non-DP':>15} {'clip only':>15}"
    for eps in epsilons:
        header += f" {'ε ' + f'{eps:g}':>15} {'σ':>6} {'÷ non-DP':>8}"
    print(header)
    for m in cohorts:
        q = min(1.0, m / args.clients)
        row = {"cohort": m, "q": q}
        row["non_dp"] = spread([federate(data[s], test, settings=settings, cohort=m, sigma=None, seed=s)["accuracy"]
                                for s in seeds])
        row["clip_only"] = spread([federate(data[s], test, settings=settings, cohort=m, sigma=0.0, seed=s)["accuracy"]
                                   for s in seeds])
        line = f"{m:>6g} {q:>6.3f} {_fmt(row['non_dp']):>15} {_fmt(row['clip_only']):>15}"
        for eps in epsilons:
            sigma = calibrate(epsilon=eps, delta=args.delta, q=q, rounds=settings.rounds)
            runs = [federate(data[s], test, settings=settings, cohort=m, sigma=sigma, seed=1000 + s) for s in seeds]
            entry = spread([r["accuracy"] for r in runs])
            entry.update(sigma=sigma, noise_std_on_average=sigma * settings.clip / m,
                         ratio_to_non_dp=entry["mean"] / row["non_dp"]["mean"],
                         clipped_share=float(np.mean([r["clipped_share"] for r in runs])))
            row[f"eps_{eps:g}"] = entry
            line += f" {_fmt(entry):>15} {sigma:>6.2f} {entry['ratio_to_non_dp']:>8.3f}"
        print(line, flush=True)
        rows.append(row)
    seconds = time.perf_counter() - started
    print(f"majority class {majority:.4f}; δ {args.delta:g}; RDP accountant; {len(seeds)} seeds (mean [min, max]); "
          f"{seconds:.0f} s")
    result = {"clients": args.clients, "partition": args.partition, "delta": args.delta, "accountant": "rdp",
              "settings": asdict(settings), "median_first_update_norm": median_norm, "majority_class": majority,
              "test_rows": int(len(test_y)), "client_rows": {"min": min(sizes), "max": max(sizes)},
              "seeds": len(seeds), "rows": rows, "seconds": round(seconds, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"-> {out / 'results.json'}")


def _fmt(entry: dict) -> str:
    return f"{entry['mean']:.3f} ±{(entry['max'] - entry['min']) / 2:.3f}"


if __name__ == "__main__":
    main()
