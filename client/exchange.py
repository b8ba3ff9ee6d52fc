"""What every way of sending a site's update back starts with (the codec exchange, :mod:`client.encoding`;
secure aggregation's first stage, :mod:`client.secure`): decode the broadcast, run the handler, and take
the update it trained."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Message

from fedpeft.adapters.state import without_keys
from fedpeft.errors import FedPeftError
from fedpeft.wire import ARRAYS, CODEC, decode_payload, from_array_record, to_array_record


def trained_update(msg: Message, context: Any, call_next: Any, *, expected: Mapping[str, tuple[int, ...]],
                   held: tuple[str, ...]) -> tuple[Message, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Decode the broadcast of ``msg`` (``expected``: name → shape of what it must hold) into plain arrays,
    run the handler, and return ``(reply, sent, update)``: ``sent`` the broadcast's tensors the site sends
    back (all but ``held``), ``update`` trained − broadcast over them, ``{}`` when the site did not train,
    None when the reply is an error. A PayloadError becomes the reply's error."""
    broadcast, _ = decode_payload(msg.content, expected)
    del msg.content[CODEC]
    msg.content[ARRAYS] = to_array_record(broadcast)
    reply = call_next(msg, context)
    sent = without_keys(broadcast, held)  # a held factor is not sent back: the server has it
    if reply.has_error():
        return reply, sent, None
    trained = from_array_record(reply.content[ARRAYS])
    if trained and set(trained) != set(broadcast):
        raise FedPeftError("the trained adapter holds other tensors than the broadcast")
    if trained and any(not np.array_equal(trained[k], broadcast[k]) for k in broadcast if k not in sent):
        raise FedPeftError(f"the site trained a factor the strategy holds this round ({', '.join(held)})")
    return reply, sent, ({k: trained[k] - broadcast[k] for k in sent} if trained else {})
