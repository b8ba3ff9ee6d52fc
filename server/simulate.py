"""Run a whole federation in this process with Flower's simulation engine (Ray backend)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.state_dir import STATE_DIR_ENV


def simulation_environment() -> None:
    """Defaults of the variables Flower, Ray and tokenizers read when first imported (telemetry off, Ray's
    log dedup off, no tokenizer threads): set before anything imports them, by :func:`simulate` and by
    ``fedpeft simulate`` before its checks (which may import Flower)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def simulate(
    cfg: FedPeftConfig,
    *,
    verbose: bool = False,
    client_app: Any = None,
    output: str = "table",
    ray_address: str | None = None,
) -> None:
    """Run ``cfg`` with ``cfg.clients`` simulated SuperNodes; re-raise the server's error if any.

    ``output``: how rounds are reported (:mod:`server.console`); ``client_app`` replaces fedpeft's own
    ClientApp (tests inject faults with it); ``ray_address``: run on that existing Ray cluster instead of
    starting a local one."""
    simulation_environment()
    # Simulated sites keep their privacy accounts and ledger keys beside the run unless told otherwise.
    os.environ.setdefault(STATE_DIR_ENV, str(Path(cfg.out).resolve() / "sites"))
    # deferred: heavy (flwr, ray) on the CLI start-up path, and Flower and Ray read the variables set above
    # (FLWR_TELEMETRY_ENABLED, RAY_DEDUP_LOGS) when first imported
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
    if ray_address:
        join_cluster(ray_address, cfg, level=level, verbose=verbose)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_simulation(
                server_app=make_server_app(cfg, on_error=errors.append, output=output),
                client_app=client_app,
                num_supernodes=cfg.clients,
                backend_config=backend,
                verbose_logging=verbose,
            )
    finally:
        if ray_address:  # leave the cluster (Flower's backend does too when it ends normally)
            import ray  # deferred: as above

            ray.shutdown()
    if errors:
        raise errors[0]


# What a simulated client reads from the environment. Actors on a local Ray inherit this process's
# environment; on a cluster they are started by each node's raylet, so these travel in the job's runtime_env.
_FORWARDED = (STATE_DIR_ENV, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
              "FLWR_TELEMETRY_ENABLED")


def join_cluster(address: str, cfg: FedPeftConfig, *, level: int, verbose: bool) -> None:
    """Connect this process to the Ray cluster at ``address`` (Flower's backend then uses it as is).

    Flower's own ``ray.init`` starts a local Ray and cannot be given an address; connecting first makes it
    keep this connection. Fails in one line when the cluster is unreachable or cannot host one client."""
    import ray  # deferred: heavy on the CLI start-up path, and imported only after simulate() set RAY_DEDUP_LOGS

    if address != "auto":
        _probe(address)
    env = {name: os.environ[name] for name in _FORWARDED if name in os.environ}
    # Flower puts its driver's sys.path on the actors' PYTHONPATH; do the same so they import fedpeft's apps.
    env["PYTHONPATH"] = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        ray.init(address=address, runtime_env={"env_vars": env}, logging_level=level, log_to_driver=verbose,
                 include_dashboard=False)
    except Exception as err:  # ConnectionError, ValueError (bad address), RuntimeError (version mismatch), ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FedPeftError(f"cannot join the Ray cluster at {address!r}: {first}") from None
    have = ray.cluster_resources()
    for key, need in (("CPU", cfg.client_cpus), ("GPU", cfg.client_gpus)):
        if need > have.get(key, 0.0):
            ray.shutdown()
            raise FedPeftError(
                f"the Ray cluster at {address!r} has {have.get(key, 0.0):g} {key}s in all; each client asks for "
                f"{need:g} (--client-{key.lower()}s)"
            )


def _probe(address: str) -> None:
    """Fail in one line when nothing listens at ``address`` (Ray itself would retry it for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise FedPeftError(f"--ray-address {address!r}: give HOST:PORT of the cluster's head, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise FedPeftError(
            f"cannot join the Ray cluster at {address!r}: nothing answers there ({err.strerror or err}); "
            "is `ray start --head` running, and is its port open to this machine?"
        ) from None
