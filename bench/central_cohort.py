"""User-level (central) DP-FedAvg with many small clients: the cohort size at which it keeps accuracy.

    python bench/central_cohort.py                          # docs/privacy.md's tables (3.4 CPU-min, embeddings cached)
    python bench/central_cohort.py --partition shards --clip 5 --full-cohorts ''   # label-skewed users
    python bench/central_cohort.py --tune                   # the non-DP grid the fixed settings came from

A fast in-process model of ``--dp central`` (DP-FedAvg, McMahan, Ramage, Talwar, Zhang, ICLR 2018,
arXiv 1710.06963, with client-side clipping): the default data's training split (the project's reader
and seeded hold-out, ``fedpeft.data.sources.load_split``) is cut into N small clients (``--clients``,
1000 by default, about 11 rows each; the project's iid partitioner, or ``--partition shards``: one class
per client). The model is tiny on purpose: a linear classifier (weights and bias, 770 parameters) on
frozen, mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence embeddings, computed once (about 3 min
here) and cached under ``--out``.

**Sampled table.** Each round every client is sampled independently with probability q = m/N
(Poisson; m is the *expected* cohort). A sampled client takes ``--local-steps`` full-batch gradient
steps from the global head; its update is clipped to L2 norm C; the server sums the clipped updates,
adds N(0, σ²C²) per coordinate, divides by the fixed m (not by how many answered: the sensitivity
stays C/m) and applies it (server lr 1, optional server momentum). σ meets (ε, δ) over all T rounds
by the project's RDP accountant (``privacy.accounting.noise_for_budget``, sampling rate q, T steps):
one user is one client. **Full-participation table**: the same users grouped into N = m sites, every
site every round (q = 1, no amplification by sampling), as in a federation of m hospitals with
``--fraction 1``. Next to each DP run, at the same m and seeds: non-private FedAvg (no clipping, no
noise, mean over the clients that answered) and the DP run with clipping but σ = 0, which separates
the cost of clipping from the cost of noise.

**Fixed settings** (:data:`SETTINGS`, kept for every m and ε), from ``--tune`` (non-DP, m = 100, one
seed): 5 local steps at lr 2 reach 0.762 at T = 100 rounds against 0.766 at T = 300, so T = 100 (fewer
rounds is less noise per round at a fixed ε); 20 local steps gain < 1 point but make updates 2.6×
larger. C = 1 is about 0.6 × the median first-round update norm (1.63; updates shrink as the head
converges) and costs at most 0.6 points without noise on iid users. Under label skew (``shards``) C = 1
collapses to the majority class even without noise (every one-class update is cut to the same norm, so
the majority class wins the average); C = 5 (about 2 × that split's median norm, 2.2) does not.
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
    from fedpeft.data.sources import load_split
    from fedpeft.models import resolve_model_path

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


@dataclass(frozen=True)
class Clients:
    """All clients' rows, padded: ``feats [N, R, D+1]``, ``labels [N, R]``, ``mask [N, R]``, and the Gram
    matrices ``gram [N, R, R]`` when R is small (else ``None``: products go through ``feats``)."""

    feats: object
    labels: object
    mask: object
    gram: object

    def take(self, picked) -> Clients:
        """The clients at positions ``picked`` (``None``: all of them, without copying)."""
        if picked is None:
            return self
        gram = None if self.gram is None else self.gram[picked]
        return Clients(self.feats[picked], self.labels[picked], self.mask[picked], gram)

    def times_gram(self, coef):
        """``G_n A_n = F_n (F_nᵀ A_n)`` for every client, ``[n, R, K]``."""
        import torch

        if self.gram is not None:
            return torch.bmm(self.gram, coef)
        return torch.bmm(self.feats, torch.bmm(coef.transpose(1, 2), self.feats).transpose(1, 2))


def client_tensors(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]) -> Clients:
    """Clients padded to one tensor: features with a constant 1 (bias) ``[N, R, D+1]``, labels, row mask, Gram."""
    import torch

    rows = max(len(p) for p in parts)
    feats = np.zeros((len(parts), rows, x.shape[1] + 1), dtype=np.float32)
    labels = np.zeros((len(parts), rows), dtype=np.int64)
    mask = np.zeros((len(parts), rows), dtype=np.float32)
    for k, p in enumerate(parts):
        feats[k, : len(p), :-1], feats[k, : len(p), -1] = x[p], 1.0
        labels[k, : len(p)], mask[k, : len(p)] = y[p], 1.0
    feats_t = torch.from_numpy(feats)
    # Padded rows are zero, so they never contribute. R x R beats 2 x R x D per product only for small R.
    gram = torch.bmm(feats_t, feats_t.transpose(1, 2)) if rows < feats.shape[2] else None
    return Clients(feats_t, torch.from_numpy(labels), torch.from_numpy(mask), gram)


# ------------------------------------------------------------------------------------------ simulation


def local_coefficients(base, clients: Clients, *, steps: int, lr: float):
    """Full-batch gradient descent on each client's cross-entropy, in the span of its own rows.

    A linear head's gradient on client n is ``F_nᵀ (p − y) / r_n``, so after any number of steps the
    update is ``Δ_n = F_nᵀ A_n`` for an ``[R, K]`` matrix ``A_n``, and the logits are
    ``F_n w + G_n A_n`` with the Gram matrix ``G_n = F_n F_nᵀ``. Iterating on ``A`` costs R×R instead
    of R×D per step and gives the same updates. ``base`` is ``F_n w`` ``[n, R, K]``; returns ``A``.
    """
    import torch

    mask = clients.mask.unsqueeze(-1)
    onehot = torch.nn.functional.one_hot(clients.labels, base.shape[-1]).to(base.dtype) * mask
    count = clients.mask.sum(1).clamp(min=1).view(-1, 1, 1)
    coef = torch.zeros_like(base)
    for _ in range(steps):
        probs = torch.softmax(base + clients.times_gram(coef), dim=-1) * mask
        coef = coef - lr * (probs - onehot) / count
    return coef


def client_updates(w, clients: Clients, settings: Settings):
    """``(A, norms)`` of the clients' local updates ``Δ_n = F_nᵀ A_n`` from the global head ``w``."""

    n, rows, dim = clients.feats.shape
    base = (clients.feats.reshape(n * rows, dim) @ w).view(n, rows, w.shape[1])
    coef = local_coefficients(base, clients, steps=settings.local_steps, lr=settings.local_lr)
    norms = (coef * clients.times_gram(coef)).sum((1, 2)).clamp(min=0).sqrt()  # ‖F_nᵀA_n‖_F² = tr(AᵀGA)
    return coef, norms


def federate(clients: Clients, test, *, settings: Settings, cohort: float, sigma: float | None, seed: int) -> dict:
    """One run. ``sigma=None``: non-private FedAvg (no clipping, mean over repliers); else DP-FedAvg with
    clipping to C and N(0, σ²C²) on the sum, divided by the expected cohort ``cohort``."""
    import torch

    test_x, test_y = test
    n_clients, dim, classes = clients.feats.shape[0], clients.feats.shape[2], int(clients.labels.max()) + 1
    gen = torch.Generator().manual_seed(seed)
    q = min(1.0, cohort / n_clients)
    w = torch.zeros(dim, classes)
    velocity = torch.zeros_like(w)
    answered, clipped = [], []
    for _ in range(settings.rounds):
        picked = None if q >= 1 else torch.nonzero(torch.rand(n_clients, generator=gen) < q).flatten()
        cohort_now = clients.take(picked)
        replied = cohort_now.feats.shape[0]
        answered.append(replied)
        coef, norms = client_updates(w, cohort_now, settings)
        if sigma is None:
            if not replied:
                continue
            scale = torch.full_like(norms, 1.0 / replied)
        else:
            clipped.append(float((norms > settings.clip).float().mean()) if replied else 0.0)
            scale = (settings.clip / norms.clamp(min=1e-12)).clamp(max=1.0) / cohort
        flat = (coef * scale.view(-1, 1, 1)).reshape(-1, classes)
        step = (flat.T @ cohort_now.feats.reshape(-1, dim)).T  # Σ_n scale_n F_nᵀ A_n
        if sigma is not None:
            step = step + (sigma * settings.clip / cohort) * torch.randn(step.shape, generator=gen)
        velocity = settings.server_momentum * velocity + step
        w = w + velocity
    result = {"accuracy": accuracy(w, test_x, test_y), "mean_cohort": float(np.mean(answered))}
    if clipped:
        result["clipped_share"] = float(np.mean(clipped))
    return result


def accuracy(w, test_x, test_y) -> float:
    return float(((test_x @ w[:-1] + w[-1]).argmax(1) == test_y).float().mean())


def calibrate(*, epsilon: float, delta: float, q: float, rounds: int, cache: dict[str, float]) -> float:
    """σ whose T Poisson rounds at rate q spend at most ε at δ (RDP, the project's accountant).

    ``cache`` (kept in ``--out/sigmas.json``) saves the search on a rerun: at small q it takes seconds.
    """
    from privacy.accounting import noise_for_budget

    key = f"eps={epsilon:g} delta={delta:g} q={q:.6g} T={rounds} rdp"
    if key not in cache:
        cache[key] = noise_for_budget(
            epsilon_budget=epsilon, delta=delta, sample_rate=q, steps=rounds, accountant="rdp"
        )
    return cache[key]


# ----------------------------------------------------------------------------------------------- main


def median_update_norm(clients: Clients, settings: Settings, cohort: float, seed: int) -> float:
    """Median L2 norm of the clients' first-round updates (from the zero head): what C is set against."""
    import torch

    w = torch.zeros(clients.feats.shape[2], int(clients.labels.max()) + 1)
    picked = torch.randperm(clients.feats.shape[0], generator=torch.Generator().manual_seed(seed))[: int(cohort)]
    return float(client_updates(w, clients.take(picked), settings)[1].median())


def tune(data, test, *, cohort: float) -> None:
    """The non-DP grid over local lr, local steps and rounds at one cohort (prints; one seed)."""
    for steps in (1, 5, 20):
        for lr in (0.5, 2.0, 8.0):
            for rounds in (30, 100, 300):
                s = replace(SETTINGS, local_steps=steps, local_lr=lr, rounds=rounds)
                acc = federate(data, test, settings=s, cohort=cohort, sigma=None, seed=0)["accuracy"]
                med = median_update_norm(data, s, cohort, 0)
                print(
                    f"steps {steps:>2}  lr {lr:>4}  rounds {rounds:>3}: non-DP {acc:.4f}  median |Δ| {med:.3f}",
                    flush=True,
                )


def spread(values: list[float]) -> dict:
    stats = {"mean": np.mean(values), "min": np.min(values), "max": np.max(values)}
    return {**{k: float(v) for k, v in stats.items()}, "runs": [round(v, 4) for v in values]}


def split_clients(table, spec: str, *, clients: int, seed: int) -> list[np.ndarray]:
    """Row positions of each client: ``iid`` (the project's partitioner) or ``shards`` (label skew: rows
    sorted by label and cut into equal contiguous shards, McMahan et al. 2017's pathological non-IID
    split; almost every client holds one class). The project's ``dirichlet:<alpha>`` cannot give 1000
    clients of ~11 rows each."""
    from fedpeft.data import partition_indices

    if spec != "shards":
        return partition_indices(table, spec, num_clients=clients, seed=seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(table.labels))
    order = order[np.argsort(table.labels[order], kind="stable")]
    shards = np.array_split(order, clients)
    return [np.sort(shards[i]) for i in rng.permutation(clients)]


def group(users: list[np.ndarray], sites: int, *, seed: int) -> list[np.ndarray]:
    """The users' rows merged into ``sites`` sites of (almost) equal numbers of users, at random."""
    order = np.random.default_rng(seed + 1).permutation(len(users))
    return [np.sort(np.concatenate([users[u] for u in chunk])) for chunk in np.array_split(order, sites)]


def sweep(
    federations: dict[float, tuple[dict[int, Clients], float]],
    test,
    *,
    settings: Settings,
    epsilons: list[float],
    delta: float,
    seeds: list[int],
    sigmas: dict[str, float],
) -> list[dict]:
    """One row per cohort m: non-DP, clipping alone, and DP at each ε (mean and range over the seeds)."""
    rows = []
    header = f"{'m':>6} {'N':>6} {'q':>6} {'non-DP':>13} {'clip only':>13}"
    for eps in epsilons:
        header += f" {'ε ' + f'{eps:g}':>13} {'σ':>6} {'÷non-DP':>7}"
    print(header, flush=True)
    for m, (data, q) in federations.items():
        n_clients = data[seeds[0]].feats.shape[0]
        row = {"cohort": m, "clients": n_clients, "q": q}
        for name, sigma in (("non_dp", None), ("clip_only", 0.0)):
            row[name] = spread(
                [federate(data[s], test, settings=settings, cohort=m, sigma=sigma, seed=s)["accuracy"] for s in seeds]
            )
        line = f"{m:>6g} {n_clients:>6} {q:>6.3f} {_fmt(row['non_dp']):>13} {_fmt(row['clip_only']):>13}"
        for eps in epsilons:
            sigma = calibrate(epsilon=eps, delta=delta, q=q, rounds=settings.rounds, cache=sigmas)
            runs = [federate(data[s], test, settings=settings, cohort=m, sigma=sigma, seed=1000 + s) for s in seeds]
            entry = spread([r["accuracy"] for r in runs])
            entry.update(
                sigma=sigma,
                noise_std_on_average=sigma * settings.clip / m,
                ratio_to_non_dp=entry["mean"] / row["non_dp"]["mean"],
                clipped_share=float(np.mean([r["clipped_share"] for r in runs])),
            )
            row[f"eps_{eps:g}"] = entry
            line += f" {_fmt(entry):>13} {sigma:>6.2f} {entry['ratio_to_non_dp']:>7.3f}"
        print(line, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000, help="N of the sampled federation (users)")
    parser.add_argument("--cohorts", default="1,3,10,30,100,300,1000", help="expected clients per round m")
    parser.add_argument(
        "--full-cohorts",
        default="10,30,100,300",
        help="the second table: federations of exactly m clients, all of them every round (q = 1); '' skips it",
    )
    parser.add_argument("--epsilons", default="8,3")
    parser.add_argument("--delta", type=float, default=1e-5, help="must be below 1/N")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--partition", default="iid", help="iid | shards (label skew)")
    for field, value in asdict(SETTINGS).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--tune", action="store_true", help="print the non-DP grid at m = 100 and stop")
    parser.add_argument("--out", default="runs/bench-central-cohort")
    args = parser.parse_args()

    started = time.perf_counter()
    out = Path(args.out)
    if not args.delta < 1 / args.clients:
        parser.error(f"--delta {args.delta} must be below 1/N = {1 / args.clients}")
    train_x, train_y, test_x, test_y, train_table = load_data(out)
    import torch

    torch.set_num_threads(1)
    test = (torch.from_numpy(test_x), torch.from_numpy(test_y))
    settings = Settings(**{f: getattr(args, f) for f in asdict(SETTINGS)})
    epsilons = [float(e) for e in args.epsilons.split(",")]
    majority = float(np.bincount(test_y).max() / len(test_y))
    seeds = list(range(args.seeds))

    users = {s: split_clients(train_table, args.partition, clients=args.clients, seed=s) for s in seeds}
    data = {s: client_tensors(train_x, train_y, users[s]) for s in seeds}
    sizes = [int(c) for c in data[0].mask.sum(1)]
    print(
        f"{args.clients} clients ({args.partition}), {min(sizes)}-{max(sizes)} rows each; test {len(test_y)} rows, "
        f"majority class {majority:.4f}; {settings}",
        flush=True,
    )
    if args.tune:
        tune(data[0], test, cohort=100.0)
        return
    median_norm = median_update_norm(data[0], settings, 100.0, 0)
    print(f"median first-round update norm {median_norm:.3f} (C = {settings.clip})", flush=True)
    sigma_file = out / "sigmas.json"
    sigmas = json.loads(sigma_file.read_text()) if sigma_file.is_file() else {}
    common = {"settings": settings, "epsilons": epsilons, "delta": args.delta, "seeds": seeds, "sigmas": sigmas}

    print(f"\nSampled: N = {args.clients} clients, each in a round with probability q = m/N (Poisson)")
    cohorts = [float(m) for m in args.cohorts.split(",")]
    sampled = sweep({m: (data, min(1.0, m / args.clients)) for m in cohorts}, test, **common)
    full = []
    if args.full_cohorts:
        print(
            f"\nFull participation: the {args.clients} users grouped into N = m sites, all of them every round (q = 1)"
        )
        full_cohorts = [float(m) for m in args.full_cohorts.split(",")]
        sites = {
            m: ({s: client_tensors(train_x, train_y, group(users[s], int(m), seed=s)) for s in seeds}, 1.0)
            for m in full_cohorts
        }
        full = sweep(sites, test, **common)
    seconds = time.perf_counter() - started
    print(
        f"\nmajority class {majority:.4f}; δ {args.delta:g}; RDP accountant; {len(seeds)} seeds, "
        f"mean ± half the range; {seconds:.0f} s"
    )
    result = {
        "clients": args.clients,
        "partition": args.partition,
        "delta": args.delta,
        "accountant": "rdp",
        "settings": asdict(settings),
        "median_first_update_norm": median_norm,
        "majority_class": majority,
        "test_rows": int(len(test_y)),
        "client_rows": {"min": min(sizes), "max": max(sizes)},
        "seeds": len(seeds),
        "sampled": sampled,
        "full_participation": full,
        "seconds": round(seconds, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    sigma_file.write_text(json.dumps(sigmas, indent=2))
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"-> {out / 'results.json'}")


def _fmt(entry: dict) -> str:
    return f"{entry['mean']:.3f}±{(entry['max'] - entry['min']) / 2:.3f}"


if __name__ == "__main__":
    main()
