"""A round's exchange with the grid: push once, pull until every reply came or the round timed out."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import SimpleNamespace

from server.rounds import play_round, send_and_receive
from strategies.flower import RoundOutcome
from strategies.replies import RoundTraffic


class Grid:
    """Replies to message ``i`` on pull number ``answers[i]`` (never when None)."""

    def __init__(self, answers: dict[str, int | None]) -> None:
        self.answers, self.pulls, self.pushed = answers, 0, []

    def push_messages(self, messages: Iterable[str]) -> list[str]:
        self.pushed = list(messages)
        return list(self.pushed)

    def pull_messages(self, ids: Iterable[str]) -> list[SimpleNamespace]:
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids
                if self.answers[i] is not None and self.answers[i] <= self.pulls]


def replied(replies: list[SimpleNamespace]) -> list[str]:
    return sorted(r.metadata.reply_to_message_id for r in replies)


def test_pulls_until_every_reply_came_and_not_once_more() -> None:
    grid = Grid({"a": 1, "b": 4, "c": 2})
    replies = send_and_receive(grid, ["a", "b", "c"], timeout=60, poll=0.001)
    assert replied(replies) == ["a", "b", "c"]  # each once, though "a" was ready from the first pull on
    assert grid.pulls == 4 and grid.pushed == ["a", "b", "c"]


def test_a_silent_site_ends_the_exchange_at_the_timeout_with_the_others_replies() -> None:
    grid = Grid({"a": 1, "b": None})
    replies = send_and_receive(grid, ["a", "b"], timeout=0.05, poll=0.001)
    assert replied(replies) == ["a"] and grid.pulls >= 2


def test_before_the_first_reply_may_come_it_asks_seldom_then_often() -> None:
    """The previous round's first reply came after 1 s: until 0.8 s it asks every 0.2 s (5 asks), then every
    0.01 s; the reply on the 10th ask therefore comes after at least 0.8 s, and its arrival is recorded."""
    grid, arrivals = Grid({"a": 10}), []
    started = time.monotonic()
    replies = send_and_receive(grid, ["a"], timeout=60, poll=0.01, slow=0.2, expect=1.0, arrivals=arrivals)
    took = time.monotonic() - started
    assert replied(replies) == ["a"] and grid.pulls == 10
    assert took >= 0.8 and len(arrivals) == 1 and 0.8 <= arrivals[0] <= took


def test_once_a_reply_came_the_rest_are_asked_for_often() -> None:
    grid, arrivals = Grid({"a": 1, "b": 6}), []
    started = time.monotonic()
    replies = send_and_receive(grid, ["a", "b"], timeout=600, poll=0.001, slow=30.0, expect=100.0, arrivals=arrivals)
    assert replied(replies) == ["a", "b"] and time.monotonic() - started < 20  # 5 fast asks, not 5 slow ones
    assert len(arrivals) == 2 and arrivals[0] <= arrivals[1]


def test_a_deployed_grid_asks_again_soon_for_a_reply_whose_objects_are_still_uploading(monkeypatch) -> None:
    from flwr.superlink.grid import http_grid, inmemory_grid

    from fedpeft.deploy.objects import FIRST_RETRY
    from server.app import eager_reply_pulls

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after the test
    assert eager_reply_pulls(object.__new__(http_grid.HttpGrid))  # what flwr-serverapp hands a deployed run
    assert http_grid.pull_objects.keywords == {"initial_backoff": FIRST_RETRY}  # Flower's first retry: 1 s
    assert not eager_reply_pulls(object.__new__(inmemory_grid.InMemoryGrid))  # simulation: nothing to pull


class Everyone(Grid):
    """Every message is answered on the first pull."""

    def pull_messages(self, ids: Iterable[str]) -> list[SimpleNamespace]:
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ids]


class Stages:
    """A strategy whose round has several message stages, each one's messages named after the last one's
    replies (the shape secure aggregation needs), and a short first attempt when told to."""

    def __init__(self, stages: int, short_first: bool = False) -> None:
        self.stages, self.short_first, self.attempts, self.seen = stages, short_first, 0, []

    def train_round(self, rnd, arrays, config):
        self.attempts += 1
        messages = [f"r{rnd}-s1-a", f"r{rnd}-s1-b"]
        for stage in range(2, self.stages + 1):
            replies = yield messages
            self.seen.append(replied(replies))
            messages = [f"{r}>s{stage}" for r in replied(replies)]
        replies = yield messages
        self.seen.append(replied(replies))
        short = self.short_first and self.attempts == 1
        traffic = RoundTraffic(failures={"site-a": "masked share missing"} if short else {})
        return RoundOutcome(None if short else "arrays", None, traffic, None)


def test_a_round_plays_every_message_stage_in_turn() -> None:
    strategy = Stages(4)
    cfg = SimpleNamespace(round_retries=0, short_round="skip", round_timeout=60.0, min_clients=1)
    outcome = play_round(3, {}, cfg=cfg, strategy=strategy, base_config=None, grid=Everyone({}))
    assert outcome.arrays == "arrays" and len(strategy.seen) == 4
    assert strategy.seen[-1] == ["r3-s1-a>s2>s3>s4", "r3-s1-b>s2>s3>s4"]  # each stage built on the last


def test_a_short_multi_stage_round_is_sent_again_from_its_first_stage() -> None:
    strategy = Stages(2, short_first=True)
    cfg = SimpleNamespace(round_retries=1, short_round="retry", round_timeout=60.0, min_clients=1)
    outcome = play_round(1, {}, cfg=cfg, strategy=strategy, base_config=None, grid=Everyone({}))
    assert strategy.attempts == 2 and outcome.arrays == "arrays" and len(strategy.seen) == 4
