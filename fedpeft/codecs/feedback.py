"""Error feedback: what a lossy codec did not send is added to the next update.

Stich, Cordonnier, Jaggi, "Sparsified SGD with memory" (NeurIPS 2018); Karimireddy, Rebjock, Stich,
Jaggi, "Error feedback fixes SignSGD and other gradient compression schemes" (ICML 2019). Per round,
for every tensor:

1. target = update + residual (the residual starts at 0);
2. send encode(target); the receiver will see sent = decode(encode(target));
3. residual ← target − sent.

So Σ sent over rounds = Σ update − residual: the sum of what arrived tracks the sum of the true
updates, off by one residual at any time instead of by the sum of every round's error. Pure maths:
the caller keeps the residual (a site persists it between rounds).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedpeft.codecs.chain import Codec


def compress(
    codec: Codec, update: Mapping[str, np.ndarray], residual: Mapping[str, np.ndarray] | None = None
) -> tuple[dict[str, list[np.ndarray]], dict[str, np.ndarray], dict[str, float]]:
    """Encode ``update`` (+ the carried ``residual``) tensor by tensor.

    Returns ``(parts by tensor, new residual, metrics)``. A residual entry whose tensor is absent or
    has another shape (the site's rank changed) is dropped. The new residual is empty for a lossless
    codec. Metrics: ``codec-error``, ‖target − sent‖ / ‖target‖ over all tensors, and
    ``codec-residual-carried``, ‖residual in‖ / ‖update‖.
    """
    residual = residual or {}
    parts: dict[str, list[np.ndarray]] = {}
    new_residual: dict[str, np.ndarray] = {}
    err2 = target2 = carried2 = update2 = 0.0
    for key, value in update.items():
        value = np.asarray(value, dtype=np.float32)
        carried = residual.get(key)
        target = value + carried if carried is not None and carried.shape == value.shape else value
        own = codec.for_tensor(key)  # a head goes whole
        parts[key] = own.encode(target)
        if not own.lossless:
            left = target - own.decode(parts[key], value.shape)
            new_residual[key] = left.astype(np.float32)
            err2 += float(np.sum(left.astype(np.float64) ** 2))
        target2 += float(np.sum(target.astype(np.float64) ** 2))
        update2 += float(np.sum(value.astype(np.float64) ** 2))
        if target is not value:
            carried2 += float(np.sum(np.asarray(carried, dtype=np.float64) ** 2))
    metrics = {
        "codec-error": (err2 / target2) ** 0.5 if target2 > 0 else 0.0,
        "codec-residual-carried": (carried2 / update2) ** 0.5 if update2 > 0 else 0.0,
    }
    return parts, new_residual, metrics
