"""The one-run audit's maths: the p-value against exact binomial sums, validity of the bound against an
ε-DP mechanism simulated exactly (randomized response), and power when scores reveal membership."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.one_run_audit import audit_scores, epsilon_lower_bound, guess_grid, p_value


def exact_tail(r: int, v: int, q: float) -> float:
    return sum(math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(v, r + 1))


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 60), st.data(), st.floats(0, 5))
def test_p_value_is_the_binomial_tail_plus_the_delta_term(r: int, data: st.DataObject, eps: float) -> None:
    v = data.draw(st.integers(0, r))
    m = r + data.draw(st.integers(0, 40))
    q = 1 / (1 + math.exp(-eps))
    assert p_value(m=m, r=r, v=v, epsilon=eps, delta=0.0) == pytest.approx(min(1.0, exact_tail(r, v, q)), abs=1e-10)
    delta = 1e-4
    alpha = max((exact_tail(r, v - i, q) - exact_tail(r, v, q)) / i for i in range(1, v + 1)) if v else 0.0
    want = min(1.0, exact_tail(r, v, q) + 2 * m * delta * alpha)
    assert p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) == pytest.approx(want, abs=1e-9)


def test_the_bound_is_where_the_p_value_crosses() -> None:
    m, r, v, delta = 1000, 200, 170, 1e-5
    eps = epsilon_lower_bound(m=m, r=r, v=v, delta=delta, confidence=0.95)
    assert eps > 1
    assert p_value(m=m, r=r, v=v, epsilon=eps * 0.999, delta=delta) < 0.05 <= p_value(
        m=m, r=r, v=v, epsilon=eps * 1.001, delta=delta)
    assert epsilon_lower_bound(m=m, r=r, v=v, delta=1e-3, confidence=0.95) < eps  # more delta: weaker claim
    assert epsilon_lower_bound(m=m, r=r, v=100, delta=delta, confidence=0.95) == 0.0  # chance level


def randomized_response(m: int, eps: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Canaries whose scores leak membership exactly as much as eps-DP allows (randomized response)."""
    members = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(eps) / (1 + math.exp(eps))
    says_in = np.where(truthful, members, ~members)
    scores = np.where(says_in, 0.0, 1.0) + 1e-3 * rng.random(m)  # low score: "in"
    return scores, members


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_the_bound_exceeds_the_true_epsilon_rarely(eps: float) -> None:
    """An eps-DP mechanism: the 95 % bound must exceed eps in at most about 5 % of runs."""
    rng = np.random.default_rng(1)
    bounds = [audit_scores(*randomized_response(400, eps, rng), delta=0.0, confidence=0.95).epsilon
              for _ in range(150)]
    assert np.mean(np.array(bounds) > eps) <= 0.08
    assert np.median(bounds) > 0.3 * eps  # and it is not vacuous: most runs certify a good share of eps


def test_memorised_canaries_give_a_large_bound_and_random_scores_none() -> None:
    rng = np.random.default_rng(0)
    members = rng.random(1000) < 0.5
    perfect = audit_scores(np.where(members, 0.1, 2.0), members, delta=1e-5)
    assert perfect.epsilon > 3 and perfect.correct == perfect.guesses
    noise = [audit_scores(rng.random(1000), members, delta=1e-5).epsilon for _ in range(40)]
    assert np.mean(np.array(noise) > 0) <= 0.1


def test_grid_and_input_checks() -> None:
    assert guess_grid(100) == [(a, b) for a in (0, 12, 25) for b in (12, 25, 50)]
    assert guess_grid(2) == [(0, 1), (1, 1)]
    with pytest.raises(ValueError, match="equally long"):
        audit_scores([0.1, 0.2], [True], delta=0.0)
    with pytest.raises(ValueError, match="finite"):
        audit_scores([0.1, float("nan")], [True, False], delta=0.0)
    with pytest.raises(ValueError, match="0 <= v <= r <= m"):
        p_value(m=5, r=6, v=1, epsilon=1.0, delta=0.0)
    with pytest.raises(ValueError, match="confidence"):
        epsilon_lower_bound(m=5, r=5, v=5, delta=0.0, confidence=1.0)
