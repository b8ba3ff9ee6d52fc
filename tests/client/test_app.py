"""The ClientApp Flower starts per message: it trains in-process, and refuses where a site worker should have
taken the message."""

from __future__ import annotations

import sys
import types

import pytest
from flwr.app import Context, Message, RecordDict
from replies import incoming

from client.app import handle, served_by_worker
from fedpeft.errors import FedPeftError

pytestmark = pytest.mark.usefixtures("server_identity")  # to build the incoming instruction as a grid would


def context(**node_config: object) -> Context:
    return Context(run_id=3, node_id=7, node_config={"data-path": "/data/site.jsonl", **node_config},
                   state=RecordDict(), run_config={})


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> list[Message]:
    """client.local's app, without torch: the messages it was handed."""
    seen: list[Message] = []
    local = types.ModuleType("client.local")
    local.app = lambda msg, ctx: seen.append(msg) or Message(RecordDict(), reply_to=msg)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "client.local", local)
    return seen


@pytest.mark.parametrize("flag", [None, 0, "false", "off", ""])
def test_without_a_worker_the_message_trains_in_this_process(flag: object, trained: list[Message]) -> None:
    msg = incoming()
    reply = handle(msg, context() if flag is None else context(worker=flag))
    assert trained == [msg] and reply.metadata.reply_to_message_id == msg.metadata.message_id


@pytest.mark.parametrize("flag", [1, True, "1", "yes"])
def test_a_node_a_worker_serves_refuses_instead_of_loading_the_model_per_message(flag: object,
                                                                                 trained: list[Message]) -> None:
    assert served_by_worker({"worker": flag})
    with pytest.raises(FedPeftError, match="--isolation process") as raised:
        handle(incoming(), context(worker=flag))
    assert "\n" not in str(raised.value) and not trained
