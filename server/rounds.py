"""Playing one round against the federation: its message stages pushed and their replies pulled
(:func:`send_and_receive`), a short round retried, skipped or stopped as ``short_round`` says.
The round's content (sampling, the broadcast, the reply pipeline) is the strategy's
(:meth:`strategies.flower.FedPeftStrategy.train_round`); what the coordinator keeps across rounds is
:class:`server.run.Coordinator`'s."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import Message

from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.wire import to_array_record
from strategies.flower import FedPeftStrategy, RoundOutcome
from strategies.replies import RoundTraffic

logger = logging.getLogger(__name__)

REPLY_POLL_SECONDS = 0.2  # how often a round asks the SuperLink for replies once the first may be near
REPLY_POLL_SLOW = 1.0  # how often before then (each ask costs the SuperLink and the ServerApp CPU)
REPLY_EARLY = 0.8  # "near": this fraction of the time the previous round's first reply took


def short_round_reasons(traffic: RoundTraffic, *, sampled: int) -> str:
    """What became of each sampled site in a round that aggregated nothing, in one line."""
    parts = [f"{site}: {reason}" for site, reason in sorted({**traffic.failures, **traffic.refused}.items())]
    silent = sampled - len(set(traffic.failures) | set(traffic.refused) | set(traffic.received))
    if silent > 0:
        parts.append(f"{silent} sampled site(s) sent no reply within round_timeout")
    return "; ".join(parts) or "no replies"


def play_round(rnd: int, state: Mapping[str, np.ndarray], *, cfg: FedPeftConfig, strategy: FedPeftStrategy,
               base_config: Any, grid: Any, arrivals: list[float] | None = None) -> RoundOutcome:
    """Play round ``rnd`` (every message stage of it) and return its outcome, whose arrays are None when too
    few valid replies came (then ``short_round`` decides: retry, skip, or stop with the reasons).
    ``arrivals`` holds when the previous round's replies came (seconds after its push) and is refilled."""
    arrivals = [] if arrivals is None else arrivals
    attempts = 1 + (cfg.round_retries if cfg.short_round == "retry" else 0)
    for attempt in range(1, attempts + 1):
        stages = strategy.train_round(rnd, to_array_record(state), base_config)
        messages = next(stages)
        sampled = len(messages)
        while True:
            expect = min(arrivals, default=0.0)
            arrivals.clear()
            replies = send_and_receive(grid, messages, timeout=cfg.round_timeout, expect=expect, arrivals=arrivals)
            try:
                messages = stages.send(replies)
            except StopIteration as done:
                outcome: RoundOutcome = done.value
                break
        if outcome.arrays is not None:
            break
        reasons = short_round_reasons(outcome.traffic, sampled=sampled)
        if cfg.short_round == "stop" and not outcome.traffic.refused:
            raise FedPeftError(f"round {rnd}: fewer than min_clients={cfg.min_clients} valid replies ({reasons})")
        then = "sending it again" if attempt < attempts else "skipping it: the global adapter stays as it was"
        logger.warning("round %d (attempt %d of %d): fewer than min_clients=%d valid replies (%s); %s",
                       rnd, attempt, attempts, cfg.min_clients, reasons, then)
    return outcome


def send_and_receive(grid: Any, messages: Iterable[Message], *, timeout: float, poll: float = REPLY_POLL_SECONDS,
                     expect: float = 0.0, slow: float = REPLY_POLL_SLOW,
                     arrivals: list[float] | None = None) -> list[Message]:
    """Push ``messages`` and pull their replies until all came or ``timeout`` passed.

    What ``Grid.send_and_receive`` does, but asking every ``poll`` seconds: a deployed ServerApp's grid
    (Flower 1.39) sleeps 3 s between pulls, which a round pays after its last reply (1.5 s on average).
    Until a reply may be near (:data:`REPLY_EARLY` of ``expect``, when the previous round's first reply
    came) and while none came, it asks every ``slow`` seconds instead: on a machine that also trains,
    every ask is CPU taken from training. ``arrivals`` receives each reply's seconds after the push."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    start = time.monotonic()
    deadline, near = start + timeout, start + REPLY_EARLY * expect
    while pending:
        got = list(grid.pull_messages(pending))
        now = time.monotonic()
        replies += got
        if arrivals is not None:
            arrivals += [now - start] * len(got)
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or now >= deadline:
            break
        wait = poll if replies or now >= near else min(slow, max(poll, near - now))
        time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
    return replies
