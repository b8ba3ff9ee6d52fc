"""FedAvgM: server momentum (Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution
for Federated Visual Classification", 2019, arXiv 1909.06335; Reddi et al. 2021, eq. in §2).

Per tensor and round, with Δ the aggregate delta:

1. m ← β·m + Δ          (m starts at 0)
2. x ← x + η·m

At β = 0 and η = 1 it is FedAvg.
"""

from __future__ import annotations

import numpy as np

from strategies.server_opt import SERVER_OPTIMIZERS
from strategies.server_opt.base import Moments, ServerOptimizer, ServerOptSettings


def step(delta: np.ndarray, moments: Moments, settings: ServerOptSettings) -> tuple[np.ndarray, Moments]:
    m = moments["m"] * settings.momentum + delta if "m" in moments else delta.copy()
    return m * settings.lr, {"m": m}


SERVER_OPTIMIZERS.register("avgm")(ServerOptimizer(
    "avgm", step, "FedAvgM: server momentum on the aggregate delta (Hsu et al. 2019)", moments=("m",)))
