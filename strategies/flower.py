"""The Flower ``Strategy`` that routes messages to a registered aggregator.

It adds what a federated PEFT run needs around the maths: seeded sampling over stable site keys,
the broadcast encoded with the downlink codec (or its change since the last one, :mod:`fedpeft.downlink`),
every reply's update decoded with the codec its header
names (:mod:`fedpeft.wire`), replies ordered by site (so floating-point sums do not depend on arrival
order), bytes measured on the wire for every message, and per-client records for the run log. It
does no file I/O.

A reply goes through one pipeline (:mod:`strategies.replies`): it is received (it has arrays and
metrics, a well-formed privacy record), ledgered (every check passes: the privacy ledger admits its
signed entry, since the site spent that budget whether or not its update is used), accounted (it did
not refuse the round), validated (the site was sampled; the reply fits the size bound; its payload
decodes to exactly the tensors the site was sent, finite; SCAFFOLD's change fits them; the update's norm
is within the absolute bound), bounded (central DP's clip, or norm bounding:
:mod:`strategies.norm_bound`) and weighed; the survivors are screened against the round's median norm
(:mod:`strategies.validation`). Anything else is logged with its reason and the round goes on with the
other replies; with fewer than ``min_replies`` valid ones it aggregates nothing. A round is a sequence of
message stages (:meth:`FedPeftStrategy.train_round`); training needs one.

Under central DP a ``release`` replaces the aggregator: it gets the accepted updates and returns the
noised mean over the fixed sampled cohort (:func:`privacy.central.central_release`), so a site that
failed, was rejected or stayed silent is one more absent contribution, never a voided round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedpeft.adapters.lora.dynamic import RankSchedule, keep_active
from fedpeft.adapters.state import adapter_kind, key_matches, without_keys
from fedpeft.codecs import parse_codec
from fedpeft.codecs.shared import round_seed, secure_positions, with_seed
from fedpeft.downlink import Change, apply_change, broadcast_digest, chain_records, same_tensors
from fedpeft.errors import FedPeftError
from fedpeft.protocol import (
    ACTIVE_RANK,
    DOWNLINK_BASE,
    DOWNLINK_CHAIN,
    DOWNLINK_DIGEST,
    FROZEN,
    HELD,
    SECAGG,
    SERVER_ROUND,
)
from fedpeft.wire import CONFIG, CONTROL, encode_tensors, from_array_record, raw_nbytes, record_nbytes, to_array_record
from strategies import AGGREGATORS
from strategies.aggregator import AggregationOptions, lora_layers, round_rule, truncate_to_rank
from strategies.checks import check_adapter_kind, check_ranks
from strategies.replies import (
    Release,
    ReplyCheck,
    ReplyContext,
    RoundTraffic,
    UpdateBound,
    moved_control,
    receive,
    run_steps,
    screen,
    train_loss,
)
from strategies.sampling import sample_sites
from strategies.validation import ReplyLimits

logger = logging.getLogger(__name__)

_WHOLE = parse_codec("none")  # the delta broadcast's whole adapter: exact, so that a change can follow it


@dataclass(frozen=True)
class RoundOutcome:
    """What a round's replies came to: the new global adapter and the round's metrics (None when too few
    valid replies came), what each site sent and received, and SCAFFOLD's variate c after the round."""

    arrays: ArrayRecord | None
    metrics: MetricRecord | None
    traffic: RoundTraffic
    control: dict[str, Any] | None
    broadcasts: Broadcasts | None = None


@dataclass(frozen=True)
class Broadcasts:
    """The delta broadcast's state at the coordinator (:mod:`fedpeft.downlink`): the last broadcast ``base``
    (at the global rank; before round 1 the seeded initial adapter), the digest of the broadcast each site
    is known to hold (``held``; a site not named holds the initial adapter, whose digest is ``origin``,
    None before round 1), and the last rounds' changes as sent, oldest first, ending at ``base``."""

    base: dict[str, np.ndarray]
    held: dict[str, str] = field(default_factory=dict)
    origin: str | None = None
    changes: tuple[Change, ...] = ()

    def chain(self, site: str, base_digest: str, change: Change, whole_bytes: int) -> list[Change] | None:
        """The changes that take ``site`` from the broadcast it holds to the round's (``change`` last), or
        None when they are not smaller than the whole adapter (``whole_bytes``) or start nowhere it holds."""
        holds = self.held.get(site, self.origin or base_digest)
        if holds == base_digest:
            return [change]
        starts = [i for i, c in enumerate(self.changes) if c.base == holds]
        if not starts:
            return None
        chain = [*self.changes[starts[-1]:], change]
        return chain if sum(c.payload.size for c in chain) < whole_bytes else None

    def after(self, start: dict[str, np.ndarray], base_digest: str, change: Change | None, digest: str, *,
              received: Iterable[str], failed: Iterable[str], whole_bytes: int) -> Broadcasts:
        """The state once the sites whose reply came (``received``) hold the round's broadcast ``start`` (of
        ``digest``); a site that failed may not hold what the coordinator thought, so it counts as holding
        the initial adapter (which it can always rebuild). The changes kept are those a chain could still
        use (together smaller than the whole adapter)."""
        kept = [*self.changes, change] if change is not None else []
        while kept and sum(c.payload.size for c in kept) >= whole_bytes:
            kept.pop(0)
        gone = set(failed)
        held = {k: v for k, v in self.held.items() if k not in gone} | {site: digest for site in received}
        return Broadcasts(base=start, held=held, origin=self.origin or base_digest, changes=tuple(kept))


@dataclass(frozen=True)
class Broadcast:
    """One round's broadcast at the global rank: the records of the whole adapter (``whole``), what the
    sites start from (``start``, of digest ``digest``), and under the delta broadcast the round's change
    (from the last broadcast, of digest ``base``) and what the codec has not sent yet (``unsent``: the
    global adapter less ``start``, added back to the round's aggregate)."""

    whole: dict[str, Any]
    start: dict[str, np.ndarray]
    digest: str = ""
    base: str = ""
    change: Change | None = None
    unsent: dict[str, np.ndarray] | None = None
    whole_bytes: int = 0  # the whole adapter's payload (fp32): the most a chain of changes may weigh


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
    secure : SecureSettings, optional
        Secure aggregation (:class:`server.secure.SecureSettings`): each round is four message stages
        and the coordinator sees only the sum of the sampled sites' clipped updates (linear rules only).
        The strategy calls its ``request(number, round, sampled)`` for each train request and plays the
        round through its ``round(strategy, round, arrays, config)``.
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
        broadcasts: Broadcasts | None = None,
        bound: UpdateBound | None = None,
        limits: ReplyLimits | None = None,
        min_replies: int = 1,
        message_ttl: float | None = None,
        release: Release | None = None,
        control: Mapping[str, Any] | None = None,
        control_scope: tuple[str, ...] = (),
        head_frozen_after: int | None = None,
        secure: Any = None,
        ranks_drawn: RankSchedule | None = None,
        secure_codec: str = "none",
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
        self.broadcasts = broadcasts  # the delta broadcast's state; None: each broadcast is the whole adapter
        self._broadcast: Broadcast | None = None  # the round's, at the global rank
        self.bound = bound
        self.limits = limits or ReplyLimits()
        if min_replies < 1:
            raise ValueError(f"min_replies must be >= 1, got {min_replies}")
        self.min_replies = min_replies
        self.message_ttl = message_ttl
        if release is not None and not self.aggregator.linear:
            raise FedPeftError(f"strategy {aggregator!r} does not average, so a release cannot replace it")
        self.release = release
        if secure is not None and not self.aggregator.linear:
            raise FedPeftError(f"strategy {aggregator!r} needs each site's factors; secure aggregation gives only "
                               "their sum")
        self.secure = secure
        self.secure_codec = secure_codec  # under secure aggregation, ``shared:<density>``: the entries summed
        self._secure_positions: dict[str, np.ndarray] | None = None
        if ranks_drawn is not None and (not self.aggregator.linear or self.aggregator.adapter != "lora"):
            raise FedPeftError(f"strategy {aggregator!r} cannot train a drawn LoRA rank (lora_dynamic_rank)")
        self.ranks_drawn = ranks_drawn
        self.active_rank: int | None = None  # DP-DyLoRA: the rank of the round being played
        self.secure_numbers: dict[str, int] = {}  # site → its number (Shamir point) in this round's secure sum
        self._secure_shapes: dict[str, tuple[int, ...]] = {}  # the tensors of the secure sum, in its order
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
        self.traffic[server_round] = RoundTraffic()  # a round sent again (short_round=retry) starts its record anew
        self.previous = from_array_record(arrays)
        check_adapter_kind(self.aggregator, adapter_kind(self.previous.keys()))  # before any site trains
        rule = self._rule(server_round)  # RoLoRA: the factor clients hold this round
        frozen = rule.frozen
        config = ConfigRecord({**config, SERVER_ROUND: server_round, FROZEN: ",".join(frozen),
                               HELD: ",".join(rule.held)})
        self.active_rank = None if self.ranks_drawn is None else self.ranks_drawn.rank(server_round)
        if self.active_rank is not None:
            config[ACTIVE_RANK] = self.active_rank
        broadcast = without_keys(self.previous, frozen)
        pairs, _ = lora_layers(self.previous.keys())
        global_rank = self.previous[pairs[0][0]].shape[0] if pairs else None
        contents: dict[int | None, RecordDict] = {}
        traffic = self.traffic[server_round]
        messages = []
        if global_rank:  # every site, sampled this round or not
            check_ranks(self.aggregator, self.ranks, global_rank=global_rank)
        self.baselines, self._rank_of = {}, {}
        self._broadcast = sent = self._encode_broadcast(broadcast)
        self.baselines[global_rank] = sent.start
        control = {}
        if self.control is not None:  # c for every tensor the sites train this round (zero until it moves)
            trained = {k: v for k, v in without_keys(broadcast, rule.held).items()
                       if not self.control_scope or key_matches(k, self.control_scope)}
            control = {CONTROL: to_array_record(
                {k: self.control.get(k, np.zeros(v.shape, np.float32)) for k, v in trained.items()})}
        whole_keys = {DOWNLINK_DIGEST: sent.digest} if self.broadcasts is not None else {}
        contents[global_rank] = RecordDict({**sent.whole, CONFIG: ConfigRecord({**config, **whole_keys}), **control})
        chains: dict[str, RecordDict] = {}  # the delta broadcast: by the broadcast a site holds, its changes since
        self.previous = {**self.previous, **self.baselines[global_rank]}  # what every site starts from
        if self.secure is not None:  # sites numbered from 1 in site order: the Shamir points of the round
            self.secure_numbers = {site: i + 1 for i, site in enumerate(sorted(chosen))}
            summed = without_keys(self.baselines[global_rank], rule.held)
            self._secure_shapes = {k: summed[k].shape for k in sorted(summed)}
            self._secure_positions = secure_positions(
                parse_codec(with_seed(self.secure_codec, round_seed(self.options.seed, server_round))),
                self._secure_shapes)
        for site in chosen:
            rank = self.ranks.get(site, global_rank)
            if rank not in contents:  # a lower rank: SCAFFOLD covers only the head then (server.checks)
                lower = truncate_to_rank(sent.start, rank) if self.broadcasts is not None else \
                    truncate_to_rank(broadcast, rank)  # delta broadcast: the truncated start, whole and exact
                records, self.baselines[rank] = encode_tensors(_WHOLE if self.broadcasts is not None else self.downlink,
                                                               lower)
                contents[rank] = RecordDict({**records, CONFIG: config, **control})
            chain = self.broadcasts.chain(site, sent.base, sent.change, sent.whole_bytes) \
                if rank == global_rank and self.broadcasts is not None and sent.change is not None else None
            if chain is None:
                content = RecordDict(dict(contents[rank]))  # one dict per message: a site's mods replace records
            else:
                if chain[0].base not in chains:
                    keys = {DOWNLINK_DIGEST: sent.digest, DOWNLINK_BASE: chain[0].base,
                            **({DOWNLINK_CHAIN: len(chain) - 1} if len(chain) > 1 else {})}
                    chains[chain[0].base] = RecordDict({**chain_records(chain),
                                                        CONFIG: ConfigRecord({**config, **keys}), **control})
                content = RecordDict(dict(chains[chain[0].base]))
            if self.site_config is not None:
                content[CONFIG] = ConfigRecord({**content[CONFIG], **self.site_config(site)})
            if self.secure is not None:
                content[CONFIG] = ConfigRecord({**content[CONFIG], SECAGG: self.secure.request(
                    self.secure_numbers[site], server_round, len(chosen))})
            self._rank_of[site] = rank
            traffic.sent[site] = record_nbytes(content)
            traffic.raw_sent[site] = raw_nbytes({k: v.shape for k, v in self.baselines[rank].items()})
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=self._node_of[site],
                                    ttl=self.message_ttl))
        logger.info("round %d: sampled %d of %d sites", server_round, len(chosen), len(self.sites))
        self._sent = messages
        return messages

    def _encode_broadcast(self, broadcast: dict[str, Any]) -> Broadcast:
        """The round's broadcast at the global rank: the whole adapter in the downlink codec, or under the
        delta broadcast its change since the last one (:mod:`fedpeft.downlink`)."""
        if self.broadcasts is None:
            records, start = encode_tensors(self.downlink, broadcast)
            return Broadcast(whole=records, start=start)
        base = {k: v for k, v in self.broadcasts.base.items() if k in broadcast}
        base_digest = broadcast_digest(base)
        if same_tensors(base, broadcast):
            records, decoded = encode_tensors(self.downlink, {k: broadcast[k] - base[k] for k in broadcast})
            start = apply_change(base, decoded)
        else:  # another set of tensors than the last broadcast's (the rule's frozen set changed): no change to send
            records, start = None, {k: np.asarray(v, np.float32) for k, v in broadcast.items()}
        whole, _ = encode_tensors(_WHOLE, start)
        digest = broadcast_digest(start)
        change = None if records is None else Change.of(records, base=base_digest, digest=digest)
        return Broadcast(whole=whole, start=start, digest=digest, base=base_digest, change=change,
                         unsent={k: (broadcast[k] - start[k]).astype(np.float32) for k in broadcast},
                         whole_bytes=raw_nbytes({k: v.shape for k, v in start.items()}))

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

    def train_round(self, server_round: int, arrays: ArrayRecord,
                    config: ConfigRecord) -> Generator[list[Message], list[Message], RoundOutcome]:
        """Round ``server_round`` as message stages: yields each stage's messages, is sent that stage's
        replies, returns the :class:`RoundOutcome`. A training round is one stage (train instructions,
        then their replies); a protocol that needs several (secure aggregation: keys, shares, masked
        updates, unmasking) yields once per stage, and the round loop (:func:`server.rounds.play_round`)
        runs any number of them the same way."""
        if self.secure is not None:
            return (yield from self.secure.round(self, server_round, arrays, config))
        replies = yield list(self.configure_train(server_round, arrays, config, grid=None))
        return self.collect(server_round, replies)

    # --- what a round of several stages (server.secure) asks of the strategy ---------------------------
    def site_of(self, msg: Message) -> tuple[str, bool]:
        return self._site_of(msg)

    def node_of(self, site: str) -> int:
        return self._node_of[site]

    def sending(self, messages: list[Message]) -> list[Message]:
        """A later stage's messages: the grid gives each its id, by which a reply the SuperLink wrote names
        its site."""
        self._sent = messages
        return messages

    def outcome(self, server_round: int, arrays: ArrayRecord | None, metrics: MetricRecord | None) -> RoundOutcome:
        """The round's outcome. Under the delta broadcast the aggregate gets back what the codec has not sent
        (its sites trained from what they received), and the round's broadcast is the next one's base, held
        by the sites whose reply came."""
        traffic = self.traffic[server_round]
        sent = self._broadcast
        if self.broadcasts is not None and sent is not None:
            unsent = sent.unsent or {}
            if arrays is not None:
                state = from_array_record(arrays)
                arrays = to_array_record({k: (v + unsent[k]).astype(v.dtype) if k in unsent else v
                                          for k, v in state.items()})
            self.broadcasts = self.broadcasts.after(sent.start, sent.base, sent.change, sent.digest,
                                                    received=traffic.received, failed=traffic.failures,
                                                    whole_bytes=sent.whole_bytes)
            self._broadcast = None
        return RoundOutcome(arrays, metrics, traffic, self.control, self.broadcasts)

    def _summed(self, name: str) -> int:
        positions = self._secure_positions
        return int(np.prod(self._secure_shapes[name])) if positions is None else int(positions[name].size)

    def secure_size(self) -> int:
        """Values in this round's secure sum (the flattened update, or the shared codec's positions of it;
        without the weight)."""
        return sum(self._summed(name) for name in self._secure_shapes)

    def secure_unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The secure sum's flat mean back into the tensors it was made of (sorted-name order; entries the
        shared codec did not draw this round are 0)."""
        out, at = {}, 0
        for name, shape in self._secure_shapes.items():
            n = self._summed(name)
            if self._secure_positions is None:
                out[name] = flat[at:at + n].reshape(shape).astype(np.float32)
            else:
                full = np.zeros(int(np.prod(shape)), dtype=np.float32)
                full[self._secure_positions[name]] = flat[at:at + n]
                out[name] = full.reshape(shape)
            at += n
        return out

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's entry: :meth:`collect`'s arrays and metrics (its traffic stays in :attr:`traffic`)."""
        outcome = self.collect(server_round, replies)
        return outcome.arrays, outcome.metrics

    def collect(self, server_round: int, replies: Iterable[Message]) -> RoundOutcome:
        """Round ``server_round``'s replies through the reply pipeline (:mod:`strategies.replies`): each
        reply received, checked by the ledger, accounted, validated, bounded and weighed; the survivors
        screened and aggregated."""
        traffic = self.traffic.setdefault(server_round, RoundTraffic())
        ctx = self.reply_context(server_round)
        candidates = []
        for msg in replies:
            site, unreachable = self._site_of(msg)
            reply, report = receive(msg, site, unreachable)
            traffic.note(site, report, server_round)
            if reply is not None and (reply := run_steps(reply, ctx, traffic)) is not None:
                candidates.append(reply)
        accepted, reports = screen(candidates, ctx)
        for site, report in reports.items():
            traffic.note(site, report, server_round)
        if accepted is None:
            return self.outcome(server_round, None, None)
        if self.control is not None:
            self.control = moved_control(self.control, accepted, population=len(self.sites))
        updates = [r.update for r in accepted]
        if self.release is not None:
            state, agg_metrics = self._released(updates)
        else:
            state, agg_metrics = self._rule(server_round)(updates, [r.weight for r in accepted],
                                                          previous=self.previous, options=self.options)
        if self.active_rank is not None:  # components above the round's rank stay as broadcast
            state = keep_active(state, self.previous, self.active_rank)
            agg_metrics = {**agg_metrics, "active_rank": self.active_rank}
        metrics = MetricRecord({"clients": len(accepted), **agg_metrics,
                                **train_loss(accepted, traffic.client_metrics)})
        return self.outcome(server_round, to_array_record(state), metrics)

    def reply_context(self, server_round: int) -> ReplyContext:
        """What round ``server_round``'s replies are judged against."""
        return ReplyContext(
            server_round=server_round, held=self._rule(server_round).held, baselines=self.baselines,
            rank_of=self._rank_of, checks=tuple(self.checks), limits=self.limits, scaffold=self.control is not None,
            bound=self.bound, releases=self.release is not None, uniform_weights=self.uniform_weights,
            min_replies=self.min_replies, active_rank=self.active_rank,
            shared_seed=round_seed(self.options.seed, server_round),
        )

    def _released(self, updates: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The broadcast plus the release; tensors the aggregator freezes stay as they were."""
        assert self.release is not None
        change, metrics = self.release(updates)
        state = {k: (v + change[k]).astype(v.dtype) if k in change else v for k, v in self.previous.items()}
        return state, {f"dp_{k}": v for k, v in metrics.items()}

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]:
        return []  # the server evaluates the global adapter on the held-out split

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None
