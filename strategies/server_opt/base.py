"""What a server optimizer is, and the driver that steps every tensor of the adapter with it."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedpeft.adapters.state import key_matches

Moments = dict[str, np.ndarray]
"""One tensor's optimizer state by name (``m``: first moment, ``v``: second moment), float32."""

StepRule = Callable[[np.ndarray, Moments, "ServerOptSettings"], "tuple[np.ndarray, Moments]"]
"""``rule(delta, moments, settings) → (move, new moments)`` for one tensor; ``moments`` is empty on
the tensor's first step (the rule initialises it, as its paper does)."""


@dataclass(frozen=True)
class ServerOptSettings:
    """The knobs every server optimizer reads (each reads the ones it needs).

    Parameters
    ----------
    lr : float
        η, the server learning rate (FedAvgM at η = 1 and momentum 0 is plain FedAvg).
    momentum : float
        β₁ in [0, 1): FedAvgM's momentum, the adaptive optimizers' first-moment decay.
    beta2 : float
        β₂ in [0, 1): the second-moment decay of FedAdam and FedYogi.
    tau : float
        τ > 0: the adaptivity floor of FedAdagrad, FedAdam and FedYogi (the moments start at v = τ²).
    """

    lr: float = 1.0
    momentum: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"server_lr must be a finite number > 0, got {self.lr}")
        for name in ("momentum", "beta2"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise ValueError(f"server_{name} must lie in [0, 1), got {value}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"server_tau must be a finite number > 0, got {self.tau}")


@dataclass(frozen=True)
class ServerOptimizer:
    """A registered server optimizer: ``rule`` (one tensor's step) and a line for ``--help`` and the docs."""

    name: str
    rule: StepRule
    summary: str = ""
    moments: tuple[str, ...] = ()  # the state each tensor keeps, by name


def server_step(
    opt: ServerOptimizer,
    previous: Mapping[str, np.ndarray],
    aggregated: Mapping[str, np.ndarray],
    state: Mapping[str, np.ndarray],
    *,
    settings: ServerOptSettings,
    fixed: tuple[str, ...] = (),
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Move the broadcast ``previous`` along the round's aggregate ``aggregated − previous``.

    Parameters
    ----------
    state : mapping
        The optimizer's moments, keyed ``<moment>/<tensor name>`` (empty before its first step).
    fixed : tuple of str
        Key components the round did not train (frozen, or held this round): they keep their value
        and their moments.

    Returns
    -------
    new_global, new_state, metrics
        The next broadcast (the dtypes of ``previous``), the moments, and ``server_step_norm``: ‖x' − x‖.
    """
    out: dict[str, np.ndarray] = {}
    new_state = dict(state)
    moved = 0.0
    for key, prev in previous.items():
        if key_matches(key, fixed):
            out[key] = prev
            continue
        prev32 = np.asarray(prev, dtype=np.float32)
        delta = np.asarray(aggregated[key], dtype=np.float32) - prev32
        moments = {m: np.asarray(state[f"{m}/{key}"], dtype=np.float32) for m in opt.moments if f"{m}/{key}" in state}
        move, moments = opt.rule(delta, moments, settings)
        for m, value in moments.items():
            new_state[f"{m}/{key}"] = np.asarray(value, dtype=np.float32)
        out[key] = (prev32 + move).astype(np.asarray(prev).dtype, copy=False)
        step = out[key] - prev32
        moved += float(np.dot(step.ravel(), step.ravel()))
    return out, new_state, {"server_step_norm": math.sqrt(moved)}


def adaptive_move(delta: np.ndarray, moments: Moments, v: np.ndarray,
                  settings: ServerOptSettings) -> tuple[np.ndarray, Moments]:
    """The step the three adaptive optimizers share once their ``v`` is known:
    m ← β₁·m + (1 − β₁)·Δ, move = η·m / (√v + τ). ``delta`` is consumed (its buffer becomes the move)."""
    m = moments["m"] * settings.momentum if "m" in moments else np.zeros_like(delta)
    m += (1 - settings.momentum) * delta
    denominator = np.sqrt(v)
    denominator += settings.tau
    np.divide(m, denominator, out=delta)
    delta *= settings.lr
    return delta, {"m": m, "v": v}
