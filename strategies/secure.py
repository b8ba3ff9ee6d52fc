"""The coordinator's stages of a secure-aggregation round (the protocol: :mod:`privacy.secagg`; the site's
stages: :mod:`client.secure`).

A round is four message stages (:func:`secure_round`, driven by :func:`server.rounds.play_round`):

1. **train**: the train requests, each with the site's number for the round; the replies carry the
   sites' public keys, their metrics without ``num-examples`` and, under local DP, their signed ledger
   entries, which go through the reply pipeline's ``ledger`` and ``account`` steps as in any round;
2. **shares**: the roster to every site that answered; their encrypted shares back;
3. **masked input**: to each site that shared, the shares meant for it and who shared; masked vectors
   back;
4. **unmasking**: who survived and who dropped; the shares asked for back.

The coordinator then holds the weighted sum of the survivors' clipped updates and the sum of their
weights, and nothing about any one site's: the round's change is their quotient, as central DP's
release is (a linear rule is post-processing of the average). What it can no longer do is check one
site's update (validation, norm bounds, robust statistics): the sites clip their own update to
``secagg_clip`` (:func:`server.checks.check_config` refuses the settings that need the coordinator to look).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.protocol import MASKED, SECAGG_KEYS, SECAGG_MASKED, SECAGG_SHARES, SECAGG_STAGE, SECAGG_UNMASK
from fedpeft.wire import record_nbytes, to_array_record
from privacy.secagg import fixed_point
from privacy.secagg.protocol import Advert, SecAggError, check_roster, unmask
from strategies.replies import Reply, Report, account, ledger, train_loss

logger = logging.getLogger(__name__)

RING = 64  # as the sites' (client.secure.RING)


@dataclass(frozen=True)
class SecureSettings:
    """The run's secure-aggregation settings (the config's ``secagg_*``; under central DP the clip is C and
    every site weighs 1, and ``release`` noises the secure sum: :func:`privacy.central.noised_mean_of_sum`)."""

    clip: float
    bits: int
    threshold: int  # 0: a majority of the round's sampled sites
    run_id: str
    uniform: bool = False
    release: Callable[..., tuple[dict[str, Any], dict[str, Any]]] | None = None

    def threshold_for(self, sampled: int) -> int:
        return self.threshold or max(2, sampled // 2 + 1)

    def request(self, number: int, server_round: int, sampled: int) -> str:
        """The ``secagg`` entry of site ``number``'s train request."""
        return json.dumps({"number": number, "threshold": self.threshold_for(sampled), "bits": self.bits,
                           "clip": self.clip, "uniform": self.uniform, "tag": tag(self.run_id, server_round)})


def tag(run_id: str, server_round: int) -> str:
    """The round's tag: every ciphertext and mask of the round is bound to it."""
    return f"{run_id}/round-{server_round}"


def _stage_message(strategy: Any, site: str, message_type: str, body: Mapping[str, Any]) -> Message:
    content = RecordDict({SECAGG_STAGE: ConfigRecord({"json": json.dumps(body)})})
    return Message(content=content, message_type=message_type, dst_node_id=strategy.node_of(site),
                   ttl=strategy.message_ttl)


def _answers(strategy: Any, replies: list[Message], traffic: Any, server_round: int, stage: str) -> dict[str, Any]:
    """site → the reply's content, for the replies that came without error (the others noted as failed)."""
    out = {}
    for msg in replies:
        site, unreachable = strategy.site_of(msg)
        if unreachable:
            traffic.note(site, Report(unreachable=msg.error.reason), server_round)
        elif msg.has_error():
            traffic.note(site, Report(failed=f"secure aggregation, {stage}: {msg.error.reason}"), server_round)
        else:
            out[site] = msg.content
            traffic.received[site] = traffic.received.get(site, 0) + record_nbytes(msg.content)
    return out


def _send(strategy: Any, traffic: Any, messages: list[Message], sites: list[str]) -> list[Message]:
    for site, msg in zip(sites, messages, strict=True):
        traffic.sent[site] = traffic.sent.get(site, 0) + record_nbytes(msg.content)
    return strategy.sending(messages)


def secure_round(strategy: Any, server_round: int, arrays: Any,
                 config: Any) -> Generator[list[Message], list[Message], Any]:
    """Round ``server_round`` under secure aggregation (see the module doc); returns the RoundOutcome."""
    settings: SecureSettings = strategy.secure
    messages = list(strategy.configure_train(server_round, arrays, config, grid=None))
    traffic = strategy.traffic[server_round]
    numbers: dict[str, int] = dict(strategy.secure_numbers)
    sampled = len(numbers)
    threshold = settings.threshold_for(sampled)
    ctx = strategy.reply_context(server_round)

    def stop(reason: str) -> Any:
        """Too few sites left: the round aggregates nothing, and every site that was still in it says why."""
        logger.warning("round %d: secure aggregation stops: %s", server_round, reason)
        ended = set(traffic.failures) | set(traffic.refused) | set(traffic.unreachable)
        for site in sorted(set(numbers) - ended):
            traffic.failures[site] = f"secure aggregation stopped: {reason}"
        return strategy.outcome(server_round, None, None)

    # 1. train → public keys (and the ledger's entries under local DP)
    roster: dict[int, Advert] = {}
    metrics: dict[str, Any] = {}
    for msg in (yield messages):
        site, unreachable = strategy.site_of(msg)
        if unreachable or msg.has_error():
            traffic.note(site, Report(unreachable=msg.error.reason) if unreachable else
                         Report(failed=msg.error.reason), server_round)
            continue
        reply = Reply(site=site, content=msg.content, nbytes=record_nbytes(msg.content))
        traffic.note(site, Report(received=reply.nbytes), server_round)
        for step in (ledger, account):
            reply, report = step(reply, ctx)
            traffic.note(site, report, server_round)
            if reply is None:
                break
        if reply is None:
            continue
        if SECAGG_KEYS not in msg.content.config_records:
            traffic.note(site, Report(rejected="a secure round's reply without public keys"), server_round)
            continue
        keys = msg.content.config_records[SECAGG_KEYS]
        try:
            roster[numbers[site]] = Advert(bytes.fromhex(str(keys["c"])), bytes.fromhex(str(keys["s"])))
        except (KeyError, ValueError) as err:
            traffic.note(site, Report(rejected=f"malformed public keys: {err}"), server_round)
            continue
        metrics[site] = reply.metrics
    site_of_number = {n: s for s, n in numbers.items()}
    needed = max(threshold, ctx.min_replies)
    try:
        if len(roster) < needed:
            raise SecAggError(f"{len(roster)} sites sent keys, {needed} needed")
        check_roster(roster, threshold=threshold)
    except SecAggError as err:
        return stop(str(err))

    # 2. shares
    roster_json = {str(n): [a.c_public.hex(), a.s_public.hex()] for n, a in roster.items()}
    sites = [site_of_number[n] for n in sorted(roster)]
    answers = _answers(strategy, (yield _send(strategy, traffic, [
        _stage_message(strategy, s, SECAGG_SHARES, {"tag": tag(settings.run_id, server_round), "roster": roster_json,
                                                    "threshold": threshold}) for s in sites], sites)),
        traffic, server_round, "shares")
    routed: dict[int, dict[str, str]] = {}
    commitments: dict[int, bytes] = {}
    for site, content in answers.items():
        body = json.loads(str(content[SECAGG_STAGE]["json"]))
        commitments[numbers[site]] = bytes.fromhex(body["commitment"])
        for receiver, blob in body["shares"].items():
            routed.setdefault(int(receiver), {})[str(numbers[site])] = blob
    shared = sorted(commitments)
    if len(shared) < needed:
        return stop(f"{len(shared)} sites shared their keys, {needed} needed")

    # 3. masked input
    sites = [site_of_number[n] for n in shared]
    answers = _answers(strategy, (yield _send(strategy, traffic, [
        _stage_message(strategy, site_of_number[n], SECAGG_MASKED, {
            "tag": tag(settings.run_id, server_round), "shared": shared,
            "shares": {u: blob for u, blob in routed.get(n, {}).items() if int(u) in commitments}})
        for n in shared], sites)), traffic, server_round, "masked input")
    size = strategy.secure_size() + 1  # the flattened update and the weight
    masked: dict[int, np.ndarray] = {}
    for site, content in answers.items():
        vector = content.array_records[MASKED]["vector"].numpy() if MASKED in content.array_records else None
        if vector is None or vector.dtype != np.uint64 or vector.shape != (size,):
            traffic.note(site, Report(rejected=f"a masked vector that is not {size} uint64 values"), server_round)
            continue
        masked[numbers[site]] = vector
    if len(masked) < needed:
        return stop(f"{len(masked)} masked inputs, {needed} needed")

    # 4. unmasking
    survivors, dropped = sorted(masked), sorted(set(shared) - set(masked))
    sites = [site_of_number[n] for n in survivors]
    answers = _answers(strategy, (yield _send(strategy, traffic, [
        _stage_message(strategy, s, SECAGG_UNMASK, {"tag": tag(settings.run_id, server_round),
                                                    "survivors": survivors, "dropped": dropped}) for s in sites],
        sites)), traffic, server_round, "unmasking")
    revealed = {}
    for site, content in answers.items():
        body = json.loads(str(content[SECAGG_STAGE]["json"]))
        revealed[numbers[site]] = {int(v): (kind, bytes.fromhex(part)) for v, (kind, part) in body["revealed"].items()}
    try:
        total = unmask(masked, revealed, roster=roster, commitments={n: commitments[n] for n in shared},
                       threshold=threshold, round_tag=tag(settings.run_id, server_round).encode(), ring=RING)
    except SecAggError as err:
        return stop(str(err))
    weight = int(total[-1])
    if weight <= 0:
        return stop(f"the survivors' weights sum to {weight}")
    summed = fixed_point.decode(total[:-1], clip=settings.clip, bits=settings.bits, ring=RING)
    dp_metrics: dict[str, Any] = {}
    if settings.release is not None:  # central DP: noise on the sum after unmasking, ÷ the fixed cohort size
        change, released = settings.release(strategy.secure_unflatten(summed), len(masked))
        dp_metrics = {f"dp_{k}": v for k, v in released.items()}
        mean = summed / max(weight, 1)
    else:
        mean = summed / weight
        change = strategy.secure_unflatten(mean)
    for n in survivors:
        traffic.raw_received[site_of_number[n]] = int(mean.size * 4)
    state = {k: (v + change[k]).astype(v.dtype) if k in change else v for k, v in strategy.previous.items()}
    accepted = [site_of_number[n] for n in survivors]
    losses = train_loss([Reply(site=s, content=None, weight=1.0) for s in accepted], traffic.client_metrics)
    round_metrics = MetricRecord({
        "clients": len(accepted), "secagg_dropped": len(dropped), "secagg_threshold": threshold,
        "secagg_step": fixed_point.step(settings.clip, settings.bits), "secagg_ring_bits": RING,
        "secagg_max_error": float(fixed_point.step(settings.clip, settings.bits) / 2 * math.sqrt(mean.size)),
        **losses, **dp_metrics,
    })
    logger.info("round %d: secure sum of %d sites (%d dropped after sharing)", server_round, len(accepted),
                len(dropped))
    return strategy.outcome(server_round, to_array_record(state), round_metrics)
