"""What a real deployment adds to local training, with and without the site worker (issue 23).

What is measured
----------------
In one run of this script, on this machine's loopback:

* **bare**: each site's local training run alone, one process per site (both at once, as the deployed sites
  train at once), with the same settings the federated run gives them: the model and the site's file are
  loaded first (untimed), then ``--rounds`` client-rounds of :func:`fedpeft.client_round.train_client_round`
  (the function the ClientApp calls) are timed. The bare wall time is the slower site's.
* **worker** / **no-worker**: a real federation started with docs/deployment.md's deployment commands (the same
  code as ``tests/test_deployment.py``): ``fedpeft certs``, ``fedpeft link`` (a SuperLink with TLS and
  SuperNode authentication, gRPC Fleet API), two ``fedpeft node`` sites (``--no-worker`` for the second
  mode), then ``flwr run`` with ``--rounds`` rounds, both sites sampled every round, the same local steps.
  The federated wall time runs from the moment round 0's line lands in ``metrics.jsonl`` (the initial
  adapter evaluated; the sites have answered the discovery query, so a worker has loaded) to the moment
  the last round's line lands: the rounds themselves, including the coordinator's evaluation after each
  (kept small, ``--eval-rows``).
* **secure**: the worker mode with ``--secure-aggregation`` (four message stages a round; issue 37's target:
  <= 1.3x the worker mode's wall time).

Reported per federated mode: federated ÷ bare (target with the worker: <= 1.10); the median over rounds
2.. of a round's wall time minus its slower site's ``seconds_train`` (everything a round costs that is not
training: messages, process starts, loading, aggregation, evaluation); and from ``traffic.jsonl``, the
median over rounds 2.. and sites of ``seconds_wait + seconds_load``: with the worker, from the moment the
SuperNode stored the message as a task to the first training step (target <= 1 s at a site that already
trained a round; the worker takes the task itself, no process starts). Without the worker no reply says
where its time went (``—``); the per-message process start is in the round's overhead.

Running it
----------
From the repository root::

    python bench/deployed.py --repeats 2                      # docs/deployment.md's run (about 25 minutes)
    python bench/deployed.py --rounds 2 --steps 3 --modes bare,worker   # a quick check

This is a benchmark, not a test: it prints results and asserts nothing about them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SITES = ("hospital-a", "hospital-b")
MODES = ("bare", "worker", "no-worker", "secure")  # secure: the worker mode with --secure-aggregation


def site_config(args: argparse.Namespace, data: str) -> object:
    from fedpeft.config import FedPeftConfig

    return FedPeftConfig(data=data, test_fraction=0.5, max_local_steps=args.steps, local_epochs=1000,
                         batch_size=args.batch_size, max_length=args.max_length, client_cpus=args.cpus,
                         rounds=args.rounds, clients=2, fraction=1.0)


def bare_site(args: argparse.Namespace) -> None:
    """``--bare-site FILE``: load, then time ``--rounds`` client-rounds; prints ``{"seconds": s, ...}``."""
    import torch

    from fedpeft.adapters import load_adapter_state
    from fedpeft.client_round import train_client_round
    from fedpeft.data.sources import load_split
    from fedpeft.site import Sites

    cfg = site_config(args, args.eval)
    torch.set_num_threads(args.cpus)
    label_names = list(load_split(cfg)[0].label_names)
    # the site as the ClientApp builds it (client.sites.site_for): its model, and its own file tokenized
    site = Sites().site(cfg, {"data-path": args.bare_site}, label_names=label_names)
    model = site.model.model
    rounds = []
    started = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        t = time.perf_counter()
        load_adapter_state(model, site.model.initial)
        result = train_client_round(cfg, model, site.data, server_round=rnd, partition_id=0,
                                    features=site.features)
        rounds.append(time.perf_counter() - t)
    print(json.dumps({"seconds": time.perf_counter() - started, "rounds": rounds, "steps": result["steps"]}))


def make_files(root: Path, args: argparse.Namespace) -> None:
    from fedpeft.data import DEFAULT_DATA

    need = args.eval_rows + 2 * args.site_rows
    with open(DEFAULT_DATA, encoding="utf-8") as fh:
        rows = [json.loads(line) for _, line in zip(range(need), fh, strict=False)]
    if len(rows) < need:
        raise SystemExit(f"the default data has {len(rows)} rows, fewer than the {need} asked for")
    parts = {"eval": rows[:args.eval_rows], SITES[0]: rows[args.eval_rows:args.eval_rows + args.site_rows],
             SITES[1]: rows[args.eval_rows + args.site_rows:need], "intruder": rows[:1]}
    for name, part in parts.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                                                     for r in part))


def run_bare(root: Path, args: argparse.Namespace) -> dict:
    procs = [subprocess.Popen([sys.executable, __file__, "--bare-site", str(root / f"{s}.jsonl"),
                               "--eval", str(root / "eval.jsonl"), *passthrough(args)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for s in SITES]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"bare site failed:\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    per_round = [max(r["rounds"][i] for r in results) for i in range(args.rounds)]
    return {"wall": max(r["seconds"] for r in results), "per_round": per_round[1:] or per_round, "sites": results}


def run_federated(root: Path, args: argparse.Namespace, *, worker: bool, secure: bool = False) -> dict:
    from tests.test_deployment import Federation, command, free_port, online_nodes, wait_for

    fed = Federation(root, Path(""))
    try:
        fed.start_link()
        for site in SITES:
            line = fed.node_line(site, free_port()) + ("" if worker else " --no-worker")
            fed.start(line.replace(" --dp-epsilon 8", ""), site)
        wait_for(lambda: len(online_nodes(fed)) == 2, 180, "both SuperNodes online")
        out = root / "run"
        overrides = (f'rounds={args.rounds} fraction=1.0 data="{root / "eval.jsonl"}" test-fraction=0.5 '
                     f'max-local-steps={args.steps} local-epochs=1000 batch-size={args.batch_size} '
                     f'max-length={args.max_length} client-cpus={args.cpus} round-timeout=3600 out="{out}"'
                     + (" secure-aggregation=true" if secure else ""))
        line = re.sub(r"--run-config '[^']*'", f"--run-config {shlex.quote(overrides)}", command("flwr run")[0])
        submitted = time.perf_counter()
        proc = subprocess.Popen(["bash", "-c", fed.ports(line)], env=fed.home("cli"), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        landed: list[float] = []  # when each metrics.jsonl line appeared
        metrics = out / "metrics.jsonl"
        while len(landed) < args.rounds + 1:
            count = len(metrics.read_text().splitlines()) if metrics.exists() else 0
            now = time.perf_counter()
            landed += [now] * (count - len(landed))
            if proc.poll() is not None and count < args.rounds + 1:
                raise SystemExit(f"the run ended after {count} metrics lines; logs in {root}")
            time.sleep(0.05)
        proc.wait(600)
        traffic = [json.loads(x) for x in (out / "traffic.jsonl").read_text().splitlines()]
        loads = [fed.log(s).count("site worker started") for s in SITES] if worker else None
        cpu = cpu_seconds(fed)
    finally:
        fed.close()
    rounds = [b - a for a, b in zip(landed, landed[1:], strict=False)]
    train = {r: max(t.get("seconds_train", 0.0) for t in traffic if t["round"] == r) for r in range(1, args.rounds + 1)}
    later = range(2, args.rounds + 1) if args.rounds > 1 else range(1, 2)
    overhead = [rounds[r - 1] - train[r] for r in later]
    first_step = [t["seconds_wait"] + t["seconds_load"]  # only a worker's reply has seconds_wait
                  for t in traffic if t["round"] in later and t["status"] == "accepted" and "seconds_wait" in t]
    return {"wall": landed[-1] - landed[0], "startup": landed[0] - submitted, "rounds": rounds,
            "train": [train[r] for r in later],
            "overhead": statistics.median(overhead),
            "first_step": statistics.median(first_step) if first_step else None,
            "loads": statistics.median(t["seconds_load"] for t in traffic if t["round"] in later),
            "statuses": sorted({t["status"] for t in traffic}), "worker_starts": loads, "cpu": cpu}


KINDS = (("client.worker", "workers"), ("flwr-serverapp", "serverapp"), ("flwr-clientapp", "clientapps"),
         ("superexec", "superexec"), ("superlink", "superlink"), ("supernode", "supernodes"))  # in the program's name


def cpu_seconds(fed: object) -> dict[str, float]:
    """CPU seconds used so far by the federation's processes, by kind (the site workers, the SuperLink, the
    ServerApp, the SuperNodes, SuperExec, the per-message ClientApp processes that were waited for), and
    ``flower``: all but the workers. A process's waited-for children count as its own kind."""
    import psutil

    used: dict[str, float] = {}
    for proc in fed.procs:  # type: ignore[attr-defined]
        try:
            top = psutil.Process(proc.pid)
            tree = [top, *top.children(recursive=True)]
        except psutil.Error:
            continue
        for p in tree:
            try:
                t = p.cpu_times()
                line = " ".join(p.cmdline()[:3])  # the interpreter, the program or -m and its module
            except psutil.Error:
                continue
            kind = next((name for key, name in KINDS if key in line), "other")
            used[kind] = used.get(kind, 0.0) + t.user + t.system + t.children_user + t.children_system
    used["flower"] = sum(v for k, v in used.items() if k != "workers")
    return {k: round(v, 1) for k, v in sorted(used.items())}


def passthrough(args: argparse.Namespace) -> list[str]:
    return ["--rounds", str(args.rounds), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--cpus", str(args.cpus)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=90, help="local steps per site per round (90: about 32 s here)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--cpus", type=int, default=1, help="torch threads per site (client-cpus)")
    parser.add_argument("--site-rows", type=int, default=600)
    parser.add_argument("--eval-rows", type=int, default=64, help="rows of the evaluation file")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=1, help="bare and federated runs, alternating order")
    parser.add_argument("--keep", type=Path, help="keep logs and run directories here")
    parser.add_argument("--bare-site", help=argparse.SUPPRESS)
    parser.add_argument("--eval", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_site:
        return bare_site(args)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES) or "bare" not in modes:
        parser.error(f"--modes takes bare (always needed: it is the denominator) and any of {MODES[1:]}")
    base = Path(tempfile.mkdtemp(prefix="fd-", dir="/tmp"))  # short: socket paths hold at most 107 bytes
    results: list[dict[str, dict]] = []
    try:
        for repeat in range(args.repeats):
            order = ["bare", *[m for m in MODES[1:] if m in modes]]
            results.append({})
            for mode in order if repeat % 2 == 0 else order[::-1]:  # alternate, against drift
                root = base / f"{repeat}-{mode}"
                root.mkdir()
                make_files(root, args)
                print(f"# repeat {repeat + 1}, {mode} ...", flush=True)
                results[-1][mode] = (run_bare(root, args) if mode == "bare"
                                     else run_federated(root, args, worker=mode != "no-worker",
                                                        secure=mode == "secure"))
                print(f"# repeat {repeat + 1}, {mode}: {json.dumps(results[-1][mode])}", flush=True)
    finally:
        if args.keep:
            shutil.copytree(base, args.keep, dirs_exist_ok=True)
        shutil.rmtree(base, ignore_errors=True)
    bare = [r["bare"]["wall"] for r in results]
    print(f"\nMiniLM + LoRA, 2 sites x {args.steps} steps x {args.rounds} rounds, batch {args.batch_size}, "
          f"max length {args.max_length}, {args.cpus} thread(s) per site, {args.repeats} repeat(s); bare "
          f"{', '.join(f'{b:.1f}' for b in bare)} s\n")
    print("| mode | federated ÷ bare (median; each repeat) | non-training s per round | message at the site → "
          "first step (s) | seconds_load | a round's training ÷ bare's | Flower CPU s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for mode in MODES[1:]:
        if mode not in results[0]:
            continue
        runs = [(r[mode], r["bare"]) for r in results]
        ratios = [m["wall"] / b["wall"] for m, b in runs]
        slow = [statistics.median(m["train"]) / statistics.median(b["per_round"]) for m, b in runs]
        med = {key: statistics.median(m[key] for m, _ in runs) for key in ("overhead", "loads")}
        firsts = [m["first_step"] for m, _ in runs if m["first_step"] is not None]
        first = f"{statistics.median(firsts):.2f}" if firsts else "—"
        print(f"| {mode} | **{statistics.median(ratios):.3f}** ({', '.join(f'{x:.3f}' for x in ratios)}) | "
              f"{med['overhead']:.2f} | {first} | {med['loads']:.2f} | "
              f"{statistics.median(slow):.3f} | {statistics.median(m['cpu']['flower'] for m, _ in runs):.0f} |")

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
