"""The coordinator's reply path as one pipeline: each train reply goes through

    receive → ledger → account → validate → project → bound → weigh

and the round's survivors through ``screen`` (outliers, quorum) and ``aggregate`` (SCAFFOLD's variate,
then central DP's release or the aggregation rule).

Every step is a function of its input and the round's :class:`ReplyContext` that returns
``(result, report)``: the result (None when the reply goes no further) and a :class:`Report` of what
happened to it, which :meth:`RoundTraffic.note` writes down. No step edits shared state, so a round with
several message stages (secure aggregation) can run its own steps between ``validate`` and ``aggregate``
with the same bookkeeping.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedpeft.adapters.lora.dynamic import project_update
from fedpeft.adapters.state import without_keys
from fedpeft.codecs.shared import SharedPositions
from fedpeft.protocol import TRAIN_LOSS
from fedpeft.wire import (
    METRICS,
    NUM_EXAMPLES,
    REFUSED,
    SECONDS,
    PayloadError,
    decode_payload,
    raw_nbytes,
    read_privacy,
    record_nbytes,
    unpack_control,
)
from strategies.scaffold import control_rejection, server_variate
from strategies.validation import ReplyLimits, norm_rejection, relative_outliers, reply_bound, update_norm

logger = logging.getLogger(__name__)

ReplyCheck = Callable[[str, int, Any], "str | None"]
"""``check(site, server_round, content)``: a reason to reject the reply, or None to accept it."""

Release = Callable[[Sequence[dict[str, Any]]], "tuple[dict[str, Any], dict[str, Any]]"]
"""``release(updates)``: the round's mean update from the accepted updates (in site order), and its
metrics (central DP: the noised sum of clipped updates over the fixed cohort size)."""

UpdateBound = Callable[[dict[str, Any]], "tuple[dict[str, Any], bool]"]
"""``bound(update)``: the decoded update made safe to aggregate (central DP: clipped to C), and
whether it had to change."""


@dataclass
class RoundTraffic:
    """What one training round sent and received, per site."""

    sent: dict[str, int] = field(default_factory=dict)  # site → bytes down
    received: dict[str, int] = field(default_factory=dict)  # site → bytes up
    raw_sent: dict[str, int] = field(default_factory=dict)  # site → the broadcast's bytes as raw fp32
    raw_received: dict[str, int] = field(default_factory=dict)  # site → its decoded update's bytes as raw fp32
    reclipped: set[str] = field(default_factory=set)  # sites whose decoded update the server clipped (bound)
    norms: dict[str, float] = field(default_factory=dict)  # site → its decoded update's L2 norm, as sent
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # site → reason
    refused: dict[str, str] = field(default_factory=dict)  # site → why it did not train (its privacy budget)
    unreachable: dict[str, str] = field(default_factory=dict)  # site → what the SuperLink said in its place

    def note(self, site: str, report: Report, server_round: int) -> None:
        """Write down what a step reported of ``site``'s reply (and log what went wrong)."""
        if report.received is not None:
            self.received[site] = report.received
        if report.client_metrics is not None:
            self.client_metrics[site] = report.client_metrics
        if report.reclipped:
            self.reclipped.add(site)
        if report.raw is not None:
            self.raw_received[site] = report.raw
        if report.norm is not None:
            self.norms[site] = report.norm
        if report.unreachable is not None:
            self.unreachable[site] = report.unreachable
            logger.warning("round %d: %s did not reply: %s", server_round, site, report.unreachable)
        if report.refused is not None:
            self.refused[site] = report.refused
            logger.warning("round %d: %s did not train: %s", server_round, site, report.refused)
        if report.failed is not None:
            self.failures[site] = report.failed
            logger.warning("round %d: %s failed: %s", server_round, site, report.failed)
        if report.rejected is not None:
            self.failures[site] = report.rejected
            logger.warning("round %d: rejected the reply of %s: %s", server_round, site, report.rejected)

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
                **({"update_norm": round(self.norms[site], 6)} if site in self.norms else {}),
                **({"codec_error": self.client_metrics[site]["codec-error"]}
                   if "codec-error" in self.client_metrics.get(site, {}) else {}),
                # where the site's time went (load, train; at a deployed site with a worker: the wait)
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


@dataclass(frozen=True)
class Report:
    """What a step did with a reply: at most one of unreachable / failed / refused / rejected (it stops
    there), and what it measured on the way."""

    received: int | None = None  # bytes on the wire
    client_metrics: dict[str, float] | None = None
    raw: int | None = None  # the accepted update's bytes as raw fp32
    norm: float | None = None  # the decoded update's L2 norm, as the site sent it
    reclipped: bool = False
    unreachable: str | None = None  # the SuperLink answered in the site's place
    failed: str | None = None  # the site answered with an error
    refused: str | None = None  # the site did not train (its privacy budget)
    rejected: str | None = None  # the reply failed a check


NOTHING = Report()


@dataclass(frozen=True)
class ReplyContext:
    """What one round's replies are judged against (built by the strategy when the round's replies come)."""

    server_round: int
    held: tuple[str, ...]  # tensors broadcast but not trained this round: not sent back
    baselines: Mapping[int | None, Mapping[str, Any]]  # rank → the decoded broadcast at that rank
    rank_of: Mapping[str, int | None]  # site → the rank it was sent
    checks: Sequence[ReplyCheck] = ()
    limits: ReplyLimits = field(default_factory=ReplyLimits)
    scaffold: bool = False  # a reply carries its change of c_i
    bound: UpdateBound | None = None
    releases: bool = False  # central DP: the aggregate is made of the updates, not of states
    uniform_weights: bool = False
    min_replies: int = 1
    active_rank: int | None = None  # DP-DyLoRA: every update is projected onto this rank's components
    shared_seed: int | None = None  # the round's public seed of the ``shared`` codec's positions


@dataclass(frozen=True)
class Reply:
    """A site's train reply as it goes through the pipeline."""

    site: str
    content: Any
    nbytes: int = 0
    metrics: Mapping[str, Any] = field(default_factory=dict)
    baseline: Mapping[str, Any] | None = None
    shapes: Mapping[str, tuple[int, ...]] | None = None
    update: dict[str, Any] | None = None  # the decoded update; after ``weigh``, the state when no release
    control: dict[str, Any] | None = None  # SCAFFOLD: its change of c_i
    norm: float = 0.0
    raw: int = 0
    weight: float = 0.0


Step = Callable[[Reply, ReplyContext], "tuple[Reply | None, Report]"]


def receive(msg: Any, site: str, unreachable: bool) -> tuple[Reply | None, Report]:
    """A message → the reply of ``site``: not one where the SuperLink answered in its place or the site
    answered with an error, and one that has arrays, metrics and a well-formed privacy record."""
    if unreachable:  # not an answer from the site: it stays "no reply", with the SuperLink's reason
        return None, Report(unreachable=msg.error.reason)
    if msg.has_error():
        return None, Report(failed=msg.error.reason)
    content = msg.content
    nbytes = record_nbytes(content)
    if not content.array_records or METRICS not in content.metric_records:
        return None, Report(received=nbytes, rejected="reply lacks arrays or metrics")
    try:
        read_privacy(content)
    except ValueError as err:
        return None, Report(received=nbytes, rejected=str(err))
    return Reply(site=site, content=content, nbytes=nbytes), Report(received=nbytes)


def ledger(reply: Reply, ctx: ReplyContext) -> tuple[Reply | None, Report]:
    """The run's reply checks (the privacy ledger's signed entry, its sequence)."""
    for check in ctx.checks:
        reason = check(reply.site, ctx.server_round, reply.content)
        if reason is not None:
            return None, Report(rejected=reason)
    return reply, NOTHING


def account(reply: Reply, ctx: ReplyContext) -> tuple[Reply | None, Report]:
    """The site's own metrics; a site that did not train (its budget) stops here."""
    metrics = dict(reply.content.metric_records[METRICS])
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    privacy = read_privacy(reply.content)
    if privacy is not None and privacy["status"] == REFUSED:
        return None, Report(client_metrics=numbers, refused=privacy["reason"])
    return replace(reply, metrics=metrics), Report(client_metrics=numbers)


def validate(reply: Reply, ctx: ReplyContext) -> tuple[Reply | None, Report]:
    """Sampled this round, within the size bound, a payload that decodes to the expected tensors, a
    SCAFFOLD change that fits them, a norm within the absolute bounds."""
    baseline = ctx.baselines.get(ctx.rank_of.get(reply.site, -1))
    if baseline is None:
        return None, Report(rejected="replied to a round it was not sampled for")
    shapes = {k: v.shape for k, v in without_keys(baseline, ctx.held).items()}  # what the site sends
    raw = raw_nbytes(shapes)
    if reply.nbytes > reply_bound(raw):
        return None, Report(rejected=f"reply of {reply.nbytes} bytes exceeds the bound {reply_bound(raw)} for this "
                                     "adapter")
    try:
        update, codec = decode_payload(reply.content, shapes)
    except PayloadError as err:
        return None, Report(rejected=f"payload rejected: {err}")
    drawn = getattr(codec.sparsifier, "seed", None)
    if isinstance(codec.sparsifier, SharedPositions) and drawn != ctx.shared_seed:
        return None, Report(rejected=f"payload rejected: shared positions drawn from seed {drawn}, not the round's")
    control = None
    if ctx.scaffold:
        try:
            control = unpack_control(reply.content)
        except PayloadError as err:
            return None, Report(rejected=f"control change rejected: {err}")
        reason = control_rejection(control, shapes)
        if reason is not None:
            return None, Report(rejected=reason)
    norm = update_norm(update)  # as sent: the bounds judge the site, not what clipping made of it
    reason = norm_rejection(norm, ctx.limits)
    if reason is not None:
        return None, Report(rejected=reason)
    return (replace(reply, baseline=baseline, shapes=shapes, update=update, control=control, norm=norm, raw=raw),
            Report(norm=norm))


def project(reply: Reply, ctx: ReplyContext) -> tuple[Reply | None, Report]:
    """Under DP-DyLoRA, the update on the round's active components only: anything a site sent for the
    others is dropped before clipping, so every update lives on the same public support."""
    if ctx.active_rank is None:
        return reply, NOTHING
    return replace(reply, update=project_update(reply.update, ctx.active_rank)), NOTHING


def bound(reply: Reply, ctx: ReplyContext) -> tuple[Reply | None, Report]:
    """The update made safe to aggregate (central DP: clipped to C again)."""
    if ctx.bound is None:
        return reply, NOTHING
    update, changed = ctx.bound(reply.update)
    return replace(reply, update=update), Report(reclipped=changed)


def weigh(reply: Reply, ctx: ReplyContext) -> tuple[Reply | None, Report]:
    """Its weight (examples, or 1 each under central DP) and what the aggregate reads: the site's state
    (baseline + update) for a rule, the update itself for a release."""
    weight = 1.0 if ctx.uniform_weights else float(reply.metrics.get(NUM_EXAMPLES, 0))
    update = reply.update
    if not ctx.releases:
        update = {k: reply.baseline[k] + update[k] for k in reply.shapes}
    return replace(reply, update=update, weight=weight), NOTHING


STEPS: tuple[Step, ...] = (ledger, account, validate, project, bound, weigh)


def run_steps(reply: Reply, ctx: ReplyContext, traffic: RoundTraffic, steps: Sequence[Step] = STEPS) -> Reply | None:
    """``reply`` through ``steps`` in turn, each report written down; None once one stops it."""
    current: Reply | None = reply
    for step in steps:
        current, report = step(current, ctx)
        traffic.note(reply.site, report, ctx.server_round)
        if current is None:
            return None
    return current


def screen(candidates: Sequence[Reply], ctx: ReplyContext) -> tuple[list[Reply] | None, dict[str, Report]]:
    """The replies the round aggregates, in site order: without those far from the round's median norm;
    None when fewer than ``min_replies`` remain (each remaining one then says why it was not used)."""
    outliers = relative_outliers({r.site: r.norm for r in candidates}, ctx.limits)
    reports = {site: Report(rejected=reason) for site, reason in sorted(outliers.items())}
    accepted = sorted((r for r in candidates if r.site not in outliers), key=lambda r: r.site)
    if len(accepted) < ctx.min_replies:
        logger.warning("round %d: %d valid replies, fewer than the %d needed; nothing aggregated",
                       ctx.server_round, len(accepted), ctx.min_replies)
        for r in accepted:
            reports[r.site] = Report(failed=f"valid, but the round had {len(accepted)} of {ctx.min_replies} needed")
        return None, reports
    for r in accepted:
        reports[r.site] = Report(raw=r.raw)
    return accepted, reports


def moved_control(control: Mapping[str, Any], accepted: Sequence[Reply], *, population: int) -> dict[str, Any]:
    """SCAFFOLD's c after the round: c + (1/N)·Σ Δc_i over the accepted replies."""
    return server_variate(control, [r.control for r in accepted], population=population)


def train_loss(accepted: Sequence[Reply], client_metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The example-weighted mean of the sites' reported training losses (DP sites report none: a loss on
    private data is not covered by their epsilon)."""
    losses = [(r.weight, client_metrics[r.site][TRAIN_LOSS]) for r in accepted
              if TRAIN_LOSS in client_metrics[r.site]]
    if not losses:
        return {}
    return {TRAIN_LOSS: sum(w * loss for w, loss in losses) / sum(w for w, _ in losses)}
