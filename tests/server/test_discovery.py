"""Start-up discovery: clients that fail to start or stay silent are left out with a warning; the run
starts with the others, or stops with the reasons when fewer than min_clients started."""

from __future__ import annotations

import logging

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedpeft.errors import FedPeftError
from fedpeft.wire import CONFIG, METRICS, NUM_EXAMPLES
from server.discovery import finish_discovery

pytestmark = pytest.mark.usefixtures("server_identity")


class FakeGrid:
    """Answers queries the way the nodes below do: a site name, an error, or silence."""

    def __init__(self, behaviour: dict[int, str]) -> None:
        self.behaviour = behaviour
        self.sent = {}

    def push(self) -> list[str]:
        ids = []
        for node in self.behaviour:
            msg = Message(content=RecordDict({CONFIG: ConfigRecord({})}), message_type=MessageType.QUERY,
                          dst_node_id=node)
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what pushing a message does
            self.sent[msg.object_id] = msg
            ids.append(msg.object_id)
        return ids

    def pull_messages(self, ids: set[str]) -> list[Message]:
        out = []
        for mid in list(ids):
            query = self.sent[mid]
            what = self.behaviour[query.metadata.dst_node_id]
            if what == "silent":
                continue
            if what.startswith("error:"):
                out.append(Message(Error(code=0, reason=what[6:]), reply_to=query))
            else:
                out.append(Message(RecordDict({CONFIG: ConfigRecord({"site": what}),
                                               METRICS: MetricRecord({NUM_EXAMPLES: 5})}), reply_to=query))
        return out


def test_failed_and_silent_clients_are_left_out_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    grid = FakeGrid({11: "hospital-a", 12: "error:site data file not found: /data/b.jsonl", 13: "silent",
                     14: "hospital-d"})
    with caplog.at_level(logging.WARNING, logger="server.discovery"):
        sites, ranks, _ = finish_discovery(grid, grid.push(), timeout=0.3, min_sites=2)
    assert sites == {11: "hospital-a", 14: "hospital-d"} and ranks == {}
    assert "client 12 could not start: site data file not found: /data/b.jsonl; the run goes on without it" \
        in caplog.text
    assert "1 client(s) did not answer the start-up query within 0 s; the run goes on without it" in caplog.text


def test_too_few_started_clients_stop_the_run_with_the_reasons() -> None:
    grid = FakeGrid({11: "hospital-a", 12: "error:boom", 13: "silent"})
    with pytest.raises(FedPeftError, match=r"1 of 3 clients started, fewer than min_clients=2: client 12 could not "
                                           r"start: boom; 1 client\(s\) did not answer"):
        finish_discovery(grid, grid.push(), timeout=0.3, min_sites=2)


def test_two_clients_claiming_one_site_are_refused() -> None:
    grid = FakeGrid({11: "hospital-a", 12: "hospital-a"})
    with pytest.raises(FedPeftError, match="two clients reported the same site"):
        finish_discovery(grid, grid.push(), timeout=0.3)


def test_a_delta_not_below_one_over_a_sites_examples_stops_the_run_naming_it() -> None:
    grid = FakeGrid({11: "hospital-a", 12: "hospital-b"})  # 5 examples each
    with pytest.raises(FedPeftError, match=r"dp_delta 0.2 is not below 1/examples at site hospital-a \(5 examples\)"):
        finish_discovery(grid, grid.push(), timeout=0.3, example_delta=0.2)
    sites, _, counts = finish_discovery(grid, grid.push(), timeout=0.3, example_delta=0.19)
    assert set(sites.values()) == {"hospital-a", "hospital-b"}
    assert counts == {"hospital-a": 5, "hospital-b": 5}  # what secure aggregation's ring is sized by
