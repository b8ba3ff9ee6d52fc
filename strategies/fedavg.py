"""FedAvg over the adapter state (McMahan et al., 2017, arXiv 1602.05629).

Steps: normalise the weights p_k = n_k / Σ n_k; every tensor of the new state is Σ_k p_k · x_k.
Applied to LoRA this averages A and B separately (the FedIT baseline); it is exact for the head.
The sum streams over clients, so only one client's state and the running total are held at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from strategies import AGGREGATORS


def weighted_average(states: Iterable[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Σ_k p_k · states[k] with p_k = weights[k] / Σ weights, accumulated in float64.

    Raises
    ------
    ValueError
        No states, a count mismatch, negative weights, a zero total, or differing keys/shapes.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or (w < 0).any() or not w.sum() > 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    p = w / w.sum()
    total: dict[str, np.ndarray] | None = None
    count = 0
    for k, state in enumerate(states):
        if k >= len(p):
            raise ValueError("more states than weights")
        if total is None:
            total = {key: p[k] * np.asarray(v, dtype=np.float64) for key, v in state.items()}
            dtypes = {key: np.asarray(v).dtype for key, v in state.items()}
        else:
            if state.keys() != total.keys():
                raise ValueError(f"client {k} sent keys that differ from client 0")
            for key, v in state.items():
                if np.shape(v) != total[key].shape:
                    raise ValueError(f"client {k} tensor {key} has shape {np.shape(v)}, expected {total[key].shape}")
                total[key] += p[k] * np.asarray(v, dtype=np.float64)
        count += 1
    if total is None or count != len(p):
        raise ValueError(f"got {count} states for {len(p)} weights")
    return {key: v.astype(dtypes[key]) for key, v in total.items()}


@AGGREGATORS.register("fedavg")
def fedavg(
    states: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Weighted average of every adapter tensor; no extra metrics."""
    return weighted_average(states, weights), {}
