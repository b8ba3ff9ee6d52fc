"""What the site worker does with a message: call the handler, time it, log one line.

Light on purpose (Flower's public message types and fedpeft's wire names only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context, Error, Message

from fedpeft.protocol import CONFIG, METRICS, NUM_EXAMPLES, SECONDS, SERVER_ROUND, STEPS

logger = logging.getLogger("client.worker")  # one logger for the worker's lines, as the site's log shows them

ERROR_CODE = 20  # fedpeft's code for "the site worker could not answer" (Flower uses 0-5 for its own)

Handler = Callable[[Message, Context], Message]


def answer(handler: Handler, msg: Message, context: Context) -> Message:
    """``handler``'s reply; an exception becomes an error reply naming it, as Flower does."""
    try:
        return handler(msg, context)
    except Exception as err:  # noqa: BLE001
        logger.exception("site worker: the %s handler raised", msg.metadata.message_type)
        return Message(Error(code=ERROR_CODE, reason=f"{type(err).__name__}: {err}"), reply_to=msg)


def refusal(msg: Message, reason: str) -> Message:
    """An error reply from the site worker to ``msg``, saying ``reason``."""
    return Message(Error(code=ERROR_CODE, reason=f"site worker: {reason}"), reply_to=msg)


def timed(reply: Message, seconds: Mapping[str, Any]) -> None:
    """Add ``seconds`` (those that are numbers) to a train reply's metrics; error replies stay as they are."""
    if reply.has_error() or reply.metadata.message_type != "train" or METRICS not in reply.content.metric_records:
        return
    metrics = reply.content.metric_records[METRICS]
    for key, value in seconds.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            metrics[key] = float(value)


def head(msg: Message) -> str:
    """``train round 3``: the message's type and round."""
    kind = msg.metadata.message_type
    config = msg.content.config_records.get(CONFIG, {}) if msg.has_content() else {}
    return f"{kind} round {config[SERVER_ROUND]}" if SERVER_ROUND in config else kind


def summary(msg: Message, reply: Message, seconds: float) -> str:
    """One log line per message: round, steps, examples, seconds (or the failure)."""
    what = head(msg)
    if reply.has_error():
        return f"{what} failed after {seconds:.2f} s: {reply.error.reason}"
    metrics = reply.content.metric_records.get(METRICS, {})
    parts = [f"{metrics[key]} {name}" for key, name in ((STEPS, "steps"), (NUM_EXAMPLES, "examples"))
             if key in metrics]
    spent = ", ".join(f"{key.removeprefix('seconds-')} {metrics[key]:.2f}" for key in SECONDS if key in metrics)
    return f"{what}: {', '.join([*parts, f'{seconds:.2f} s'])}" + (f" ({spent})" if spent else "")
