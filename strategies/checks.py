"""What an aggregation rule can aggregate, each check written once: the coordinator's configuration check
(:func:`server.checks.check_config`, from the settings) and the strategy at run time (from what the sites
reported) both call these. Each raises :class:`~fedpeft.errors.FedPeftError` in one line."""

from __future__ import annotations

from collections.abc import Mapping

from fedpeft.errors import FedPeftError
from strategies import AGGREGATORS, strategies_for
from strategies.aggregator import Aggregator
from strategies.robust import parse_robust


def check_adapter_kind(agg: Aggregator, kind: str | None) -> None:
    """``agg`` aggregates adapters of ``kind`` (``lora``, ``ssf``; None: only a head, which every rule can)."""
    if kind is None or kind == agg.adapter:
        return
    fits = [name for name in strategies_for(kind) if name != "fedavg"]
    raise FedPeftError(f"strategy {agg.name!r} aggregates {agg.adapter.upper()} adapters, but this adapter is "
                       f"{kind.upper()}; use --strategy {' or '.join(fits)}")


def check_ranks(agg: Aggregator, ranks: Mapping[str, int], *, global_rank: int) -> None:
    """Every client trains the global rank, unless ``agg`` takes mixed ranks (``ranks``: who trains what)."""
    mixed = sorted(who for who, rank in ranks.items() if rank != global_rank)
    if mixed and not agg.heterogeneous_ranks:
        able = [name for name in AGGREGATORS if AGGREGATORS.get(name).heterogeneous_ranks]
        raise FedPeftError(f"strategy {agg.name!r} needs every client at LoRA rank {global_rank}, but {mixed[0]} "
                           f"trains rank {ranks[mixed[0]]}; use {' or '.join(able)} for mixed ranks")


def check_robust(agg: Aggregator, spec: str) -> None:
    """``spec`` parses, and a robust statistic replaces an average that ``agg`` really takes."""
    try:
        name, _ = parse_robust(spec)
    except ValueError as err:
        raise FedPeftError(str(err)) from None
    if name != "none" and not agg.linear:
        raise FedPeftError(f"robust={spec} replaces averages; strategy {agg.name!r} does not average: use fedit, "
                           "ffa-lora, ssf-avg or fedins")
