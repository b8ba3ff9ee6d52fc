"""FedAdagrad (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, arXiv 2003.00295, Algorithm 2).

Per tensor and round, with Δ the aggregate delta (m starts at 0, v at τ², as the paper initialises it):

1. m ← β₁·m + (1 − β₁)·Δ
2. v ← v + Δ²
3. x ← x + η·m / (√v + τ)
"""

from __future__ import annotations

import numpy as np

from strategies.server_opt import SERVER_OPTIMIZERS
from strategies.server_opt.base import Moments, ServerOptimizer, ServerOptSettings, adaptive_move


def step(delta: np.ndarray, moments: Moments, settings: ServerOptSettings) -> tuple[np.ndarray, Moments]:
    v = moments["v"] + np.square(delta) if "v" in moments else np.square(delta) + settings.tau**2
    return adaptive_move(delta, moments, v, settings)


SERVER_OPTIMIZERS.register("adagrad")(ServerOptimizer(
    "adagrad", step, "FedAdagrad: v accumulates Δ² (Reddi et al. 2021)", moments=("m", "v")))
