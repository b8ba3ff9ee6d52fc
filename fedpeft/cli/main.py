"""``fedpeft``: the command line. Errors in the input print one line and exit with status 2."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

from fedpeft.cli import deploy
from fedpeft.config import (
    DP_DEFAULTS,
    PEFT_DEFAULT_STRATEGY,
    PEFT_FIELDS,
    SEQ_CLS_FIELDS,
    FedPeftConfig,
    field_help,
)
from fedpeft.errors import FedPeftError
from privacy.modes import privacy_mode
from server.checkpoint import load_checkpoint, resumed_config
from server.checks import check_config
from server.simulate import simulate, simulation_environment

# Flags shown first in --help, in this order; every other config field follows.
_MAIN_FLAGS = (
    "clients",
    "rounds",
    "fraction",
    "local_epochs",
    "batch_size",
    "lr",
    "data",
    "text_column",
    "label_column",
    "partition",
    "seed",
    "out",
)


# What each string flag takes, for --help (every other flag shows its type).
_METAVARS = {
    "model": "DIR|NAME", "peft": "METHOD", "data": "FILE", "text_column": "COLUMN", "label_column": "COLUMN",
    "partition": "SPEC", "strategy": "NAME", "client_ranks": "RANKS", "lora_target_modules": "NAMES",
    "ssf_target_modules": "NAMES", "short_round": "ACTION", "robust": "RULE", "codec": "SPEC",
    "downlink_codec": "SPEC", "dp_clipping": "MODE", "dp_accountant": "NAME", "run_id": "ID", "out": "RUN_DIR",
    "resume": "RUN_DIR", "task": "TASK", "device": "DEVICE", "precision": "PRECISION",
}
_EXAMPLES = """examples:
  fedpeft simulate --out runs/demo                          the main job: MiniLM, 10 clients, 5 rounds
  fedpeft simulate --data my.csv --partition natural:site   one client per value of a column
  fedpeft simulate --dp --out runs/private                  local DP, epsilon 8 per site (delta 1e-5)
  fedpeft simulate --dp local --dp-epsilon 3                the same preset at epsilon 3
  fedpeft simulate --codec topk:0.1+int8                    compressed updates
  fedpeft simulate --resume runs/demo                       continue a run that stopped
  fedpeft simulate --ray-address 10.0.0.5:6379              the clients on an existing Ray cluster
  fedpeft simulate --task causal-lm --model ~/llama --data chat.jsonl   instruction-tune a decoder LM
  fedpeft report runs/demo && fedpeft export runs/demo --merge --out merged/"""


def _flag(value: str) -> bool:
    """A boolean flag's value: true/false, yes/no, on/off, 1/0."""
    words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
    try:
        return words[value.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated parameter-efficient fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim = sub.add_parser(
        "simulate",
        help="run a federated fine-tune with simulated clients on this machine",
        description="Run a federated LoRA or SSF fine-tune with simulated clients; writes RUN_DIR "
        "(metrics.jsonl, traffic.jsonl, config.json, checkpoint.npz, adapter/, report.md).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = FedPeftConfig()
    helps = field_help()
    main = sim.add_argument_group("main options")
    more = sim.add_argument_group("more options")
    names = list(_MAIN_FLAGS) + [f.name for f in dataclasses.fields(FedPeftConfig) if f.name not in _MAIN_FLAGS]
    for name in names:
        default = getattr(defaults, name)
        group = main if name in _MAIN_FLAGS else more
        extra: dict = {"nargs": "?", "const": "local", "metavar": "MODE"} if name == "dp" else {}
        if isinstance(default, bool):  # --flag alone: on; --flag false: off
            extra = {"nargs": "?", "const": True, "metavar": "BOOL"}
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=_flag if isinstance(default, bool) else type(default),
            default=None,
            **({"metavar": _METAVARS.get(name, type(default).__name__.upper())} | extra),
            help=f"{helps[name]} (default: {default!r})"
            + ("; --dp alone: local, with the DP defaults below" if name == "dp" else ""),
        )
    sim.add_argument_group("cluster").add_argument(
        "--ray-address", metavar="ADDRESS", default=None,
        help="run the clients on this existing Ray cluster (HOST:PORT of its head, or 'auto') instead of starting "
        "a local Ray; every node needs fedpeft installed as here and the data and model at the same paths",
    )
    shown = sim.add_argument_group("output").add_mutually_exclusive_group()
    shown.add_argument("--verbose", action="store_true", help="also show Flower's and Ray's logs")
    shown.add_argument("--quiet", action="store_true", help="print nothing but errors (for scripts)")
    shown.add_argument("--json", action="store_true", help="print one JSON object per line: start, each round, end")
    preset = ", ".join(
        f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
        for k, v in DP_DEFAULTS.items()
    )
    sim.epilog = _EXAMPLES + "\n\nWith --dp local and no value of your own, these apply:\n" + textwrap.fill(
        preset, width=96, initial_indent="  ", subsequent_indent="  "
    )

    audit = sub.add_parser(
        "audit",
        help="verify a run's privacy ledger and recompute every epsilon",
        description="Verify RUN_DIR/privacy_ledger.jsonl (hash chain, signatures, per-site counts), recompute each "
        "site's epsilon from its logged (sigma, q, steps) with its own accountant and with dp-accounting's PLD, and "
        "check every budget. Exit status 1 on any violation.",
    )
    audit.add_argument("run_dir", metavar="RUN_DIR", help="directory of a run made with --dp")
    audit.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    audit.add_argument("--empirical", action="store_true", help="show the empirical audit of a run made with "
                       "--canaries: the measured epsilon lower bound next to the accountant's (exit 1 if above it)")
    audit.add_argument("--keys", metavar="FILE", help="JSON {site: base64 Ed25519 public key} obtained from the sites")
    audit.add_argument(
        "--tolerance", type=float, default=0.05, help="relative gap allowed between accountants (default: 0.05)"
    )
    audit.add_argument(
        "--plot", metavar="PNG", help="where to draw epsilon vs round (default: RUN_DIR/privacy_epsilon.png)"
    )
    report = sub.add_parser(
        "report",
        help="draw a run's figures and write RUN_DIR/report.md",
        description="Draw accuracy/loss, traffic, aggregation residual and (with DP) epsilon per site and round "
        "as PNGs under RUN_DIR/report/, and write RUN_DIR/report.md embedding them with the configuration and the "
        "communication, reliability and privacy summaries. Every run writes it at its end; this redraws it.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="directory of a run (finished or not)")
    export = sub.add_parser(
        "export",
        help="merge a run's adapter into its base model and save a plain transformers model",
        description="Fold the run's LoRA (peft merge_and_unload) or SSF adapter into the base model and save it with "
        "its tokenizer and label names: it loads with AutoModelForSequenceClassification (causal-lm: "
        "AutoModelForCausalLM), without fedpeft or peft.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="directory of a finished run (it holds adapter/)")
    export.add_argument("--merge", action="store_true", required=True,
                        help="merge the adapter into the base weights (the only export there is; required, so "
                        "that the command says what it does)")
    export.add_argument("--out", required=True, metavar="DIR", help="where to save the merged model")
    export.add_argument("--base", metavar="MODEL", help="the base model's directory, when the path the run "
                        "recorded does not resolve from here (default: the run's own)")
    export.add_argument("--force", action="store_true", help="replace DIR if it exists")
    deploy.add_parsers(sub)
    key = sub.add_parser(
        "site-key",
        help="print a site's ledger public key (creating the key if needed)",
        description="Print the base64 Ed25519 public key a site signs its privacy ledger entries with, "
        "for an auditor's --keys file.",
    )
    key.add_argument("site", help="the site's name (simulation: partition-00000, ...)")
    key.add_argument(
        "--state-dir", default=None, help="the site's state directory (default: $FEDPEFT_STATE_DIR or ~/.fedpeft/state)"
    )
    return parser


def dp_defaults(given: dict) -> dict:
    """The ``--dp`` defaults that apply: ε only when the user set neither ε nor σ, δ unless given; the
    probe follows ``--rounds`` (every round a probe round, as the preset has it) unless set; the LoRA
    settings (and the LoRA strategy) only when the PEFT method is LoRA."""
    defaults = dict(DP_DEFAULTS)
    if "dp_epsilon" in given or "dp_noise_multiplier" in given:
        defaults.pop("dp_epsilon", None)
    if "rounds" in given and "probe_rounds" not in given and defaults.get("probe_rounds") == defaults.get("rounds"):
        defaults["probe_rounds"] = given["rounds"]
    peft = given.get("peft", "lora")
    if peft != "lora":
        defaults = {k: v for k, v in defaults.items() if k not in PEFT_FIELDS["lora"] and k != "strategy"}
    if given.get("task", "seq-cls") != "seq-cls":  # no classification head to probe or give its own learning rate
        defaults = {k: v for k, v in defaults.items() if k not in SEQ_CLS_FIELDS}
    return defaults


def with_defaults(given: dict) -> dict:
    """The flags given plus the defaults they imply: ``--dp`` alone brings the DP preset, and a PEFT
    method without ``--strategy`` brings its own aggregation (``--peft ssf``: ssf-avg)."""
    if given.get("dp") == "local":
        given = {**dp_defaults(given), **given}
    if "strategy" not in given and given.get("peft") in PEFT_DEFAULT_STRATEGY:
        given = {**given, "strategy": PEFT_DEFAULT_STRATEGY[given["peft"]]}
    return given


def resume_config(given: dict) -> FedPeftConfig:
    """``--resume RUN_DIR``: the run's own config; any other setting is refused rather than ignored."""
    others = [f"--{name.replace('_', '-')}" for name in given if name != "resume"]
    if others:
        raise FedPeftError(f"--resume continues a run under its own config.json; drop {' '.join(others)}")
    return resumed_config(FedPeftConfig(resume=given["resume"]))


def _simulate(args: argparse.Namespace) -> int:
    simulation_environment()  # before the checks below, which may import Flower
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(FedPeftConfig) if getattr(args, f.name) is not None
    }
    cfg = resume_config(given) if "resume" in given else FedPeftConfig(**with_defaults(given)).with_default_out()
    # deferred: heavy (torch, pandas) on the CLI start-up path: a bad flag has failed above without them
    from fedpeft.preflight import check_run

    cfg = check_run(cfg, clients_given="resume" in given or "clients" in given, here=not args.ray_address)
    if "resume" in given:
        done = load_checkpoint(Path(cfg.out)).round
        if done >= cfg.rounds and (Path(cfg.out) / "adapter").is_dir():
            if not args.quiet:
                print(f"fedpeft: {cfg.out} completed its {cfg.rounds} rounds; nothing to resume")
            return 0
        if not (args.quiet or args.json):
            print(f"fedpeft: resuming {cfg.out} after round {done} of {cfg.rounds}")
    check_config(cfg)
    mode = privacy_mode(cfg)
    output = "json" if args.json else "quiet" if args.quiet else "table"
    if output == "json":
        from server.console import emit  # deferred: heavy (rich, scipy, matplotlib) on the CLI start-up path

        emit("start", out=cfg.out, clients=cfg.clients, rounds=cfg.rounds,
             dp=mode.describe(cfg) if mode.private else "off", resume=bool(cfg.resume))
    elif output == "table":
        print(f"fedpeft: {cfg.clients} clients, {cfg.rounds} rounds, partition {cfg.partition}, writing {cfg.out}")
        if mode.private:
            print(f"fedpeft: {mode.describe(cfg)}")

    simulate(cfg, verbose=args.verbose, output=output, ray_address=args.ray_address)
    out = Path(cfg.out)
    if output == "json":
        from server.report import REPORT_FILE, load_run  # deferred: heavy (scipy, matplotlib), as above

        emit("end", final=load_run(out).metrics[-1], adapter=str(out / "adapter"), report=str(out / REPORT_FILE))
    elif output == "table":
        # deferred: heavy (rich, scipy, matplotlib) on the CLI start-up path
        from rich.console import Console

        from server.console import summary_table

        Console(soft_wrap=True).print(summary_table(out))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "audit":
            from fedpeft.cli.audit import run_audit  # deferred: heavy (cryptography, rich) on the CLI start-up path

            return run_audit(args)
        if args.command == "report":
            from server.report import write_report  # deferred: heavy (scipy, matplotlib) on the CLI start-up path

            print(f"fedpeft: report written to {write_report(args.run_dir)}")
            return 0
        if args.command == "export":
            # deferred: heavy (torch, pandas) on the CLI start-up path
            from fedpeft.export import adapter_meta, export_merged
            from fedpeft.tasks import TASKS

            out = export_merged(args.run_dir, args.out, base=args.base, force=args.force)
            auto = TASKS.get(str(adapter_meta(Path(args.run_dir)).get("task", "seq-cls"))).auto_class
            remote = ", trust_remote_code=True" if any(out.glob("modeling_*.py")) else ""  # the head's code beside it
            what = "instance-adaptive FedIns model" if (out / "modeling_fedins.py").exists() else "merged model"
            print(f"fedpeft: {what} saved to {out} (load it with transformers' {auto}.from_pretrained(path{remote}))")
            return 0
        if args.command in ("certs", "link", "node", "connection"):
            return getattr(deploy, f"run_{args.command}")(args)
        if args.command == "site-key":
            from fedpeft.cli.audit import print_site_key  # deferred: heavy (cryptography, rich), as above

            return print_site_key(args)
    except FedPeftError as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpeft: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
