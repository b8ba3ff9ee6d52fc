"""fedpeft's ClientApp with faults injected by a mod in front of the real handlers, for tests/test_faults.py.

Partition 1 raises in its round-2 training; partition 2 is a straggler in round 1 (it answers 20 s late,
past the test's round timeout); every other client, and every other round, is fedpeft's own.

(A simulated client that never answers at all would hold one of Flower's simulation workers for good;
tests/test_deployment.py stops a real SuperNode instead.)
"""

from __future__ import annotations

import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.local import clipping_mod, codec_mod, identify, train

app = ClientApp()


def fault_mod(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN201 - Flower's mod signature
    partition = int(context.node_config["partition-id"])
    if partition == 1 and int(msg.content["config"]["server-round"]) == 2:
        raise RuntimeError("injected fault: the site's disk is full")
    if partition == 2 and int(msg.content["config"]["server-round"]) == 1:
        time.sleep(20)
    return call_next(msg, context)


app.query()(identify)
app.train(mods=[fault_mod, codec_mod, clipping_mod])(train)
