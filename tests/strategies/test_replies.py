"""The reply pipeline (strategies/replies.py): each step a function of the reply and the round's context
returning ``(result, report)``, writing nothing itself; the strategy's round as message stages."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord
from replies import reply

from fedpeft.wire import NUM_EXAMPLES, to_array_record
from strategies.flower import FedPeftStrategy, RoundOutcome
from strategies.replies import (
    STEPS,
    ReplyContext,
    RoundTraffic,
    account,
    bound,
    ledger,
    receive,
    run_steps,
    screen,
    validate,
    weigh,
)
from strategies.validation import ReplyLimits

pytestmark = pytest.mark.usefixtures("server_identity")

NODES = {11: "partition-00000", 12: "partition-00001", 13: "partition-00002"}


def _state(scale: float = 0.0) -> dict[str, np.ndarray]:
    shapes = {"a.lora_A.weight": (2, 4), "a.lora_B.weight": (5, 2), "head.weight": (3, 4)}
    return {k: np.full(shape, scale, np.float32) for k, shape in shapes.items()}


def _round(strategy: FedPeftStrategy, server_round: int = 1):
    stages = strategy.train_round(server_round, to_array_record(_state()), ConfigRecord({"label-names": ["a", "b"]}))
    return stages, next(stages)


def _context(strategy: FedPeftStrategy, **changes) -> ReplyContext:
    base = ReplyContext(server_round=1, held=(), baselines=strategy.baselines, rank_of=strategy._rank_of)
    return dataclasses.replace(base, **changes)


def _replies(messages, scale: float = 1.0, examples: int = 10):
    return [reply(m, _state(scale * (i + 1)), MetricRecord({NUM_EXAMPLES: examples * (i + 1), "train-loss": 0.5}))
            for i, m in enumerate(messages)]


def test_a_training_round_is_one_stage_that_returns_its_outcome() -> None:
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0)
    stages, messages = _round(strategy)
    assert sorted(m.metadata.dst_node_id for m in messages) == sorted(NODES)
    with pytest.raises(StopIteration) as done:
        stages.send(_replies(messages))
    outcome = done.value.value
    assert isinstance(outcome, RoundOutcome) and outcome.metrics["clients"] == 3
    assert set(outcome.traffic.raw_received) == set(NODES.values()) and outcome.control is None
    assert outcome.traffic is strategy.traffic[1]


def test_the_steps_report_and_write_nothing() -> None:
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0)
    _, messages = _round(strategy)
    msg = _replies(messages)[0]
    site = NODES[msg.metadata.src_node_id]
    got, report = receive(msg, site, False)
    assert got is not None and report.received == got.nbytes > 0 and report.rejected is None
    ctx = _context(strategy)
    before = {k: dict(v) for k, v in strategy.baselines.items()}
    received = got
    for step in STEPS:
        got, _ = step(got, ctx)
        assert got is not None
    assert received.update is None and received.weight == 0.0  # each step made a new reply (they are frozen)
    assert got.weight == 10.0 and {k: v.shape for k, v in got.update.items()} == got.shapes
    assert all(np.array_equal(before[r][k], strategy.baselines[r][k]) for r in before for k in before[r])
    assert strategy.traffic[1].received == {}  # no step wrote to the round's record


def test_a_rejecting_step_stops_the_reply_with_its_reason() -> None:
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0)
    _, messages = _round(strategy)
    msg = _replies(messages, scale=100.0)[0]
    first, _ = receive(msg, "partition-00000", False)
    tight = _context(strategy, limits=ReplyLimits(max_norm=1.0))
    assert validate(first, tight)[0] is None and "norm" in validate(first, tight)[1].rejected
    checks = _context(strategy, checks=(lambda site, rnd, content: f"bad entry of {site}",))
    out, report = ledger(first, checks)
    assert out is None and report.rejected == "bad entry of partition-00000"
    traffic = RoundTraffic()
    assert run_steps(first, checks, traffic) is None
    assert traffic.failures == {"partition-00000": "bad entry of partition-00000"}
    unsampled = _context(strategy, rank_of={})
    assert validate(first, unsampled)[1].rejected == "replied to a round it was not sampled for"


def test_bound_reports_a_clip_and_weigh_reads_the_release_mode() -> None:
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0)
    _, messages = _round(strategy)
    got, _ = receive(_replies(messages)[1], "partition-00001", False)
    got, _ = account(got, _context(strategy))
    got, _ = validate(got, _context(strategy))
    halve = _context(strategy, bound=lambda u: ({k: v / 2 for k, v in u.items()}, True))
    clipped, report = bound(got, halve)
    assert report.reclipped and np.allclose(clipped.update["head.weight"], got.update["head.weight"] / 2)
    as_state, _ = weigh(got, _context(strategy))
    as_update, _ = weigh(got, _context(strategy, releases=True, uniform_weights=True))
    assert as_update.weight == 1.0 and as_state.weight == 20.0
    assert np.array_equal(as_update.update["head.weight"], got.update["head.weight"])
    assert np.allclose(as_state.update["head.weight"], got.baseline["head.weight"] + got.update["head.weight"])


def test_screen_needs_a_quorum_and_says_why_each_valid_reply_went_unused() -> None:
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0)
    _, messages = _round(strategy)
    ready = []
    for msg in _replies(messages):
        got, _ = receive(msg, NODES[msg.metadata.src_node_id], False)
        ready.append(run_steps(got, _context(strategy), RoundTraffic()))
    accepted, reports = screen(ready, _context(strategy, min_replies=3))
    assert [r.site for r in accepted] == sorted(NODES.values()) and all(reports[s].raw for s in NODES.values())
    none, reports = screen(ready[:2], _context(strategy, min_replies=3))
    assert none is None and all("of 3 needed" in reports[r.site].failed for r in ready[:2])
