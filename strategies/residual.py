"""Aggregation bias of one LoRA layer, from Gram traces (never a dense d×n matrix).

With the clients' factors stacked as B_s = [p_1 B_1, …, p_K B_K] (d × R) and
A_s = [A_1; …; A_K] (R × n), the ideal update is ΔW = Σ_k p_k B_k A_k = B_s A_s, and for the new
global factors (B', A'):

    ‖ΔW‖²        = ⟨B_sᵀB_s, A_sA_sᵀ⟩
    ⟨ΔW, B'A'⟩   = ⟨B_sᵀB', A_sA'ᵀ⟩
    ‖B'A'‖²      = ⟨B'ᵀB', A'A'ᵀ⟩
    ‖ΔW − B'A'‖² = ‖ΔW‖² − 2⟨ΔW, B'A'⟩ + ‖B'A'‖²

(⟨X, Y⟩ = Σ_ij X_ij Y_ij), and cos(ΔW, B'A') = ⟨ΔW, B'A'⟩ / (‖ΔW‖ ‖B'A'‖). The size of the server's
correction of B relative to FedIT's B̄ = Σ_k p_k B_k = B_s E (E stacks each client's r_k × r identity
block) comes from the same products: ‖B' − B̄‖² = ‖B'‖² − 2⟨B_sᵀB', E⟩ + ⟨B_sᵀB_s, EEᵀ⟩.

The cost is O((d + n) R²); memory O(R²). :class:`LayerGrams` forms the stacks and ‖ΔW‖² once per layer:
the aggregation driver hands the same instance to the rule and to :func:`layer_geometry`, so a rule that
needs ‖ΔW‖ (``lora-fair``) does not pay for the products twice. Computed in the inputs' precision, so with
float32 factors the relative residual has a floor of about 1e-3 (cancellation in the difference of squares).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np


def stack(As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(A_s, B_s)``: rows of every A_k stacked, columns p_k B_k side by side (so ΔW = B_s A_s)."""
    dtype = np.result_type(*As, *Bs, np.float32)
    A_s = np.concatenate([np.asarray(a, dtype=dtype) for a in As], axis=0)
    B_s = np.concatenate([np.asarray(b, dtype=dtype) * dtype.type(w) for b, w in zip(Bs, p, strict=True)], axis=1)
    return A_s, B_s


class LayerGrams:
    """One layer's stacked factors and the R × R products behind ‖ΔW‖², each formed on first use.

    The driver makes one per layer and passes it to the rule (``grams=``) and to :func:`layer_geometry`,
    so the O((d + n) R²) products are paid at most once per layer, whoever reads them first."""

    def __init__(self, As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], p: np.ndarray) -> None:
        self.As, self.Bs, self.p = list(As), list(Bs), p

    @cached_property
    def stacked(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A_s, B_s)`` of :func:`stack`."""
        return stack(self.As, self.Bs, self.p)

    @cached_property
    def B_gram(self) -> np.ndarray:
        """B_sᵀB_s (R × R)."""
        B_s = self.stacked[1]
        return B_s.T @ B_s

    @cached_property
    def dw_sq(self) -> float:
        """‖ΔW‖²_F = ⟨B_sᵀB_s, A_sA_sᵀ⟩."""
        A_s = self.stacked[0]
        return float(np.vdot(self.B_gram, A_s @ A_s.T))


def residual_traces(
    As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], p: np.ndarray, new_A: np.ndarray, new_B: np.ndarray
) -> tuple[float, float, float]:
    """``(‖ΔW‖², ⟨ΔW, B'A'⟩, ‖B'A'‖²)`` for one layer."""
    A_s, B_s = stack(As, Bs, p)
    new_A, new_B = new_A.astype(A_s.dtype, copy=False), new_B.astype(B_s.dtype, copy=False)
    ideal = float(np.vdot(B_s.T @ B_s, A_s @ A_s.T))
    cross = float(np.vdot(B_s.T @ new_B, A_s @ new_A.T))
    ours = float(np.vdot(new_B.T @ new_B, new_A @ new_A.T))
    return ideal, cross, ours


def layer_geometry(
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    p: np.ndarray,
    new_A: np.ndarray,
    new_B: np.ndarray,
    grams: LayerGrams | None = None,
) -> dict[str, float]:
    """``residual`` (relative, as :func:`relative_residual`), ``cosine`` (cos(ΔW, B'A'); 1 when both are
    zero, 0 when only one is) and ``correction`` (‖B' − B̄‖_F / ‖B̄‖_F; 0 when both are zero) of one layer.
    ``grams``: the layer's :class:`LayerGrams` when the rule already formed them (of the same As, Bs, p)."""
    grams = LayerGrams(As, Bs, p) if grams is None else grams
    A_s, B_s = grams.stacked
    new_A, new_B = new_A.astype(A_s.dtype, copy=False), new_B.astype(B_s.dtype, copy=False)
    BsBs, BsB = grams.B_gram, B_s.T @ new_B
    ideal = grams.dw_sq
    cross = float(np.vdot(BsB, A_s @ new_A.T))
    ours = float(np.vdot(new_B.T @ new_B, new_A @ new_A.T))
    E = np.concatenate([np.eye(np.shape(b)[1], new_B.shape[1], dtype=B_s.dtype) for b in Bs], axis=0)  # R × r
    bar2 = float(np.vdot(E.T @ BsBs, E.T))
    shift2 = max(float(np.vdot(new_B, new_B)) - 2.0 * float(np.vdot(BsB, E)) + bar2, 0.0)
    if ideal <= 0.0:
        residual, cosine = (0.0, 1.0) if ours <= 0.0 else (1.0, 0.0)
    else:
        residual = float(np.sqrt(max(ideal - 2.0 * cross + ours, 0.0) / ideal))
        cosine = float(np.clip(cross / np.sqrt(ideal * ours), -1.0, 1.0)) if ours > 0.0 else 0.0
    correction = float(np.sqrt(shift2 / bar2)) if bar2 > 0.0 else (0.0 if shift2 <= 0.0 else 1.0)
    return {"residual": residual, "cosine": cosine, "correction": correction}


def squared_residual(
    As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], p: np.ndarray, new_A: np.ndarray, new_B: np.ndarray
) -> float:
    """‖ΔW − B'A'‖²_F for one layer."""
    ideal, cross, ours = residual_traces(As, Bs, p, new_A, new_B)
    return max(ideal - 2.0 * cross + ours, 0.0)


def relative_residual(
    As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], p: np.ndarray, new_A: np.ndarray, new_B: np.ndarray
) -> float:
    """‖ΔW − B'A'‖_F / ‖ΔW‖_F for one layer (0 when both ΔW and B'A' are zero, 1 when only ΔW is)."""
    ideal, cross, ours = residual_traces(As, Bs, p, new_A, new_B)
    if ideal <= 0.0:
        return 0.0 if ours <= 0.0 else 1.0
    return float(np.sqrt(max(ideal - 2.0 * cross + ours, 0.0) / ideal))
