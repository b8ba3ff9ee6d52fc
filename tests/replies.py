"""Test helpers: read a broadcast and build a site's encoded reply, as client.encoding does."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedpeft.adapters.state import key_matches
from fedpeft.codecs import compress, parse_codec
from fedpeft.wire import CODEC, CONFIG, METRICS, decode_payload, payload_records


def header_shapes(content: Any) -> list[tuple[int, ...]]:
    text = str(content[CODEC]["shapes"])
    return [tuple(int(d) for d in s.split("x") if d) for s in text.split(";")] if text else []


def sent(msg: Message, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The tensors a broadcast carries; ``names`` may include tensors the config names frozen."""
    frozen = tuple(c for c in str(msg.content[CONFIG].get("frozen", "")).split(",") if c)
    kept = sorted(n for n in names if not key_matches(n, frozen))
    out, _ = decode_payload(msg.content, dict(zip(kept, header_shapes(msg.content), strict=True)))
    return out


def reply(
    out: Message,
    state: Mapping[str, np.ndarray],
    metrics: Mapping[str, Any],
    *,
    codec: str = "none",
    extra: Mapping[str, Any] | None = None,
) -> Message:
    """The reply of a site that trained the broadcast of ``out`` into ``state`` (a factor the config
    names ``held`` is left out, as client.encoding does)."""
    broadcast = sent(out, state)
    held = tuple(c for c in str(out.content[CONFIG].get("held", "")).split(",") if c)
    update = {k: np.asarray(state[k], dtype=np.float32) - broadcast[k] for k in broadcast if not key_matches(k, held)}
    chosen = parse_codec(codec)
    parts, _, _ = compress(chosen, update)
    records = payload_records(chosen, parts, {k: v.shape for k, v in update.items()})
    return Message(RecordDict({**records, METRICS: MetricRecord(dict(metrics)), **(extra or {})}), reply_to=out)


def incoming(rnd: int = 1) -> Message:
    """A train message as a SuperNode hands it to the ClientApp (with the id the grid gave it; needs the
    ``server_identity`` fixture)."""
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": rnd})}), dst_node_id=7,
                  message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg
