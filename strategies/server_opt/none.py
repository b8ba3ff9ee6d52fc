"""No server optimizer: the broadcast becomes the aggregate (x' = x + Δ), as in FedAvg."""

from __future__ import annotations

import numpy as np

from strategies.server_opt import SERVER_OPTIMIZERS
from strategies.server_opt.base import Moments, ServerOptimizer, ServerOptSettings


def step(delta: np.ndarray, moments: Moments, settings: ServerOptSettings) -> tuple[np.ndarray, Moments]:
    return delta, {}


SERVER_OPTIMIZERS.register("none")(ServerOptimizer("none", step, "the aggregate is the next broadcast (FedAvg)"))
