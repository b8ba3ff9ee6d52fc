"""The Flower ``Strategy`` that routes messages to a registered aggregator.

It adds what a federated PEFT run needs around the maths: seeded sampling over stable site keys,
the broadcast encoded with the downlink codec, every reply's update decoded with the codec its header
names (:mod:`fedpeft.wire`), replies ordered by site (so floating-point sums do not depend on arrival
order), bytes measured on the wire for every message, and per-client records for the run log. It
does no file I/O.

A reply is used only if, in order: it has arrays and metrics; its privacy record (if any) is well
formed; every check passes (the privacy ledger admits its signed entry: the site spent that budget
whether or not its update is used); it did not refuse the round; the site was sampled; the reply
fits the size bound; its payload decodes to exactly the tensors the site was sent, finite; the
update's norm is within the absolute bound and, against the round's median, within the ratio
(:mod:`strategies.validation`). An accepted update is then bounded, if asked (central DP's clip, or
norm bounding: :mod:`strategies.norm_bound`). Anything else is logged with its reason and the round goes on with
the other replies; with fewer than ``min_replies`` valid ones it aggregates nothing.

Under central DP a ``release`` replaces the aggregator: it gets the accepted updates and returns the
noised mean over the fixed sampled cohort (:func:`privacy.central.central_release`), so a site that
failed, was rejected or stayed silent is one more absent contribution, never a voided round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedpeft.adapters.state import key_matches, without_keys
from fedpeft.codecs import parse_codec
from fedpeft.errors import FedPeftError
from fedpeft.wire import (
    CONFIG,
    CONTROL,
    METRICS,
    NUM_EXAMPLES,
    REFUSED,
    SECONDS,
    PayloadError,
    decode_payload,
    encode_tensors,
    from_array_record,
    raw_nbytes,
    read_privacy,
    record_nbytes,
    to_array_record,
)
from strategies import AGGREGATORS
from strategies.aggregator import AggregationOptions, check_adapter, lora_layers, round_rule, truncate_to_rank
from strategies.checks import check_ranks
from strategies.sampling import sample_sites
from strategies.scaffold import control_rejection, server_variate
from strategies.validation import ReplyLimits, norm_rejection, relative_outliers, reply_bound, update_norm

logger = logging.getLogger(__name__)


@dataclass
class RoundTraffic:
    """What one training round sent and received, per site."""

    sent: dict[str, int] = field(default_factory=dict)  # site → bytes down
    received: dict[str, int] = field(default_factory=dict)  # site → bytes up
    raw_sent: dict[str, int] = field(default_factory=dict)  # site → the broadcast's bytes as raw fp32
    raw_received: dict[str, int] = field(default_factory=dict)  # site → its decoded update's bytes as raw fp32
    reclipped: set[str] = field(default_factory=set)  # sites whose decoded update the server clipped (bound)
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # site → reason
    refused: dict[str, str] = field(default_factory=dict)  # site → why it did not train (its privacy budget)
    unreachable: dict[str, str] = field(default_factory=dict)  # site → what the SuperLink said in its place

    def per_site(self) -> list[dict[str, Any]]:
        """One record per site this round touched: bytes each way, compression, what became of it."""
        rows = []
        for site in sorted(set(self.sent) | set(self.received) | set(self.failures)):
            up, raw_up = self.received.get(site, 0), self.raw_received.get(site, 0)
            down, raw_down = self.sent.get(site, 0), self.raw_sent.get(site, 0)
            if site in self.raw_received:
                status, reason = "accepted", ""
            elif site in self.refused:
                status, reason = "refused", self.refused[site]
            elif site in self.failures:
                status, reason = ("rejected" if site in self.received else "failed"), self.failures[site]
            else:
                status, reason = "no reply", self.unreachable.get(site, "")
            rows.append({
                "site": site,
                "status": status,
                **({"reason": reason} if reason else {}),
                "bytes_down": down,
                "bytes_up": up,
                "compression_ratio_down": raw_down / down if down else 0.0,
                "compression_ratio": raw_up / up if up and raw_up else 0.0,
                **({"codec_error": self.client_metrics[site]["codec-error"]}
                   if "codec-error" in self.client_metrics.get(site, {}) else {}),
                # where the site's time went (load, train; at a deployed site with a worker: wait, relay)
                **{key.replace("-", "_"): round(value, 3) for key, value in self.client_metrics.get(site, {}).items()
                   if key in SECONDS},
            })
        return rows

    def rejected(self) -> list[str]:
        """Sites whose reply arrived but was not used (failed a check), sorted."""
        return sorted(s for s in self.failures if s in self.received)

    def compression(self) -> dict[str, float]:
        """Ratios of raw fp32 tensor bytes to the bytes on the wire, over accepted replies and all sends."""
        up = sum(self.received[s] for s in self.raw_received)
        down = sum(self.sent.values())
        metrics = [m for s, m in self.client_metrics.items() if s in self.raw_received]
        errors = [m["codec-error"] for m in metrics if "codec-error" in m]
        return {
            "compression_ratio": sum(self.raw_received.values()) / up if up else 0.0,
            "compression_ratio_down": sum(self.raw_sent.values()) / down if down else 0.0,
            **({"codec_error": float(sum(errors) / len(errors))} if errors else {}),
        }


ReplyCheck = Callable[[str, int, Any], "str | None"]
"""``check(site, server_round, content)``: a reason to reject the reply, or None to accept it."""

Release = Callable[[Sequence[dict[str, Any]]], "tuple[dict[str, Any], dict[str, Any]]"]
"""``release(updates)``: the round's mean update from the accepted updates (in site order), and its
metrics (central DP: the noised sum of clipped updates over the fixed cohort size)."""

UpdateBound = Callable[[dict[str, Any]], "tuple[dict[str, Any], bool]"]
"""``bound(update)``: the decoded update made safe to aggregate (central DP: clipped to C), and
whether it had to change."""


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
    site_config : callable, optional
        ``site_config(site)``: config entries for that site's train message alone (local DP: how many
        of its entries the privacy ledger holds).
    uniform_weights : bool
        Weight every accepted reply equally instead of by its ``num-examples`` (central DP).
    downlink : str
        Codec spec of the broadcast (a value codec: none, fp16, int8, int4). Sites start from what
        they decode, and so does the server: the baseline of each site's update is the decoded
        broadcast, bit for bit.
    bound : UpdateBound, optional
        Applied to every decoded update before aggregation (central DP clips it to C again, so the
        sensitivity holds whatever a codec and its error feedback did to the norm).
    limits : ReplyLimits, optional
        Norm bounds a decoded update must meet (absolute, and against the round's median); every
        reply must also fit :func:`strategies.validation.reply_bound`.
    message_ttl : float, optional
        Seconds a training message stays deliverable (the round timeout): a node that comes back later
        never trains on a round that is over.
    min_replies : int
        Fewest valid replies a round aggregates; with fewer it returns no arrays (a short round: the
        server skips, retries or stops it) and nothing is aggregated.
    release : Release, optional
        Central DP: computes the new global adapter's change from the accepted updates in place of
        the aggregator (which must be linear); the aggregator's own metrics, computed from each
        site's factors, are then not reported.
    head_frozen_after : int, optional
        Hold the classification head in every round after this one (``head_after_probe=freeze``: the
        head the probe rounds trained stays; sites train and send only the adapter).
    control : mapping, optional
        SCAFFOLD (:mod:`fedpeft.drift.scaffold`): the coordinator's control variate c by tensor name
        (empty at the start of a run). Each train message then carries c for the tensors the site
        trains, each accepted reply's change of c_i updates it (:attr:`control`), and a reply whose
        change does not fit those tensors is rejected. None: no SCAFFOLD.
    control_scope : tuple of str
        Key components the variates cover (``scaffold:head``: the head's); empty: every trained tensor.

    The broadcast leaves out the tensors the aggregator freezes and tells clients which they are
    (config ``frozen``), and names those it holds this round (config ``held``: broadcast, not trained,
    not sent back); a site of lower rank gets the global factors truncated to its rank. The
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
        site_config: Callable[[str], Mapping[str, Any]] | None = None,
        uniform_weights: bool = False,
        downlink: str = "none",
        bound: UpdateBound | None = None,
        limits: ReplyLimits | None = None,
        min_replies: int = 1,
        message_ttl: float | None = None,
        release: Release | None = None,
        control: Mapping[str, Any] | None = None,
        control_scope: tuple[str, ...] = (),
        head_frozen_after: int | None = None,
    ) -> None:
        self.aggregator_name = aggregator
        self.aggregator = AGGREGATORS.get(aggregator)
        self.options = options or AggregationOptions(seed=seed)
        self.sites = dict(sites)
        self.ranks = dict(ranks or {})
        self.fraction = fraction
        self.seed = seed
        self.checks = list(checks)
        self.site_config = site_config
        self.uniform_weights = uniform_weights
        self.downlink = parse_codec(downlink)
        self.bound = bound
        self.limits = limits or ReplyLimits()
        if min_replies < 1:
            raise ValueError(f"min_replies must be >= 1, got {min_replies}")
        self.min_replies = min_replies
        self.message_ttl = message_ttl
        if release is not None and not self.aggregator.linear:
            raise FedPeftError(f"strategy {aggregator!r} does not average, so a release cannot replace it")
        self.release = release
        self.control = None if control is None else dict(control)
        self.control_scope = control_scope
        self.head_frozen_after = head_frozen_after
        self.baselines: dict[int | None, dict[str, Any]] = {}  # rank → the decoded broadcast at that rank
        self._rank_of: dict[str, int | None] = {}
        self.traffic: dict[int, RoundTraffic] = {}
        self.previous: dict[str, Any] = {}
        self._node_of = {site: node for node, site in self.sites.items()}
        self._sent: list[Message] = []  # this round's instructions: the grid gives each its message id

    def _rule(self, server_round: int) -> Any:
        return round_rule(self.aggregator, server_round, head_frozen_after=self.head_frozen_after)

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
        check_adapter(self.aggregator, self.previous.keys())  # before any site trains: SSF under LoRA, or the reverse
        rule = self._rule(server_round)  # RoLoRA: the factor clients hold this round
        frozen = rule.frozen
        config = ConfigRecord({**config, "server-round": server_round, "frozen": ",".join(frozen),
                               "held": ",".join(rule.held)})
        broadcast = without_keys(self.previous, frozen)
        pairs, _ = lora_layers(self.previous.keys())
        global_rank = self.previous[pairs[0][0]].shape[0] if pairs else None
        contents: dict[int | None, RecordDict] = {}
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        messages = []
        if global_rank:  # every site, sampled this round or not
            check_ranks(self.aggregator, self.ranks, global_rank=global_rank)
        self.baselines, self._rank_of = {}, {}
        records, self.baselines[global_rank] = encode_tensors(self.downlink, broadcast)
        control = {}
        if self.control is not None:  # c for every tensor the sites train this round (zero until it moves)
            trained = {k: v for k, v in without_keys(broadcast, rule.held).items()
                       if not self.control_scope or key_matches(k, self.control_scope)}
            control = {CONTROL: to_array_record(
                {k: self.control.get(k, np.zeros(v.shape, np.float32)) for k, v in trained.items()})}
        contents[global_rank] = RecordDict({**records, CONFIG: config, **control})
        self.previous = {**self.previous, **self.baselines[global_rank]}  # what every site starts from
        for site in chosen:
            rank = self.ranks.get(site, global_rank)
            if rank not in contents:  # a lower rank: SCAFFOLD covers only the head then (server.checks)
                records, self.baselines[rank] = encode_tensors(self.downlink, truncate_to_rank(broadcast, rank))
                contents[rank] = RecordDict({**records, CONFIG: config, **control})
            content = RecordDict(dict(contents[rank]))  # one dict per message: a site's mods replace records
            if self.site_config is not None:
                content[CONFIG] = ConfigRecord({**config, **self.site_config(site)})
            self._rank_of[site] = rank
            traffic.sent[site] = record_nbytes(content)
            traffic.raw_sent[site] = raw_nbytes({k: v.shape for k, v in self.baselines[rank].items()})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=self._node_of[site],
                                    ttl=self.message_ttl))
        logger.info("round %d: sampled %d of %d sites", server_round, len(chosen), len(self.sites))
        self._sent = messages
        return messages

    def _site_of(self, msg: Message) -> tuple[str, bool]:
        """The site a reply stands for, and whether the SuperLink wrote it in that site's place.

        The SuperLink answers for a node that went silent (its heartbeat lapsed, the instruction expired) with
        an error whose source is the SuperLink itself; the instruction it replies to names the site."""
        src = msg.metadata.src_node_id
        if src in self.sites:
            return self.sites[src], False
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent if m.metadata.message_id}
        node = sent.get(msg.metadata.reply_to_message_id)
        if node is not None and msg.has_error():
            return self.sites[node], True
        return f"node-{src}", False

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        rule = self._rule(server_round)
        held = rule.held
        candidates: list[tuple[str, dict[str, Any], float, float, int]] = []  # site, state|update, weight, norm, raw
        controls: dict[str, dict[str, Any]] = {}  # SCAFFOLD: site → its change of c_i
        for msg in replies:
            site, unreachable = self._site_of(msg)
            if unreachable:  # not an answer from the site: it stays "no reply", with the SuperLink's reason
                traffic.unreachable[site] = msg.error.reason
                logger.warning("round %d: %s did not reply: %s", server_round, site, msg.error.reason)
                continue
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
            baseline = self.baselines.get(self._rank_of.get(site, -1))
            if baseline is None:
                traffic.failures[site] = "replied to a round it was not sampled for"
                logger.warning("round %d: rejected the reply of %s: not sampled", server_round, site)
                continue
            shapes = {k: v.shape for k, v in without_keys(baseline, held).items()}  # what the site sends
            raw = raw_nbytes(shapes)
            if traffic.received[site] > reply_bound(raw):
                self._reject(traffic, server_round, site, f"reply of {traffic.received[site]} bytes exceeds the "
                             f"bound {reply_bound(raw)} for this adapter")
                continue
            try:
                update, _ = decode_payload(content, shapes)
            except PayloadError as err:
                self._reject(traffic, server_round, site, f"payload rejected: {err}")
                continue
            if self.control is not None:
                change = from_array_record(content[CONTROL]) if CONTROL in content else None
                reason = control_rejection(change, shapes)
                if reason is not None:
                    self._reject(traffic, server_round, site, reason)
                    continue
                controls[site] = change
            norm = update_norm(update)  # as sent: the bounds judge the site, not what clipping made of it
            reason = norm_rejection(norm, self.limits)
            if reason is not None:
                self._reject(traffic, server_round, site, reason)
                continue
            if self.bound is not None:
                update, changed = self.bound(update)
                if changed:
                    traffic.reclipped.add(site)
            weight = 1.0 if self.uniform_weights else float(metrics.get(NUM_EXAMPLES, 0))
            if self.release is None:  # the aggregator reads states; a release reads the updates themselves
                update = {k: baseline[k] + update[k] for k in shapes}
            candidates.append((site, update, weight, norm, raw))
        outliers = relative_outliers({c[0]: c[3] for c in candidates}, self.limits)
        for site, reason in sorted(outliers.items()):
            self._reject(traffic, server_round, site, reason)
        accepted = [(site, state, weight) for site, state, weight, _, _ in candidates if site not in outliers]
        if len(accepted) < self.min_replies:
            logger.warning("round %d: %d valid replies, fewer than the %d needed; nothing aggregated",
                           server_round, len(accepted), self.min_replies)
            for site, _, _ in accepted:
                traffic.failures[site] = f"valid, but the round had {len(accepted)} of {self.min_replies} needed"
            return None, None
        for site, _, _, _, raw in candidates:
            if site not in outliers:
                traffic.raw_received[site] = raw
        accepted.sort(key=lambda item: item[0])
        if self.control is not None:
            self.control = server_variate(self.control, [controls[a[0]] for a in accepted],
                                          population=len(self.sites))
        if self.release is not None:
            state, agg_metrics = self._released([a[1] for a in accepted])
        else:
            state, agg_metrics = rule(
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

    def _released(self, updates: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The broadcast plus the release; tensors the aggregator freezes stay as they were."""
        assert self.release is not None
        change, metrics = self.release(updates)
        state = {k: (v + change[k]).astype(v.dtype) if k in change else v for k, v in self.previous.items()}
        return state, {f"dp_{k}": v for k, v in metrics.items()}

    @staticmethod
    def _reject(traffic: RoundTraffic, server_round: int, site: str, reason: str) -> None:
        traffic.failures[site] = reason
        logger.warning("round %d: rejected the reply of %s: %s", server_round, site, reason)

    def _rejection(self, site: str, server_round: int, content: Any) -> str | None:
        """Why a reply cannot be used, or None."""
        if not content.array_records or METRICS not in content.metric_records:
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
