"""Seeded client sampling, so that the same seed picks the same clients in every run.

Flower's FedAvg samples node ids with Python's unseeded ``random``; node ids are themselves random in
simulation. We sample over stable site keys (partition id or site name) with a generator derived from
``(seed, round)`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def sample_count(num_sites: int, fraction: float, *, minimum: int = 1) -> int:
    """How many of ``num_sites`` a ``fraction`` samples: floor(n · fraction), at least ``minimum``."""
    return min(num_sites, max(minimum, math.floor(num_sites * fraction + 1e-9)))


def sample_sites(sites: Sequence[str], fraction: float, *, seed: int, server_round: int) -> list[str]:
    """A seeded sample of ``sites`` (returned sorted); all of them when ``fraction`` is 1."""
    ordered = sorted(sites)
    k = sample_count(len(ordered), fraction)
    if k >= len(ordered):
        return ordered
    rng = np.random.default_rng([seed, server_round])
    return sorted(ordered[i] for i in rng.choice(len(ordered), size=k, replace=False))
