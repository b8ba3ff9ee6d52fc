"""Federated fine-tuning against pooled training and each site alone, on natural splits where sites differ.

    python bench/heterogeneity.py                                  # every split, the core rows, seeds 0-2
    python bench/heterogeneity.py --splits debian --rows recipes --seeds 0
    python bench/heterogeneity.py --report               # the tables of docs/benchmarks.md

**Splits** (real attributes, not Dirichlet draws; each is a JSONL file the bench writes once under
``--root``):

- ``debian``: ``bench/data/debian_packages.jsonl``, Debian package descriptions → their archive section,
  16 classes, one site per maintainer (20 sites, 113–313 packages; ``scripts/make_debian_data.py``);
- ``airline``: ``bench/data/airline_tweets.jsonl``, tweet sentiment (3 classes), one site per airline
  (6 sites, 504–3,822 tweets);
- ``movies``: the default data, review snippets of a movie grouped into sites of at least 100 snippets
  (movies in a seeded order, consecutive movies joined until a site has 100), the first 20 such sites;
- ``debian-mixed``: heterogeneity *inside* sites, for FedIns: ``debian``'s maintainers joined in pairs of
  the most different label mixes (10 sites of two populations each);
- ``iid``: the README's main job itself (the default data, 10 IID clients, half a round, 5 rounds), the
  check that a recipe for differing sites costs nothing where they do not differ.

The natural splits run as the heterogeneity issue measured them: ``--fraction 1 --rounds 10
--max-length 64`` with the split's own ``--clients``.

**Rows**, each on the split's own held-out test set (``--test-fraction``, the same for every row of a seed):

- ``pooled``: one client holding all the training data, 3 rounds of one full epoch of fine-tuning
  (``--partition iid --clients 1 --max-local-steps 0 --rounds 3 --probe-rounds 0``), the default head;
  ``pooled-cls``: the same with BERT's [CLS] pooler; ``pooled-plain``: a plain transformers + peft loop
  (the same LoRA, the [CLS] pooler and HF classifier, one AdamW over 3 epochs with linear decay, no
  fedpeft training code);
- ``local``: each site alone with the default recipe for as many rounds, in this process (fedpeft's own
  site training, no Flower): the mean and the best over sites;
- ``default``: ``fedpeft simulate`` with the data flags and the federation's size only;
- ``fedit-2026-12-06``: the defaults before this benchmark (fedit, no probe round);
- ``dp``: ``--dp`` (the preset, ε 8 per site);
- recipe rows (``--rows recipes``): the aggregation rules, the server optimizers, FedProx, SCAFFOLD, the
  label corrections and the frozen head, each on top of the default recipe; ``--rows peft``: SSF
  (``ssf``), FedIns (``fedins``: M 4, N 1 over every layer SSF follows; ``fedins-ln``: the LayerNorms only).

Every federated and pooled row is a real ``fedpeft simulate`` in its own process (one at a time: two
would fight over the cores). Runs land in ``--root/<split>/<row>-s<seed>/``; a finished run is not run
again and a stopped one resumes from its last completed round (``fedpeft simulate --resume``, byte-identical
to an uninterrupted run), so the bench can be stopped and restarted. ``--report`` prints, per split, each row's final
accuracy as mean ± half-range over seeds, ÷ the best pooled row's mean, and − the best local-only
site's mean.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulation import simulate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"


def movie_sites(out: Path, *, sites: int = 20, min_examples: int = 100, seed: int = 0) -> Path:
    """The default data's snippets grouped by movie into ``sites`` sites of >= ``min_examples`` each."""
    import numpy as np

    from fedpeft.data import DEFAULT_DATA

    if out.exists():
        return out
    with open(DEFAULT_DATA, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    by_movie: dict[str, list[dict]] = {}
    for row in rows:
        by_movie.setdefault(row["movie"], []).append(row)
    order = sorted(by_movie)
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    kept: list[dict] = []
    group: list[dict] = []
    made = 0
    for movie in order:
        group += by_movie[movie]
        if len(group) >= min_examples:
            kept += [{**r, "site": f"site-{made:02d}"} for r in group]
            group, made = [], made + 1
            if made == sites:
                break
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    return out


def mixed_sites(out: Path, *, source: Path = DATA / "debian_packages.jsonl", key: str = "maintainer") -> Path:
    """Heterogeneity inside sites: the ``debian`` split's 20 maintainers joined in pairs into 10 sites, each
    maintainer paired with the one whose label mix differs most from its own (greedy, by total-variation
    distance, the largest sites first), so that every site holds two different populations."""
    if out.exists():
        return out
    with open(source, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    labels = sorted({r["label"] for r in rows})

    def mix(name: str) -> list[float]:
        return [sum(r["label"] == lab for r in groups[name]) / len(groups[name]) for lab in labels]

    left = sorted(groups, key=lambda g: (-len(groups[g]), g))
    site_of: dict[str, str] = {}
    while len(left) > 1:
        first = left.pop(0)
        other = max(left, key=lambda g: (sum(abs(a - b) for a, b in zip(mix(first), mix(g), strict=True)), g))
        left.remove(other)
        site_of[first] = site_of[other] = f"pair-{len(site_of) // 2:02d}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({**r, "site": site_of[r[key]]}, ensure_ascii=False) + "\n" for r in rows
                           if r[key] in site_of), encoding="utf-8")
    return out


SPLITS = ("debian", "airline", "movies", "debian-mixed", "iid")
COMMON = ["--fraction", "1", "--rounds", "10", "--max-length", "64"]  # the natural splits' federation


def split_flags(name: str, root: Path) -> list[str]:
    """The data flags and the federation's size of a split (what a user of that federation would type).
    ``iid`` is the README's main job: no flag at all (10 IID clients, half of them a round, 5 rounds)."""
    if name == "debian":
        return ["--data", str(DATA / "debian_packages.jsonl"), "--partition", "natural:maintainer", "--clients", "20",
                "--test-fraction", "0.2", *COMMON]
    if name == "airline":
        return ["--data", str(DATA / "airline_tweets.jsonl"), "--partition", "natural:airline", "--clients", "6",
                *COMMON]
    if name == "movies":
        return ["--data", str(movie_sites(root / "movies.jsonl")), "--partition", "natural:site", "--clients", "20",
                "--test-fraction", "0.2", *COMMON]
    if name == "debian-mixed":
        return ["--data", str(mixed_sites(root / "debian-mixed.jsonl")), "--partition", "natural:site", "--clients",
                "10", "--test-fraction", "0.2", *COMMON]
    if name == "iid":
        return []
    raise SystemExit(f"unknown split {name!r}; known: {', '.join(SPLITS)}")
# one client, 3 full epochs of fine-tuning from the start (no probe round; nothing to correct drift from)
POOLED = ["--partition", "iid", "--clients", "1", "--rounds", "3", "--max-local-steps", "0", "--probe-rounds", "0",
          "--drift", "none"]
# The defaults of 2026-12-06, before this benchmark chose new ones (given explicitly, so that the row
# keeps meaning the same thing whatever the defaults become).
BEFORE = ["--strategy", "fedit", "--probe-rounds", "0", "--server-opt", "none", "--label-correction", "none",
          "--drift", "none", "--head-after-probe", "train", "--lr", "1e-3", "--batch-size", "16",
          "--max-local-steps", "30", "--head-lr", "0"]
CORE = {
    "pooled": POOLED,
    "pooled-cls": [*POOLED, "--pooling", "cls"],
    "pooled-plain": None,  # in this process
    "local": None,  # in this process
    "default": [],
    "fedit-2026-12-06": BEFORE,
    "dp": ["--dp"],
}
RECIPES = {
    "lora-fair": ["--strategy", "lora-fair"],
    "exact-svd": ["--strategy", "exact-svd"],
    "server-avgm": ["--server-opt", "avgm"],
    "server-adam": ["--server-opt", "adam", "--server-lr", "0.3"],
    "fedprox": ["--drift", "fedprox:0.01"],
    "scaffold": ["--drift", "scaffold"],
    "balanced": ["--label-correction", "balanced"],
    "fedlc": ["--label-correction", "fedlc"],
    "head-frozen": ["--head-after-probe", "freeze"],
}
# FedIns (issue 38) beside SSF: the paper's pool (every Linear and LayerNorm, M 4, N 1) and one that pools the
# LayerNorms only (a fifth of SSF's size per entry: the upload stays near SSF's)
PEFT_ROWS = {
    "ssf": ["--peft", "ssf"],
    "fedins": ["--peft", "ssf-pool"],
    "fedins-ln": ["--peft", "ssf-pool", "--ssf-target-modules", "LayerNorm"],
}
RECIPES = {**RECIPES, **PEFT_ROWS}


def flags_of(split: str, row: str, root: Path) -> list[str]:
    base = split_flags(split, root)
    extra = {**CORE, **RECIPES}[row]
    if row.startswith("pooled"):  # one client: no partition of the data, the test split unchanged
        base = [f for i, f in enumerate(base) if f not in ("--partition", "--clients", "--rounds", "--fraction")
                and (i == 0 or base[i - 1] not in ("--partition", "--clients", "--rounds", "--fraction"))]
        return [*base, "--fraction", "1", *extra]
    return [*base, *extra]


def run_row(split: str, row: str, seed: int, root: Path) -> dict:
    out = root / split / f"{row}-s{seed}"
    start = time.monotonic()
    if row == "local":  # one site has no federation to drift from: SCAFFOLD's c would equal its c_i
        result = local_only(flags_of(split, "default", root) + ["--drift", "none", "--seed", str(seed)])
    elif row == "pooled-plain":
        result = plain_loop(flags_of(split, "pooled", root) + ["--seed", str(seed)])
    else:
        metrics = out / "metrics.jsonl"
        flags = [*flags_of(split, row, root), "--seed", str(seed), "--quiet"]
        rounds = _config(flags[:-1]).rounds
        if not (metrics.exists() and len(metrics.read_text().splitlines()) == rounds + 1):
            if (out / "checkpoint.npz").exists():  # a stopped run: on from its last round (resume is byte-identical)
                simulate(out, flags, resume=True)
            else:
                if out.exists():
                    import shutil

                    shutil.rmtree(out)
                simulate(out, flags)
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        result = {"accuracy": records[-1]["accuracy"], "curve": [round(r["accuracy"], 4) for r in records],
                  "bytes_up_per_client": max(r.get("bytes_up_per_client", 0) for r in records)}
    return {"split": split, "row": row, "seed": seed, **result, "seconds": round(time.monotonic() - start, 1)}


def _config(flags: list[str]):
    """The FedPeftConfig ``fedpeft simulate FLAGS`` would run (the CLI's own defaults applied)."""
    from fedpeft.cli.main import build_parser, with_defaults
    from fedpeft.config import FedPeftConfig

    args = build_parser().parse_args(["simulate", *flags])
    given = {k: v for k, v in vars(args).items() if k in FedPeftConfig.__dataclass_fields__ and v is not None}
    return FedPeftConfig(**with_defaults(given))


def local_only(flags: list[str]) -> dict:
    """Each site trains alone for the run's rounds with the run's recipe (fedpeft's own site training,
    no Flower), evaluated on the same test split: per site, the mean and the best."""
    import torch

    from fedpeft.adapters import adapter_state, load_adapter_state
    from fedpeft.client_round import train_client_round
    from fedpeft.data.sources import load_split
    from fedpeft.site import Sites
    from server.evaluation import Evaluator

    cfg = _config(flags)
    torch.set_num_threads(cfg.client_cpus)
    split = load_split(cfg)
    evaluator = Evaluator(cfg, split=split)  # the coordinator's evaluation, on the same test split
    sites = Sites()  # the simulated sites as the ClientApp builds them, sharing one model
    model = sites.model(cfg, len(evaluator.label_names)).model
    init = adapter_state(model)
    accs = []
    for pid in range(cfg.clients):
        site = sites.site(cfg, {"partition-id": pid, "num-partitions": cfg.clients}, label_names=evaluator.label_names)
        load_adapter_state(model, init)
        for rnd in range(1, cfg.rounds + 1):
            train_client_round(cfg, model, site.data, server_round=rnd, partition_id=pid, features=site.features)
        accs.append(evaluator.evaluate(adapter_state(model))["accuracy"])
    return {"accuracy": statistics.mean(accs), "best": max(accs), "per_site": [round(a, 4) for a in accs]}


def plain_loop(flags: list[str], *, epochs: int = 3, lr: float = 1e-3, batch_size: int = 16) -> dict:
    """Pooled training without fedpeft's training code: transformers' BERT classifier ([CLS] pooler, HF
    head), peft's LoRA on the same modules, one AdamW over ``epochs`` with linear decay to zero."""
    import numpy as np
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    from fedpeft.data.sources import load_split
    from fedpeft.models import resolve_model_path

    cfg = _config(flags)
    torch.set_num_threads(cfg.client_cpus)
    torch.manual_seed(cfg.seed)
    train, test = load_split(cfg)
    path = resolve_model_path(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(train.label_names),
                                                               local_files_only=True)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                             target_modules=["query", "value"]))

    def batch_of(table, rows):
        enc = tokenizer([table.texts[i] for i in rows], truncation=True, max_length=cfg.max_length, padding=True,
                        return_tensors="pt")
        return enc, torch.as_tensor(table.labels[rows])

    steps = epochs * math.ceil(len(train) / batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    rng = np.random.default_rng(cfg.seed)
    model.train()
    for _ in range(epochs):
        order = rng.permutation(len(train))
        for start in range(0, len(order), batch_size):
            enc, labels = batch_of(train, order[start:start + batch_size])
            model(**enc, labels=labels).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 64):
            rows = np.arange(start, min(start + 64, len(test)))
            enc, labels = batch_of(test, rows)
            correct += int((model(**enc).logits.argmax(-1) == labels).sum())
    return {"accuracy": correct / len(test)}


def report(results: list[dict]) -> None:
    """Per split: mean ± half-range over seeds, ÷ best pooled, − best local-only (a markdown table). A run
    recorded twice (two benches on one root) counts once."""
    results = list({(r["split"], r["row"], r["seed"]): r for r in results}.values())
    for split in dict.fromkeys(r["split"] for r in results):
        rows: dict[str, list[dict]] = {}
        for r in results:
            if r["split"] == split:
                rows.setdefault(r["row"], []).append(r)
        means = {row: statistics.mean(r["accuracy"] for r in rs) for row, rs in rows.items()}
        pooled = max((m for row, m in means.items() if row.startswith("pooled")), default=None)
        best_local = statistics.mean(r["best"] for r in rows["local"]) if "local" in rows else None
        print(f"\n**{split}** (best pooled {pooled if pooled is None else f'{pooled:.4f}'}, best site alone "
              f"{best_local if best_local is None else f'{best_local:.4f}'})\n")
        print("| row | seeds | final accuracy | ÷ best pooled | − best site alone |")
        print("|---|---:|---:|---:|---:|")
        for row, rs in rows.items():
            accs = [r["accuracy"] for r in rs]
            half = (max(accs) - min(accs)) / 2
            ratio = f"{means[row] / pooled:.3f}" if pooled else "—"
            gap = f"{means[row] - best_local:+.4f}" if best_local is not None else "—"
            extra = ""
            if row == "local":
                extra = f" (best site {statistics.mean(r['best'] for r in rs):.4f})"
            print(f"| {row} | {len(rs)} | {means[row]:.4f} ± {half:.4f}{extra} | {ratio} | {gap} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", default="debian,airline,movies", help=f"of {', '.join(SPLITS)}")
    parser.add_argument("--rows", default="core", help="comma-separated row names or groups (core, recipes, peft)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", default="runs/bench-heterogeneity", help="where runs and results.jsonl go")
    parser.add_argument("--report", action="store_true", help="print the tables from ROOT/results.jsonl and stop")
    args = parser.parse_args()
    root = Path(args.root)
    results_file = root / "results.jsonl"
    if args.report:
        report([json.loads(line) for line in results_file.read_text().splitlines()])
        return
    groups = {"core": list(CORE), "recipes": list(RECIPES), "peft": list(PEFT_ROWS)}
    names = list(dict.fromkeys(n for item in args.rows.split(",") for n in groups.get(item, [item])))
    unknown = [n for n in names if n not in CORE and n not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; known: {', '.join([*CORE, *RECIPES])}")
    root.mkdir(parents=True, exist_ok=True)

    def done() -> set[tuple[str, str, int]]:  # read before each row: another bench may share the root
        if not results_file.exists():
            return set()
        return {(r["split"], r["row"], r["seed"]) for r in map(json.loads, results_file.read_text().splitlines())}

    for seed in (int(s) for s in args.seeds.split(",")):
        for split in args.splits.split(","):
            for row in names:
                if (split, row, seed) in done():
                    continue
                result = run_row(split, row, seed, root)
                print(json.dumps(result), flush=True)
                with open(results_file, "a") as fh:
                    fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
