"""Two-sided LoRA-FAIR: correct both factors by alternating ridge steps (fedpeft's variant).

LoRA-FAIR (arXiv 2411.14961) corrects B only, so the bias outside Ā's row space stays. Here, for one
LoRA layer with ΔW = Σ_k p_k B_k A_k and λ_eff = λ · tr(ĀĀᵀ) / r:

    minimise f(A, B) = ‖ΔW − BA‖²_F + λ_eff (‖B − B̄‖²_F + ‖A − Ā‖²_F)

by block-coordinate descent from (Ā, B̄), each block solved exactly (r × r systems only):

1. B ← (ΔW Aᵀ + λ_eff B̄)(AAᵀ + λ_eff I)⁻¹     (the first B-step is exactly LoRA-FAIR's ΔB)
2. A ← (BᵀB + λ_eff I)⁻¹ (BᵀΔW + λ_eff Ā)
3. repeat ``ab_iterations`` times.

ΔW Aᵀ = B_s (A_s Aᵀ) and BᵀΔW = (BᵀB_s) A_s use the stacked factors, never a dense ΔW. Each step can
only lower f, so f ends at or below LoRA-FAIR's objective for the same λ. As λ → 0 this is
alternating least squares for the best rank-r approximation (→ ``exact-svd``); as λ grows the result
stays at the averages (Ā, B̄), LoRA-FAIR's "Avg-Initial" starting point.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies import AGGREGATORS
from strategies.aggregator import AggregationOptions, Aggregator, weighted_sum
from strategies.lora_fair_ridge import relative_lambda, ridge_right
from strategies.residual import LayerGrams, squared_residual


def lora_fair_ab_pair(
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    p: np.ndarray,
    *,
    prev_A: np.ndarray,
    prev_B: np.ndarray,
    options: AggregationOptions,
    grams: LayerGrams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(Ā + ΔA, B̄ + ΔB)`` after ``options.ab_iterations`` alternating ridge sweeps."""
    A_bar, B_bar = weighted_sum(As, p), weighted_sum(Bs, p)
    A_s, B_s = (grams or LayerGrams(As, Bs, p)).stacked
    lam = relative_lambda(options.lam, A_bar)
    A, B = A_bar, B_bar
    for _ in range(options.ab_iterations):
        B = ridge_right(B_s @ (A_s @ A.T) + lam * B_bar, A @ A.T, lam)
        A = ridge_right(((B.T @ B_s) @ A_s).T + lam * A_bar.T, B.T @ B, lam).T
    return A, B


def fair_ab_objective(
    As: Sequence[np.ndarray], Bs: Sequence[np.ndarray], p: np.ndarray, A: np.ndarray, B: np.ndarray, lam: float
) -> float:
    """f(A, B) above, from Gram traces (used by tests and the benchmark)."""
    A_bar, B_bar = weighted_sum(As, p), weighted_sum(Bs, p)
    lam_eff = relative_lambda(lam, A_bar)
    return squared_residual(As, Bs, p, A, B) + lam_eff * (
        float(np.vdot(B - B_bar, B - B_bar)) + float(np.vdot(A - A_bar, A - A_bar))
    )


AGGREGATORS.register("lora-fair-ab")(
    Aggregator(
        name="lora-fair-ab",
        pair=lora_fair_ab_pair,
        summary="alternating ridge correction of A and B (two-sided LoRA-FAIR)",
    )
)
