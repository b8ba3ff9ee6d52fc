"""FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv 2003.00295, Algorithm 2).

Per tensor and round, with Δ the aggregate delta (m starts at 0, v at τ², as the paper initialises it):

1. m ← β₁·m + (1 − β₁)·Δ
2. v ← v − (1 − β₂)·Δ²·sign(v − Δ²)     (v grows no faster than Adam's, and shrinks slowly)
3. x ← x + η·m / (√v + τ)
"""

from __future__ import annotations

import numpy as np

from strategies.server_opt import SERVER_OPTIMIZERS
from strategies.server_opt.base import Moments, ServerOptimizer, ServerOptSettings, adaptive_move


def step(delta: np.ndarray, moments: Moments, settings: ServerOptSettings) -> tuple[np.ndarray, Moments]:
    v0 = moments["v"] if "v" in moments else np.full_like(delta, settings.tau**2)
    sq = np.square(delta)
    v = v0 - (1 - settings.beta2) * sq * np.sign(v0 - sq)
    return adaptive_move(delta, moments, v, settings)


SERVER_OPTIMIZERS.register("yogi")(ServerOptimizer(
    "yogi", step, "FedYogi: Yogi's additive second moment (Reddi et al. 2021)", moments=("m", "v")))
