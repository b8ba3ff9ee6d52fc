"""The codec mod: the site's side of the encoded exchange, around the train handler.

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

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, MetricRecord

from client.exchange import received_broadcast, trained_update
from client.secure import secure_exchange
from client.sites import site_for
from fedpeft.adapters.lora.dynamic import split_active
from fedpeft.adapters.state import key_matches, without_keys
from fedpeft.codecs import compress, parse_codec
from fedpeft.codecs.shared import round_seed, with_seed
from fedpeft.downlink import broadcast_path
from fedpeft.feedback_state import load_residual, residual_path, save_residual
from fedpeft.protocol import train_request
from fedpeft.wire import (
    ARRAYS,
    CODEC,
    CONTROL,
    METRICS,
    from_array_record,
    pack_control,
    payload_records,
)

logger = logging.getLogger(__name__)


def codec_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Decode the broadcast, run the handler, send back the encoded update (see the module doc)."""
    request = train_request(msg.content)
    cfg = request.settings
    site, _ = site_for(cfg, context, list(request.label_names))
    initial = without_keys(site.model.initial, request.frozen)
    expected = {k: v.shape for k, v in initial.items()}
    # None: error feedback off (error_feedback=false, for comparison): what the codec does not send is dropped
    residual_file = residual_path(site.state_dir, site.key, cfg.run_id) if cfg.error_feedback else None
    broadcast = received_broadcast(msg.content, expected, base=request.downlink_base, digest=request.downlink_digest,
                                   store=broadcast_path(site.state_dir, site.key, cfg.run_id), initial=initial,
                                   links=request.downlink_chain)
    if request.secagg is not None:  # secure aggregation: the update waits at the site for the masked stage
        return secure_exchange(msg, context, call_next, expected=expected, held=request.held, secagg=request.secagg,
                               codec=with_seed(cfg.codec, round_seed(cfg.seed, request.server_round)),
                               residual_file=residual_file, broadcast=broadcast)
    return encoded_exchange(
        msg,
        context,
        call_next,
        expected=expected,
        codec=with_seed(str(context.node_config.get("codec") or cfg.codec), round_seed(cfg.seed, request.server_round)),
        residual_file=residual_file,
        held=request.held,
        active_rank=request.active_rank,
        broadcast=broadcast,
    )


def encoded_exchange(
    msg: Message,
    context: Any,
    call_next: Any,
    *,
    expected: Mapping[str, tuple[int, ...]],
    codec: str,
    residual_file: Path | None,
    held: tuple[str, ...] = (),
    active_rank: int | None = None,
    broadcast: dict[str, np.ndarray] | None = None,
) -> Message:
    """:func:`codec_mod` once the site knows its tensors (``expected``: name → shape of what the
    broadcast must hold), its codec spec, where its error-feedback residual lives (None: no error
    feedback), the tensors the rule holds this round (``held``: broadcast, not trained, not sent back)
    and the round's LoRA rank under DP-DyLoRA (``active_rank``: the residual of components above it
    waits for a round that trains them, since the coordinator drops anything sent there); ``broadcast``:
    the received broadcast when the caller has decoded it (:func:`client.exchange.received_broadcast`)."""
    reply, _, update = trained_update(msg, context, call_next, expected=expected, held=held, broadcast=broadcast)
    if update is None:
        return reply
    chosen = parse_codec(codec)
    carry = bool(update) and not chosen.lossless and residual_file is not None
    residual = None
    if carry:
        try:
            residual = load_residual(residual_file)
        except ValueError as err:  # costs accuracy, not privacy: restart the feedback from zero
            logger.warning("%s; starting error feedback from zero", err)
    stored, waiting = residual, {}
    if residual is not None and active_rank is not None:
        residual, waiting = split_active(residual, active_rank)
    parts, left, metrics = compress(chosen, update, residual)
    if carry:  # a held factor's residual waits for the round that sends it, and so do inactive components'
        kept = {k: v for k, v in (stored or {}).items() if key_matches(k, held)}
        left = {k: v + waiting[k] if k in waiting else v for k, v in left.items()}
        save_residual(residual_file, {**kept, **left})
    records = payload_records(chosen, parts, {k: v.shape for k, v in update.items()})
    reply.content[ARRAYS], reply.content[CODEC] = records[ARRAYS], records[CODEC]
    if CONTROL in reply.content and not chosen.lossless:  # SCAFFOLD's variate at int8 beside a compressed update
        for name, record in pack_control(from_array_record(reply.content[CONTROL]), quantize=True).items():
            reply.content[name] = record
    if update:
        reply.content[METRICS] = MetricRecord({**reply.content[METRICS], **metrics})
    return reply
