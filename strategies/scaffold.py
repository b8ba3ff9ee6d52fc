"""SCAFFOLD's coordinator side (Karimireddy et al., ICML 2020, arXiv 1910.06378, Algorithm 1, line 17):
c ← c + (1/N)·Σ_{i∈S} Δc_i, and the check each site's Δc_i must pass first. The sites' side, and the
choice of c_i⁺, are in :mod:`fedpeft.drift.scaffold`. Pure numpy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def control_rejection(change: Mapping[str, Any] | None, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why a site's change of its control variate cannot be used (None: it can): it must be present, name
    only tensors the site trains this round, with their shapes, and be finite."""
    if change is None:
        return "reply lacks its SCAFFOLD control-variate change"
    extra = sorted(set(change) - set(shapes))
    if extra:
        return f"control-variate change names tensors the site does not train: {extra[:3]}"
    for key, value in change.items():
        value = np.asarray(value)
        if value.shape != tuple(shapes[key]):
            return f"control-variate change of {key} has shape {value.shape}, expected {tuple(shapes[key])}"
        if not np.isfinite(value).all():
            return f"control-variate change of {key} is not finite"
    return None


def server_variate(control: Mapping[str, np.ndarray], deltas: Sequence[Mapping[str, np.ndarray]], *,
                   population: int) -> dict[str, np.ndarray]:
    """c ← c + (1/N)·Σ_i Δc_i over the sites that replied (a name missing from c starts at zero)."""
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    out = {k: np.asarray(v, dtype=np.float64) for k, v in control.items()}
    for delta in deltas:
        for name, value in delta.items():
            out[name] = out.get(name, 0.0) + np.asarray(value, dtype=np.float64) / population
    return {k: np.asarray(v, dtype=np.float32) for k, v in sorted(out.items())}
