"""Does a change of code leave what a run computes unchanged? Runs a fixed set of short simulations and
prints a digest of each run's ``metrics.jsonl`` (without wall-clock seconds) and adapter; ``--compare``
holds two such sets side by side.

    python bench/behaviour_unchanged.py --out /tmp/before          # on the old code (a worktree of it)
    python bench/behaviour_unchanged.py --out /tmp/after           # on the new code
    python bench/behaviour_unchanged.py --compare /tmp/before /tmp/after
    python bench/behaviour_unchanged.py --compare /tmp/before /tmp/after --except bytes_down,compression_ratio_down

The runs are ``fedpeft simulate --rounds 2 --seed 0`` plus, in turn: nothing; ``--dp``; ``--dp central
--clients 20 --fraction 0.5``; ``--peft ssf``; ``--codec topk:0.3+int4``. DP noise and central DP's secret
draw of sites come from the OS entropy pool, so for this check alone the runs set
``FEDPEFT_UNSAFE_NOISE_SEED`` (:mod:`privacy.randomness`): the noise is then derived from it and the same
in both sets (every run has the run id ``behaviour-check``, which the noise's derivation includes). Such
runs have no privacy; they exist to compare bytes. The ledger's head hash is left out of the digest: it
chains signatures made with keys each site draws afresh.

``--compare`` digests the two sets' run directories again, so that ``--except`` can leave metrics out
that a change is meant to change (the typed requests of 2026-12-07 send a site only its settings: the
broadcast's ``bytes_down`` shrank, nothing else may move), and names every one it left out. An
adapter's ``adapter_config.json`` is compared as JSON with ``target_modules`` sorted: peft writes that
set in the order of Python's per-process string hashing, so two runs of the same code differ there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

RUNS = {
    "default": [],
    "dp-local": ["--dp"],
    "dp-central": ["--dp", "central", "--dp-epsilon", "8", "--clients", "20", "--fraction", "0.5"],
    "ssf": ["--peft", "ssf"],
    "codec": ["--codec", "topk:0.3+int4"],
}
# keys that differ from run to run whatever the code: wall-clock seconds, and the ledger's head hash (it
# chains Ed25519 signatures made with keys each site draws afresh)
UNSTABLE = ("seconds", "ledger_head")


def digest(run: Path, *, without: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of the run's metrics (timings and the keys starting with one of ``without`` dropped) and of
    every adapter file (``adapter_config.json`` canonically: see the module doc)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in row.items() if not k.startswith((*UNSTABLE, *without))} for row in rows]
    out = {"metrics.jsonl": hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()}
    for path in sorted((run / "adapter").iterdir()):
        data = path.read_bytes()
        if path.name == "adapter_config.json":
            config = json.loads(data)
            if isinstance(config.get("target_modules"), list):
                config["target_modules"] = sorted(config["target_modules"])
            data = json.dumps(config, sort_keys=True).encode()
        out[f"adapter/{path.name}"] = hashlib.sha256(data).hexdigest()
    return out


def run_all(out: Path, names: list[str]) -> None:
    env = {**os.environ, "FEDPEFT_UNSAFE_NOISE_SEED": "36", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, flags in RUNS.items():
        if name not in names:
            continue
        run = out / name
        cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--rounds", "2", "--seed", "0", "--quiet",
               "--run-id", "behaviour-check", "--out", str(run), *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        digests[name] = digest(run)
        print(name, json.dumps(digests[name]), flush=True)
    (out / "digests.json").write_text(json.dumps(digests, indent=2) + "\n")


def compare(a: Path, b: Path, *, without: tuple[str, ...] = ()) -> int:
    left, right = ({name: digest(d / name, without=without) for name in RUNS if (d / name).is_dir()} for d in (a, b))
    if without:
        print(f"left out of metrics.jsonl: every key starting with {', '.join(without)}")
    differ = 0
    for name in RUNS:
        if name not in left or name not in right:
            print(f"{name:12} not run in {a if name not in left else b}")
            continue
        same = left.get(name) == right.get(name)
        differ += not same
        print(f"{name:12} {'identical' if same else 'DIFFERENT'}")
        if not same:
            for key in sorted(set(left.get(name, {})) | set(right.get(name, {}))):
                if left.get(name, {}).get(key) != right.get(name, {}).get(key):
                    print(f"  {key} differs")
    return 1 if differ else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="run the set here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two sets")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"with --out: which of {', '.join(RUNS)}")
    parser.add_argument("--except", dest="without", default="", metavar="KEY,...",
                        help="with --compare: metrics keys (prefixes) a change is meant to move")
    args = parser.parse_args()
    if args.compare:
        raise SystemExit(compare(*args.compare, without=tuple(k for k in args.without.split(",") if k)))
    if not args.out:
        parser.error("give --out DIR or --compare A B")
    names = [n for n in args.runs.split(",") if n]
    if not names or set(names) - set(RUNS):
        parser.error(f"--runs takes some of {', '.join(RUNS)}")
    run_all(args.out, names)


if __name__ == "__main__":
    main()
