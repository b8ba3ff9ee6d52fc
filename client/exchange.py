"""What every way of sending a site's update back starts with (the codec exchange, :mod:`client.encoding`;
secure aggregation's first stage, :mod:`client.secure`): decode the broadcast, run the handler, and take
the update it trained."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Message

from fedpeft.adapters.state import without_keys
from fedpeft.downlink import apply_change, broadcast_digest, chain_payloads, load_broadcasts, save_broadcasts
from fedpeft.errors import FedPeftError
from fedpeft.wire import ARRAYS, CODEC, PayloadError, decode_payload, from_array_record, to_array_record

logger = logging.getLogger(__name__)


def received_broadcast(content: Any, expected: Mapping[str, tuple[int, ...]], *, base: str | None,
                       digest: str | None, store: Path, initial: Mapping[str, np.ndarray],
                       links: int = 0) -> dict[str, np.ndarray]:
    """The broadcast a train message carries (``expected``: name → shape of what it must hold).

    Under the delta broadcast (``digest`` given, :mod:`fedpeft.downlink`) the payload is the change of the
    broadcast ``base`` names (the site's ``initial`` adapter, or one kept in ``store``), after ``links``
    earlier changes the message also holds (taken out of ``content``), or the whole adapter when ``base``
    is None; the result must have ``digest``, and is kept with its base.

    Raises
    ------
    PayloadError
        A malformed payload.
    FedPeftError
        The site holds no broadcast named ``base``, or the result is not the one the coordinator holds.
    """
    try:
        earlier = chain_payloads(content, links) if digest is not None and base is not None else []
    except KeyError as err:
        raise PayloadError(f"the request counts {links} earlier broadcast changes, and {err} is missing") from None
    decoded, _ = decode_payload(content, expected)
    if digest is None:
        return decoded
    try:
        kept = load_broadcasts(store)
    except ValueError as err:  # then only the initial adapter can be a base; else the error below says so
        logger.warning("%s", err)
        kept = {}
    if base is None:  # the whole adapter; the newest broadcast kept stays too, should the coordinator name it
        result, keep = decoded, dict(list(kept.items())[-1:])
    else:
        if base not in kept and broadcast_digest(initial) == base:
            kept[base] = dict(initial)
        if base not in kept:
            raise FedPeftError(f"the broadcast is a change of one this site does not hold ({base[:12]}; it keeps "
                               f"{', '.join(d[:12] for d in kept) or 'none'}): its state directory was lost or "
                               "is another run's; the coordinator starts it afresh next round")
        result = kept[base]
        for records in earlier:  # the rounds this site missed, oldest first
            result = apply_change(result, decode_payload(records, expected)[0])
        result, keep = apply_change(result, decoded), {base: kept[base]}
    if broadcast_digest(result) != digest:
        raise FedPeftError(f"the broadcast this site rebuilt ({broadcast_digest(result)[:12]}) is not the "
                           f"coordinator's ({digest[:12]})")
    save_broadcasts(store, {**keep, digest: result})
    return result


def trained_update(msg: Message, context: Any, call_next: Any, *, expected: Mapping[str, tuple[int, ...]],
                   held: tuple[str, ...], broadcast: dict[str, np.ndarray] | None = None,
                   ) -> tuple[Message, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Decode the broadcast of ``msg`` (``expected``: name → shape of what it must hold) into plain arrays
    (or take ``broadcast``, :func:`received_broadcast`'s), run the handler, and return ``(reply, sent,
    update)``: ``sent`` the broadcast's tensors the site sends back (all but ``held``), ``update`` trained −
    broadcast over them, ``{}`` when the site did not train, None when the reply is an error. A
    PayloadError becomes the reply's error."""
    if broadcast is None:
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
