"""One-run privacy audit: an empirical lower bound on ε from canaries' membership guesses.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023, arXiv 2305.08846.

Steps:

1. m canaries; each is included in training independently with probability 1/2 (S_i ∈ {in, out}); the
   auditor keeps S secret until scoring.
2. After the one run, each canary gets a score (the final model's loss on it: low ⇒ "in").
3. The auditor guesses "in" for the k₊ lowest scores, "out" for the k₋ highest and abstains on the
   rest: r = k₊ + k₋ guesses, v of them correct.
4. If training is (ε, δ)-DP, the number of correct guesses is dominated as in their Theorem 5.2:

       P[W ≥ v] ≤ P[Bin(r, q) ≥ v] + 2mδ · max_{i=1..v} P[v − i ≤ Bin(r, q) < v] / i,  q = e^ε/(1 + e^ε)

   (q is the accuracy of ε-DP randomized response). The largest ε whose p-value stays below 1 − confidence
   is a lower bound on the ε of any (·, δ) guarantee the run can have, at that confidence.
5. Choosing (k₊, k₋) after seeing the scores would spend the confidence; :func:`audit_scores` tries a
   fixed grid of guess counts (:func:`guess_grid`) and divides the error probability among them
   (Bonferroni).

Pure functions over scores and memberships; no model, file or Flower code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability, under (ε, δ)-DP, of at least ``v`` correct among ``r`` guesses on ``m`` canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))  # P[Bin(r, q) >= v]
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[Bin = v-1], P[Bin = v-2], ..., P[Bin = 0]
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest ε (to 1e-6 relative) whose p-value is below ``1 - confidence``; 0 if none."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    if p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m=m, r=r, v=v, epsilon=hi, delta=delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # every guess right and r large: the bound grows like log(r); cap it
            return lo
    while hi - lo > 1e-6 * max(1.0, hi):
        mid = (lo + hi) / 2
        if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class AuditResult:
    """The bound and the guesses that gave it."""

    epsilon: float  # lower bound, at ``confidence``
    confidence: float
    delta: float
    canaries: int  # m
    guesses: int  # r
    correct: int  # v
    guesses_in: int  # k₊
    guesses_out: int  # k₋


def guess_grid(m: int) -> list[tuple[int, int]]:
    """The fixed (k₊, k₋) pairs tried: "in" for none, 1/8 or 1/4 of the canaries, "out" for 1/8, 1/4 or
    1/2. Asymmetric on purpose: a non-member with a random label has a low loss half the time (when its
    label happens to be what the model predicts), while a member's loss is low by training, so "high loss
    ⇒ out" is usually the stronger guess."""
    ins = sorted({0, max(1, m // 8), max(1, m // 4)})
    outs = sorted({max(1, m // 8), max(1, m // 4), max(1, m // 2)})
    return [(a, b) for a in ins for b in outs if a + b <= m]


def audit_scores(
    scores: Sequence[float], members: Sequence[bool], *, delta: float, confidence: float = 0.95
) -> AuditResult:
    """The one-run bound from canary ``scores`` (lower ⇒ more likely trained on) and the secret ``members``.

    Every (k₊, k₋) of :func:`guess_grid` is tried at confidence ``1 - (1 - confidence)/len(grid)``, so the
    reported maximum holds at ``confidence`` (Bonferroni).
    """
    s = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(members, dtype=bool)
    if s.shape != truth.shape or s.ndim != 1 or len(s) < 2:
        raise ValueError("scores and members must be two equally long 1-D sequences of at least 2 canaries")
    if not np.all(np.isfinite(s)):
        raise ValueError("canary scores must be finite")
    m = len(s)
    order = np.argsort(s, kind="stable")
    grid = guess_grid(m)
    each = 1.0 - (1.0 - confidence) / len(grid)
    results = []
    for k_in, k_out in grid:
        v = int(truth[order[:k_in]].sum() + (~truth[order[m - k_out:]]).sum())
        eps = epsilon_lower_bound(m=m, r=k_in + k_out, v=v, delta=delta, confidence=each)
        results.append(AuditResult(eps, confidence, delta, m, k_in + k_out, v, k_in, k_out))
    # the largest bound; with none above 0, the guesses that came closest (the best accuracy)
    return max(results, key=lambda a: (a.epsilon, a.correct / a.guesses))
