"""Checks on a decoded update before it may reach the aggregate: size, norm, and norm against the round.

Pure functions over arrays (the Flower strategy routes replies to them). Keys, shapes, dtypes and
finiteness are checked earlier, by the wire decoder (:func:`fedpeft.wire.decode_payload`): a payload
that does not decode to exactly the tensors the site was sent never gets here.

1. **size**: a reply larger than ``reply_bound`` (twice the update's raw fp32 bytes plus 1 MiB for the
   codec header, metrics and privacy record) is refused before anything is decoded;
2. **absolute norm**: ‖Δ‖₂ over all tensors above ``max_norm`` (when > 0);
3. **relative norm**: ‖Δ‖₂ above ``ratio`` × the median norm of the round's other candidates (when
   ``ratio`` > 0 and at least 3 updates: with two, a median cannot tell which one is odd).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

REPLY_SLACK = 1 << 20  # bytes beyond 2× the raw update: codec header, metrics, privacy record
MIN_FOR_MEDIAN = 3


@dataclass(frozen=True)
class ReplyLimits:
    """Bounds a decoded update must meet.

    Parameters
    ----------
    max_norm : float
        Largest accepted L2 norm of an update (all its tensors together); 0: no bound.
    ratio : float
        Largest accepted multiple of the round's median update norm; 0: no bound.
    """

    max_norm: float = 0.0
    ratio: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_norm", "ratio"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be 0 (off) or > 1, got {self.ratio}")


def reply_bound(raw_update_bytes: int) -> int:
    """The largest reply accepted for an update of ``raw_update_bytes`` raw fp32 bytes."""
    return 2 * int(raw_update_bytes) + REPLY_SLACK


def update_norm(update: Mapping[str, np.ndarray]) -> float:
    """‖Δ‖₂ over every tensor of an update, accumulated in float64."""
    return float(np.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in update.values())))


def norm_rejection(norm: float, limits: ReplyLimits) -> str | None:
    """Why an update of this norm is refused outright, or None."""
    if limits.max_norm > 0 and norm > limits.max_norm:
        return f"update norm {norm:.4g} exceeds the bound {limits.max_norm:g}"
    return None


def relative_outliers(norms: Mapping[str, float], limits: ReplyLimits) -> dict[str, str]:
    """Site → reason, for every update whose norm exceeds ``ratio`` × the median of the others'.

    Each site is compared with the median of the *other* sites' norms, so one huge update cannot
    raise the bar it is measured against.
    """
    if limits.ratio <= 0 or len(norms) < MIN_FOR_MEDIAN:
        return {}
    out = {}
    for site, norm in norms.items():
        median = float(np.median([n for s, n in norms.items() if s != site]))
        if median > 0 and norm > limits.ratio * median:
            out[site] = (
                f"update norm {norm:.4g} is {norm / median:.1f}x the round's median {median:.4g} "
                f"(max {limits.ratio:g}x)"
            )
    return out
