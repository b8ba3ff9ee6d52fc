"""The run configuration: one frozen dataclass, parsed once at each entry point.

Every field documents itself (``help``) and is validated in ``__post_init__``; an invalid value raises
:class:`~fedpeft.errors.FedPeftError` naming the field and the allowed range. The same object is built
from the ``fedpeft simulate`` flags, from Flower's run config (``[tool.flwr.app.config]`` in
``pyproject.toml``, keys in kebab-case) and from the copy the server sends to clients each round.
Change it with :func:`dataclasses.replace`, never in place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedpeft.config_checks import (  # noqa: F401  (PEFT_FIELDS, ...: part of this module's interface)
    PEFT_DEFAULT_STRATEGY,
    PEFT_FIELDS,
    SEQ_CLS_FIELDS,
    check_codecs,
    check_device,
    check_peft,
    check_privacy,
    check_recipe,
    check_reliability,
    check_task,
)
from fedpeft.errors import FedPeftError

AUTO_PROBE_SHARE = 5  # probe_rounds auto: one probe round per this many rounds (bench/heterogeneity.py)


def _f(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class FedPeftConfig:
    """Everything that defines a federated PEFT run."""

    # --- model and adapter ---------------------------------------------------------------------
    task: str = _f(
        "seq-cls", "seq-cls (text classification: text + label columns) | causal-lm (instruction tuning of a decoder "
        "LM: prompt/response or chat messages, loss on the response tokens)"
    )
    model: str = _f("", "HF model directory or cached hub name; empty: bundled all-MiniLM-L6-v2 (seq-cls only)")
    peft: str = _f("lora", "PEFT method: lora (low-rank factors, HF peft) | ssf (per-feature scale and shift) | "
                   "ssf-pool (FedIns: a pool of SSF entries with keys, chosen per input)")
    lora_r: int = _f(8, "LoRA rank r")
    lora_alpha: float = _f(16.0, "LoRA scaling alpha (update scaled by alpha/r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input, in [0, 1)")
    lora_target_modules: str = _f(
        "", "comma-separated module names; empty: seq-cls peft's per-architecture default, causal-lm the attention "
        "and MLP projections of the architecture"
    )
    lora_dynamic_rank: bool = _f(
        False, "DP-DyLoRA: each round trains LoRA at one rank b that the coordinator draws from the run seed "
        "(uniform on lora_rank_min..lora_r, scale alpha/b); components above b stay as they were that round"
    )
    lora_rank_min: int = _f(1, "the lowest rank lora_dynamic_rank draws")
    ssf_target_modules: str = _f(
        "", "SSF, ssf-pool: comma-separated nn.Linear / nn.LayerNorm names it follows; empty: every one but the head"
    )
    ssf_pool_size: int = _f(4, "ssf-pool (FedIns): M, the pool's entries, each an SSF over the targets with one key")
    ssf_pool_select: int = _f(1, "ssf-pool: N, the entries each input combines (its N nearest keys by cosine), 1..M")
    ssf_pool_match: float = _f(
        0.1, "ssf-pool: lambda of the objective (1 - lambda) CE + lambda (1 - sum of the chosen keys' cosines), "
        "in [0, 1)"
    )
    pooling: str = _f(
        "auto", "seq-cls head: auto (the pooling the model directory declares, sentence-transformers layout: "
        "all-MiniLM-L6-v2 -> mean, normalised; else the architecture's own head) | cls (the architecture's own "
        "head, BERT: [CLS] pooler) | mean (a linear classifier on the mean of the non-padding token states)"
    )
    # --- data -----------------------------------------------------------------------------------
    data: str = _f("", "JSONL/CSV file (optionally .gz); empty: bundled Rotten Tomatoes snippets")
    text_column: str = _f("text", "column holding the input text")
    label_column: str = _f("label", "column holding the class label")
    test_fraction: float = _f(0.1, "share of examples held out for server-side evaluation, in (0, 1)")
    max_length: int = _f(128, "tokens kept per example")
    partition: str = _f("iid", "iid | dirichlet:<alpha> | natural:<column>")
    # --- federation -----------------------------------------------------------------------------
    clients: int = _f(10, "number of simulated clients (partitions)")
    rounds: int = _f(5, "federated rounds")
    fraction: float = _f(0.5, "share of clients sampled each round, in (0, 1]")
    strategy: str = _f(
        "fedit", "LoRA: fedit (alias fedavg) | lora-fair | lora-fair-ridge | lora-fair-ab | ffa-lora | rolora | "
        "exact-svd; SSF: ssf-avg"
    )
    fair_lambda: float = _f(
        1e-2, "lora-fair: weight of ||dB||^2 beside 1 - cosine; lora-fair-ridge / lora-fair-ab: ridge strength "
        "relative to mean(singular(A-bar)^2)"
    )
    fair_iterations: int = _f(5, "alternating sweeps of lora-fair-ab")
    client_ranks: str = _f("", "comma-separated LoRA ranks given to clients in turn (exact-svd); empty: all lora_r")
    server_opt: str = _f(
        "none", "a server step on each round's aggregate delta, after the strategy (and central DP's noise): none | "
        "avgm (FedAvgM) | adagrad | adam | yogi (Reddi et al. 2021)"
    )
    server_lr: float = _f(1.0, "server optimizer: learning rate eta (avgm at 1 with momentum 0 is FedAvg)")
    server_momentum: float = _f(0.9, "server optimizer: avgm's momentum, the adaptive ones' beta1, in [0, 1)")
    server_beta2: float = _f(0.99, "server optimizer: adam's and yogi's beta2, in [0, 1)")
    server_tau: float = _f(1e-3, "server optimizer: adagrad's, adam's and yogi's adaptivity floor tau, > 0")
    round_timeout: float = _f(3600.0, "seconds the server waits for replies in a round")
    startup_timeout: float = _f(600.0, "seconds the server waits for clients to load their model and data")
    min_clients: int = _f(1, "fewest valid replies a round aggregates; fewer: see short_round")
    short_round: str = _f(
        "skip",
        "a round with fewer than min_clients valid replies: skip (keep the global adapter) | retry (send it "
        "again, up to round_retries times, then skip) | stop (end the run, naming each site's failure)",
    )
    round_retries: int = _f(2, "how often short_round=retry sends a short round again")
    max_update_norm: float = _f(0.0, "reject a site's update whose L2 norm exceeds this; 0: no bound")
    clip_update_norm: float = _f(
        0.0, "norm bounding: scale a site's update down to this L2 norm before aggregation (not under central DP, "
        "which clips to dp_max_grad_norm); 0: off"
    )
    robust: str = _f(
        "none", "none | median | trimmed:<beta>: a coordinate-wise robust statistic instead of the average "
        "(fedit, ffa-lora, ssf-avg, fedins)"
    )
    max_norm_ratio: float = _f(
        0.0, "reject an update whose norm exceeds this multiple of the median of the round's others (>= 3); 0: off"
    )
    # --- communication --------------------------------------------------------------------------
    codec: str = _f(
        "none",
        "how sites send their update: none | fp16 | int8[:row] | int4[:row] | topk:<fraction> | "
        "ternary[:fraction] | compeft[:density] | shared:<density>[:<bound>], composed with + (topk:0.1+int8); lossy "
        "codecs keep error feedback",
    )
    error_feedback: bool = _f(
        True, "a lossy codec's site keeps what it did not send and adds it to its next update; false drops it "
        "(for comparison only: sparse codecs then lose what they leave out for good)"
    )
    downlink_codec: str = _f(
        "none",
        "how the server sends the global adapter: none | fp16 | int8[:row] | int4[:row]; with downlink_delta any "
        "codec (compeft[:density], topk:<fraction>+int8, ...)",
    )
    downlink_delta: bool = _f(
        False, "broadcast the change since the previous broadcast (encoded with downlink_codec, the coordinator "
        "keeping what it did not send) to sites that hold it; the whole adapter, uncompressed, to the others"
    )
    # --- local training -------------------------------------------------------------------------
    local_epochs: int = _f(1, "passes over the client's data per round")
    max_local_steps: int = _f(30, "cap on optimizer steps per client-round; 0: no cap")
    batch_size: int = _f(16, "examples per local step")
    lr: float = _f(1e-3, "AdamW learning rate")
    head_lr: float = _f(0.0, "learning rate of the classification head; 0: the same as lr")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    probe_rounds: int = _f(
        -1, "seq-cls: the first probe_rounds rounds train only the classification head (a linear probe on the "
        "encoder's pooled features, computed once per site), the rest train adapter and head; 0: none; -1 (auto): "
        "a fifth of the rounds, at least one, for LoRA (SSF and causal-lm: none)"
    )
    probe_steps: int = _f(20, "head steps per probe round")
    probe_batch_size: int = _f(0, "examples per probe step (under DP: the expected Poisson batch); 0: all (full batch)")
    probe_lr: float = _f(0.1, "AdamW learning rate of the probe's head steps")
    head_after_probe: str = _f(
        "train", "seq-cls with probe rounds: what the head does in the rounds after them: train (LP-FT) | freeze "
        "(the probed head stays, only the adapter trains: FedBABU's body-only updates)"
    )
    label_correction: str = _f(
        "none", "seq-cls: offset the logits in the local loss by the site's own label counts (never sent): none | "
        "balanced[:tau] (balanced softmax) | fedlc[:tau] (FedLC calibration); not under local DP"
    )
    drift: str = _f(
        "auto", "drift correction at the sites: auto (scaffold:head for seq-cls without DP, else none) | none | "
        "fedprox:<mu> (proximal term) | scaffold (control variates for every trained tensor: doubles the traffic) | "
        "scaffold:head (for the classification head: a few kB); not under local DP"
    )
    eval_batch_size: int = _f(64, "examples per evaluation batch")
    client_cpus: int = _f(2, "CPU threads each simulated client uses")
    client_gpus: float = _f(0.0, "share of a GPU each simulated client reserves (0.5: two clients per GPU); 0: none")
    device: str = _f("auto", "where sites and the server train and evaluate: auto (CUDA when present) | cpu | cuda")
    precision: str = _f(
        "auto", "auto (bf16 on a GPU that supports it, else fp32) | fp32 | bf16 (frozen weights in bf16, "
        "adapters in fp32, bf16 autocast)"
    )
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass: less memory, slower steps")
    seed: int = _f(0, "seed for data split, sampling, initialisation and training")
    # --- privacy --------------------------------------------------------------------------------
    dp: str = _f("off", "off | local (DP-SGD at each site: sample-level) | central (clipped updates + server noise)")
    dp_epsilon: float = _f(0.0, "epsilon budget per site (local) or per client (central); sigma fits it; 0: none")
    dp_delta: float = _f(1e-5, "delta of every epsilon, in (0, 1); under local DP below 1/examples at every site")
    dp_noise_multiplier: float = _f(0.0, "noise multiplier sigma; 0: fitted once to dp_epsilon over all planned rounds")
    dp_max_grad_norm: float = _f(1.0, "clipping norm C: per example (local) or per client update (central)")
    dp_clipping: str = _f("hooks", "Opacus clipping for local DP: hooks (per-sample gradients) | ghost (fast clipping)")
    dp_accountant: str = _f("prv", "accountant sites count with: prv (near-tight) | rdp (Opacus)")
    secure_aggregation: bool = _f(
        False, "secure aggregation (SecAgg): the coordinator learns the sum of the sampled sites' updates, never one "
        "site's; four message stages a round; linear rules only (fedit, ffa-lora, rolora, ssf-avg, fedins), codec none"
    )
    secagg_clip: float = _f(
        25.0, "secure aggregation: the L2 norm each site clips its own update to before masking (set it from a plain "
        "run's update_norm in traffic.jsonl; the default run's largest is 18.6, its probe round's)"
    )
    secagg_bits: int = _f(24, "secure aggregation: fixed-point bits per value (each value's error <= clip/2^bits)")
    secagg_threshold: int = _f(
        0, "secure aggregation: shares that rebuild a site's masks (sites that must stay to the end); 0: a majority "
        "of the round's sampled sites"
    )
    canaries: int = _f(
        0, "empirical privacy audit: this many random canaries spread over the sites, each trained on with "
        "probability 1/2 (a secret draw), scored by the final model; 0: off"
    )
    run_id: str = _f("", "run identifier; sites account privacy per run id (reuse one to share a budget); empty: new")
    # --- output ---------------------------------------------------------------------------------
    out: str = _f("", "run directory; empty: runs/<timestamp>")
    resume: str = _f("", "RUN_DIR of a stopped run to continue from its last completed round, under its own config")

    def __post_init__(self) -> None:
        _positive(
            self,
            "lora_r",
            "max_length",
            "clients",
            "rounds",
            "local_epochs",
            "batch_size",
            "eval_batch_size",
            "client_cpus",
            "fair_iterations",
        )
        if not self.fair_lambda >= 0:
            raise FedPeftError(f"fair_lambda must be >= 0, got {self.fair_lambda}")
        ranks = parse_ranks(self.client_ranks)
        if any(r < 1 or r > self.lora_r for r in ranks):
            raise FedPeftError(f"client_ranks must lie in 1..lora_r={self.lora_r}, got {self.client_ranks!r}")
        if not self.lora_alpha > 0:
            raise FedPeftError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        _in_range(self, "lora_dropout", 0.0, 1.0, lo_open=False, hi_open=True)
        _in_range(self, "test_fraction", 0.0, 1.0, lo_open=True, hi_open=True)
        _in_range(self, "fraction", 0.0, 1.0, lo_open=True, hi_open=False)
        if self.max_local_steps < 0:
            raise FedPeftError(f"max_local_steps must be >= 0 (0: no cap), got {self.max_local_steps}")
        if not self.lr > 0:
            raise FedPeftError(f"lr must be > 0, got {self.lr}")
        if not (math.isfinite(self.head_lr) and self.head_lr >= 0):
            raise FedPeftError(f"head_lr must be a finite number >= 0 (0: the same as lr), got {self.head_lr}")
        if self.weight_decay < 0:
            raise FedPeftError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("round_timeout", "startup_timeout"):
            if not getattr(self, name) > 0:
                raise FedPeftError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        check_reliability(self)
        if not (math.isfinite(self.secagg_clip) and self.secagg_clip > 0):
            raise FedPeftError(f"secagg_clip must be a finite number > 0, got {self.secagg_clip}")
        if not 2 <= self.secagg_bits <= 32:
            raise FedPeftError(f"secagg_bits must lie in 2..32, got {self.secagg_bits}")
        if self.secagg_threshold < 0 or self.secagg_threshold == 1:
            raise FedPeftError(f"secagg_threshold must be 0 (a majority) or at least 2, got {self.secagg_threshold}")
        if self.canaries < 0 or self.canaries == 1:
            raise FedPeftError(f"canaries must be 0 (off) or at least 2, got {self.canaries}")
        for name in ("text_column", "label_column"):
            if not getattr(self, name):
                raise FedPeftError(f"{name} must not be empty")
        if self.text_column == self.label_column:
            raise FedPeftError("text_column and label_column must differ")
        check_peft(self)
        check_task(self)
        check_recipe(self)
        check_device(self)
        check_privacy(self)
        check_codecs(self)

    # --- conversions ----------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> FedPeftConfig:
        """Build a config from a flat mapping (kebab- or snake-case keys), coercing types.

        Unknown keys raise, listing the known ones, so a typo in a run config is never ignored.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise FedPeftError(f"unknown config key {key!r}; known: {', '.join(sorted(known))}")
            kwargs[name] = _coerce(name, value, type(known[name].default))
        return cls(**kwargs)

    def with_default_out(self) -> FedPeftConfig:
        """This config, with an empty ``out`` filled as ``runs/<UTC timestamp>``."""
        if self.out:
            return self
        return dataclasses.replace(self, out=time.strftime("runs/%Y%m%d-%H%M%S", time.gmtime()))

    @property
    def probes(self) -> int:
        """How many probe rounds the run has: ``probe_rounds``, with ``-1`` (auto) resolved to a fifth of the
        rounds (rounded, at least one) for a LoRA classifier, where bench/heterogeneity.py measured it; none
        for SSF (unmeasured on real data; on the SSF test task a probe round slowed the fine-tune) and for a
        causal LM (it has no head to probe)."""
        if self.probe_rounds >= 0:
            return self.probe_rounds
        return max(1, round(self.rounds / AUTO_PROBE_SHARE)) if self.task == "seq-cls" and self.peft == "lora" else 0

    def to_dict(self) -> dict[str, Any]:
        """A flat snake-case dict of every field (JSON- and Flower-ConfigRecord-safe)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as pretty JSON, as written to ``RUN_DIR/config.json``."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


# What `--dp` (local) means when the user sets nothing else: the regime that won the search on the
# default data (docs/privacy.md; bench/dp_accuracy.py): every round a linear probe on the
# encoder's mean-pooled features, large Poisson batches, few steps, a high learning rate. The adapter
# settings apply only to rounds after the probe (``--probe-rounds`` below ``--rounds``).
# The privacy settings proper; the CLI gives delta unless set, epsilon unless epsilon or sigma is set.
DP_PRIVACY_KEYS = ("dp_epsilon", "dp_delta", "dp_noise_multiplier")

DP_DEFAULTS: dict[str, Any] = {
    "dp_epsilon": 8.0,
    "dp_delta": 1e-5,
    "rounds": 10,
    "fraction": 1.0,
    "probe_rounds": 10,  # = rounds: the CLI keeps them equal when only --rounds is given
    "probe_steps": 20,
    "probe_batch_size": 256,
    "probe_lr": 0.1,
    "strategy": "ffa-lora",  # after the probe: A stays frozen, noise enters B alone
    "lora_r": 1,  # every LoRA coordinate is a noise dimension
    "lora_alpha": 2.0,
    "batch_size": 64,
    "max_local_steps": 5,
    "lr": 1e-3,
    "head_lr": 0.1,
}


def parse_ranks(spec: str) -> list[int]:
    """``"2,4,8"`` → ``[2, 4, 8]`` (empty → ``[]``)."""
    try:
        return [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise FedPeftError(f"client_ranks must be comma-separated integers, got {spec!r}") from None


def field_help() -> dict[str, str]:
    """Field name → help text, for the CLI."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(FedPeftConfig)}


def _coerce(name: str, value: Any, kind: type) -> Any:
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind is float and isinstance(value, int | str) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, str):
            return int(value)
        if kind is bool and isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        if kind is bool and isinstance(value, int) and value in (0, 1):
            return bool(value)
    except ValueError:
        pass
    raise FedPeftError(f"{name} must be of type {kind.__name__}, got {value!r}")


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _positive(cfg: FedPeftConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 1:
            raise FedPeftError(f"{name} must be >= 1, got {value}")


def _in_range(cfg: FedPeftConfig, name: str, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> None:
    value = getattr(cfg, name)
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise FedPeftError(f"{name} must be in {interval}, got {value}")
