"""The ClientApp Flower starts for a message: it trains here, or relays to the site's worker.

A site run by ``fedpeft node`` starts no ClientApp process at all: its SuperNode runs with ``--isolation
process`` and the site worker takes the messages itself (:mod:`client.executor`). Where Flower does start
this app for a node whose config sets ``worker`` (a SuperNode run by hand with Flower's default isolation),
it only hands the message to the worker over the site's private socket (:mod:`client.worker`) and returns
its reply, so it imports nothing heavy. Without ``worker`` (simulation, or a site that opts out) the message
is handled in-process by :mod:`client.local`, the same code the worker runs. A worker that is configured
but cannot answer is a failed reply naming why, never a silent fall-back to training here (that would load
the model per message again, unnoticed).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.worker import relay, worker_socket

app = ClientApp()


def handle(msg: Message, context: Context) -> Message:
    path = worker_socket(context.node_config)
    if path is not None:
        return relay(msg, context, path)
    from client.local import app as local  # torch, transformers, the model: only where training happens

    return local(msg, context)


app.query()(handle)
app.train()(handle)
