"""The Gram-trace aggregation bias against the dense ‖ΔW − B'A'‖_F / ‖ΔW‖_F (float64 references)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_cases import Problem, dense_update, make_problem, problems

from strategies.residual import layer_geometry, relative_residual, residual_traces, squared_residual, stack


def new_factors(problem: Problem, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Arbitrary global factors (A': r × n, B': d × r) to measure against."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(problem.r, problem.n)), rng.normal(size=(problem.d, problem.r))


@settings(max_examples=30, deadline=None)
@given(problems(heterogeneous=True))
def test_stack_is_the_factorisation_of_the_update(problem: Problem) -> None:
    A_s, B_s = stack(problem.As, problem.Bs, problem.p)
    R = sum(a.shape[0] for a in problem.As)
    assert A_s.shape == (R, problem.n) and B_s.shape == (problem.d, R)
    assert A_s.dtype == B_s.dtype == np.float64
    start = 0
    for pk, a, b in zip(problem.p, problem.As, problem.Bs, strict=True):  # blocks in client order
        np.testing.assert_array_equal(A_s[start : start + a.shape[0]], a)
        np.testing.assert_allclose(B_s[:, start : start + a.shape[0]], pk * b, rtol=1e-15)
        start += a.shape[0]
    np.testing.assert_allclose(B_s @ A_s, problem.dW, rtol=0, atol=1e-12 * np.abs(problem.dW).max())


@settings(max_examples=30, deadline=None)
@given(problems(heterogeneous=True), st.integers(0, 2**16))
def test_traces_and_residuals_match_dense(problem: Problem, seed: int) -> None:
    new_A, new_B = new_factors(problem, seed)
    dW, ours = problem.dW, new_B @ new_A
    ideal, cross, own = residual_traces(problem.As, problem.Bs, problem.p, new_A, new_B)
    assert ideal == pytest.approx(np.sum(dW * dW), rel=1e-10)
    assert cross == pytest.approx(np.sum(dW * ours), rel=1e-9, abs=1e-12 * np.linalg.norm(dW) * np.linalg.norm(ours))
    assert own == pytest.approx(np.sum(ours * ours), rel=1e-10)
    dense_sq = float(np.sum((dW - ours) ** 2))
    assert squared_residual(problem.As, problem.Bs, problem.p, new_A, new_B) == pytest.approx(dense_sq, rel=1e-8)
    want = np.sqrt(dense_sq) / np.linalg.norm(dW)
    assert relative_residual(problem.As, problem.Bs, problem.p, new_A, new_B) == pytest.approx(want, rel=1e-8)


@settings(max_examples=30, deadline=None)
@given(problems(heterogeneous=True), st.sampled_from([1e-2, 1e-3, 1e-4]))
def test_small_residuals_keep_absolute_accuracy(problem: Problem, eps: float) -> None:
    """B'A' = ΔW + a perturbation of relative size eps: the difference of squares stays accurate to
    about 1e-8 absolute in float64, far below eps."""
    rng = np.random.default_rng(int(eps * 1e6))
    dW = problem.dW
    U, S, Vt = np.linalg.svd(dW, full_matrices=False)  # exact factors of ΔW (rank up to min(d, n))
    new_B, new_A = U * np.sqrt(S), np.sqrt(S)[:, None] * Vt
    noise = rng.normal(size=new_A.shape)
    new_A = new_A + eps * np.linalg.norm(dW) * noise / np.linalg.norm(new_B @ noise)
    want = np.linalg.norm(dW - new_B @ new_A) / np.linalg.norm(dW)
    assert want == pytest.approx(eps, rel=1e-9)
    got = relative_residual(problem.As, problem.Bs, problem.p, new_A, new_B)
    assert got == pytest.approx(want, abs=1e-7)


@settings(max_examples=30, deadline=None)
@given(problems(heterogeneous=True))
def test_exact_factors_give_zero_up_to_rounding(problem: Problem) -> None:
    A_s, B_s = stack(problem.As, problem.Bs, problem.p)
    assert relative_residual(problem.As, problem.Bs, problem.p, A_s, B_s) <= 1e-6  # float64 floor ~1e-8


def test_hand_computed() -> None:
    # ΔW = 0.5·[1] + 0.5·[0] = [0.5]; B'A' = [0.25] → |0.5 − 0.25| / 0.5 = 0.5
    one, zero = np.ones((1, 1)), np.zeros((1, 1))
    p, half = np.array([0.5, 0.5]), np.full((1, 1), 0.5)
    assert relative_residual([one, zero], [one, zero], p, half, half) == pytest.approx(0.5)
    assert squared_residual([one, zero], [one, zero], p, half, half) == pytest.approx(0.0625)


def test_zero_update_conventions() -> None:
    problem = make_problem(0, d=4, n=5, r=2, K=3)
    zero_Bs = [np.zeros_like(b) for b in problem.Bs]  # ΔW = 0 (round 1: nobody moved B)
    new_A, new_B = new_factors(problem, 1)
    assert relative_residual(problem.As, zero_Bs, problem.p, new_A, np.zeros_like(new_B)) == 0.0
    assert relative_residual(problem.As, zero_Bs, problem.p, new_A, new_B) == 1.0
    zero_As = [np.zeros_like(a) for a in problem.As]  # ΔW = 0 the other way round
    assert relative_residual(zero_As, problem.Bs, problem.p, np.zeros_like(new_A), new_B) == 0.0
    assert relative_residual(zero_As, problem.Bs, problem.p, new_A, new_B) == 1.0
    # a non-zero ΔW against a zero global product: everything is missing
    assert relative_residual(problem.As, problem.Bs, problem.p, new_A, np.zeros_like(new_B)) == pytest.approx(1.0)
    assert relative_residual(problem.As, problem.Bs, problem.p, np.zeros_like(new_A), new_B) == pytest.approx(1.0)


def test_zero_weight_clients_do_not_count() -> None:
    problem = make_problem(1, d=6, n=5, r=2, K=3)
    new_A, new_B = new_factors(problem, 2)
    p = np.array([0.3, 0.0, 0.7])
    got = relative_residual(problem.As, problem.Bs, p, new_A, new_B)
    kept = relative_residual([problem.As[0], problem.As[2]], [problem.Bs[0], problem.Bs[2]], np.array([0.3, 0.7]),
                             new_A, new_B)  # fmt: skip
    assert got == pytest.approx(kept, rel=1e-12)
    dW = dense_update(problem.As, problem.Bs, p)
    assert got == pytest.approx(np.linalg.norm(dW - new_B @ new_A) / np.linalg.norm(dW), rel=1e-9)


def test_float32_factors_are_measured_in_float32_near_the_dense_value() -> None:
    problem = make_problem(2, d=12, n=10, r=3, K=4)
    new_A, new_B = new_factors(problem, 3)
    f32 = problem.astype(np.float32)
    A_s, B_s = stack(f32.As, f32.Bs, f32.p)
    assert A_s.dtype == B_s.dtype == np.float32
    got = relative_residual(f32.As, f32.Bs, f32.p, new_A.astype(np.float32), new_B.astype(np.float32))
    want = relative_residual(problem.As, problem.Bs, problem.p, new_A, new_B)
    assert got == pytest.approx(want, abs=1e-3)  # the float32 floor the module documents
    # and the exact product stays near zero (floor ~1e-3, not 1e-8)
    assert relative_residual(f32.As, f32.Bs, f32.p, A_s, B_s) <= 5e-3


def test_mixed_precision_stacks_in_the_wider_type() -> None:
    A_s, B_s = stack([np.ones((1, 3), np.float32), np.ones((2, 3))], [np.ones((4, 1)), np.ones((4, 2), np.float32)],
                     np.array([0.25, 0.75]))  # fmt: skip
    assert A_s.dtype == B_s.dtype == np.float64
    np.testing.assert_array_equal(B_s, np.concatenate([np.full((4, 1), 0.25), np.full((4, 2), 0.75)], axis=1))


@settings(max_examples=30, deadline=None)
@given(problems(heterogeneous=True), st.integers(0, 2**16))
def test_layer_geometry_matches_dense(problem: Problem, seed: int) -> None:
    """Residual, cosine and ‖B' − B̄‖/‖B̄‖ (B̄ the zero-padded average when ranks differ) from Gram traces."""
    new_A, new_B = new_factors(problem, seed)
    got = layer_geometry(problem.As, problem.Bs, problem.p, new_A, new_B)
    dW, ours = problem.dW, new_B @ new_A
    B_bar = sum(pk * np.pad(b, ((0, 0), (0, problem.r - b.shape[1]))) for pk, b in zip(problem.p, problem.Bs,
                                                                                          strict=True))  # fmt: skip
    assert got["residual"] == pytest.approx(np.linalg.norm(dW - ours) / np.linalg.norm(dW), abs=1e-7)
    assert got["cosine"] == pytest.approx(np.vdot(dW, ours) / (np.linalg.norm(dW) * np.linalg.norm(ours)), abs=1e-9)
    assert got["correction"] == pytest.approx(np.linalg.norm(new_B - B_bar) / np.linalg.norm(B_bar), rel=1e-7)


def test_layer_geometry_zero_conventions() -> None:
    zero_A, zero_B = np.zeros((2, 3)), np.zeros((4, 2))
    both_zero = layer_geometry([zero_A], [zero_B], np.ones(1), zero_A, zero_B)
    assert both_zero == {"residual": 0.0, "cosine": 1.0, "correction": 0.0}
    only_ours = layer_geometry([zero_A], [zero_B], np.ones(1), np.ones((2, 3)), np.ones((4, 2)))
    assert only_ours == {"residual": 1.0, "cosine": 0.0, "correction": 1.0}
