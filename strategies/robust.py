"""Robust combination of the clients' tensors: coordinate-wise median and trimmed mean.

For adversarial settings (Yin et al., ICML 2018, arXiv 1803.01498): instead of the weighted average
Σ_k p_k x_k, each coordinate takes the median of the clients' values, or their mean after dropping
the ``beta`` share of lowest and of highest values. Both ignore the example counts (a weight is
exactly what an attacker would inflate) and bound what a minority of clients can do to any
coordinate. The maths is Flower's own (``flwr.server.strategy.aggregate``: ``aggregate_median``,
``aggregate_trimmed_avg``); this module only parses the choice and hands it the tensors.

They apply to aggregators that average tensors (``Aggregator.linear``: fedit, ffa-lora, ssf-avg, fedins),
replacing each average (of A, of B, of γ, β and the head) by the robust statistic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fedpeft.deploy import flower_compat  # its Flower functions resolve on first use, not at import

Combine = Callable[[Sequence[np.ndarray]], np.ndarray]


def parse_robust(spec: str) -> tuple[str, float]:
    """``"none"`` → (none, 0); ``"median"`` → (median, 0); ``"trimmed:0.1"`` → (trimmed, 0.1).

    Raises
    ------
    ValueError
        Anything else, or a trimmed share outside (0, 0.5).
    """
    name, _, arg = spec.partition(":")
    if name in ("none", "median") and not arg:
        return name, 0.0
    if name == "trimmed":
        try:
            beta = float(arg)
        except ValueError:
            beta = -1.0
        if 0 < beta < 0.5:
            return name, beta
        raise ValueError(f"trimmed:<beta> needs a share in (0, 0.5) cut from each end, got {arg!r}")
    raise ValueError(f"robust must be none, median or trimmed:<beta>, got {spec!r}")


def combiner(spec: str) -> Combine | None:
    """The coordinate-wise statistic of ``spec`` (None for ``none``: the weighted average)."""
    name, beta = parse_robust(spec)
    if name == "none":
        return None

    def combine(arrays: Sequence[np.ndarray]) -> np.ndarray:
        results = [([np.asarray(a, dtype=np.float64)], 1) for a in arrays]
        out = (flower_compat.aggregate_median(results) if name == "median"
               else flower_compat.aggregate_trimmed_avg(results, beta))
        return np.asarray(out[0])

    return combine
