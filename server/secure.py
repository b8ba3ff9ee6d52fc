"""The coordinator's stages of a secure-aggregation round (the protocol: :mod:`privacy.secagg`; the site's
stages: :mod:`client.secure`). The strategy is handed a :class:`SecureSettings` and plays its rounds
through :meth:`SecureSettings.round`, so that ``strategies/`` needs nothing of ``privacy/``.

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
from collections.abc import Callable, Generator
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
    weight_cap: int = 0  # the most one site's weight may be (its examples; 1 under central DP); 0: no cap known

    def threshold_for(self, sampled: int) -> int:
        return self.threshold or max(2, sampled // 2 + 1)

    def ring_for(self, sampled: int) -> int:
        """The round's ring ℤ/2^k: the fewest bits that hold ``sampled`` sites' weighted sum without wrapping
        (every site clamps its weight to :attr:`weight_cap`); 64 when no cap is known."""
        return fixed_point.ring_bits(self.bits, sampled * self.weight_cap) if self.weight_cap > 0 else 64

    def round(self, strategy: Any, server_round: int, arrays: Any,
              config: Any) -> Generator[list[Message], list[Message], Any]:
        """Round ``server_round`` of ``strategy`` as four message stages (:func:`secure_round`)."""
        return secure_round(strategy, server_round, arrays, config)

    def request(self, number: int, server_round: int, sampled: int) -> str:
        """The ``secagg`` entry of site ``number``'s train request."""
        return json.dumps({"number": number, "threshold": self.threshold_for(sampled), "bits": self.bits,
                           "clip": self.clip, "uniform": self.uniform, "tag": tag(self.run_id, server_round),
                           "ring": self.ring_for(sampled), "cap": self.weight_cap})


def tag(run_id: str, server_round: int) -> str:
    """The round's tag: every ciphertext and mask of the round is bound to it."""
    return f"{run_id}/round-{server_round}"


class SecureRound:
    """One secure round's bookkeeping at the coordinator: who has which number, what each stage brought, and
    the traffic; :func:`secure_round` drives it through the four stages."""

    def __init__(self, strategy: Any, server_round: int) -> None:
        self.strategy, self.server_round = strategy, server_round
        self.settings: SecureSettings = strategy.secure
        self.traffic = strategy.traffic[server_round]
        self.numbers: dict[str, int] = dict(strategy.secure_numbers)
        self.site_of_number = {n: s for s, n in self.numbers.items()}
        self.threshold = self.settings.threshold_for(len(self.numbers))
        self.ring = self.settings.ring_for(len(self.numbers))
        self.ctx = strategy.reply_context(server_round)
        self.needed = max(self.threshold, self.ctx.min_replies)
        self.tag = tag(self.settings.run_id, server_round)

    def note(self, site: str, report: Report) -> None:
        self.traffic.note(site, report, self.server_round)

    def short(self, count: int, what: str) -> str | None:
        """Why the round cannot go on with ``count`` sites left, or None."""
        return f"{count} {what}, {self.needed} needed" if count < self.needed else None

    def stop(self, reason: str) -> Any:
        """Too few sites left: the round aggregates nothing, and every site that was still in it says why."""
        logger.warning("round %d: secure aggregation stops: %s", self.server_round, reason)
        ended = set(self.traffic.failures) | set(self.traffic.refused) | set(self.traffic.unreachable)
        for site in sorted(set(self.numbers) - ended):
            self.traffic.failures[site] = f"secure aggregation stopped: {reason}"
        return self.strategy.outcome(self.server_round, None, None)

    def send(self, message_type: str, numbers: list[int], body: Callable[[int], dict[str, Any]]) -> list[Message]:
        """A later stage's messages to the sites ``numbers`` (each its ``body``, with the round's tag)."""
        messages = []
        for n in numbers:
            site = self.site_of_number[n]
            content = RecordDict({SECAGG_STAGE: ConfigRecord({"json": json.dumps({"tag": self.tag, **body(n)})})})
            messages.append(Message(content=content, message_type=message_type,
                                    dst_node_id=self.strategy.node_of(site), ttl=self.strategy.message_ttl))
            self.traffic.sent[site] = self.traffic.sent.get(site, 0) + record_nbytes(content)
        return self.strategy.sending(messages)

    def answers(self, replies: list[Message], stage: str, read: Callable[[Any], Any]) -> dict[int, Any]:
        """Site number → ``read(content)`` of each reply of a later stage; an error or a reply ``read`` cannot
        make sense of is noted with its reason and left out."""
        out = {}
        for msg in replies:
            site, unreachable = self.strategy.site_of(msg)
            if unreachable:
                self.note(site, Report(unreachable=msg.error.reason))
            elif msg.has_error():
                self.note(site, Report(failed=f"secure aggregation, {stage}: {msg.error.reason}"))
            elif site in self.numbers:
                self.traffic.received[site] = self.traffic.received.get(site, 0) + record_nbytes(msg.content)
                try:
                    out[self.numbers[site]] = read(msg.content)
                except (KeyError, TypeError, ValueError) as err:
                    self.note(site, Report(rejected=f"secure aggregation, {stage}: a malformed reply ({err})"))
        return out

    def keys(self, replies: list[Message]) -> dict[int, Advert]:
        """Stage 1's replies: each site's public keys, after the ledger and the site's own metrics (a site that
        did not train, or whose ledger entry does not verify, stops here)."""
        roster: dict[int, Advert] = {}
        for msg in replies:
            site, unreachable = self.strategy.site_of(msg)
            if unreachable or msg.has_error():
                reason = msg.error.reason
                self.note(site, Report(unreachable=reason) if unreachable else Report(failed=reason))
                continue
            reply: Reply | None = Reply(site=site, content=msg.content, nbytes=record_nbytes(msg.content))
            self.note(site, Report(received=reply.nbytes))
            for step in (ledger, account):
                reply, report = step(reply, self.ctx)
                self.note(site, report)
                if reply is None:
                    break
            if reply is None or site not in self.numbers:
                continue
            try:
                keys = msg.content.config_records[SECAGG_KEYS]
                roster[self.numbers[site]] = Advert(bytes.fromhex(str(keys["c"])), bytes.fromhex(str(keys["s"])))
            except (KeyError, ValueError) as err:
                self.note(site, Report(rejected=f"a secure round's reply without well-formed public keys ({err})"))
        return roster

    def finish(self, roster: dict[int, Advert], commitments: dict[int, bytes], masked: dict[int, np.ndarray],
               revealed: dict[int, Any]) -> Any:
        """Unmask, and the round's outcome: the broadcast plus the mean (or central DP's release) of the sum."""
        survivors = sorted(masked)
        try:
            total = unmask(masked, revealed, roster=roster, commitments=commitments, threshold=self.threshold,
                           round_tag=self.tag.encode(), ring=self.ring)
        except SecAggError as err:
            return self.stop(str(err))
        weight = int(total[-1])
        if weight <= 0:
            return self.stop(f"the survivors' weights sum to {weight}")
        settings, strategy = self.settings, self.strategy
        summed = fixed_point.decode(total[:-1], clip=settings.clip, bits=settings.bits, ring=self.ring)
        dp_metrics: dict[str, Any] = {}
        if settings.release is not None:  # central DP: noise on the sum after unmasking, ÷ the fixed cohort size
            change, released = settings.release(strategy.secure_unflatten(summed), len(masked))
            dp_metrics = {f"dp_{k}": v for k, v in released.items()}
        else:
            change = strategy.secure_unflatten(summed / weight)
        for n in survivors:
            self.traffic.raw_received[self.site_of_number[n]] = int(summed.size * 4)
        state = {k: (v + change[k]).astype(v.dtype) if k in change else v for k, v in strategy.previous.items()}
        accepted = [self.site_of_number[n] for n in survivors]
        step = fixed_point.step(settings.clip, settings.bits)
        metrics = MetricRecord({
            "clients": len(accepted), "secagg_dropped": len(commitments) - len(survivors),
            "secagg_threshold": self.threshold, "secagg_step": step, "secagg_ring_bits": self.ring,
            "secagg_max_error": float(step / 2 * math.sqrt(summed.size)),
            **train_loss([Reply(site=s, content=None, weight=1.0) for s in accepted], self.traffic.client_metrics),
            **dp_metrics,
        })
        logger.info("round %d: secure sum of %d sites (%d dropped after sharing)", self.server_round, len(accepted),
                    len(commitments) - len(survivors))
        return strategy.outcome(self.server_round, to_array_record(state), metrics)


def _shares_of(content: Any) -> tuple[bytes, dict[int, str]]:
    body = json.loads(str(content[SECAGG_STAGE]["json"]))
    return bytes.fromhex(body["commitment"]), {int(v): str(blob) for v, blob in body["shares"].items()}


def _revealed(content: Any) -> dict[int, tuple[str, bytes]]:
    body = json.loads(str(content[SECAGG_STAGE]["json"]))
    return {int(v): (str(kind), bytes.fromhex(part)) for v, (kind, part) in body["revealed"].items()}


def _masked_of(size: int, ring: int) -> Callable[[Any], np.ndarray]:
    def read(content: Any) -> np.ndarray:
        data = content.array_records[MASKED]["vector"].numpy()
        width = fixed_point.packed_width(ring)
        if data.dtype != np.uint8 or data.shape != (size * width,):
            raise ValueError(f"a masked vector that is not {size} elements of {width} bytes (a {ring}-bit ring)")
        return fixed_point.unpack(data, ring)
    return read


def secure_round(strategy: Any, server_round: int, arrays: Any,
                 config: Any) -> Generator[list[Message], list[Message], Any]:
    """Round ``server_round`` under secure aggregation (see the module doc); returns the RoundOutcome."""
    messages = list(strategy.configure_train(server_round, arrays, config, grid=None))
    r = SecureRound(strategy, server_round)
    roster = r.keys((yield messages))
    try:
        why = r.short(len(roster), "sites sent keys") or check_roster(roster, threshold=r.threshold)
    except SecAggError as err:
        why = str(err)
    if why:
        return r.stop(why)
    keys = {str(n): [a.c_public.hex(), a.s_public.hex()] for n, a in roster.items()}
    shared = r.answers((yield r.send(SECAGG_SHARES, sorted(roster), lambda n: {"roster": keys,
                                                                                "threshold": r.threshold})),
                       "shares", _shares_of)
    if why := r.short(len(shared), "sites shared their keys"):
        return r.stop(why)
    sharers = sorted(shared)
    masked = r.answers((yield r.send(SECAGG_MASKED, sharers, lambda n: {"shared": sharers, "shares": {
        str(u): shared[u][1][n] for u in sharers if u != n and n in shared[u][1]}})),
        "masked input", _masked_of(strategy.secure_size() + 1, r.ring))
    if why := r.short(len(masked), "masked inputs"):
        return r.stop(why)
    survivors = sorted(masked)
    dropped = sorted(set(sharers) - set(survivors))
    revealed = r.answers((yield r.send(SECAGG_UNMASK, survivors, lambda n: {"survivors": survivors,
                                                                            "dropped": dropped})),
                         "unmasking", _revealed)
    return r.finish(roster, {n: shared[n][0] for n in sharers}, masked, revealed)
