"""The cross-field checks of :class:`fedpeft.config.FedPeftConfig`, one group of settings each.

Each raises :class:`~fedpeft.errors.FedPeftError` naming the field, the value and what to do instead.
"""

from __future__ import annotations

import math
from typing import Any

from fedpeft.adapters import PEFT_METHODS
from fedpeft.adapters.lora.dynamic import DYNAMIC_RULES
from fedpeft.adapters.ssf_pool.config import check_pool
from fedpeft.codecs import CodecError, parse_codec
from fedpeft.drift import parse_drift
from fedpeft.errors import FedPeftError
from fedpeft.heads import POOLING_MODES
from fedpeft.label_correction import parse_label_correction

DP_MODES = ("off", "local", "central")
DP_CLIPPING = ("hooks", "ghost")
DP_ACCOUNTANTS = ("prv", "rdp")


def check_privacy(cfg: Any) -> None:
    if cfg.dp not in DP_MODES:
        raise FedPeftError(f"dp must be one of {', '.join(DP_MODES)}, got {cfg.dp!r}")
    if cfg.dp_clipping not in DP_CLIPPING:
        raise FedPeftError(f"dp_clipping must be one of {', '.join(DP_CLIPPING)}, got {cfg.dp_clipping!r}")
    if cfg.dp_accountant not in DP_ACCOUNTANTS:
        raise FedPeftError(f"dp_accountant must be one of {', '.join(DP_ACCOUNTANTS)}, got {cfg.dp_accountant!r}")
    for name in ("dp_epsilon", "dp_noise_multiplier"):
        value = getattr(cfg, name)
        if not (value >= 0 and math.isfinite(value)):
            raise FedPeftError(f"{name} must be a finite number >= 0, got {value}")
    if not (cfg.dp_max_grad_norm > 0 and math.isfinite(cfg.dp_max_grad_norm)):
        raise FedPeftError(f"dp_max_grad_norm must be a finite number > 0, got {cfg.dp_max_grad_norm}")
    # how the dp_* settings combine with the mode and the rest: privacy.modes (server.checks.check_config)


SHORT_ROUND = ("skip", "retry", "stop")


def check_reliability(cfg: Any) -> None:
    if cfg.min_clients < 1 or cfg.min_clients > cfg.clients:
        raise FedPeftError(f"min_clients must lie in 1..clients={cfg.clients}, got {cfg.min_clients}")
    if cfg.short_round not in SHORT_ROUND:
        raise FedPeftError(f"short_round must be one of {', '.join(SHORT_ROUND)}, got {cfg.short_round!r}")
    if cfg.round_retries < 0:
        raise FedPeftError(f"round_retries must be >= 0, got {cfg.round_retries}")
    if not (math.isfinite(cfg.max_update_norm) and cfg.max_update_norm >= 0):
        raise FedPeftError(f"max_update_norm must be a finite number >= 0 (0: no bound), got {cfg.max_update_norm}")
    if not (math.isfinite(cfg.clip_update_norm) and cfg.clip_update_norm >= 0):
        raise FedPeftError(f"clip_update_norm must be a finite number >= 0 (0: off), got {cfg.clip_update_norm}")
    if not (math.isfinite(cfg.max_norm_ratio) and (cfg.max_norm_ratio == 0 or cfg.max_norm_ratio > 1)):
        raise FedPeftError(f"max_norm_ratio must be 0 (off) or a finite number > 1, got {cfg.max_norm_ratio}")


# The settings each PEFT method reads; setting another method's is a mistake worth one line.
PEFT_FIELDS = {
    "lora": ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "client_ranks", "lora_dynamic_rank",
             "lora_rank_min"),
    "ssf": ("ssf_target_modules",),
    "ssf-pool": ("ssf_target_modules", "ssf_pool_size", "ssf_pool_select", "ssf_pool_match"),
}
# The aggregation a PEFT method gets when no strategy is named (the CLI fills it in).
PEFT_DEFAULT_STRATEGY = {"lora": "fedit", "ssf": "ssf-avg", "ssf-pool": "fedins"}


def check_peft(cfg: Any) -> None:
    PEFT_METHODS.get(cfg.peft)  # unknown: lists the known ones
    try:
        check_pool(cfg.ssf_pool_size, cfg.ssf_pool_select, cfg.ssf_pool_match)
    except ValueError as err:
        raise FedPeftError(str(err)) from None
    if cfg.peft == "ssf-pool" and cfg.gradient_checkpointing:
        raise FedPeftError("gradient_checkpointing with peft ssf-pool: the forward recomputed in the backward pass "
                           "would not see each input's choice of pool entries; turn it off")
    defaults = type(cfg).__dataclass_fields__
    own = PEFT_FIELDS.get(cfg.peft, ())
    for method, names in PEFT_FIELDS.items():
        if method == cfg.peft:
            continue
        for name in names:
            if name not in own and getattr(cfg, name) != defaults[name].default:
                raise FedPeftError(
                    f"{name} is a {method} setting but peft is {cfg.peft}; drop it or use --peft {method}"
                )
    check_dynamic_rank(cfg)


def check_dynamic_rank(cfg: Any) -> None:
    """One line for a setting that dynamic rank cannot serve (exit 2 at the CLI)."""
    if cfg.lora_rank_min < 1 or cfg.lora_rank_min > cfg.lora_r:
        raise FedPeftError(f"lora_rank_min must lie in 1..lora_r={cfg.lora_r}, got {cfg.lora_rank_min}")
    if not cfg.lora_dynamic_rank:
        if cfg.lora_rank_min != 1:
            raise FedPeftError("lora_rank_min is the lowest rank lora_dynamic_rank draws; add --lora-dynamic-rank")
        return
    if cfg.peft != "lora":
        raise FedPeftError(f"lora_dynamic_rank trains LoRA at a drawn rank, but peft is {cfg.peft}; use --peft lora")
    if cfg.client_ranks:
        raise FedPeftError("lora_dynamic_rank with client_ranks: every site trains the round's drawn rank; drop "
                           "--client-ranks")
    drift = cfg.drift.strip()
    if drift.startswith("scaffold") and ":" not in drift:
        raise FedPeftError("drift scaffold with lora_dynamic_rank: a control variate of components the round does "
                           "not train would move anyway; use --drift scaffold:head or fedprox")
    if cfg.strategy not in DYNAMIC_RULES:
        raise FedPeftError(f"strategy {cfg.strategy} reads whole factors (products, QR or SVD), so the components a "
                           f"round does not train would change; with lora_dynamic_rank use {', '.join(DYNAMIC_RULES)}")


TASKS = ("seq-cls", "causal-lm")
# The settings only classification reads; setting one for causal-lm is a mistake worth one line.
SEQ_CLS_FIELDS = ("text_column", "label_column", "head_lr", "pooling", "probe_rounds", "probe_steps",
                  "probe_batch_size", "probe_lr", "head_after_probe", "label_correction")


def check_task(cfg: Any) -> None:
    if cfg.task not in TASKS:
        raise FedPeftError(f"task must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    check_head(cfg)
    if cfg.task == "seq-cls":
        return
    defaults = type(cfg).__dataclass_fields__
    for name in SEQ_CLS_FIELDS:
        if getattr(cfg, name) != defaults[name].default:
            raise FedPeftError(f"{name} is a seq-cls setting but task is causal-lm; drop it (causal-lm reads "
                               "prompt/response or messages columns)")
    if not cfg.model:
        raise FedPeftError("task causal-lm needs --model: a decoder LM's directory (Llama, Qwen, Mistral, GPT-2, ...); "
                           "the bundled MiniLM is an encoder")
    if not cfg.data:
        raise FedPeftError("task causal-lm needs --data: a JSONL file with prompt/response columns or chat messages")
    if cfg.partition.strip().startswith("dirichlet"):
        raise FedPeftError("partition dirichlet draws label shares, and causal-lm data has no labels; use iid or "
                           "natural:<column>")
    if cfg.canaries:
        raise FedPeftError("canaries (the empirical privacy audit) are labelled texts: seq-cls only")


def check_head(cfg: Any) -> None:
    if cfg.pooling not in POOLING_MODES:
        raise FedPeftError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {cfg.pooling!r}")
    if not (cfg.probe_rounds == -1 or 0 <= cfg.probe_rounds <= cfg.rounds):
        raise FedPeftError(f"probe_rounds must lie in 0..rounds={cfg.rounds} (or be -1: auto), got {cfg.probe_rounds}")
    if cfg.probe_steps < 1:
        raise FedPeftError(f"probe_steps must be >= 1, got {cfg.probe_steps}")
    if cfg.probe_batch_size < 0:
        raise FedPeftError(f"probe_batch_size must be >= 0 (0: full batch), got {cfg.probe_batch_size}")
    if not (math.isfinite(cfg.probe_lr) and cfg.probe_lr > 0):
        raise FedPeftError(f"probe_lr must be a finite number > 0, got {cfg.probe_lr}")


DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def check_device(cfg: Any) -> None:
    if cfg.device not in DEVICES:
        raise FedPeftError(f"device must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
    if cfg.precision not in PRECISIONS:
        raise FedPeftError(f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if not (math.isfinite(cfg.client_gpus) and cfg.client_gpus >= 0):
        raise FedPeftError(f"client_gpus must be a finite number >= 0 (0: no GPU), got {cfg.client_gpus}")
    if cfg.client_gpus > 0 and cfg.device == "cpu":
        raise FedPeftError("client_gpus reserves GPUs for clients that device=cpu keeps off them; drop one")


def check_codecs(cfg: Any) -> None:
    for name in ("codec", "downlink_codec"):
        try:
            codec = parse_codec(getattr(cfg, name))
        except CodecError as err:
            raise FedPeftError(f"{name}: {err}") from None
        if name == "downlink_codec" and codec.sparsifier is not None and not cfg.downlink_delta:
            raise FedPeftError(
                "downlink_codec cannot be a sparsifier of the whole adapter: add --downlink-delta (the broadcast "
                "becomes its change since the previous one, and the coordinator keeps what it did not send), or "
                "use none, fp16, int8 or int4"
            )
    if cfg.downlink_delta and parse_codec(cfg.downlink_codec).lossless:
        raise FedPeftError("downlink_delta sends the broadcast's change encoded with downlink_codec, which is "
                           f"{cfg.downlink_codec!r} (lossless): name a lossy one, e.g. --downlink-codec compeft")


HEAD_AFTER_PROBE = ("train", "freeze")
# The registry of strategies/server_opt holds these (a test keeps the two equal; fedpeft does not import strategies).
SERVER_OPTS = ("none", "avgm", "adagrad", "adam", "yogi")
SERVER_OPT_FIELDS = ("server_lr", "server_momentum", "server_beta2", "server_tau")


def check_recipe(cfg: Any) -> None:
    """The training recipe around the aggregation rule: server optimizer, drift and label correction, the head."""
    if cfg.server_opt not in SERVER_OPTS:
        raise FedPeftError(f"server_opt must be one of {', '.join(SERVER_OPTS)}, got {cfg.server_opt!r}")
    for name in ("server_lr", "server_tau"):
        if not (math.isfinite(getattr(cfg, name)) and getattr(cfg, name) > 0):
            raise FedPeftError(f"{name} must be a finite number > 0, got {getattr(cfg, name)}")
    for name in ("server_momentum", "server_beta2"):
        if not (math.isfinite(getattr(cfg, name)) and 0 <= getattr(cfg, name) < 1):
            raise FedPeftError(f"{name} must lie in [0, 1), got {getattr(cfg, name)}")
    if cfg.server_opt == "none":
        defaults = type(cfg).__dataclass_fields__
        changed = [name for name in SERVER_OPT_FIELDS if getattr(cfg, name) != defaults[name].default]
        if changed:
            raise FedPeftError(f"{changed[0]} is set but server_opt is none; add --server-opt avgm, adagrad, adam or "
                               "yogi")
    if cfg.head_after_probe not in HEAD_AFTER_PROBE:
        raise FedPeftError(f"head_after_probe must be one of {', '.join(HEAD_AFTER_PROBE)}, got "
                           f"{cfg.head_after_probe!r}")
    if cfg.head_after_probe == "freeze" and not cfg.probes:
        raise FedPeftError("head_after_probe freeze keeps the probed head, but probe_rounds is 0: add --probe-rounds")
    parse_label_correction(cfg.label_correction)
    drift = parse_drift("none" if cfg.drift.strip() == "auto" else cfg.drift)  # auto: scaffold:head or none
    if drift.method == "scaffold" and cfg.client_ranks and not drift.scope:
        raise FedPeftError("drift scaffold with client_ranks: a site's control variate must have the global "
                           "adapter's shapes; drop --client-ranks")
