"""The site's side of the wire: which site this node is, and the codec mod around the train handler.

``codec_mod`` is the outermost mod of the train handler (``mods=[codec_mod, clipping_mod]``):

1. on the way in it decodes the broadcast payload into plain adapter tensors (so the central-DP
   clipping mod and the handler see an ordinary ArrayRecord);
2. on the way out it turns the handler's trained adapter into the update (trained − broadcast, after
   any clipping), adds the carried error-feedback residual, encodes it with the site's codec, saves
   the new residual atomically, and replaces the reply's arrays with the payload and its header.

Under local DP the update is already a DP-SGD output, so the codec and its residual are
post-processing and cost no privacy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord

from fedpeft import site
from fedpeft.adapters.state import key_matches, without_keys
from fedpeft.codecs import compress, parse_codec
from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.feedback_state import load_residual, residual_path, save_residual
from fedpeft.wire import (
    ARRAYS,
    CODEC,
    CONFIG,
    METRICS,
    config_from_record,
    decode_payload,
    from_array_record,
    payload_records,
    to_array_record,
)

logger = logging.getLogger(__name__)


def site_identity(context: Context, fallback_partitions: int) -> tuple[int, int, str]:
    """``(partition_id, num_partitions, site_key)`` of this node (:func:`fedpeft.site.node_identity`)."""
    return site.node_identity(context.node_config, fallback_partitions)


def site_config(cfg: FedPeftConfig, context: Context, partition_id: int) -> FedPeftConfig:
    """The run config as this site trains it: its own LoRA rank, and its own ``device`` / ``precision``
    when its node config sets them (``fedpeft node --device/--precision``; a site knows its hardware)."""
    node = context.node_config
    own = {key: str(node[key]) for key in ("device", "precision") if key in node}
    if own:
        try:
            cfg = dataclasses.replace(cfg, **own)  # validates, as any config does
        except FedPeftError as err:
            raise FedPeftError(f"this site's node config: {err}") from None
    node_rank = node.get("lora-r")
    return site.at_rank(cfg, site.client_rank(cfg, partition_id, None if node_rank is None else int(node_rank)))


def frozen_components(config: Any) -> tuple[str, ...]:
    """The tensor names the site does not train this round and never sends back: those the strategy
    freezes (config ``frozen``, never broadcast either) and those it holds this round (config ``held``,
    broadcast: RoLoRA's other factor)."""
    return unbroadcast_components(config) + held_components(config)


def unbroadcast_components(config: Any) -> tuple[str, ...]:
    """The tensor names the strategy freezes: never broadcast, never sent back (FFA-LoRA's A)."""
    return _components(config, "frozen")


def held_components(config: Any) -> tuple[str, ...]:
    """The tensor names broadcast this round but neither trained nor sent back."""
    return _components(config, "held")


def _components(config: Any, key: str) -> tuple[str, ...]:
    return tuple(c for c in str(config.get(key, "")).split(",") if c)


def codec_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Decode the broadcast, run the handler, send back the encoded update (see the module doc)."""
    config = msg.content[CONFIG]
    cfg = config_from_record(config)
    pid, _, key = site_identity(context, cfg.clients)
    local = site_config(cfg, context, pid)
    initial = site.initial_adapter(local, num_labels=len(list(config["label-names"])))
    return encoded_exchange(
        msg,
        context,
        call_next,
        expected={k: v.shape for k, v in without_keys(initial, unbroadcast_components(config)).items()},
        codec=str(context.node_config.get("codec") or cfg.codec),
        residual_file=residual_path(site.state_dir(context.node_config), key, cfg.run_id),
    )


def encoded_exchange(
    msg: Message,
    context: Any,
    call_next: Any,
    *,
    expected: Mapping[str, tuple[int, ...]],
    codec: str,
    residual_file: Path,
) -> Message:
    """:func:`codec_mod` once the site knows its tensors (``expected``: name → shape of what the
    broadcast must hold), its codec spec and where its error-feedback residual lives."""
    broadcast, _ = decode_payload(msg.content, expected)  # a PayloadError becomes the reply's error
    del msg.content[CODEC]
    msg.content[ARRAYS] = to_array_record(broadcast)

    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    trained = from_array_record(reply.content[ARRAYS])
    if trained and set(trained) != set(broadcast):
        raise FedPeftError("the trained adapter holds other tensors than the broadcast")
    held = held_components(msg.content[CONFIG])
    sent = without_keys(broadcast, held)  # a held factor is not sent back: the server has it
    if trained and any(not np.array_equal(trained[k], broadcast[k]) for k in broadcast if k not in sent):
        raise FedPeftError(f"the site trained a factor the strategy holds this round ({', '.join(held)})")
    update = {k: trained[k] - broadcast[k] for k in sent} if trained else {}  # empty: a refused round
    chosen = parse_codec(codec)
    carry = bool(update) and not chosen.lossless
    residual = None
    if carry:
        try:
            residual = load_residual(residual_file)
        except ValueError as err:  # costs accuracy, not privacy: restart the feedback from zero
            logger.warning("%s; starting error feedback from zero", err)
    parts, left, metrics = compress(chosen, update, residual)
    if carry:  # a held factor's residual waits for the round that sends it
        kept = {k: v for k, v in (residual or {}).items() if key_matches(k, held)}
        save_residual(residual_file, {**kept, **left})
    records = payload_records(chosen, parts, {k: v.shape for k, v in update.items()})
    reply.content[ARRAYS], reply.content[CODEC] = records[ARRAYS], records[CODEC]
    if update:
        reply.content[METRICS] = MetricRecord({**reply.content[METRICS], **metrics})
    return reply
