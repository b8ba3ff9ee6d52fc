"""fedpeft's ClientApp with one site that drops out of secure aggregation after it shared its keys: partition 1
fails its round-1 masked-input stage (as a site that lost power between stages would). Every other site,
stage and round is fedpeft's own. For tests/test_secure_simulation.py."""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import secure
from client.local import clipping_mod, codec_mod, identify, train

app = ClientApp()


def drop_mod(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN201 - Flower's mod signature
    marker = Path(os.environ["FEDPEFT_TEST_DROPPED"])  # the first round only, whichever worker runs it
    if int(context.node_config["partition-id"]) == 1 and not marker.exists():
        marker.touch()
        raise RuntimeError("injected fault: the site went offline before its masked input")
    return call_next(msg, context)


app.query()(identify)
app.train(mods=[codec_mod, clipping_mod])(train)
app.query("secagg_shares")(secure.shares)
app.query("secagg_masked", mods=[drop_mod])(secure.masked)
app.query("secagg_unmask")(secure.unmask)
