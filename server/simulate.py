"""Run a whole federation in this process with Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from fedpeft.config import FedPeftConfig
from fedpeft.site import STATE_DIR_ENV


def validate(cfg: FedPeftConfig) -> None:
    """Server-side checks that must fail in one line before any process starts."""
    from fedpeft.config import parse_ranks
    from fedpeft.errors import FedPeftError
    from strategies import AGGREGATORS, strategies_for
    from strategies.sampling import sample_count

    aggregator = AGGREGATORS.get(cfg.strategy)
    sampled = sample_count(cfg.clients, cfg.fraction)
    if cfg.min_clients > sampled:
        raise FedPeftError(
            f"min_clients {cfg.min_clients} exceeds the {sampled} clients sampled per round "
            f"({cfg.clients} x fraction {cfg.fraction:g}): every round would be short; lower it or raise --fraction"
        )
    if aggregator.adapter != cfg.peft:
        fits = [name for name in strategies_for(cfg.peft) if name != "fedavg"]
        raise FedPeftError(
            f"strategy {cfg.strategy!r} aggregates {aggregator.adapter.upper()} adapters, but peft is {cfg.peft}; "
            f"use --strategy {' or '.join(fits)}"
        )
    from server.run import check_robust

    check_robust(cfg, aggregator)
    if cfg.dp == "central":
        from privacy.central import check_composes

        check_composes(aggregator)
    if len(set(parse_ranks(cfg.client_ranks)) | {cfg.lora_r}) > 1 and not aggregator.heterogeneous_ranks:
        mixed = [name for name in AGGREGATORS if AGGREGATORS.get(name).heterogeneous_ranks]
        raise FedPeftError(
            f"strategy {cfg.strategy!r} needs every client at rank lora_r={cfg.lora_r}; "
            f"client_ranks {cfg.client_ranks!r} needs one of: {', '.join(mixed)}"
        )


def simulate(
    cfg: FedPeftConfig, *, verbose: bool = False, client_app: Any = None, output: str = "table"
) -> None:
    """Run ``cfg`` with ``cfg.clients`` simulated SuperNodes; re-raise the server's error if any.

    ``output``: how rounds are reported (:mod:`server.console`); ``client_app`` replaces fedpeft's own
    ClientApp (tests inject faults with it)."""
    validate(cfg)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Simulated sites keep their privacy accounts and ledger keys beside the run unless told otherwise.
    os.environ.setdefault(STATE_DIR_ENV, str(Path(cfg.out).resolve() / "sites"))
    from flwr.simulation import run_simulation

    from server.app import make_server_app

    if client_app is None:
        from client.app import app as client_app

    errors: list[BaseException] = []
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    logging.getLogger("strategies").setLevel(logging.INFO if verbose else logging.WARNING)
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": cfg.client_gpus},
        "init_args": {"logging_level": level, "log_to_driver": verbose, "include_dashboard": False},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=make_server_app(cfg, on_error=errors.append, output=output),
            client_app=client_app,
            num_supernodes=cfg.clients,
            backend_config=backend,
            verbose_logging=verbose,
        )
    if errors:
        raise errors[0]
