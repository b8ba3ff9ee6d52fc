"""Exact low-rank aggregation: the best rank-r factorisation of ΔW (FlexLoRA, Bai et al., NeurIPS 2024,
arXiv 2402.11505; HLoRA), for clients of equal or different ranks.

Steps for one LoRA layer (ΔW = Σ_k p_k B_k A_k = B_s A_s with the stacked factors of
:func:`strategies.residual.stack`, R = Σ_k r_k):

1. R ≤ ``exact_max_stack``: thin QR of B_s (d × R) and of A_sᵀ (n × R), SVD of the R × R core
   R_B R_Aᵀ. Exact: ΔW = (Q_B U) S (Q_A V)ᵀ.
   R larger (many clients): a randomized range finder (Halko, Martinsson & Tropp, 2011) — sketch
   Y = ΔW Ω with r + oversample columns, ``sketch_power_iters`` power iterations, then the SVD of
   QᵀΔW. Every product goes through the factors, so the cost is O((d + n) R (r + p)), never d × n.
2. Keep the top r components, split evenly: B' = U_r S_r^½, A' = S_r^½ V_rᵀ. Components are sorted
   by singular value, so a client of rank r_k < r gets the best rank-r_k truncation by slicing
   (:func:`strategies.aggregator.truncate_to_rank`).
3. Each component's sign is fixed (largest |entry| of its A row positive), so the order in which
   clients are stacked does not change the result.
4. Components with (numerically) zero singular value would leave A' and B' both zero there, and a
   LoRA pair that is zero on both sides gets no gradient. There B' is zero and A' keeps the previous
   global A row, so the product is unchanged and training can still move that component.

The residual is zero when Σ_k r_k ≤ r (ΔW then has rank ≤ r); otherwise it is the best possible for
rank r (the tail of ΔW's singular values).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies import AGGREGATORS
from strategies.aggregator import AggregationOptions, Aggregator
from strategies.residual import LayerGrams

ZERO_TOL = 1e-6  # a singular value below ZERO_TOL · s_max counts as zero


def svd_of_product(
    B_s: np.ndarray, A_s: np.ndarray, rank: int, options: AggregationOptions
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(U, S, Vt)`` with ΔW = B_s A_s ≈ U diag(S) Vt: exact when the stack is small (see step 1),
    otherwise accurate in the top ``rank`` components."""
    R = A_s.shape[0]
    if R <= options.exact_max_stack:
        Q_B, R_B = np.linalg.qr(B_s)
        Q_A, R_A = np.linalg.qr(A_s.T)
        U, S, Vt = np.linalg.svd(R_B @ R_A.T)
        return Q_B @ U, S, Vt @ Q_A.T
    width = min(R, rank + options.sketch_oversample)
    rng = np.random.default_rng(options.seed)
    omega = rng.standard_normal((A_s.shape[1], width)).astype(A_s.dtype)
    Q, _ = np.linalg.qr(B_s @ (A_s @ omega))
    for _ in range(options.sketch_power_iters):
        Z, _ = np.linalg.qr(A_s.T @ (B_s.T @ Q))
        Q, _ = np.linalg.qr(B_s @ (A_s @ Z))
    U, S, Vt = np.linalg.svd((Q.T @ B_s) @ A_s, full_matrices=False)
    return Q @ U, S, Vt


def exact_svd_pair(
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    p: np.ndarray,
    *,
    prev_A: np.ndarray,
    prev_B: np.ndarray,
    options: AggregationOptions,
    grams: LayerGrams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(A', B')``: the top-r singular triplets of ΔW, split evenly between the factors."""
    r = prev_A.shape[0]
    A_s, B_s = (grams or LayerGrams(As, Bs, p)).stacked
    U, S, Vt = svd_of_product(B_s, A_s, r, options)
    k = min(r, len(S))
    S, U, Vt = S[:k], U[:, :k], Vt[:k]
    # fix each component's sign (largest |entry| of its A row positive): the result then does not
    # depend on the order the clients were stacked in
    signs = np.sign(Vt[np.arange(k), np.abs(Vt).argmax(axis=1)]) if k else np.ones(0)
    signs[signs == 0] = 1.0
    U, Vt = U * signs, Vt * signs[:, None]
    alive = S > ZERO_TOL * (S[0] if k else 0.0)
    root = np.sqrt(np.where(alive, S, 0.0)).astype(A_s.dtype)
    new_B = np.zeros((B_s.shape[0], r), dtype=B_s.dtype)
    new_A = np.array(prev_A, dtype=A_s.dtype, copy=True)
    new_B[:, :k] = U[:, :k] * root
    new_A[:k][alive] = (root[:, None] * Vt[:k])[alive]
    return new_A, new_B


AGGREGATORS.register("exact-svd")(
    Aggregator(
        name="exact-svd",
        pair=exact_svd_pair,
        heterogeneous_ranks=True,
        summary="best rank-r factorisation of the ideal update via QR + small SVD; mixed client ranks",
    )
)
