"""Aggregation strategies: pure functions over arrays, registered by name, plus a thin Flower wrapper.

An aggregator takes the clients' adapter states (name → array, one mapping per client, in a stable
order) and their weights, and returns ``(new_state, metrics)``. It does no I/O and knows nothing of
Flower; :class:`strategies.flower.FedPeftStrategy` routes messages to it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedpeft.registry import Registry

Aggregator = Callable[
    [Sequence[Mapping[str, np.ndarray]], Sequence[float]], tuple[dict[str, np.ndarray], dict[str, Any]]
]

AGGREGATORS: Registry[Aggregator] = Registry("strategy")

from strategies import fedavg  # noqa: E402,F401  (registers "fedavg")

__all__ = ["AGGREGATORS", "Aggregator"]
