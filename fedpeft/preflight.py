"""Check a run before any process starts, so bad input fails in one line instead of mid-simulation."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from fedpeft.adapters import PEFT_METHODS
from fedpeft.config import FedPeftConfig
from fedpeft.data.partition import natural_client_count, parse_partition_spec
from fedpeft.data.sources import load_split, partition_rows
from fedpeft.errors import FedPeftError
from fedpeft.models import check_model_fits_task, resolve_model_path
from fedpeft.runtime import resolve_runtime


def check_run(cfg: FedPeftConfig, *, clients_given: bool = True, here: bool = True,
              partitions: bool = True) -> FedPeftConfig:
    """Validate everything a run needs; return the config with derived values filled in.

    ``here``: the clients run on this machine, so its CPUs and GPUs must host one (False for a Ray
    cluster, whose resources ``server.simulate`` checks once it has joined).
    The strategy name is checked by the server (``server.simulate``), which owns the strategies.
    With ``natural:<column>`` and no explicit client count, the count becomes the number of distinct
    values of the column. ``partitions=False`` (``flwr run``: the federation's nodes say which partition
    each trains) leaves the split into clients unchecked.
    """
    PEFT_METHODS.get(cfg.peft)
    spec = parse_partition_spec(cfg.partition)
    path = resolve_model_path(cfg.model)
    if Path(path).is_dir() is False and not _hub_cached(path):
        raise FedPeftError(f"model {cfg.model!r} is neither a directory nor in the local HF cache")
    if Path(path).is_dir():
        try:
            check_model_fits_task(path, cfg.task)
        except (OSError, ValueError) as err:
            raise FedPeftError(f"cannot read the config of model {cfg.model!r}: {str(err).splitlines()[0]}") from None
    if here:
        cpus = os.cpu_count() or 1
        if cfg.client_cpus > cpus:
            raise FedPeftError(f"client_cpus {cfg.client_cpus} exceeds the {cpus} CPUs of this machine")
        where = resolve_runtime(cfg.device, cfg.precision)  # cuda without a GPU, bf16 where unsupported: one line
        if cfg.client_gpus > 0 and where.device != "cuda":
            raise FedPeftError(f"client_gpus {cfg.client_gpus:g}: torch sees no CUDA GPU on this machine")
    if cfg.device == "cuda" and cfg.client_gpus == 0:
        raise FedPeftError("device cuda in a simulation: give each client a share of a GPU with --client-gpus "
                           "(e.g. 0.5: two clients per GPU); without one its process sees no GPU")
    train, _ = load_split(cfg)
    if spec.kind == "natural" and not clients_given:
        cfg = dataclasses.replace(cfg, clients=natural_client_count(train, spec))
    if partitions:
        partition_rows(cfg, train, cfg.clients)
    if cfg.out and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise FedPeftError(f"--out {cfg.out} is a file; give a directory for the run")
    if cfg.out and not cfg.resume and (Path(cfg.out) / "metrics.jsonl").exists():
        raise FedPeftError(f"{cfg.out} already holds a run; choose another --out, or continue it: --resume {cfg.out}")
    return cfg


def _hub_cached(name: str) -> bool:
    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:
        return False
