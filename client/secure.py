"""The site's stages of secure aggregation (the protocol itself: :mod:`privacy.secagg`).

1. **Train** (:func:`secure_exchange`, in place of the codec exchange when the request has ``secagg``):
   the site trains as usual, clips its update to the run's L2 bound, turns it into fixed point times its
   weight (its number of examples, which travels only inside the masked sum) with the weight appended,
   draws its key pairs for the round and replies with the public keys. The vector waits at the site.
2. **Shares** (:func:`shares`): the roster in; the encrypted shares for every other site out.
3. **Masked input** (:func:`masked`): the shares meant for this site and who shared in; the masked
   vector out, in the round's ring ℤ/2^k (the request's ``ring``: the fewest bits that hold the cohort's
   sum, each site's weight clamped to the request's ``cap``) at ⌈k/8⌉ bytes an element.
4. **Unmasking** (:func:`unmask`): who survived and who dropped in; the shares asked for out. The round's
   secrets are then deleted.

Between stages the round's secrets live in the node's :class:`flwr.app.Context` state, which Flower
keeps in the memory of the site's own processes (the simulation's, or the SuperNode's and its site
worker's); nothing is written to disk.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.exchange import trained_update
from fedpeft.codecs import parse_codec
from fedpeft.codecs.shared import secure_positions
from fedpeft.errors import FedPeftError
from fedpeft.feedback_state import load_residual, save_residual
from fedpeft.protocol import (
    MASKED,
    METRICS,
    NUM_EXAMPLES,
    SECAGG_KEYS,
    SECAGG_STAGE,
)
from privacy.secagg import fixed_point
from privacy.secagg.protocol import Advert, SiteSecrets, advertise, mask, receive_shares, reveal, share
from strategies.norm_bound import clip_to_norm

logger = logging.getLogger(__name__)

RING = 64  # the ring of the masked sum when the coordinator names none: room for any cohort's weighted sum
STATE = "secagg-state"  # the node context's ConfigRecord of the round's secrets
VECTOR = "secagg-vector"  # the node context's ArrayRecord of the round's unmasked vector


def flatten(update: dict[str, np.ndarray]) -> np.ndarray:
    """The update's tensors in sorted-name order, as one float64 vector (the coordinator cuts it the same way)."""
    return np.concatenate([np.asarray(update[k], np.float64).ravel() for k in sorted(update)]) if update \
        else np.zeros(0, np.float64)


def secure_exchange(msg: Message, context: Context, call_next: Any, *, expected: dict[str, tuple[int, ...]],
                    held: tuple[str, ...], secagg: dict[str, Any], codec: str = "none",
                    residual_file: Path | None = None, broadcast: dict[str, np.ndarray] | None = None) -> Message:
    """Stage 1 at the site: train, keep the masked sum's input, reply with this round's public keys.

    With the ``shared`` codec (``codec``, the round's seed written in) only the round's shared positions
    enter the masked sum, and the rest of update + residual waits in the error-feedback residual
    (``residual_file``); what is summed is still clipped to the run's bound."""
    reply, sent, update = trained_update(msg, context, call_next, expected=expected, held=held, broadcast=broadcast)
    if update is None:
        return reply
    metrics = dict(reply.content[METRICS])
    examples = int(metrics.pop(NUM_EXAMPLES))  # inside the masked sum only
    weight = min(examples, 1) if secagg.get("uniform") else examples  # central DP: every site that trained weighs 1
    ring, cap = int(secagg.get("ring", RING)), int(secagg.get("cap", 0))
    if cap > 0 and weight > cap:  # the ring holds the cohort's sum only if no site weighs more than the cap
        logger.warning("secure aggregation: this site's weight %d is above the round's cap %d (its examples at the "
                       "start of the run); it counts as %d", weight, cap, cap)
        weight = cap
    update = update or {k: np.zeros_like(v) for k, v in sent.items()}  # a refused round adds nothing, weight 0
    clip, bits = float(secagg["clip"]), int(secagg["bits"])
    chosen = parse_codec(codec)
    positions = secure_positions(chosen, {k: v.shape for k, v in update.items()})
    target, residual = update, None
    if positions is not None and residual_file is not None:  # the shared codec: what it does not send waits
        residual = load_residual(residual_file) or {}
        target = {k: v + residual[k] if residual.get(k) is not None and residual[k].shape == v.shape else v
                  for k, v in update.items()}
    picked = target if positions is None else {k: v.reshape(-1)[positions[k]] for k, v in target.items()}
    size = sum(int(v.size) for v in picked.values())
    # clipped to C less the most rounding can add, so that the fixed-point vector's norm stays within C
    # (central DP's sensitivity holds for what is summed, not only for what was trained)
    room = clip - fixed_point.step(clip, bits) / 2 * np.sqrt(size)
    if room <= 0:
        raise FedPeftError(f"secure aggregation: {bits} bits are too few for {size} values within norm {clip:g}")
    flat = flatten(clip_to_norm(picked, max_norm=room)[0])
    vector = np.concatenate([fixed_point.encode(flat, clip=clip, bits=bits, weight=weight, ring=ring),
                             np.array([weight], np.uint64)])
    if positions is not None and residual_file is not None and weight > 0:  # residual = target − what is summed
        summed = fixed_point.decode(fixed_point.encode(flat, clip=clip, bits=bits, weight=1, ring=ring), clip=clip,
                                    bits=bits, ring=ring)  # this site's own values as the sum will hold them
        left, at = {}, 0
        for key in sorted(target):
            value = np.array(target[key], dtype=np.float32).reshape(-1)
            value[positions[key]] -= summed[at:at + positions[key].size].astype(np.float32)
            at += positions[key].size
            left[key] = value.reshape(target[key].shape)
        save_residual(residual_file, left)
    secrets, advert = advertise(round_tag=str(secagg["tag"]).encode(), me=int(secagg["number"]))
    _save(context, secrets)
    context.state[VECTOR] = ArrayRecord({"vector": _array(vector), "ring": _array(np.array([ring]))})
    content = RecordDict({METRICS: MetricRecord(metrics),
                          SECAGG_KEYS: ConfigRecord({"c": advert.c_public.hex(), "s": advert.s_public.hex()})})
    for name, record in reply.content.config_records.items():  # the privacy record (local DP's ledger entry)
        content[name] = record
    return Message(content, reply_to=msg)


def shares(msg: Message, context: Context) -> Message:
    """Stage 2 at the site."""
    request, secrets = _stage(msg, context)
    roster = {int(v): Advert(bytes.fromhex(c), bytes.fromhex(s)) for v, (c, s) in request["roster"].items()}
    out, commitment = share(secrets, roster, threshold=int(request["threshold"]))
    _save(context, secrets)
    return _reply(msg, {"shares": {str(v): blob.hex() for v, blob in out.items()}, "commitment": commitment.hex()})


def masked(msg: Message, context: Context) -> Message:
    """Stage 3 at the site."""
    request, secrets = _stage(msg, context)
    receive_shares(secrets, {int(u): bytes.fromhex(blob) for u, blob in request["shares"].items()})
    _save(context, secrets)
    vector, ring = context.state[VECTOR]["vector"].numpy(), int(context.state[VECTOR]["ring"].numpy()[0])
    out = mask(secrets, vector, ring=ring, shared_with=[int(v) for v in request["shared"]])
    packed = fixed_point.pack(out, ring)  # ⌈ring/8⌉ bytes an element, not 8
    return Message(RecordDict({MASKED: ArrayRecord({"vector": Array(packed)})}), reply_to=msg)


def unmask(msg: Message, context: Context) -> Message:
    """Stage 4 at the site; the round's secrets go with it."""
    request, secrets = _stage(msg, context)
    answer = reveal(secrets, survivors=[int(v) for v in request["survivors"]],
                    dropped=[int(v) for v in request["dropped"]])
    for name in (STATE, VECTOR):
        if name in context.state:
            del context.state[name]
    return _reply(msg, {"revealed": {str(v): [kind, part.hex()] for v, (kind, part) in answer.items()}})


# --- the round's secrets in the node's context -----------------------------------------------------------

def _array(values: np.ndarray) -> Array:
    return Array(np.ascontiguousarray(values, dtype=np.uint64))


def _save(context: Context, secrets: SiteSecrets) -> None:
    context.state[STATE] = ConfigRecord({"json": json.dumps({
        "tag": secrets.round_tag.hex(), "me": secrets.me, "c": secrets.c_private.hex(), "s": secrets.s_private.hex(),
        "seed": secrets.self_seed.hex(), "threshold": secrets.threshold,
        "roster": {str(v): [a.c_public.hex(), a.s_public.hex()] for v, a in secrets.roster.items()},
        "received": {str(v): [b.hex(), s.hex()] for v, (b, s) in secrets.received.items()},
    })})


def _load(context: Context) -> SiteSecrets:
    if STATE not in context.state:
        raise FedPeftError("a secure-aggregation stage for a round this site holds no secrets of (it restarted, or "
                           "the stage came out of order)")
    raw = json.loads(str(context.state[STATE]["json"]))
    return SiteSecrets(
        round_tag=bytes.fromhex(raw["tag"]), me=int(raw["me"]), c_private=bytes.fromhex(raw["c"]),
        s_private=bytes.fromhex(raw["s"]), self_seed=bytes.fromhex(raw["seed"]), threshold=int(raw["threshold"]),
        roster={int(v): Advert(bytes.fromhex(c), bytes.fromhex(s)) for v, (c, s) in raw["roster"].items()},
        received={int(v): (bytes.fromhex(b), bytes.fromhex(s)) for v, (b, s) in raw["received"].items()},
    )


def _stage(msg: Message, context: Context) -> tuple[dict[str, Any], SiteSecrets]:
    request = json.loads(str(msg.content[SECAGG_STAGE]["json"]))
    secrets = _load(context)
    if str(request.get("tag", "")).encode() != secrets.round_tag:
        raise FedPeftError("a secure-aggregation stage of another round than the one this site holds secrets of")
    return request, secrets


def _reply(msg: Message, body: dict[str, Any]) -> Message:
    return Message(RecordDict({SECAGG_STAGE: ConfigRecord({"json": json.dumps(body)})}), reply_to=msg)
