"""``fedpeft``: the command line. Errors in the input print one line and exit with status 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from fedpeft.config import FedPeftConfig, field_help
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
        description="Run a federated LoRA fine-tune with simulated clients; writes RUN_DIR "
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
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=type(default),
            default=None,
            metavar=type(default).__name__.upper() if name != "out" else "RUN_DIR",
            help=f"{helps[name]} (default: {default!r})",
        )
    sim.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    return parser


def _simulate(args: argparse.Namespace) -> int:
    from fedpeft.preflight import check_run

    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(FedPeftConfig) if getattr(args, f.name) is not None
    }
    cfg = FedPeftConfig(**given).with_default_out()
    cfg = check_run(cfg, clients_given="clients" in given)

    from server.simulate import simulate, validate

    validate(cfg)
    print(f"fedpeft: {cfg.clients} clients, {cfg.rounds} rounds, partition {cfg.partition}, writing {cfg.out}")

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
