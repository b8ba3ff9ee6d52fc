"""A round's exchange with the grid: push once, pull until every reply came or the round timed out."""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import SimpleNamespace

from server.run import send_and_receive


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
