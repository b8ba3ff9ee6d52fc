"""LoRA-FAIR: A' = Ā and B' the ridge solution argmin_B ‖ΔW − BĀ‖² + λ_eff‖B − B̄‖², λ_eff = λ·tr(ĀĀᵀ)/r,
checked against a dense least-squares solve with the dense ΔW."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_cases import A_KEY, B_KEY, Problem, dense_average, make_problem, problems, relative_error, ridge_B

from strategies import AGGREGATORS, AggregationOptions
from strategies.lora_fair_ridge import relative_lambda, ridge_right

LAMS = st.sampled_from([1e-3, 1e-2, 0.1, 1.0, 10.0])


def lam_eff(lam: float, A_bar: np.ndarray) -> float:
    return lam * float(np.trace(A_bar @ A_bar.T)) / A_bar.shape[0]


@settings(max_examples=30, deadline=None)
@given(problems(), LAMS)
def test_B_is_the_dense_ridge_solution(problem: Problem, lam: float) -> None:
    out, metrics = problem.run("lora-fair-ridge", lam=lam)
    A_bar, B_bar = dense_average(problem.As, problem.p), dense_average(problem.Bs, problem.p)
    mu = lam_eff(lam, A_bar)
    want = ridge_B(problem.dW, A_bar, B_bar, mu)
    np.testing.assert_allclose(out[A_KEY], A_bar, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out[B_KEY], want, rtol=0, atol=1e-9 * np.abs(want).max())
    # first-order optimality of the ridge objective, with the dense ΔW
    grad = (out[B_KEY] @ A_bar - problem.dW) @ A_bar.T + mu * (out[B_KEY] - B_bar)
    assert np.abs(grad).max() <= 1e-9 * (np.abs(problem.dW).max() * np.abs(A_bar).max() * problem.n + 1)
    assert metrics["agg_residual_mean"] == pytest.approx(relative_error(problem.dW, A_bar, out[B_KEY]), abs=1e-7)


@settings(max_examples=30, deadline=None)
@given(problems(), LAMS)
def test_residual_never_above_fedit(problem: Problem, lam: float) -> None:
    fair, fair_metrics = problem.run("lora-fair-ridge", lam=lam)
    fedit, fedit_metrics = problem.run("fedit")
    assert relative_error(problem.dW, fair[A_KEY], fair[B_KEY]) <= relative_error(problem.dW, fedit[A_KEY],
                                                                                  fedit[B_KEY]) + 1e-9  # fmt: skip
    assert fair_metrics["agg_residual_max"] <= fedit_metrics["agg_residual_max"] + 1e-7  # the Gram-trace floor


@settings(max_examples=30, deadline=None)
@given(problems())
def test_lambda_zero_is_the_least_squares_B(problem: Problem) -> None:
    """λ = 0: B' = ΔW Ā⁺ (minimum norm when Ā is rank-deficient, e.g. r > n), the best B for Ā."""
    out, _ = problem.run("lora-fair-ridge", lam=0.0)
    A_bar = dense_average(problem.As, problem.p)
    want = problem.dW @ np.linalg.pinv(A_bar)
    np.testing.assert_allclose(out[B_KEY] @ A_bar, want @ A_bar, rtol=0, atol=1e-8 * np.abs(problem.dW).max())
    # the leftover is exactly the part of ΔW outside Ā's row space
    outside = problem.dW - problem.dW @ np.linalg.pinv(A_bar) @ A_bar
    assert relative_error(problem.dW, A_bar, out[B_KEY]) == pytest.approx(
        np.linalg.norm(outside) / np.linalg.norm(problem.dW), abs=1e-8
    )


@settings(max_examples=30, deadline=None)
@given(problems())
def test_smaller_lambda_never_fits_worse(problem: Problem) -> None:
    outs = [problem.run("lora-fair-ridge", lam=lam)[0] for lam in (100.0, 1.0, 0.1, 1e-2, 1e-4, 0.0)]
    residuals = [relative_error(problem.dW, o[A_KEY], o[B_KEY]) for o in outs]
    assert all(b <= a + 1e-9 for a, b in zip(residuals, residuals[1:], strict=False))


@settings(max_examples=30, deadline=None)
@given(problems())
def test_huge_lambda_is_fedit(problem: Problem) -> None:
    fair, _ = problem.run("lora-fair-ridge", lam=1e12)
    fedit, _ = problem.run("fedit")
    np.testing.assert_array_equal(fair[A_KEY], fedit[A_KEY])
    np.testing.assert_allclose(fair[B_KEY], fedit[B_KEY], rtol=0, atol=1e-9 * np.abs(fedit[B_KEY]).max())


@settings(max_examples=30, deadline=None)
@given(problems(), LAMS, st.floats(1e-3, 1e3))
def test_relative_lambda_makes_the_update_invariant_to_factor_scale(problem: Problem, lam: float, c: float) -> None:
    """A_k → c·A_k, B_k → B_k/c leaves every ΔW unchanged; with λ relative to tr(ĀĀᵀ) so does B'A'."""
    out, _ = problem.run("lora-fair-ridge", lam=lam)
    rescaled = Problem([c * a for a in problem.As], [b / c for b in problem.Bs], problem.heads, problem.weights,
                       c * problem.prev_A, problem.prev_B / c, problem.prev_head)  # fmt: skip
    again, _ = rescaled.run("lora-fair-ridge", lam=lam)
    want = out[B_KEY] @ out[A_KEY]
    np.testing.assert_allclose(again[B_KEY] @ again[A_KEY], want, rtol=0, atol=1e-8 * np.abs(want).max())


def test_hand_computed_scalar_case() -> None:
    # d = n = r = 1: ΔW = ½·(2·1) + ½·(0·3) = 1, Ā = 2, B̄ = 1, G = 4, λ_eff = λ·4
    # B' = (ΔW·Ā + λ_eff·B̄) / (G + λ_eff) = (2 + 4λ) / (4 + 4λ)
    states = [{"l.lora_A.weight": np.array([[1.0]]), "l.lora_B.weight": np.array([[2.0]])},
              {"l.lora_A.weight": np.array([[3.0]]), "l.lora_B.weight": np.array([[0.0]])}]  # fmt: skip
    previous = {"l.lora_A.weight": np.zeros((1, 1)), "l.lora_B.weight": np.zeros((1, 1))}
    for lam in (0.0, 0.5, 2.0):
        out, metrics = AGGREGATORS.get("lora-fair-ridge")(states, [1, 1], previous=previous,
                                                    options=AggregationOptions(lam=lam))  # fmt: skip
        assert out["l.lora_A.weight"][0, 0] == pytest.approx(2.0)
        assert out["l.lora_B.weight"][0, 0] == pytest.approx((2 + 4 * lam) / (4 + 4 * lam))
        assert metrics["agg_residual_max"] == pytest.approx(abs(1 - 2 * (2 + 4 * lam) / (4 + 4 * lam)), abs=1e-7)


def test_ridge_right_and_relative_lambda() -> None:
    rng = np.random.default_rng(0)
    Y, X = rng.normal(size=(5, 3)), rng.normal(size=(3, 4))
    G = X @ X.T
    np.testing.assert_allclose(ridge_right(Y, G, 0.3), Y @ np.linalg.inv(G + 0.3 * np.eye(3)), rtol=1e-10)
    singular = np.diag([2.0, 0.0, 1.0])  # pseudo-inverse when singular and λ = 0
    np.testing.assert_allclose(ridge_right(Y, singular, 0.0), Y @ np.diag([0.5, 0.0, 1.0]), rtol=1e-12, atol=1e-15)
    assert ridge_right(Y.astype(np.float32), G, 0.3).dtype == np.float32
    A = rng.normal(size=(4, 7))
    assert relative_lambda(0.1, A) == pytest.approx(0.1 * np.sum(A * A) / 4)
    assert relative_lambda(0.0, A) == 0.0


def test_zero_average_A_leaves_B_at_the_average() -> None:
    """Ā = 0 (clients' A cancel): nothing to correct through, and no division by zero."""
    problem = make_problem(2, d=5, n=4, r=2, K=2, weights=[1.0, 1.0])
    problem.As[1] = -problem.As[0]
    out, metrics = problem.run("lora-fair-ridge")
    np.testing.assert_array_equal(out[A_KEY], 0.0)
    np.testing.assert_allclose(out[B_KEY], dense_average(problem.Bs, problem.p), rtol=1e-12)
    assert np.isfinite(metrics["agg_residual_max"])


def test_registration() -> None:
    agg = AGGREGATORS.get("lora-fair-ridge")
    assert agg.name == "lora-fair-ridge" and agg.frozen == () and not agg.heterogeneous_ranks
