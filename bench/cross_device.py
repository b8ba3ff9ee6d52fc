"""User-level DP across many devices: DP-DyLoRA against fixed-rank DP-LoRA, FFA-LoRA and the linear probe.

    python bench/cross_device.py --rows all --epsilons none,2,8 --seeds 0,1,2 --cohort 1000   # docs/privacy.md
    python bench/cross_device.py --smoke                  # CI-sized: 2,000 users, cohort 20, 2 rounds, one row
    python bench/cross_device.py --flower 50,100,200 --population 1000 --rounds 3   # Flower's own path, timed

**The regime.** A population of N simulated users (``--population``, 10,000 by default) holds the default
data's training split (the product's reader and seeded hold-out, ``fedpeft.data.sources.load_split``),
cut iid into N users: 10,202 examples over 10,000 users is one example each for most and two for 202.
Each round m users (``--cohort``) are drawn without replacement, as ``--dp central`` draws sites; the
privacy unit is the user.

**Which product code runs.** The model is ``fedpeft simulate``'s (bundled all-MiniLM-L6-v2, its mean
pooling head, the product's LoRA through ``fedpeft.models.build_peft_model``); DP-DyLoRA trains through
:func:`fedpeft.adapters.lora.dynamic.train_at_rank` at the rank :class:`~fedpeft.adapters.lora.dynamic.RankSchedule`
draws, projects each update (:func:`~fedpeft.adapters.lora.dynamic.project_update`) and keeps inactive
components (:func:`~fedpeft.adapters.lora.dynamic.keep_active`); the release is
:func:`privacy.central.central_release` (each user's update clipped to C, the sum noised with σC, divided
by the fixed m), σ comes from :func:`privacy.central.calibrate_central_sigma` (the coordinator's
accountant: replace-one neighbours, sampling without replacement, all T rounds), and the server step is
:func:`strategies.server_opt.server_step` (FedAdam by default, post-processing of the release).

**How it differs from Flower's path.** (1) Each user takes *one* local step (FedSGD): its update is
−(its mean gradient), computed for the whole cohort at once from opacus's per-example gradients (the
product's local training runs one site at a time; at m = 1,000 users a round that way is 1,000 model
set-ups). (2) No messages, codecs or ledger: the accountant's ε is computed, not signed. (3) The cohort is
drawn from a seeded generator (the product draws from OS entropy, since amplification needs a secret
draw), so runs repeat. Flower's own path is timed by ``--flower 50,100,200 --population 1000 --rounds 3``
(``fedpeft simulate --dp central`` with many small sites: seconds per round and per sampled site).

Prints one JSON line per (row, ε, cohort, seed) and appends it to ``--out``; ``--report`` summarises the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.adapters import adapter_state, load_adapter_state  # noqa: E402
from fedpeft.adapters.lora.dynamic import RankSchedule, keep_active, project_update, train_at_rank  # noqa: E402
from fedpeft.adapters.state import state_names  # noqa: E402
from fedpeft.config import FedPeftConfig  # noqa: E402
from fedpeft.data.sources import load_split  # noqa: E402
from fedpeft.models import build_peft_model, load_tokenizer  # noqa: E402
from fedpeft.tasks import TASKS  # noqa: E402
from fedpeft.training import evaluate, padded_batch  # noqa: E402
from privacy.central import calibrate_central_sigma, central_release  # noqa: E402
from strategies.server_opt import SERVER_OPTIMIZERS, ServerOptSettings, server_step  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
    """One adapter recipe: its LoRA rank, which tensors train, and whether the rank is drawn per round."""

    rank: int
    train: str = "adapter"  # "adapter": LoRA factors and head; "head": the linear probe
    frozen: tuple[str, ...] = ()  # FFA-LoRA: lora_A
    dynamic: bool = False


ROWS = {
    "probe": Row(rank=1, train="head"),
    "lora-r1": Row(rank=1),
    "lora-r4": Row(rank=4),
    "lora-r16": Row(rank=16),
    "ffa-r16": Row(rank=16, frozen=("lora_A",)),
    "dylora-r16": Row(rank=16, dynamic=True),
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Fixed across rows, ε and m: T rounds of one local step, clip C, FedAdam on the release."""

    rounds: int = 60
    clip: float = 1.0
    server_lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    max_length: int = 64
    delta: float = 1e-5
    chunk: int = 128
    test_limit: int = 0  # evaluate on the first this many test examples (0: all; --smoke: 256)


def population(train_size: int, users: int, seed: int) -> list[np.ndarray]:
    """``users`` iid users over ``train_size`` rows (each holds one or more rows)."""
    if users > train_size:
        raise SystemExit(f"--population {users} exceeds the {train_size} training examples (one each at least)")
    order = np.random.default_rng(seed).permutation(train_size)
    return [np.sort(part) for part in np.array_split(order, users)]


def cohort_updates(model, data, users: list[np.ndarray], chosen: np.ndarray, params: list, names: list[str],
                   chunk: int) -> list[dict[str, np.ndarray]]:
    """Each chosen user's one-step update −(mean gradient over its rows), from opacus per-example gradients."""
    rows = np.concatenate([users[u] for u in chosen])
    owner = np.concatenate([np.full(len(users[u]), i) for i, u in enumerate(chosen)])
    sizes = np.bincount(owner, minlength=len(chosen)).astype(np.float32)
    total = [torch.zeros((len(chosen), *p.shape)) for p in params]
    order = np.argsort([len(data.input_ids[r]) for r in rows], kind="stable")  # less padding per chunk
    for start in range(0, len(order), chunk):
        at = order[start:start + chunk]
        batch = padded_batch(data, rows[at])
        labels = batch.pop("labels")
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels, reduction="sum")
        loss.backward()
        idx = torch.as_tensor(owner[at])
        for acc, p in zip(total, params, strict=True):
            acc.index_add_(0, idx, p.grad_sample.detach())
            p.grad_sample = None
            p.grad = None
    scale = torch.as_tensor(-1.0 / sizes)
    out = []
    for i in range(len(chosen)):
        out.append({n: (acc[i] * scale[i]).numpy() for n, acc in zip(names, total, strict=True)})
    return out


def run(row_name: str, *, epsilon: float | None, cohort: int, users_n: int, seed: int, s: Settings,
        cache: dict) -> dict:
    from opacus.grad_sample import GradSampleModule

    row = ROWS[row_name]
    cfg = FedPeftConfig(lora_r=row.rank, lora_alpha=2.0 * row.rank, seed=seed, max_length=s.max_length,
                        lora_dynamic_rank=row.dynamic)
    if "data" not in cache:
        train, test = load_split(cfg)
        tok = load_tokenizer(cfg.model)
        task = TASKS.get(cfg.task)
        cache["data"] = (task.encode(tok, train, max_length=s.max_length),
                         task.encode(tok, test, max_length=s.max_length), len(train.label_names))
    data, test, num_labels = cache["data"]
    users = population(len(data), users_n, seed)
    model, _ = build_peft_model(cfg, num_labels)
    model.train()
    for name, p in model.named_parameters():  # the probe trains the head alone; FFA freezes A
        if p.requires_grad and (row.train == "head" and "lora_" in name or any(f in name for f in row.frozen)):
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    names = state_names(model, params)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    sigma = 0.0 if epsilon is None else calibrate_central_sigma(
        budget=epsilon, delta=s.delta, population=users_n, sample_size=cohort, rounds=s.rounds)
    schedule = RankSchedule.of(cfg)
    opt = SERVER_OPTIMIZERS.get("adam")
    settings = ServerOptSettings(lr=s.server_lr, momentum=s.beta1, beta2=s.beta2, tau=s.tau)
    rng = np.random.default_rng([seed, 7])  # the cohort draw (seeded: see the module doc)
    noise = np.random.default_rng([seed, 11])
    state, moments = adapter_state(model), {}
    started = time.monotonic()
    for t in range(1, s.rounds + 1):
        chosen = np.sort(rng.choice(users_n, size=cohort, replace=False))
        b = schedule.rank(t) if schedule is not None else None
        with train_at_rank(model, b) if b is not None else nullcontext():
            updates = cohort_updates(gsm, data, users, chosen, params, names, s.chunk)
        if b is not None:
            updates = [project_update(u, b) for u in updates]
        if epsilon is None:  # non-private: the plain mean of the users' updates
            change = {k: np.mean([u[k] for u in updates], axis=0) for k in names}
        else:
            change, _ = central_release(updates, clipping_norm=s.clip, noise_multiplier=sigma, sample_size=cohort,
                                        rng=noise)
        trained = {k: state[k] for k in names}
        stepped, moments, _ = server_step(opt, trained, {k: trained[k] + change[k] for k in names}, moments,
                                          settings=settings)
        if b is not None:
            stepped = keep_active(stepped, trained, b)
        state = {**state, **stepped}
        load_adapter_state(model, state)
    seconds = time.monotonic() - started
    gsm._close()
    if s.test_limit:
        test = dataclasses.replace(test, input_ids=test.input_ids[:s.test_limit], labels=test.labels[:s.test_limit])
    accuracy = evaluate(model, test, batch_size=128)["accuracy"]
    return {"row": row_name, "epsilon": epsilon, "cohort": cohort, "population": users_n, "seed": seed,
            "rounds": s.rounds, "sigma": sigma, "clip": s.clip, "accuracy": accuracy,
            "seconds_per_round": round(seconds / s.rounds, 2), "settings": dataclasses.asdict(s)}


def flower_path(cohorts: list[int], *, population: int, rounds: int, out_root: Path) -> list[dict]:
    """Flower's own path at each cohort size: ``fedpeft simulate --dp central`` over ``population`` sites
    (the default data cut iid, so each site holds a few examples), DP-DyLoRA at r 16, one local step per
    site, ``rounds`` rounds. A round's seconds are read from when its ``metrics.jsonl`` line appears;
    round 1 also starts the actors and loads every sampled site's data, so only later rounds count."""
    import subprocess

    results = []
    for m in cohorts:
        out = out_root / f"flower-N{population}-m{m}-{int(time.time())}"
        cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--out", str(out), "--dp", "central",
               "--dp-epsilon", "8", "--clients", str(population), "--fraction", f"{m / population:.6f}",
               "--rounds", str(rounds), "--probe-rounds", "0", "--max-local-steps", "1", "--batch-size", "8",
               "--lora-r", "16", "--lora-dynamic-rank", "--max-length", "64", "--quiet"]
        print("$", " ".join(cmd[2:]), flush=True)
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen: list[float] = []  # seconds after the start at which each metrics line appeared
        while proc.poll() is None:
            path = out / "metrics.jsonl"
            lines = len(path.read_text().splitlines()) if path.exists() else 0
            seen += [time.monotonic() - started] * (lines - len(seen))
            time.sleep(0.1)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        per_round = np.diff(seen[1:])  # seen[0]: round 0's line; seen[1]: round 1's
        clients = [r["clients"] for r in records[2:]]
        row = {"path": "flower", "population": population, "cohort": m, "rounds": rounds,
               "clients_per_round": clients, "seconds_round_1": round(seen[1] - seen[0], 1),
               "seconds_per_round": round(float(np.mean(per_round)), 2),
               "seconds_per_client": round(float(np.mean(per_round)) / max(1, int(np.mean(clients))), 4),
               "wall_seconds": round(time.monotonic() - started, 1)}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def report(path: Path) -> None:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    for r in (r for r in rows if r.get("path") == "flower"):
        print(f"Flower's path: N {r['population']}, m {r['cohort']}: {r['seconds_per_round']} s a round, "
              f"{r['seconds_per_client']} s per sampled site")
    rows = [r for r in rows if r.get("path") != "flower"]
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["row"], r["epsilon"], r["cohort"], r["population"], r["rounds"]), []).append(r["accuracy"])
    base = {(k[2], k[3], k[4]): np.mean(v) for k, v in groups.items() if k[1] is None and k[0] == "lora-r16"}
    print(f"{'row':11} {'eps':>5} {'m':>5} {'N':>6} {'T':>4}  accuracy (mean ± half-range, n)   ÷ non-private r16")
    for (name, eps, m, n, t), accs in sorted(groups.items(), key=lambda kv: (kv[0][2], str(kv[0][1]), kv[0][0])):
        ref = base.get((m, n, t))
        ratio = f"{np.mean(accs) / ref:.3f}" if ref else "-"
        print(f"{name:11} {str(eps):>5} {m:>5} {n:>6} {t:>4}  {np.mean(accs):.4f} ± {np.ptp(accs) / 2:.4f} "
              f"(n={len(accs)})   {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="all", help=f"comma-separated of {', '.join(ROWS)}, or all")
    parser.add_argument("--epsilons", default="none,2,8", help="comma-separated; none: no DP")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cohort", type=int, default=1000)
    parser.add_argument("--population", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=Settings.rounds)
    parser.add_argument("--server-lr", type=float, default=Settings.server_lr)
    parser.add_argument("--clip", type=float, default=Settings.clip)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-results/cross_device.jsonl"))
    parser.add_argument("--report", action="store_true", help="summarise --out and exit")
    parser.add_argument("--flower", default="", metavar="COHORTS",
                        help="instead: time Flower's own path (fedpeft simulate --dp central) at these comma-separated "
                             "cohort sizes over --population sites, for --rounds rounds")
    parser.add_argument("--smoke", action="store_true",
                        help="CI-sized: 2,000 users, cohort 20, 2 rounds, dylora-r16 at eps 8, 256 test examples")
    args = parser.parse_args()
    if args.report:
        return report(args.out)
    if args.flower:
        cohorts = [int(x) for x in args.flower.split(",") if x.strip()]
        if not cohorts or not all(1 <= m <= args.population for m in cohorts):
            parser.error(f"--flower cohorts must lie in 1..--population ({args.population}), got {args.flower!r}")
        if args.rounds < 3:
            parser.error("--flower needs --rounds >= 3: round 1 starts the actors, later rounds are timed")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for row in flower_path(cohorts, population=args.population, rounds=args.rounds,
                               out_root=args.out.parent / "flower-runs"):
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        return None
    torch.set_num_threads(args.threads)
    s = Settings(rounds=args.rounds, server_lr=args.server_lr, clip=args.clip)
    rows = list(ROWS) if args.rows == "all" else [r.strip() for r in args.rows.split(",")]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    epsilons = [None if e.strip() == "none" else float(e) for e in args.epsilons.split(",")]
    seeds, cohort, users = [int(x) for x in args.seeds.split(",")], args.cohort, args.population
    if args.smoke:
        rows, epsilons, seeds, cohort, users = ["dylora-r16"], [8.0], [0], 20, 2000
        s = dataclasses.replace(s, rounds=2, test_limit=256)
    if not 1 <= cohort <= users:
        parser.error(f"--cohort must lie in 1..--population, got {cohort} of {users}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    for seed in seeds:
        for eps in epsilons:
            for name in rows:
                result = run(name, epsilon=eps, cohort=cohort, users_n=users, seed=seed, s=s, cache=cache)
                print(json.dumps(result), flush=True)
                with args.out.open("a") as fh:
                    fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
