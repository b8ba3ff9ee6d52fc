"""Run a whole federation in this process with Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

from fedpeft.config import FedPeftConfig


def validate(cfg: FedPeftConfig) -> None:
    """Server-side checks that must fail in one line before any process starts."""
    from strategies import AGGREGATORS

    AGGREGATORS.get(cfg.strategy)


def simulate(cfg: FedPeftConfig, *, verbose: bool = False) -> None:
    """Run ``cfg`` with ``cfg.clients`` simulated SuperNodes; re-raise the server's error if any."""
    validate(cfg)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import make_server_app

    errors: list[BaseException] = []
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    logging.getLogger("strategies").setLevel(logging.INFO if verbose else logging.WARNING)
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
        "init_args": {"logging_level": level, "log_to_driver": verbose, "include_dashboard": False},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=make_server_app(cfg, on_error=errors.append),
            client_app=client_app,
            num_supernodes=cfg.clients,
            backend_config=backend,
            verbose_logging=verbose,
        )
    if errors:
        raise errors[0]
