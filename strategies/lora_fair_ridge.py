"""LoRA-FAIR's λ → 0 arm as a closed form: ridge correction of B (after Bian et al., ICCV 2025, arXiv 2411.14961).

This is *not* the paper's method (that is ``lora-fair``, :mod:`strategies.lora_fair`): it replaces the
cosine similarity with the squared Frobenius distance, which gives a closed form, and with the relative λ
below it sits at the paper's λ → 0 ablation (the pure best fit of ΔW in Ā's row space), which the paper
reports *below* FedIT (DomainNet, ViT). Kept as ``lora-fair-ridge`` for comparison.

Steps for one LoRA layer, with client factors (A_k, B_k) and weights p_k:

1. Ā = Σ_k p_k A_k, B̄ = Σ_k p_k B_k (as FedIT).
2. G = ĀĀᵀ (r × r); M = Σ_k p_k B_k (A_k Āᵀ) = ΔW Āᵀ, built from r_k × r products only.
3. ΔB = argmin ‖ΔW − (B̄ + ΔB)Ā‖²_F + λ_eff‖ΔB‖²_F = (M − B̄G)(G + λ_eff I)⁻¹,
   with λ_eff = λ · tr(G) / r (λ relative to Ā's mean squared singular value).
4. Broadcast (Ā, B̄ + ΔB): the aggregate *and* every client's starting point next round.

Relation to the paper: the paper measures the mismatch between ΔW and (B̄ + ΔB)Ā with a similarity
function S (cosine similarity in its experiments) plus a penalty λ‖ΔB‖, and solves for ΔB
iteratively on the server (``lora-fair``). With the squared Frobenius distance instead the problem is a
ridge regression with the closed form above,
and the relative λ keeps one value meaningful across models and rounds. λ → 0 gives the
least-squares correction (the best B for the fixed Ā); λ → ∞ gives ΔB → 0, i.e. FedIT.

What it cannot fix: ΔB only acts through Ā's row space, so the part of ΔW outside it — clients move
their A_k too — stays. ``lora-fair-ab`` corrects A as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies import AGGREGATORS
from strategies.aggregator import AggregationOptions, Aggregator, weighted_sum
from strategies.residual import LayerGrams


def ridge_right(Y: np.ndarray, G: np.ndarray, lam: float) -> np.ndarray:
    """X = Y (G + lam I)⁻¹ for a symmetric PSD r×r ``G`` (pseudo-inverse when singular)."""
    system = G.astype(np.float64) + lam * np.eye(G.shape[0])
    return (Y.astype(np.float64) @ np.linalg.pinv(system, hermitian=True)).astype(Y.dtype)


def relative_lambda(lam: float, A: np.ndarray) -> float:
    """λ_eff = λ · tr(AAᵀ) / r."""
    return float(lam * np.vdot(A, A) / A.shape[0])


def lora_fair_ridge_pair(
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    p: np.ndarray,
    *,
    prev_A: np.ndarray,
    prev_B: np.ndarray,
    options: AggregationOptions,
    grams: LayerGrams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(Ā, B̄ + ΔB)`` with the closed-form ridge correction ΔB."""
    A_bar, B_bar = weighted_sum(As, p), weighted_sum(Bs, p)
    A_s, B_s = (grams or LayerGrams(As, Bs, p)).stacked
    G = A_bar @ A_bar.T
    M = B_s @ (A_s @ A_bar.T)
    delta_B = ridge_right(M - B_bar @ G, G, relative_lambda(options.lam, A_bar))
    return A_bar, B_bar + delta_B


AGGREGATORS.register("lora-fair-ridge")(
    Aggregator(
        name="lora-fair-ridge",
        pair=lora_fair_ridge_pair,
        summary="FedIT + closed-form ridge correction of B (LoRA-FAIR's lambda -> 0 arm)",
    )
)
