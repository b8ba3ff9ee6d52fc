"""Every key that crosses the wire between the coordinator and a site, and the typed requests a site reads.

**Records of a message** (the keys of its RecordDict): :data:`CONFIG` (the request, one ConfigRecord:
Flower's central-DP clipping mod expects exactly one), :data:`ARRAYS` and :data:`CODEC` (an encoded
adapter payload, :mod:`fedpeft.wire`), :data:`CONTROL` (SCAFFOLD's variates), :data:`METRICS` and
:data:`PRIVACY` (a reply's numbers and its signed ledger entry).

**A request** (the :data:`CONFIG` record a site receives) holds:

- ``fedpeft.<field>`` for each field of :data:`SITE_SETTINGS`: the run settings a site's code reads, and
  no other. The coordinator's own settings (the aggregation rule, the server optimizer, sampling,
  timeouts, validation bounds, where the run is written) stay with it;
  ``tests/test_recipe_simulation.py`` records every field a site reads and checks it is one of these;
- :data:`PROTOCOL`: the request's version, :data:`PROTOCOL_VERSION`; a request of another version is
  refused in one line (an encoded payload's header carries its own, :data:`WIRE_VERSION`);
- :data:`LABEL_NAMES`: the run's classes in the order of the head's outputs.

A train request adds :data:`SERVER_ROUND`, :data:`FROZEN` and :data:`HELD` (the tensors the rule freezes,
never broadcast, and those it holds this round, broadcast but not trained), under DP-DyLoRA
:data:`ACTIVE_RANK` (the round's drawn LoRA rank, the same for every site), under the delta broadcast
:data:`DOWNLINK_DIGEST` and, for a site that receives a change, :data:`DOWNLINK_BASE` (and
:data:`DOWNLINK_CHAIN` when earlier changes come with it), and for some sites
:data:`CANARIES` (the empirical audit), :data:`LEDGER_SEQ` (local DP), :data:`CLIPPING_NORM` (central
DP: Flower's fixed-clipping mod reads it under Flower's name) or :data:`SECAGG` (secure aggregation,
whose three later stages are query messages: :data:`SECAGG_SHARES`, :data:`SECAGG_MASKED`,
:data:`SECAGG_UNMASK`).

A site parses a request once per message (:func:`train_request`); its handler and its mods share the
parsed :class:`TrainRequest`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord

from fedpeft.config import FedPeftConfig
from fedpeft.deploy import flower_compat
from fedpeft.errors import FedPeftError

# --- records of a message ------------------------------------------------------------------------
ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
PRIVACY = "privacy"  # ConfigRecord of a DP reply: round status and the site's signed ledger entry
CONTROL = "control"  # ArrayRecord under SCAFFOLD: the coordinator's variate c down, a site's change of c_i up (fp32)
CODEC = "codec"  # ConfigRecord: the header of an encoded adapter payload
PAYLOAD = "payload"  # the one array of an encoded payload

# --- the request's keys --------------------------------------------------------------------------
WIRE_VERSION = 1  # the encoded payload's format (fedpeft.wire), in its header
PROTOCOL_VERSION = 2  # the request's layout: 2, typed requests (only SITE_SETTINGS travel); 1, the whole run config
PROTOCOL = "protocol"
SETTING = "fedpeft."  # prefix of a run setting's key
LABEL_NAMES = "label-names"
SERVER_ROUND = "server-round"
FROZEN = "frozen"
HELD = "held"
CANARIES = "canaries"  # train config of the empirical audit: JSON [[text, label], ...] this site trains on too
LEDGER_SEQ = "ledger-seq"  # train config under local DP: how many of this site's entries the ledger holds
CLIPPING_NORM: str = flower_compat.KEY_CLIPPING_NORM  # central DP: the norm every sampled site clips its update to
SECAGG = "secagg"  # secure aggregation: JSON {number, threshold, bits, clip, tag} of this site's round
ACTIVE_RANK = "active-rank"  # DP-DyLoRA: the LoRA rank every site trains this round (fedpeft.adapters.lora.dynamic)
# the delta broadcast (fedpeft.downlink): the digest of the broadcast the payload is the change of (absent: the
# payload is the whole adapter), and the digest of the broadcast the site must hold once it has applied it
DOWNLINK_BASE = "downlink-base"
DOWNLINK_DIGEST = "downlink-digest"
DOWNLINK_CHAIN = "downlink-chain"  # how many earlier changes come first (records arrays.0, codec.0, ...)
QUERY_KEYS = frozenset({PROTOCOL, LABEL_NAMES})
TRAIN_KEYS = QUERY_KEYS | {SERVER_ROUND, FROZEN, HELD, CANARIES, LEDGER_SEQ, CLIPPING_NORM, SECAGG, ACTIVE_RANK,
                           DOWNLINK_BASE, DOWNLINK_DIGEST, DOWNLINK_CHAIN}

# --- secure aggregation's later stages (query messages; privacy/secagg, client/secure.py) -------------
SECAGG_SHARES = "query.secagg_shares"  # the roster down; encrypted shares and the seed's commitment up
SECAGG_MASKED = "query.secagg_masked"  # a site's incoming shares and who shared down; its masked vector up
SECAGG_UNMASK = "query.secagg_unmask"  # who survived and who dropped down; the shares asked for up
SECAGG_KEYS = "secagg-keys"  # ConfigRecord of a secure train reply: the site's public keys (hex)
SECAGG_STAGE = "secagg-stage"  # ConfigRecord of a later stage's request and reply: JSON under "json"
MASKED = "masked"  # ArrayRecord of the masked-input reply: one uint64 array, "vector"

# The run settings a site reads: its model and adapter, its data and partition, local training (with
# the probe, drift and label corrections), local DP's plan and accountant, its codec, and the run's
# identity and seed. Measured by recording every field a site's code reads (tests/capturing_client.py).
SITE_SETTINGS = frozenset({
    "task", "model", "peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "ssf_target_modules",
    "ssf_pool_size", "ssf_pool_select", "ssf_pool_match", "client_ranks", "pooling",
    "data", "text_column", "label_column", "test_fraction", "max_length", "partition", "clients",
    "local_epochs", "max_local_steps", "batch_size", "lr", "head_lr", "weight_decay", "eval_batch_size",
    "rounds", "probe_rounds", "probe_steps", "probe_batch_size", "probe_lr", "drift", "label_correction",
    "codec", "error_feedback",
    "client_cpus", "device", "precision", "gradient_checkpointing",
    "dp", "dp_epsilon", "dp_delta", "dp_noise_multiplier", "dp_max_grad_norm", "dp_clipping", "dp_accountant",
    "seed", "run_id",
    "secure_aggregation",  # what drift "auto" means (fedpeft.drift.resolve_drift)
})

# --- a reply's keys ------------------------------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key; every reply carries it
STEPS = "steps"
TRAIN_LOSS = "train-loss"  # without DP only: a loss on private data is covered by no epsilon
EXAMPLES_SEEN = "examples-seen"
# where a site's time went, in a train reply's metrics (seconds): building the model and data, training, and
# waiting for the site worker to take the message from the SuperNode
SECONDS_LOAD = "seconds-load"
SECONDS_TRAIN = "seconds-train"
SECONDS_WAIT = "seconds-wait"
SECONDS = (SECONDS_LOAD, SECONDS_TRAIN, SECONDS_WAIT)
# a query's reply: who the site is (config record) and what it holds (metrics)
SITE = "site"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
LORA_R = "lora-r"
TRAINED, REFUSED = "trained", "refused"  # a privacy record's status


def _check_settings() -> None:
    unknown = SITE_SETTINGS - {f.name for f in dataclasses.fields(FedPeftConfig)}
    if unknown:  # a renamed config field: caught at import, never on the wire
        raise RuntimeError(f"SITE_SETTINGS names fields FedPeftConfig lacks: {sorted(unknown)}")


_check_settings()


def request_record(cfg: FedPeftConfig, *, label_names: list[Any], **keys: Any) -> Any:
    """A request: the site's settings of ``cfg``, the protocol version, the classes, and ``keys`` (each one
    of :data:`TRAIN_KEYS`)."""
    unknown = set(keys) - TRAIN_KEYS
    if unknown:
        raise ValueError(f"not a request key: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {f"{SETTING}{k}": v for k, v in cfg.to_dict().items() if k in SITE_SETTINGS}
    return ConfigRecord({**values, PROTOCOL: PROTOCOL_VERSION, LABEL_NAMES: list(label_names), **keys})


@dataclasses.dataclass(frozen=True)
class QueryRequest:
    """What a site is asked when the run starts: who it is and what it holds."""

    settings: FedPeftConfig  # the SITE_SETTINGS as sent; every other field at its default
    label_names: tuple[Any, ...]

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> QueryRequest:
        settings, label_names = _common(record, QUERY_KEYS)
        return cls(settings=settings, label_names=label_names)


@dataclasses.dataclass(frozen=True)
class TrainRequest:
    """One client-round's request."""

    settings: FedPeftConfig  # the SITE_SETTINGS as sent; every other field at its default
    label_names: tuple[Any, ...]
    server_round: int
    frozen: tuple[str, ...]  # never broadcast, never sent back (FFA-LoRA's A)
    held: tuple[str, ...]  # broadcast this round, neither trained nor sent back (RoLoRA's other factor)
    canaries: tuple[Any, ...] | None = None  # [text, label] pairs
    ledger_seq: int | None = None
    secagg: dict[str, Any] | None = None  # secure aggregation's settings for this site's round
    active_rank: int | None = None  # DP-DyLoRA: train LoRA at this rank; None: the full rank
    downlink_base: str | None = None  # delta broadcast: the payload changes the broadcast of this digest
    downlink_digest: str | None = None  # delta broadcast: the digest of the broadcast once received
    downlink_chain: int = 0  # delta broadcast: earlier changes the message holds before the round's own

    @property
    def untrained(self) -> tuple[str, ...]:
        """The tensor names the site does not train this round and never sends back."""
        return self.frozen + self.held

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainRequest:
        settings, label_names = _common(record, TRAIN_KEYS)
        try:
            server_round = int(record[SERVER_ROUND])
            canaries = tuple(json.loads(str(record[CANARIES]))) if CANARIES in record else None
            seq = record.get(LEDGER_SEQ)
            secagg = json.loads(str(record[SECAGG])) if SECAGG in record else None
            rank = int(record[ACTIVE_RANK]) if ACTIVE_RANK in record else None
            if rank is not None and not 1 <= rank <= settings.lora_r:
                raise ValueError(f"{ACTIVE_RANK} {rank} outside 1..lora_r={settings.lora_r}")
            return cls(settings=settings, label_names=label_names, server_round=server_round,
                       frozen=_names(record.get(FROZEN, "")), held=_names(record.get(HELD, "")),
                       canaries=canaries, ledger_seq=None if seq is None else int(seq), secagg=secagg,
                       active_rank=rank, downlink_base=_digest(record, DOWNLINK_BASE),
                       downlink_digest=_digest(record, DOWNLINK_DIGEST),
                       downlink_chain=_count(record, DOWNLINK_CHAIN))
        except (KeyError, TypeError, ValueError) as err:
            raise FedPeftError(f"malformed train request: {type(err).__name__}: {err}") from None


def _digest(record: Mapping[str, Any], key: str) -> str | None:
    if key not in record:
        return None
    value = str(record[key])
    if len(value) != 32 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(f"{key} {value!r} is not a broadcast digest")
    return value


def _count(record: Mapping[str, Any], key: str) -> int:
    value = int(record.get(key, 0))
    if not 0 <= value <= 1024:
        raise ValueError(f"{key} {value} outside 0..1024")
    return value


def _names(value: Any) -> tuple[str, ...]:
    return tuple(c for c in str(value).split(",") if c)


def _common(record: Mapping[str, Any], allowed: frozenset[str]) -> tuple[FedPeftConfig, tuple[Any, ...]]:
    version = record.get(PROTOCOL)
    if version != PROTOCOL_VERSION:
        raise FedPeftError(f"a request of protocol version {version}; this fedpeft reads version {PROTOCOL_VERSION}: "
                           "run the same fedpeft at the coordinator and the sites")
    settings = {k[len(SETTING):]: v for k, v in record.items() if k.startswith(SETTING)}
    extra = sorted(set(settings) - SITE_SETTINGS) + sorted(k for k in record if not k.startswith(SETTING)
                                                         and k not in allowed)
    if extra:
        raise FedPeftError(f"the request holds keys that protocol version {PROTOCOL_VERSION} does not define: "
                           f"{', '.join(extra)}")
    if LABEL_NAMES not in record:
        raise FedPeftError(f"a request without {LABEL_NAMES}")
    return FedPeftConfig.from_mapping(settings), tuple(record[LABEL_NAMES])


_last: tuple[Any, TrainRequest] | None = None  # the record last parsed, and its request


def train_request(content: Any) -> TrainRequest:
    """The train request of a message's ``content``, parsed once: the codec mod, the clipping mod and the
    handler see the same ConfigRecord object, and the second and later calls return the first's result."""
    global _last
    record = content[CONFIG]
    last = _last
    if last is not None and last[0] is record:
        return last[1]
    request = TrainRequest.from_record(record)
    _last = (record, request)
    return request
