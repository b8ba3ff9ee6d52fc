"""fedpeft's ClientApp with an outermost mod that writes down what every train reply carries (record names,
metric names and values, array names and shapes) to ``$FEDPEFT_TEST_CAPTURE``, for tests that check what
leaves a site."""

from __future__ import annotations

import json
import os

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.local import clipping_mod, codec_mod, identify, train

app = ClientApp()


def capture_mod(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN201 - Flower's mod signature
    reply = call_next(msg, context)
    content = reply.content
    record = {
        "site": int(context.node_config["partition-id"]),
        "round": int(msg.content["config"]["server-round"]),
        "arrays": {name: {key: list(array.shape) for key, array in rec.items()}
                   for name, rec in content.array_records.items()},
        "configs": {name: sorted(rec) for name, rec in content.config_records.items()},
        "metrics": {name: dict(rec) for name, rec in content.metric_records.items()},
    }
    with open(os.environ["FEDPEFT_TEST_CAPTURE"], "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    return reply


app.query()(identify)
app.train(mods=[capture_mod, codec_mod, clipping_mod])(train)
