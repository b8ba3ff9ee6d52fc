"""Norm bounding: scale every client's update down to an L2 norm of at most M before aggregation.

Sun, Kairouz, Suresh & McMahan, "Can You Really Backdoor Federated Learning?" (arXiv 1911.07963):
bounding the norm of each update limits what one client can move the global model, which defeats
boosted (scaled-up) model-replacement attacks at little cost in accuracy. Steps, per decoded update
Δ = x_k − x_broadcast: ‖Δ‖ over every tensor; if ‖Δ‖ > M, Δ ← Δ · M/‖Δ‖. Unlike rejection
(``max_update_norm``), a large update still counts, only its size is capped.

Central DP clips with the same function (to its clipping norm C, :mod:`privacy.central`).
"""

from __future__ import annotations

import numpy as np

from strategies.validation import update_norm


def clip_to_norm(update: dict[str, np.ndarray], *, max_norm: float) -> tuple[dict[str, np.ndarray], bool]:
    """``update`` scaled to L2 norm at most ``max_norm`` (over all tensors), and whether it had to be
    (when not, ``update`` itself comes back).

    Excess at float rounding level (1e-6 relative: a site's own clip computed in float32) is left alone.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm = update_norm(update)
    if norm <= max_norm * (1 + 1e-6):
        return update, False
    scale = np.float32(max_norm / norm)
    return {k: (np.asarray(v, dtype=np.float32) * scale).astype(np.float32) for k, v in update.items()}, True
