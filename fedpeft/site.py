"""A site's runtime: what one site keeps between messages, each piece owned by one object.

Flower calls a ClientApp once per message, in a long-lived process (a simulation actor serving many
partitions, or the site worker of a deployed site). Loading the model and tokenizing data for every
message would dominate the round, so that process keeps a :class:`Sites` and asks it for the site a
message is for:

- :class:`SiteModel` — the base model wrapped with the run's adapter, its tokenizer and the seeded
  initial adapter. Heavy, so a process holds one per distinct model setting and lends it to every site
  it serves; the adapter is overwritten from the broadcast at the start of every round, so sharing never
  leaks state between sites or rounds;
- :class:`Site` — one site (a simulated partition, or a deployed site's own file): its name, its
  tokenized training data, its head features between probe rounds, its state directory;
- :class:`Sites` — the holder: builds a site and its model on first use, builds them again when the
  run's settings (or a deployed site's data file) change.

The coordinator does not use this module: it builds its own evaluator (:mod:`server.evaluation`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config import FedPeftConfig, parse_ranks
from fedpeft.data import LabelledTable
from fedpeft.data.sources import data_path, load_split, local_table, partition_rows
from fedpeft.errors import FedPeftError
from fedpeft.models import build_peft_model, load_tokenizer, model_key
from fedpeft.probe import FeatureCache
from fedpeft.state_dir import state_dir
from fedpeft.tasks import TASKS
from fedpeft.training import Encoded, encode

DATA_PATH = "data-path"  # node config: this site's own data file (a deployed site); else a partition
SITE_NAME = "site"  # node config: this site's name (default: the data file's stem)
# the config fields that decide how a run's data file is split into test rows and partitions
SPLIT_FIELDS = ("task", "data", "text_column", "label_column", "test_fraction", "seed", "partition")


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


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from integers (run seed, round, partition, ...)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


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


class SiteModel:
    """The base model wrapped with the run's adapter (:func:`fedpeft.models.build_peft_model`), its
    tokenizer and its seeded initial adapter, for one model setting (``key``)."""

    def __init__(self, cfg: FedPeftConfig, num_labels: int) -> None:
        self.key = model_key(cfg, num_labels)
        self.model, self.initial = build_peft_model(cfg, num_labels)
        self.tokenizer = load_tokenizer(cfg.model)


class SimulationData:
    """A simulation's data file split into the held-out test rows and the clients' partitions, read once
    for every partition a process serves (``key``: the settings it was read with)."""

    def __init__(self, cfg: FedPeftConfig, num_partitions: int) -> None:
        self.key = (*(getattr(cfg, name) for name in SPLIT_FIELDS), num_partitions)
        self.train, _ = load_split(cfg)
        self.rows = partition_rows(cfg, self.train, num_partitions)

    def partition(self, partition_id: int) -> LabelledTable:
        if not 0 <= partition_id < len(self.rows):
            raise ValueError(f"partition id {partition_id} outside 0..{len(self.rows) - 1}")
        return self.train.subset(self.rows[partition_id])


@dataclasses.dataclass
class Site:
    """One site: its name and partition, its model (shared), its tokenized data, its head features
    between probe rounds, its state directory (``source``: what its data was read from)."""

    key: str
    partition_id: int
    num_partitions: int
    model: SiteModel
    data: Encoded
    state_dir: Path
    source: tuple[Any, ...]
    features: FeatureCache = dataclasses.field(default_factory=FeatureCache)

    def with_extra_examples(self, rows: Sequence[Sequence[str]], *, label_names: Sequence[str],
                            max_length: int) -> Encoded:
        """Its data plus ``rows`` of ``(text, label name)``: the audit's canaries it is asked to train on."""
        if not rows:
            return self.data
        names = list(label_names)
        unknown = sorted({str(label) for _, label in rows} - set(names))
        if unknown:
            raise FedPeftError(f"canaries with labels {unknown} the run does not know")
        extra = encode(self.model.tokenizer, [str(text) for text, _ in rows],
                       np.array([names.index(str(label)) for _, label in rows], dtype=np.int64), max_length=max_length)
        return Encoded(input_ids=[*self.data.input_ids, *extra.input_ids],
                       labels=np.concatenate([self.data.labels, extra.labels]), pad_id=self.data.pad_id)


class Sites:
    """The sites a process serves, and the models and data they share (see the module docstring)."""

    MAX_MODELS = 4  # model settings held at once: a simulation actor serving clients of several LoRA ranks

    def __init__(self) -> None:
        self._models: dict[tuple[Any, ...], SiteModel] = {}
        self._data: SimulationData | None = None
        self._sites: dict[str, Site] = {}

    def model(self, cfg: FedPeftConfig, num_labels: int) -> SiteModel:
        """The model of ``cfg`` (built on first use; past :attr:`MAX_MODELS` settings the oldest is dropped,
        with the sites that train on it)."""
        key = model_key(cfg, num_labels)
        if key not in self._models:
            if len(self._models) >= self.MAX_MODELS:
                dropped = self._models.pop(next(iter(self._models)))
                self._sites = {k: site for k, site in self._sites.items() if site.model is not dropped}
            self._models[key] = SiteModel(cfg, num_labels)
        return self._models[key]

    def site(self, cfg: FedPeftConfig, node_config: Mapping[str, Any], *, label_names: Sequence[str],
             model_cfg: FedPeftConfig | None = None) -> Site:
        """The site ``node_config`` names, trained as ``cfg`` says (its model from ``model_cfg``: a site's own
        rank, device and precision; default ``cfg``), its data read again when the run's data settings
        or its own data file changed."""
        pid, num, key = node_identity(node_config, cfg.clients)
        model = self.model(model_cfg or cfg, len(label_names))
        source = self._source(cfg, node_config, label_names, pid, num)
        site = self._sites.get(key)
        if site is None or site.source != source or site.model is not model:
            site = Site(key=key, partition_id=pid, num_partitions=num, model=model,
                        data=self._read(cfg, node_config, label_names, pid, num, model),
                        state_dir=state_dir(node_config), source=source)
            self._sites[key] = site
        return site

    def _source(self, cfg: FedPeftConfig, node_config: Mapping[str, Any], label_names: Sequence[str], pid: int,
                num: int) -> tuple[Any, ...]:
        tokens = (cfg.task, cfg.model, cfg.max_length, tuple(label_names), state_dir(node_config))
        if DATA_PATH in node_config:
            file = Path(str(node_config[DATA_PATH])).expanduser()
            version = (file.stat().st_mtime_ns, file.stat().st_size) if file.is_file() else None
            return (*tokens, str(file), version, cfg.text_column, cfg.label_column)
        return (*tokens, *(getattr(cfg, name) for name in SPLIT_FIELDS), data_path(cfg), pid, num)

    def _read(self, cfg: FedPeftConfig, node_config: Mapping[str, Any], label_names: Sequence[str], pid: int,
              num: int, model: SiteModel) -> Encoded:
        if DATA_PATH in node_config:
            table = local_table(cfg, str(node_config[DATA_PATH]), label_names=label_names)
        else:
            key = (*(getattr(cfg, name) for name in SPLIT_FIELDS), num)
            if self._data is None or self._data.key != key:
                self._data = SimulationData(cfg, num)
            table = self._data.partition(pid)
        return TASKS.get(cfg.task).encode(model.tokenizer, table, max_length=cfg.max_length)
