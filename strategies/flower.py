"""The Flower ``Strategy`` that routes messages to a registered aggregator.

It adds what a federated PEFT run needs around the maths: seeded sampling over stable site keys,
replies ordered by site (so floating-point sums do not depend on arrival order), bytes measured on
the wire for every message, and per-client records for the run log. It does no file I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedpeft.adapters.state import without_keys
from fedpeft.errors import FedPeftError
from fedpeft.wire import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    REFUSED,
    from_array_record,
    read_privacy,
    record_nbytes,
    to_array_record,
)
from strategies import AGGREGATORS
from strategies.aggregator import AggregationOptions, lora_layers, truncate_to_rank
from strategies.sampling import sample_sites

logger = logging.getLogger(__name__)


@dataclass
class RoundTraffic:
    """What one training round sent and received, per site."""

    sent: dict[str, int] = field(default_factory=dict)  # site → bytes down
    received: dict[str, int] = field(default_factory=dict)  # site → bytes up
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # site → reason
    refused: dict[str, str] = field(default_factory=dict)  # site → why it did not train (its privacy budget)


ReplyCheck = Callable[[str, int, Any], "str | None"]
"""``check(site, server_round, content)``: a reason to reject the reply, or None to accept it."""


class FedPeftStrategy(Strategy):
    """Sample sites, broadcast the global adapter, aggregate replies with ``aggregator``.

    Parameters
    ----------
    aggregator : str
        Name registered in :data:`strategies.AGGREGATORS`.
    sites : Mapping[int, str]
        Node id → stable site key, from the discovery query.
    fraction : float
        Share of sites sampled each round.
    seed : int
        Sampling seed.
    options : AggregationOptions, optional
        Parameters of the aggregation rule (λ, sweeps, sketch).
    ranks : Mapping[str, int], optional
        Site → the LoRA rank it trains, when it differs from the global adapter's (``exact-svd``).
    checks : sequence of ReplyCheck, optional
        Run on every reply before it is used (e.g. the privacy ledger's signature check); a reply
        with a reason is counted as a failure and never reaches the aggregate.
    uniform_weights : bool
        Weight every accepted reply equally instead of by its ``num-examples`` (central DP).

    The broadcast leaves out the tensors the aggregator freezes and tells clients which they are
    (config ``frozen``); a site of lower rank gets the global factors truncated to its rank. The
    aggregator sees the broadcast of the round as ``previous``.
    """

    def __init__(
        self,
        *,
        aggregator: str,
        sites: Mapping[int, str],
        fraction: float,
        seed: int,
        options: AggregationOptions | None = None,
        ranks: Mapping[str, int] | None = None,
        checks: Sequence[ReplyCheck] = (),
        uniform_weights: bool = False,
    ) -> None:
        self.aggregator_name = aggregator
        self.aggregator = AGGREGATORS.get(aggregator)
        self.options = options or AggregationOptions(seed=seed)
        self.sites = dict(sites)
        self.ranks = dict(ranks or {})
        self.fraction = fraction
        self.seed = seed
        self.checks = list(checks)
        self.uniform_weights = uniform_weights
        self.traffic: dict[int, RoundTraffic] = {}
        self.previous: dict[str, Any] = {}
        self._node_of = {site: node for node, site in self.sites.items()}

    def summary(self) -> None:
        logger.info(
            "FedPeftStrategy: aggregator=%s, %d sites, fraction=%.2f, seed=%d",
            self.aggregator_name,
            len(self.sites),
            self.fraction,
            self.seed,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        chosen = sample_sites(list(self.sites.values()), self.fraction, seed=self.seed, server_round=server_round)
        self.previous = from_array_record(arrays)
        frozen = self.aggregator.frozen
        config = ConfigRecord({**config, "server-round": server_round, "frozen": ",".join(frozen)})
        broadcast = without_keys(self.previous, frozen)
        pairs, _ = lora_layers(self.previous.keys())
        global_rank = self.previous[pairs[0][0]].shape[0] if pairs else None
        contents: dict[int | None, RecordDict] = {}
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        messages = []
        mixed = sorted(s for s, r in self.ranks.items() if r != global_rank) if global_rank else []
        if mixed and not self.aggregator.heterogeneous_ranks:  # every site, sampled this round or not
            raise FedPeftError(
                f"strategy {self.aggregator_name!r} needs every client at LoRA rank {global_rank}, "
                f"but {mixed[0]} trains rank {self.ranks[mixed[0]]}; use exact-svd for mixed ranks"
            )
        for site in chosen:
            rank = self.ranks.get(site, global_rank)
            if rank not in contents:
                state = broadcast if rank == global_rank else truncate_to_rank(broadcast, rank)
                contents[rank] = RecordDict({ARRAYS: to_array_record(state), CONFIG: config})
            content = contents[rank]
            traffic.sent[site] = record_nbytes(content)
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=self._node_of[site]))
        logger.info("round %d: sampled %d of %d sites", server_round, len(chosen), len(self.sites))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        accepted: list[tuple[str, dict[str, Any], float]] = []
        for msg in replies:
            site = self.sites.get(msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}")
            if msg.has_error():
                traffic.failures[site] = msg.error.reason
                logger.warning("round %d: %s failed: %s", server_round, site, msg.error.reason)
                continue
            content = msg.content
            traffic.received[site] = record_nbytes(content)
            reason = self._rejection(site, server_round, content)
            if reason is not None:
                traffic.failures[site] = reason
                logger.warning("round %d: rejected the reply of %s: %s", server_round, site, reason)
                continue
            metrics = dict(content.metric_records[METRICS])
            traffic.client_metrics[site] = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
            privacy = read_privacy(content)
            if privacy is not None and privacy["status"] == REFUSED:
                traffic.refused[site] = privacy["reason"]
                logger.warning("round %d: %s did not train: %s", server_round, site, privacy["reason"])
                continue
            weight = 1.0 if self.uniform_weights else float(metrics.get(NUM_EXAMPLES, 0))
            accepted.append((site, from_array_record(content.array_records[ARRAYS]), weight))
        if not accepted:
            return None, None
        accepted.sort(key=lambda item: item[0])
        state, agg_metrics = self.aggregator(
            [a[1] for a in accepted], [a[2] for a in accepted], previous=self.previous, options=self.options
        )
        metrics = MetricRecord({"clients": len(accepted), **agg_metrics})
        losses = [
            (w, traffic.client_metrics[s]["train-loss"])
            for s, _, w in accepted
            if "train-loss" in traffic.client_metrics[s]
        ]
        if losses:  # DP sites do not report it: a loss on private data is not covered by their epsilon
            metrics["train-loss"] = sum(w * loss for w, loss in losses) / sum(w for w, _ in losses)
        return to_array_record(state), metrics

    def _rejection(self, site: str, server_round: int, content: Any) -> str | None:
        """Why a reply cannot be used, or None."""
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            return "reply lacks arrays or metrics"
        try:
            read_privacy(content)
        except ValueError as err:
            return str(err)
        for check in self.checks:
            reason = check(site, server_round, content)
            if reason is not None:
                return reason
        return None

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        return []  # the server evaluates the global adapter on the held-out split

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
