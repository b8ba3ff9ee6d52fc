"""LoRA-FAIR: server-side correction of B by cosine similarity (Bian et al., ICCV 2025, arXiv 2411.14961).

The paper's method. For one LoRA layer with client factors (A_k, B_k), weights p_k and the exact
average ΔW = Σ_k p_k B_k A_k:

1. Ā = Σ_k p_k A_k, B̄ = Σ_k p_k B_k (FedIT's averages; A is not corrected).
2. ΔB = argmin f(ΔB),  f(ΔB) = 1 − cos(ΔW, (B̄ + ΔB)Ā) + λ‖ΔB‖²_F,  λ = 0.01 by default — an absolute
   weight, as in the paper (the cosine is scale-free, the penalty is not: it keeps the correction small
   next to B̄). Found by a few server-side steps from ΔB = 0 (below).
3. Broadcast (Ā, B̄ + ΔB): the aggregate and every client's starting point next round.

Only r × r Gram quantities and d × r matrices are formed, never the dense d × n ΔW. With B = B̄ + ΔB,
G = ĀĀᵀ and M = ΔW Āᵀ = B_s (A_s Āᵀ) (stacked factors, :class:`strategies.residual.LayerGrams`):

    ⟨ΔW, BĀ⟩ = ⟨M, B⟩ =: c,    ‖BĀ‖²_F = ⟨BᵀB, G⟩ =: q,    ‖ΔW‖²_F = ⟨B_sᵀB_s, A_sA_sᵀ⟩ =: w².

**Steps.** ∇f = −M/(w√q) + (c / (w q^{3/2})) BG + 2λΔB. Holding the two scalars s = 1/(w√q) and
a = c/(w q^{3/2}) at the current iterate, ∇f = 0 is the r × r linear system B(2λI + aG) = 2λB̄ + sM
(a fixed-point step; at λ = 0 it lands on the best fit in one step). A step is kept only if f falls,
halving it until it does (up to 30 times); if it cannot, a normalised gradient step is tried the same
way. Each step ends with an exact step along B's own direction: the cosine does not see a positive
scale, so f along t·B is minimised at t = ⟨B, B̄⟩/‖B‖² (taken when it lowers f; this flat direction
is the one the other steps cross slowly). The loop ends when nothing lowers f, when f changes by less
than 1e-12, or after ``fair_steps`` steps. f is not convex, so the descent runs from two starts, ΔB = 0
and the ridge fit at the same λ (``lora-fair-ridge``'s closed form, d × r work), and keeps the lower f:
it therefore never ends above FedIT's value (ΔB = 0) nor above the ridge fit's.

Being scale-blind, the cosine leaves the size of B' to the penalty: when B̄Ā points far from ΔW, the
minimiser can be much shorter than B̄. That is the paper's objective as stated; the logged correction
size shows when it happens.

**Limits.** λ → ∞ gives ΔB → 0 (FedIT). λ → 0 maximises the cosine alone: the best fit of ΔW in Ā's
row space, up to scale — the paper's λ = 0 ablation, which scored *below* FedIT, and the arm the
closed form ``lora-fair-ridge`` sits on. The round log carries ``agg_cosine_*`` (cos(ΔW, B'A')) and
``agg_correction_*`` (‖B' − B̄‖_F / ‖B̄‖_F) beside the residual, so a run shows which regime it is in.
Where ΔW = 0 or B̄Ā = 0 the cosine is undefined and ΔB = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from strategies import AGGREGATORS
from strategies.aggregator import AggregationOptions, Aggregator, weighted_sum
from strategies.lora_fair_ridge import relative_lambda, ridge_right
from strategies.residual import LayerGrams

HALVINGS = 30
TOLERANCE = 1e-12


@dataclass(frozen=True)
class CosineObjective:
    """f(B̄ + ΔB) of one layer, from d × r and r × r quantities only (see the module docstring)."""

    M: np.ndarray  # ΔW Āᵀ, d × r
    G: np.ndarray  # ĀĀᵀ, r × r
    B_bar: np.ndarray  # d × r
    w: float  # ‖ΔW‖_F
    lam: float

    def value(self, B: np.ndarray) -> tuple[float, float, float]:
        """``(f, c, q)`` at B = B̄ + ΔB; f is +inf where q = 0 (the cosine is undefined)."""
        c, q = float(np.vdot(self.M, B)), float(np.vdot(B.T @ B, self.G))
        if not q > 0:
            return np.inf, c, q
        D = B - self.B_bar
        return 1.0 - c / (self.w * np.sqrt(q)) + self.lam * float(np.vdot(D, D)), c, q

    def gradient(self, B: np.ndarray, c: float, q: float) -> np.ndarray:
        s, a = 1.0 / (self.w * np.sqrt(q)), c / (self.w * q**1.5)
        return -s * self.M + a * (B @ self.G) + 2.0 * self.lam * (B - self.B_bar)

    def fixed_point(self, c: float, q: float) -> np.ndarray:
        """Solution of ∇f = 0 with s and a frozen at the current iterate."""
        s, a = 1.0 / (self.w * np.sqrt(q)), c / (self.w * q**1.5)
        system = 2.0 * self.lam * np.eye(self.G.shape[0]) + a * self.G
        return (2.0 * self.lam * self.B_bar + s * self.M) @ np.linalg.pinv(system, hermitian=True)


def cosine_objective(grams: LayerGrams, A_bar: np.ndarray, B_bar: np.ndarray, lam: float) -> CosineObjective:
    """The objective of one layer from its stacked factors (``grams``) and averages.

    ‖ΔW‖² (R × R Grams, R = Σ r_k, the costly part: O((d + n) R²)) comes from ``grams``, formed in the
    factors' own precision — an inner product of two PSD matrices, so float32 loses nothing that
    matters — and shared with the round's metrics; everything of size d × r or r × r is kept in float64.
    """
    A_s, B_s = grams.stacked
    A_bar, B_bar = np.asarray(A_bar, dtype=np.float64), np.asarray(B_bar, dtype=np.float64)
    w2 = grams.dw_sq
    M = np.asarray(B_s @ (A_s @ A_bar.T.astype(A_s.dtype)), dtype=np.float64)
    return CosineObjective(M, A_bar @ A_bar.T, B_bar, float(np.sqrt(max(w2, 0.0))), lam)


def cosine_correction(objective: CosineObjective, *, steps: int, starts: Sequence[np.ndarray] = ()) -> np.ndarray:
    """ΔB (float64): the lowest f reached by at most ``steps`` descent steps from ΔB = 0 and from each of
    ``starts`` (more ΔB to start from; f is not convex, and one start can stop in a shallower basin)."""
    if objective.w <= 0 or not np.isfinite(objective.value(objective.B_bar)[0]):
        return np.zeros_like(objective.B_bar)
    best, best_f = np.zeros_like(objective.B_bar), objective.value(objective.B_bar)[0]
    for start in (np.zeros_like(objective.B_bar), *starts):
        delta = _descend(objective, objective.B_bar + start, steps=steps)
        f = objective.value(objective.B_bar + delta)[0]
        if f < best_f:
            best, best_f = delta, f
    return best


def _descend(objective: CosineObjective, B: np.ndarray, *, steps: int) -> np.ndarray:
    """ΔB after at most ``steps`` descent steps from B (never above f(B); B itself if f(B) is undefined)."""
    B = np.array(B, dtype=np.float64)
    f, c, q = objective.value(B)
    if not np.isfinite(f):
        return B - objective.B_bar
    for _ in range(steps):
        moved = _backtrack(objective, B, objective.fixed_point(c, q) - B, f)
        if moved is None:
            moved = _backtrack(objective, B, _normalised_descent(objective, B, c, q), f)
        if moved is None:
            break
        B, (f_new, c, q) = moved
        rescaled = _rescale(objective, B, f_new)
        if rescaled is not None:
            B, (f_new, c, q) = rescaled
        done = f - f_new <= TOLERANCE * max(1.0, abs(f))
        f = f_new
        if done:
            break
    return B - objective.B_bar


def _rescale(
    objective: CosineObjective, B: np.ndarray, f: float
) -> tuple[np.ndarray, tuple[float, float, float]] | None:
    """B scaled by t* = ⟨B, B̄⟩ / ‖B‖² when that lowers f: the cosine does not see a positive scale, so this
    is the exact minimiser of f along B's own direction (the flat direction the other steps cross slowly)."""
    t = float(np.vdot(B, objective.B_bar)) / float(np.vdot(B, B))
    if not t > 0:
        return None
    value = objective.value(t * B)
    return (t * B, value) if value[0] < f else None


def _normalised_descent(objective: CosineObjective, B: np.ndarray, c: float, q: float) -> np.ndarray:
    """−∇f scaled to the size of B (a first trial step that moves B by its own norm)."""
    g = objective.gradient(B, c, q)
    norm = float(np.linalg.norm(g))
    return -g * (float(np.linalg.norm(B)) / norm) if norm > 0 else np.zeros_like(B)


def _backtrack(
    objective: CosineObjective, B: np.ndarray, step: np.ndarray, f: float
) -> tuple[np.ndarray, tuple[float, float, float]] | None:
    """``(B + t·step, its (f, c, q))`` for the largest t in 1, ½, ¼, … that lowers f; None if none does."""
    if not np.isfinite(step).all() or not np.any(step):
        return None
    t = 1.0
    for _ in range(HALVINGS):
        candidate = B + t * step
        value = objective.value(candidate)
        if value[0] < f:
            return candidate, value
        t /= 2
    return None


def lora_fair_pair(
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    p: np.ndarray,
    *,
    prev_A: np.ndarray,
    prev_B: np.ndarray,
    options: AggregationOptions,
    grams: LayerGrams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(Ā, B̄ + ΔB)`` with ΔB the cosine-similarity correction of the paper."""
    A_bar, B_bar = weighted_sum(As, p), weighted_sum(Bs, p)
    objective = cosine_objective(grams or LayerGrams(As, Bs, p), A_bar, B_bar, options.lam)
    # a second start: the ridge fit at the same λ (lora-fair-ridge), so the result is never worse than it
    G = objective.G
    ridge = ridge_right(objective.M - objective.B_bar @ G, G, relative_lambda(options.lam, A_bar))
    delta = cosine_correction(objective, steps=options.fair_steps, starts=[ridge])
    return A_bar, (B_bar + delta).astype(B_bar.dtype)


AGGREGATORS.register("lora-fair")(
    Aggregator(
        name="lora-fair",
        pair=lora_fair_pair,
        summary="FedIT + server-side correction of B maximising cos(dW, B'A') with a small penalty (LoRA-FAIR)",
    )
)
