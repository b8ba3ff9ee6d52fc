"""fedpeft's ClientApp with an outermost mod that writes down what every train reply carries (record names,
metric names and values, array names and shapes) to ``$FEDPEFT_TEST_CAPTURE``, for tests that check what
leaves a site; and, with ``$FEDPEFT_TEST_READS`` set, every run setting (a :class:`FedPeftConfig` field)
the site's code read while handling the message, and the keys of the request it received."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.local import clipping_mod, codec_mod, identify, train
from fedpeft.config import FedPeftConfig

FIELDS = frozenset(f.name for f in dataclasses.fields(FedPeftConfig))
# reads that are not the site's code using a setting: building, validating, copying or comparing a config
# (a property of the config, such as ``probes``, is the site's code reading the fields it derives from)
PLUMBING = ("fedpeft/config_checks.py", "dataclasses.py")
PROPERTIES = frozenset(name for name, value in vars(FedPeftConfig).items() if isinstance(value, property))


def _plumbing(frame: object) -> bool:
    code = frame.f_code  # type: ignore[attr-defined]
    return code.co_filename.endswith(PLUMBING) or (code.co_filename.endswith("fedpeft/config.py")
                                                   and code.co_name not in PROPERTIES)

app = ClientApp()


def reads_mod(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN201 - Flower's mod signature
    """Record the config fields read under this message (by the handler and the mods inside this one)."""
    if "FEDPEFT_TEST_READS" not in os.environ:
        return call_next(msg, context)
    read: set[str] = set()
    plain = object.__getattribute__

    def traced(self: FedPeftConfig, name: str) -> object:
        if name in FIELDS and not _plumbing(sys._getframe(1)):
            read.add(name)
        return plain(self, name)

    FedPeftConfig.__getattribute__ = traced  # type: ignore[method-assign]
    try:
        return call_next(msg, context)
    finally:
        del FedPeftConfig.__getattribute__
        with open(os.environ["FEDPEFT_TEST_READS"], "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"type": msg.metadata.message_type, "read": sorted(read),
                                 "request": sorted(msg.content["config"])}) + "\n")


def capture_mod(msg: Message, context: Context, call_next):  # noqa: ANN001, ANN201 - Flower's mod signature
    reply = call_next(msg, context)
    if "FEDPEFT_TEST_CAPTURE" not in os.environ:
        return reply
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


app.query(mods=[reads_mod])(identify)
app.train(mods=[reads_mod, capture_mod, codec_mod, clipping_mod])(train)
