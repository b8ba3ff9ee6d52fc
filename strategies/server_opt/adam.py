"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv 2003.00295, Algorithm 2).

Per tensor and round, with Δ the aggregate delta (m starts at 0, v at τ², as the paper initialises it;
no bias correction, as in the paper):

1. m ← β₁·m + (1 − β₁)·Δ
2. v ← β₂·v + (1 − β₂)·Δ²
3. x ← x + η·m / (√v + τ)
"""

from __future__ import annotations

import numpy as np

from strategies.server_opt import SERVER_OPTIMIZERS
from strategies.server_opt.base import Moments, ServerOptimizer, ServerOptSettings, adaptive_move


def step(delta: np.ndarray, moments: Moments, settings: ServerOptSettings) -> tuple[np.ndarray, Moments]:
    v = moments["v"] * settings.beta2 if "v" in moments else np.full_like(delta, settings.beta2 * settings.tau**2)
    v += (1 - settings.beta2) * np.square(delta)
    return adaptive_move(delta, moments, v, settings)


SERVER_OPTIMIZERS.register("adam")(ServerOptimizer(
    "adam", step, "FedAdam: Adam on the aggregate delta (Reddi et al. 2021)", moments=("m", "v")))
