"""The aggregator interface: LoRA layers paired by name, a per-layer rule, one driver for all of them.

Each aggregator serves one kind of adapter (``Aggregator.adapter``: ``lora`` or ``ssf``) and refuses
the other, naming the strategies that would fit. A LoRA adapter is a set of layers, each a pair
``(A, B)`` stored under ``<prefix>.lora_A.weight`` and ``<prefix>.lora_B.weight``; every other
tensor (the classification head, SSF's vectors) is averaged by weight. An algorithm only says what it
does to one layer: a *pair rule* maps the clients' factors and weights to the new global factors.
:func:`aggregate` does the rest, identically for every algorithm:

1. normalise the weights p_k = n_k / Σ n_k;
2. weighted-average every tensor that is not a LoRA factor;
3. for each LoRA layer, collect the clients' (A_k, B_k) — a factor a client does not train
   (``Aggregator.frozen``, e.g. FFA-LoRA's A, or ``held`` this round, RoLoRA's other factor) is taken
   from the broadcast it started from — and apply the pair rule (a rule that alternates by round is
   first resolved with :meth:`Aggregator.for_round`);
4. measure the aggregation bias of that layer, ‖ΔW − B'A'‖_F / ‖ΔW‖_F with ΔW = Σ_k p_k B_k A_k, the
   cosine cos(ΔW, B'A') and the size of the correction of B, ‖B' − B̄‖_F / ‖B̄‖_F
   (:mod:`strategies.residual`), and report ``agg_residual_mean``/``_max``, ``agg_cosine_mean``/``_min``
   and ``agg_correction_mean``/``_max`` over layers.

Layers are processed one at a time, so at most one layer of every client is held in memory beyond
the inputs themselves; inputs may be lazy mappings that build a layer only when it is asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fedpeft.adapters.state import HEAD_MODULES, adapter_kind, key_matches
from strategies.residual import LayerGrams, layer_geometry
from strategies.robust import combiner, parse_robust

A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class AggregationOptions:
    """Knobs of the aggregation rules (each rule reads the ones it needs).

    Parameters
    ----------
    lam : float
        ``lora-fair``: the weight of the penalty λ‖ΔB‖²_F beside 1 − cosine (absolute, as in the paper).
        ``lora-fair-ridge`` / ``lora-fair-ab``: the ridge strength, relative to the mean squared singular
        value of Ā (λ_eff = λ · tr(ĀĀᵀ) / r), so one value means the same for every model and round.
    ab_iterations : int
        Alternating (B-step, A-step) sweeps of ``lora-fair-ab``.
    fair_steps : int
        Most descent steps ``lora-fair`` takes from ΔB = 0 (it stops earlier once f no longer falls).
    exact_max_stack : int
        ``exact-svd`` factorises the stacked factors exactly (QR + small SVD) while Σ r_k is at most
        this; above it, a randomized range finder with power iterations keeps the cost linear in Σ r_k.
    sketch_oversample, sketch_power_iters : int
        Extra sketch columns and power iterations of that randomized path.
    seed : int
        Seed of the sketch's random test matrix.
    robust : str
        ``none`` (the weighted average), ``median`` or ``trimmed:<beta>``: a coordinate-wise robust
        statistic in place of every average (:mod:`strategies.robust`; linear rules only).
    """

    lam: float = 1e-2
    ab_iterations: int = 5
    fair_steps: int = 20
    exact_max_stack: int = 512
    sketch_oversample: int = 16
    sketch_power_iters: int = 2
    seed: int = 0
    robust: str = "none"

    def __post_init__(self) -> None:
        if not (self.lam >= 0 and np.isfinite(self.lam)):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam}")
        for name in ("ab_iterations", "fair_steps", "exact_max_stack", "sketch_power_iters"):
            if getattr(self, name) < (1 if name != "sketch_power_iters" else 0):
                raise ValueError(f"{name} must be >= 1 (power iterations >= 0), got {getattr(self, name)}")
        if self.sketch_oversample < 0:
            raise ValueError(f"sketch_oversample must be >= 0, got {self.sketch_oversample}")
        parse_robust(self.robust)


class PairRule(Protocol):
    """New global ``(A', B')`` of one LoRA layer from the clients' factors.

    ``grams`` holds the layer's stacked factors and ‖ΔW‖², shared with the round's metrics; a rule that
    needs them reads them there (a linear rule needs none), and forms its own when called without."""

    def __call__(
        self,
        As: Sequence[np.ndarray],
        Bs: Sequence[np.ndarray],
        p: np.ndarray,
        *,
        prev_A: np.ndarray,
        prev_B: np.ndarray,
        options: AggregationOptions,
        grams: LayerGrams | None = None,
    ) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class Aggregator:
    """A registered aggregation algorithm.

    Parameters
    ----------
    name : str
        Registry name (``--strategy``).
    pair : PairRule or None
        What happens to one LoRA layer (None for aggregators of adapters without LoRA layers).
    frozen : tuple[str, ...]
        Key components (``"lora_A"``) that clients neither train nor send and the server does not
        broadcast: they stay at the seeded initial value every process builds for itself.
    held : tuple[str, ...]
        Key components the server broadcasts but clients neither train nor send back this round; the
        result keeps them exactly as broadcast (RoLoRA's factor of the other round).
    alternates : tuple[Aggregator, ...]
        Per-round rules in turn: round t (from 1) uses ``alternates[(t - 1) % len]``
        (:meth:`for_round`); empty: this rule every round.
    heterogeneous_ranks : bool
        Whether clients may train LoRA of a lower rank than the global adapter (they get the
        global factors truncated to their rank, so the rule must keep components sorted by importance).
    linear : bool
        Whether the result is the weighted average of the clients' tensors and nothing else, so that
        noise added to it (central DP) covers the whole output: the rule is post-processing of the
        noised average. Rules that read each client's factors non-linearly are not.
    summary : str
        One line for ``--help`` and docs/strategies.md.
    adapter : str
        The PEFT method whose state this aggregates (``lora``, ``ssf``); the other is refused.
    """

    name: str
    pair: PairRule | None
    frozen: tuple[str, ...] = ()
    held: tuple[str, ...] = ()
    alternates: tuple[Aggregator, ...] = ()
    heterogeneous_ranks: bool = False
    linear: bool = False
    summary: str = ""
    adapter: str = "lora"

    def for_round(self, server_round: int) -> Aggregator:
        """The rule round ``server_round`` (from 1) aggregates with: itself, or its turn of ``alternates``."""
        if not self.alternates:
            return self
        if server_round < 1:
            raise ValueError(f"{self.name} alternates by round; rounds count from 1, got {server_round}")
        return self.alternates[(server_round - 1) % len(self.alternates)]

    def holding(self, components: tuple[str, ...]) -> Aggregator:
        """This rule with ``components`` held as well: broadcast, neither trained nor sent back, kept as
        broadcast (the classification head after the probe rounds under ``head_after_probe=freeze``)."""
        extra = tuple(c for c in components if c not in self.held)
        return dataclasses.replace(self, held=self.held + extra) if extra else self

    @property
    def fixed(self) -> tuple[str, ...]:
        """Components clients do not train or send this round (``frozen`` + ``held``)."""
        return self.frozen + self.held

    def __call__(
        self,
        states: Sequence[Mapping[str, np.ndarray]],
        weights: Sequence[float],
        *,
        previous: Mapping[str, np.ndarray],
        options: AggregationOptions | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return aggregate(self, states, weights, previous=previous, options=options or AggregationOptions())


def round_rule(agg: Aggregator, server_round: int, *, head_frozen_after: int | None = None) -> Aggregator:
    """The rule round ``server_round`` aggregates with: ``agg``'s turn (:meth:`Aggregator.for_round`),
    holding the classification head in rounds after ``head_frozen_after`` (None: never)."""
    rule = agg.for_round(server_round)
    if head_frozen_after is not None and server_round > head_frozen_after:
        rule = rule.holding(HEAD_MODULES)
    return rule


def check_adapter(agg: Aggregator, keys: Any) -> None:
    """Raise a ValueError unless the adapter with tensor names ``keys`` is of ``agg.adapter``'s kind (a head
    alone fits every rule). The driver's own guard: the coordinator checks first, naming the rules that
    would fit (:func:`strategies.checks.check_adapter_kind`)."""
    kind = adapter_kind(keys)
    if kind is not None and kind != agg.adapter:
        raise ValueError(f"strategy {agg.name!r} aggregates {agg.adapter.upper()} adapters, but this adapter is "
                         f"{kind.upper()}")


def lora_layers(keys: Sequence[str] | Any) -> tuple[list[tuple[str, str]], list[str]]:
    """Split adapter keys into LoRA ``(A key, B key)`` pairs and the other tensors, both sorted."""
    keys = set(keys)
    pairs, paired = [], set()
    for key in sorted(keys):
        if key.endswith(A_SUFFIX):
            b_key = key[: -len(A_SUFFIX)] + B_SUFFIX
            if b_key not in keys:
                raise ValueError(f"LoRA factor {key} has no matching {b_key}")
            pairs.append((key, b_key))
            paired |= {key, b_key}
        elif key.endswith(B_SUFFIX) and key[: -len(B_SUFFIX)] + A_SUFFIX not in keys:
            raise ValueError(f"LoRA factor {key} has no matching lora_A")
    return pairs, sorted(keys - paired)


def normalised(weights: Sequence[float]) -> np.ndarray:
    """p_k = w_k / Σ w; raises unless the weights are non-negative with a positive sum."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    return w / w.sum()


def weighted_sum(arrays: Sequence[np.ndarray], p: np.ndarray) -> np.ndarray:
    """Σ_k p_k · arrays[k], accumulated in float64, returned in the arrays' dtype (at least float32)."""
    dtype = np.result_type(*arrays, np.float32)
    total = np.zeros(np.shape(arrays[0]), dtype=np.float64)
    for w, a in zip(p, arrays, strict=True):
        total += w * np.asarray(a)
    return total.astype(dtype)


def aggregate(
    agg: Aggregator,
    states: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float],
    *,
    previous: Mapping[str, np.ndarray],
    options: AggregationOptions,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Aggregate the clients' adapter ``states`` into a new global state (see the module docstring).

    ``previous`` is the global state the clients started from this round; it fixes the keys, the
    global rank and the dtypes of the result.

    Raises
    ------
    ValueError
        Weights that cannot be normalised, a client with missing/extra keys, a frozen or held factor
        that a client sent anyway, a rule that alternates by round (aggregate with ``for_round(t)``),
        or shapes that do not match (ranks may differ only for
        ``heterogeneous_ranks`` rules, and never exceed the global rank).
    """
    p = normalised(weights)
    if len(states) != len(p):
        raise ValueError(f"got {len(states)} states for {len(p)} weights")
    check_adapter(agg, previous.keys())
    if agg.alternates:
        raise ValueError(f"{agg.name} alternates by round: aggregate with its for_round(server_round)")
    combine = combiner(options.robust)
    if combine is not None and not agg.linear:
        raise ValueError(f"robust={options.robust} replaces averages; {agg.name!r} does not average (use fedit, "
                         "ffa-lora, ssf-avg or fedins)")
    average = combine if combine is not None else (lambda arrays: weighted_sum(arrays, p))
    pairs, others = lora_layers(previous.keys())
    expected = {k for k in previous if not key_matches(k, agg.fixed)}
    for i, state in enumerate(states):
        if set(state.keys()) != expected:
            missing, extra = sorted(expected - set(state.keys())), sorted(set(state.keys()) - expected)
            raise ValueError(
                f"client {i} sent keys that differ from the adapter: missing {missing[:3]}, extra {extra[:3]}"
            )

    out: dict[str, np.ndarray] = {}
    for key in others:
        if key_matches(key, agg.fixed):  # held this round (the head after the probe): kept as broadcast
            out[key] = np.asarray(previous[key])
            continue
        shape = np.shape(previous[key])
        values = [np.asarray(state[key]) for state in states]
        for i, value in enumerate(values):
            if value.shape != shape:
                raise ValueError(f"client {i} tensor {key} has shape {value.shape}, expected {shape}")
        out[key] = average(values).astype(np.asarray(previous[key]).dtype)

    geometry = []
    for a_key, b_key in pairs:
        prev_A, prev_B = np.asarray(previous[a_key]), np.asarray(previous[b_key])
        As = [np.asarray(s[a_key]) if a_key in s else prev_A for s in states]
        Bs = [np.asarray(s[b_key]) if b_key in s else prev_B for s in states]
        _check_ranks(agg, a_key, As, Bs, prev_A, prev_B)
        if agg.pair is None:
            raise ValueError(f"strategy {agg.name!r} has no rule for LoRA layers")
        grams = LayerGrams(As, Bs, p)  # formed once, read by the rule and by the metrics
        if combine is not None:  # a linear rule averages each factor (or keeps a fixed one): robustly here
            new_A = prev_A if key_matches(a_key, agg.fixed) else combine(As)
            new_B = prev_B if key_matches(b_key, agg.fixed) else combine(Bs)
        else:
            new_A, new_B = agg.pair(As, Bs, p, prev_A=prev_A, prev_B=prev_B, options=options, grams=grams)
        out[a_key], out[b_key] = new_A.astype(prev_A.dtype), new_B.astype(prev_B.dtype)
        geometry.append(layer_geometry(As, Bs, p, out[a_key], out[b_key], grams))
    out = {key: out[key] for key in previous}  # the broadcast's key order
    metrics: dict[str, Any] = {}
    if geometry:
        residual, cosine, correction = ([g[k] for g in geometry] for k in ("residual", "cosine", "correction"))
        metrics = {
            "agg_residual_mean": float(np.mean(residual)), "agg_residual_max": float(np.max(residual)),
            "agg_cosine_mean": float(np.mean(cosine)), "agg_cosine_min": float(np.min(cosine)),
            "agg_correction_mean": float(np.mean(correction)), "agg_correction_max": float(np.max(correction)),
        }
    return out, metrics


def _check_ranks(
    agg: Aggregator, key: str, As: list[np.ndarray], Bs: list[np.ndarray], prev_A: np.ndarray, prev_B: np.ndarray
) -> None:
    r, n = prev_A.shape
    d = prev_B.shape[0]
    for i, (a, b) in enumerate(zip(As, Bs, strict=True)):
        rk = a.shape[0] if a.ndim == 2 else -1
        ok = a.ndim == 2 and b.ndim == 2 and a.shape[1] == n and b.shape == (d, rk) and 1 <= rk <= r
        if ok and rk != r and not agg.heterogeneous_ranks:
            raise ValueError(f"{agg.name} needs every client at rank {r}; client {i} has rank {rk} at {key}")
        if not ok:
            raise ValueError(
                f"client {i} LoRA factors at {key} have shapes {a.shape}, {b.shape}; expected ({r}, {n}), ({d}, {r})"
            )


def truncate_to_rank(state: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The state with every LoRA layer cut to its first ``rank`` components (A rows, B columns).

    For rules that keep components sorted by singular value (``exact-svd``) this is the best
    rank-``rank`` approximation of each layer's product.
    """
    out = {}
    for key, value in state.items():
        if key.endswith(A_SUFFIX):
            out[key] = np.ascontiguousarray(value[:rank])
        elif key.endswith(B_SUFFIX):
            out[key] = np.ascontiguousarray(value[:, :rank])
        else:
            out[key] = value
    return out
