"""Aggregation strategies: pure functions over arrays, registered by name, plus a thin Flower wrapper.

Each algorithm lives in one file and registers an :class:`strategies.aggregator.Aggregator`: a rule
for one LoRA layer, plus what clients must freeze and whether mixed client ranks are allowed (or,
for SSF, plain weighted averaging: ``ssf-avg``; for FedIns' SSF pools, ``fedins``). The
shared driver (:func:`strategies.aggregator.aggregate`) pairs LoRA factors by name, averages the
other tensors and measures the aggregation bias. Nothing here does I/O or knows Flower;
:class:`strategies.flower.FedPeftStrategy` routes messages to it.
"""

from __future__ import annotations

from fedpeft.registry import Registry
from strategies.aggregator import AggregationOptions, Aggregator

AGGREGATORS: Registry[Aggregator] = Registry("strategy")

from strategies import (  # noqa: E402,F401  (register)
    exact_svd,
    fedins,
    fedit,
    ffa_lora,
    lora_fair,
    lora_fair_ab,
    lora_fair_ridge,
    rolora,
    ssf_avg,
)


def strategies_for(adapter: str) -> list[str]:
    """The registered strategies that aggregate ``adapter`` (``lora``, ``ssf``) states."""
    return [name for name in AGGREGATORS if AGGREGATORS.get(name).adapter == adapter]


__all__ = ["AGGREGATORS", "AggregationOptions", "Aggregator", "strategies_for"]
