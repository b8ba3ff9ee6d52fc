"""The ClientApp Flower starts for a message: it trains in this process (:mod:`client.local`).

This is the app of a simulation and of a site without a worker (``fedpeft node --no-worker``, or a SuperNode
run by hand with Flower's default isolation), where Flower starts it per message and everything is loaded
per message too. A site run by ``fedpeft node`` starts no ClientApp process at all: its SuperNode runs with
``--isolation process`` and the site worker takes the messages itself (:mod:`client.worker`). A node whose
config says a worker serves it (``worker``, set by ``fedpeft node``) therefore never reaches this app; if it
does (its SuperNode was started without ``--isolation process``), the message fails with the reason rather
than load the model per message unnoticed (Flower makes the
raised error the reply).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft.deploy.commands import WORKER_KEY
from fedpeft.errors import FedPeftError

app = ClientApp()


def served_by_worker(node_config: Mapping[str, Any]) -> bool:
    """Whether the node config says a site worker takes this node's messages."""
    flag = node_config.get(WORKER_KEY, False)
    if isinstance(flag, str):
        return flag.strip().lower() not in ("", "0", "false", "no", "off")
    return bool(flag)


def handle(msg: Message, context: Context) -> Message:
    if served_by_worker(context.node_config):
        raise FedPeftError(f"node config {WORKER_KEY}=1: a site worker takes this node's messages, but its SuperNode "
                           "started a ClientApp process; run the SuperNode with --isolation process and the worker "
                           f"(as `fedpeft node` does), or drop {WORKER_KEY} from its node config to train here")
    # deferred: heavy (torch, transformers): a node that a worker serves is refused above without loading them
    from client.local import app as local

    return local(msg, context)


app.query()(handle)
app.train()(handle)
for _action in ("secagg_shares", "secagg_masked", "secagg_unmask"):  # secure aggregation's later stages
    app.query(_action)(handle)
