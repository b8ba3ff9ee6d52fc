"""``fedpeft``: the command line. Errors in the input print one line and exit with status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fedpeft.config import (
    DP_DEFAULTS,
    DP_PRIVACY_KEYS,
    PEFT_DEFAULT_STRATEGY,
    PEFT_FIELDS,
    FedPeftConfig,
    describe_dp,
    field_help,
)
from fedpeft.errors import FedPeftError

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpeft", description="Federated parameter-efficient fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sim = sub.add_parser(
        "simulate",
        help="run a federated fine-tune with simulated clients on this machine",
        description="Run a federated LoRA or SSF fine-tune with simulated clients; writes RUN_DIR "
        "(metrics.jsonl, config.json, adapter/).",
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
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=type(default),
            default=None,
            **({"metavar": type(default).__name__.upper() if name not in ("out", "resume") else "RUN_DIR"} | extra),
            help=f"{helps[name]} (default: {default!r})"
            + ("; --dp alone: local, with the DP defaults below" if name == "dp" else ""),
        )
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    sim.epilog = "With --dp local and no value of your own, these apply: " + ", ".join(
        f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
        for k, v in DP_DEFAULTS.items()
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
    audit.add_argument("--keys", metavar="FILE", help="JSON {site: base64 Ed25519 public key} obtained from the sites")
    audit.add_argument(
        "--tolerance", type=float, default=0.05, help="relative gap allowed between accountants (default: 0.05)"
    )
    audit.add_argument(
        "--plot", metavar="PNG", help="where to draw epsilon vs round (default: RUN_DIR/privacy_epsilon.png)"
    )
    from fedpeft.cli.deploy import add_parsers

    add_parsers(sub)
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
    """The ``--dp`` defaults that apply: epsilon and delta come only as a pair, never one alone; the
    LoRA settings (and the LoRA strategy) only when the PEFT method is LoRA."""
    defaults = dict(DP_DEFAULTS)
    if any(name in given for name in DP_PRIVACY_KEYS):
        defaults = {k: v for k, v in defaults.items() if k not in DP_PRIVACY_KEYS}
    peft = given.get("peft", "lora")
    if peft != "lora":
        defaults = {k: v for k, v in defaults.items() if k not in PEFT_FIELDS["lora"] and k != "strategy"}
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
    from server.checkpoint import resumed_config

    return resumed_config(FedPeftConfig(resume=given["resume"]))


def _simulate(args: argparse.Namespace) -> int:
    from fedpeft.preflight import check_run

    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(FedPeftConfig) if getattr(args, f.name) is not None
    }
    if "resume" in given:
        from server.checkpoint import load_checkpoint

        cfg = check_run(resume_config(given), clients_given=True)
        done = load_checkpoint(Path(cfg.out)).round
        if done >= cfg.rounds and (Path(cfg.out) / "adapter").is_dir():
            print(f"fedpeft: {cfg.out} completed its {cfg.rounds} rounds; nothing to resume")
            return 0
        print(f"fedpeft: resuming {cfg.out} after round {done} of {cfg.rounds}")
    else:
        cfg = FedPeftConfig(**with_defaults(given)).with_default_out()
        cfg = check_run(cfg, clients_given="clients" in given)

    from server.simulate import simulate, validate

    validate(cfg)
    print(f"fedpeft: {cfg.clients} clients, {cfg.rounds} rounds, partition {cfg.partition}, writing {cfg.out}")
    if cfg.dp != "off":
        print(f"fedpeft: {describe_dp(cfg)}")

    simulate(cfg, verbose=args.verbose)
    lines = (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
    final = json.loads(lines[-1])
    print(
        f"fedpeft: final accuracy {final['accuracy']:.4f} after {final['round']} rounds; "
        f"adapter saved to {Path(cfg.out) / 'adapter'}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "audit":
            from fedpeft.cli.audit import run_audit

            return run_audit(args)
        if args.command in ("certs", "link", "node", "connection"):
            from fedpeft.cli import deploy

            return getattr(deploy, f"run_{args.command}")(args)
        if args.command == "site-key":
            from fedpeft.cli.audit import print_site_key

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
