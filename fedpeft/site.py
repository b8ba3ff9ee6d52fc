"""What a process keeps between Flower messages: the base model, the tokenizer and the data.

Flower calls the ClientApp once per message, in a long-lived process (a simulation actor or a
SuperNode's app process). Loading the model and tokenizing data for every message would dominate the
round, so they are built once per process here and reused; the adapter weights are overwritten from
the broadcast at the start of every round, so reuse never leaks state between rounds. The caches are
keyed by every setting that changes what they hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.adapters.state import key_matches
from fedpeft.config import FedPeftConfig, parse_ranks
from fedpeft.data import DEFAULT_DATA, LabelledTable, partition_indices, split_test
from fedpeft.errors import FedPeftError
from fedpeft.runtime import Runtime, resolve_runtime
from fedpeft.state_dir import STATE_DIR_ENV, state_dir  # noqa: F401 — re-exported: callers read site.state_dir
from fedpeft.tasks import TASKS
from fedpeft.training import Encoded, encode, train_local

DATA_PATH = "data-path"  # node config: this site's own data file (a deployed site); else a partition
SITE_NAME = "site"  # node config: this site's name (default: the data file's stem)


def node_identity(node_config: Mapping[str, Any], fallback_partitions: int) -> tuple[int, int, str]:
    """``(partition_id, num_partitions, site_key)`` of a node from its node config.

    A deployed site (node config ``data-path``) is named by ``site`` (default: its file's stem) and
    gets a stable pseudo partition id from its name (for seeds and rank turns); ``num_partitions`` is
    0, meaning: it trains on its own file. A simulated node trains partition ``partition-id`` of
    ``num-partitions``.
    """
    if DATA_PATH in node_config:
        key = str(node_config.get(SITE_NAME) or Path(str(node_config[DATA_PATH])).stem)
        if not key or any(c in key for c in "/\\\0") or key.startswith("."):
            raise FedPeftError(f"site name {key!r} must be a plain name (no '/', not starting with '.')")
        return derive_seed(*key.encode()) % (2**31), 0, key
    pid = int(node_config.get("partition-id", 0))
    num = int(node_config.get("num-partitions", fallback_partitions))
    return pid, num, f"partition-{pid:05d}"


def node_data(
    cfg: FedPeftConfig, node_config: Mapping[str, Any], *, label_names: Sequence[str]
) -> Encoded:
    """The tokenized training data of a node: its own file (``data-path``), or its partition."""
    if DATA_PATH in node_config:
        return encoded_local_file(cfg, str(node_config[DATA_PATH]), label_names=label_names)
    pid, num, _ = node_identity(node_config, cfg.clients)
    return encoded_partition(cfg, pid, num)


def with_extra_examples(
    cfg: FedPeftConfig, data: Encoded, rows: Sequence[Sequence[str]], *, label_names: Sequence[str]
) -> Encoded:
    """``data`` plus ``rows`` of ``(text, label name)``: the audit's canaries this site is asked to train on."""
    if not rows:
        return data
    names = list(label_names)
    unknown = sorted({str(label) for _, label in rows} - set(names))
    if unknown:
        raise FedPeftError(f"canaries with labels {unknown} the run does not know")
    extra = encode(tokenizer(cfg), [str(text) for text, _ in rows],
                   np.array([names.index(str(label)) for _, label in rows], dtype=np.int64), max_length=cfg.max_length)
    return Encoded(input_ids=[*data.input_ids, *extra.input_ids], labels=np.concatenate([data.labels, extra.labels]),
                   pad_id=data.pad_id)


def local_table(cfg: FedPeftConfig, path: str, *, label_names: Sequence[str]) -> LabelledTable:
    """A site's own data file, every row for training, its labels numbered as the run numbers them
    (conversations for ``causal-lm``: no labels).

    Raises
    ------
    FedPeftError
        A missing or unreadable file, a missing column, or labels the run does not know.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FedPeftError(f"site data file not found: {file}")
    table = TASKS.get(cfg.task).read(file, text_column=cfg.text_column, label_column=cfg.label_column,
                                     min_classes=1)
    if not table.label_names:
        return table
    unknown = sorted(set(table.label_names) - set(label_names))
    if unknown:
        raise FedPeftError(
            f"{file.name} has labels {unknown[:5]} that the run does not know; the run's labels: {list(label_names)}"
        )
    ids = np.array([list(label_names).index(name) for name in table.label_names], dtype=np.int64)
    return dataclasses.replace(table, labels=ids[table.labels], label_names=tuple(label_names))


def encoded_local_file(cfg: FedPeftConfig, path: str, *, label_names: Sequence[str]) -> Encoded:
    """:func:`local_table`, tokenized (cached until the file changes)."""
    file = Path(path).expanduser()
    version = (file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else None  # None: local_table raises
    return _encoded_local(cfg, path, tuple(label_names), version)


def data_path(cfg: FedPeftConfig) -> str:
    """The data file a config names ("" means the bundled default)."""
    return cfg.data or str(DEFAULT_DATA)


def load_split(cfg: FedPeftConfig) -> tuple[LabelledTable, LabelledTable]:
    """``(train, test)`` of the configured data, with the seeded test hold-out."""
    return _split(cfg.task, data_path(cfg), cfg.text_column, cfg.label_column, cfg.test_fraction, cfg.seed)


def partitions(cfg: FedPeftConfig, num_partitions: int) -> list[np.ndarray]:
    """Row positions (in the training split) of every client's partition (cached)."""
    return _partitions(
        cfg.task, data_path(cfg), cfg.text_column, cfg.label_column, cfg.test_fraction, cfg.seed, cfg.partition,
        num_partitions
    )


def client_partition(cfg: FedPeftConfig, partition_id: int, num_partitions: int) -> LabelledTable:
    """The training rows of one simulated client."""
    train, _ = load_split(cfg)
    parts = partitions(cfg, num_partitions)
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition id {partition_id} outside 0..{len(parts) - 1}")
    return train.subset(parts[partition_id])


def encoded_partition(cfg: FedPeftConfig, partition_id: int, num_partitions: int) -> Encoded:
    """One client's training rows, tokenized (cached)."""
    return _encoded_partition(
        cfg.task,
        cfg.model,
        cfg.max_length,
        data_path(cfg),
        cfg.text_column,
        cfg.label_column,
        cfg.test_fraction,
        cfg.seed,
        cfg.partition,
        partition_id,
        num_partitions,
    )


def encoded_test(cfg: FedPeftConfig) -> Encoded:
    """The held-out test split, tokenized (cached)."""
    return _encoded_test(
        cfg.task, cfg.model, cfg.max_length, data_path(cfg), cfg.text_column, cfg.label_column, cfg.test_fraction,
        cfg.seed
    )


def peft_model(cfg: FedPeftConfig, num_labels: int) -> Any:
    """The base model wrapped with the configured PEFT method (one per process and setting).

    The initial adapter and head are drawn from ``cfg.seed``, so every process that builds it starts
    from the same point.
    """
    return _peft_model_and_init(cfg, num_labels)[0]


def initial_adapter(cfg: FedPeftConfig, num_labels: int) -> dict[str, np.ndarray]:
    """The seeded initial adapter state of :func:`peft_model` (the same in every process).

    Tensors a strategy freezes (FFA-LoRA's A) are never broadcast; clients take them from here.
    """
    return _peft_model_and_init(cfg, num_labels)[1]


# The config fields that decide what the PEFT model is (the cache key).
ADAPTER_FIELDS = ("task", "model", "pooling", "peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                  "ssf_target_modules", "seed", "device", "precision", "gradient_checkpointing")


def _peft_model_and_init(cfg: FedPeftConfig, num_labels: int) -> tuple[Any, dict[str, np.ndarray]]:
    return _peft_model(tuple((name, getattr(cfg, name)) for name in ADAPTER_FIELDS), num_labels)


def client_rank(cfg: FedPeftConfig, partition_id: int, node_rank: int | None = None) -> int:
    """The LoRA rank this client trains: its node config's ``lora-r`` if set, else its turn in
    ``cfg.client_ranks`` (cycled over partition ids), else ``cfg.lora_r``."""
    if node_rank is not None:
        rank = int(node_rank)
    else:
        ranks = parse_ranks(cfg.client_ranks)
        rank = ranks[partition_id % len(ranks)] if ranks else cfg.lora_r
    if not 1 <= rank <= cfg.lora_r:
        raise FedPeftError(f"client LoRA rank {rank} must lie in 1..lora_r={cfg.lora_r}")
    return rank


def at_rank(cfg: FedPeftConfig, rank: int) -> FedPeftConfig:
    """``cfg`` for a client of LoRA rank ``rank``: alpha scaled with the rank, so that alpha/r (and
    hence the meaning of B·A) is the same for every client and for the global adapter."""
    if rank == cfg.lora_r:
        return cfg
    return dataclasses.replace(cfg, lora_r=rank, lora_alpha=cfg.lora_alpha * rank / cfg.lora_r, client_ranks="")


def runtime(cfg: FedPeftConfig) -> Runtime:
    """Where this process trains and evaluates (:func:`fedpeft.runtime.resolve_runtime`)."""
    return resolve_runtime(cfg.device, cfg.precision)


def evaluate(cfg: FedPeftConfig, model: Any, data: Encoded) -> dict[str, float]:
    """The task's held-out metrics of ``model`` on ``data`` (``loss``, ``accuracy``; LMs: ``perplexity``).

    A run with probe rounds evaluates through the head's cached inputs (:func:`fedpeft.probe.evaluate_probed`):
    the same figures, without an encoder pass in rounds that left the adapter as it was."""
    if cfg.probes:
        from fedpeft.probe import evaluate_probed

        return evaluate_probed(model, data, batch_size=cfg.eval_batch_size, runtime=runtime(cfg))
    return TASKS.get(cfg.task).evaluate(model, data, batch_size=cfg.eval_batch_size, runtime=runtime(cfg))


def tokenizer(cfg: FedPeftConfig) -> Any:
    """The tokenizer of the configured model (cached)."""
    return _tokenizer(cfg.model)


def train_client_round(
    cfg: FedPeftConfig,
    model: Any,
    data: Encoded,
    *,
    server_round: int,
    partition_id: int,
    frozen: tuple[str, ...] = (),
    control: Control | None = None,
    drift: Any = None,
) -> dict[str, float]:
    """One client-round of local training as ``cfg`` configures it, seeded by (seed, round, partition).

    Parameters whose names contain a ``frozen`` path component (``"lora_A"``) are not trained. The
    first ``cfg.probes`` rounds train the head alone on pooled features (:mod:`fedpeft.probe`).
    The local loss takes the run's label correction (:mod:`fedpeft.label_correction`) and its drift
    term (``drift``, a :class:`fedpeft.drift.DriftSpec`; None: the run's own without DP); under SCAFFOLD
    ``control`` holds the variates c and c_i, and receives
    the site's new c_i⁺ (``control.updated``); without it (a site trained alone) SCAFFOLD adds nothing.
    """
    seed = derive_seed(cfg.seed, server_round, partition_id)
    offset = label_offset(cfg, data, model)
    if server_round <= cfg.probes:
        from fedpeft.probe import HeadProbe, head_inputs, head_module

        settings = probe_settings(cfg, len(data))
        inputs = head_inputs(model, data, batch_size=settings.pop("feature_batch_size"), runtime=settings["runtime"])
        probe = HeadProbe(head_module(model))
        terms = drift_terms(cfg, model, probe, control, drift)
        result = train_local(probe, inputs, **settings, seed=seed, logit_offset=offset, gradient_terms=terms)
    else:
        with frozen_parameters(model, frozen):
            terms = drift_terms(cfg, model, model, control, drift)
            result = train_local(model, data, **train_settings(cfg), seed=seed, logit_offset=offset,
                                 gradient_terms=terms)
    if control is not None:
        control.updated = next(t.site_variate() for t in terms if hasattr(t, "site_variate"))
    return result


@dataclasses.dataclass
class Control:
    """SCAFFOLD's variates for one client-round: the coordinator's c and the site's c_i (by adapter-state
    name); after training, ``updated`` holds c_i⁺ for the tensors the round trained."""

    server: dict[str, np.ndarray]
    site: dict[str, np.ndarray]
    updated: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def label_offset(cfg: FedPeftConfig, data: Encoded, model: Any) -> np.ndarray | None:
    """The logit offsets of the run's label correction at a site holding ``data`` (None: no correction)."""
    from fedpeft.label_correction import label_counts, logit_offsets, parse_label_correction

    method, tau = parse_label_correction(cfg.label_correction)
    if method == "none" or cfg.task != "seq-cls":
        return None
    return logit_offsets(label_counts(data.labels, model.config.num_labels), method=method, tau=tau)


def drift_terms(cfg: FedPeftConfig, model: Any, trained: Any, control: Control | None, spec: Any = None) -> list[Any]:
    """The gradient terms of drift correction ``spec`` (None: the run's own without DP) over the trainable
    parameters of ``trained`` (``model`` itself, or its head alone in a probe round)."""
    from fedpeft.drift import resolve_drift

    spec = spec if spec is not None else resolve_drift(cfg)
    params = [p for p in trained.parameters() if p.requires_grad]
    if spec.method == "fedprox" and spec.mu > 0:
        from fedpeft.drift.fedprox import ProximalTerm

        return [ProximalTerm(params, mu=spec.mu)]
    if spec.method == "scaffold" and control is not None:  # without variates (one site alone): no term
        from fedpeft.adapters.state import state_names
        from fedpeft.drift.scaffold import ControlTerm

        named = [(p, name) for p, name in zip(params, state_names(model, params), strict=True)
                 if not spec.scope or key_matches(name, spec.scope)]
        return [ControlTerm([p for p, _ in named], [name for _, name in named], server=control.server,
                            site=control.site)]
    return []


def train_settings(cfg: FedPeftConfig) -> dict[str, Any]:
    """The local-training keywords ``cfg`` sets, shared by plain and DP-SGD client-rounds."""
    return {
        "epochs": cfg.local_epochs,
        "max_steps": cfg.max_local_steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "head_lr": cfg.head_lr,
        "weight_decay": cfg.weight_decay,
        "runtime": runtime(cfg),
    }


def probe_settings(cfg: FedPeftConfig, num_examples: int) -> dict[str, Any]:
    """The training keywords of a probe round at a site of ``num_examples`` (plain or DP-SGD), plus
    ``feature_batch_size``: how many examples one feature-extraction pass takes."""
    from fedpeft.probe import probe_plan

    return {
        **probe_plan(num_examples, batch_size=cfg.probe_batch_size, steps=cfg.probe_steps),
        "lr": cfg.probe_lr,
        "weight_decay": cfg.weight_decay,
        "runtime": runtime(cfg),
        "feature_batch_size": cfg.eval_batch_size,
    }


@contextmanager
def frozen_parameters(model: Any, components: tuple[str, ...]) -> Iterator[None]:
    """Turn off ``requires_grad`` of the matching trainable parameters for the block, then restore it
    (the model is cached and shared by every strategy this process serves)."""
    hit = [p for name, p in model.named_parameters() if p.requires_grad and key_matches(name, components)]
    if components and not hit:
        raise FedPeftError(f"no trainable parameter matches the frozen components {list(components)}")
    for p in hit:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in hit:
            p.requires_grad_(True)


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (run seed, round, partition, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@lru_cache(maxsize=4)
def _split(task: str, path: str, text: str, label: str, fraction: float, seed: int) -> tuple[Any, Any]:
    table = TASKS.get(task).read(path, text_column=text, label_column=label)
    return split_test(table, test_fraction=fraction, seed=seed)


@lru_cache(maxsize=4)
def _partitions(
    task: str, path: str, text: str, label: str, fraction: float, seed: int, spec: str, n: int
) -> list[np.ndarray]:
    train, _ = _split(task, path, text, label, fraction, seed)
    return partition_indices(train, spec, num_clients=n, seed=seed)


@lru_cache(maxsize=16)
def _encoded_partition(
    task: str,
    model: str,
    max_length: int,
    path: str,
    text: str,
    label: str,
    fraction: float,
    seed: int,
    spec: str,
    pid: int,
    n: int,
) -> Encoded:
    train, _ = _split(task, path, text, label, fraction, seed)
    rows = _partitions(task, path, text, label, fraction, seed, spec, n)[pid]
    return TASKS.get(task).encode(_tokenizer(model), train.subset(rows), max_length=max_length)


@lru_cache(maxsize=2)
def _encoded_test(
    task: str, model: str, max_length: int, path: str, text: str, label: str, fraction: float, seed: int
) -> Encoded:
    _, test = _split(task, path, text, label, fraction, seed)
    return TASKS.get(task).encode(_tokenizer(model), test, max_length=max_length)


@lru_cache(maxsize=4)
def _encoded_local(cfg: FedPeftConfig, path: str, label_names: tuple[str, ...], version: Any) -> Encoded:
    table = local_table(cfg, path, label_names=label_names)
    return TASKS.get(cfg.task).encode(_tokenizer(cfg.model), table, max_length=cfg.max_length)


@lru_cache(maxsize=2)
def _tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    from fedpeft.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(model), local_files_only=True)


@lru_cache(maxsize=4)
def _peft_model(key: tuple[tuple[str, Any], ...], num_labels: int) -> tuple[Any, dict[str, np.ndarray]]:
    """``key`` holds only :data:`ADAPTER_FIELDS` (so equal settings share one model)."""
    import types

    import torch

    cfg = types.SimpleNamespace(**dict(key))
    from fedpeft.adapters import adapter_state, apply_peft
    from fedpeft.models import load_model

    where = runtime(cfg)
    torch.manual_seed(cfg.seed)
    net, _ = load_model(cfg.model, task=cfg.task, num_labels=num_labels,
                        gradient_checkpointing=cfg.gradient_checkpointing, pooling=cfg.pooling)
    # in fp32 on the CPU: the seeded initial adapter (and head) is the same in every process, whatever its
    # device and precision — FFA-LoRA's frozen A is never sent, every site draws it from here
    wrapped = apply_peft(net, cfg)
    wrapped.eval()
    state = adapter_state(wrapped)
    if where.dtype != torch.float32:  # bf16: the frozen weights only; the adapter and head train in fp32
        for p in wrapped.parameters():
            if not p.requires_grad:
                p.data = p.data.to(where.dtype)
    return wrapped.to(where.device), state
