"""exact-svd: B'A' is the best rank-r approximation of ΔW = Σ_k p_k B_k A_k (clients of any rank ≤ r),
split evenly (B'ᵀB' = A'A'ᵀ = diag(s)), with a fixed sign per component; zero components keep the
previous A row. References: numpy's SVD of the dense ΔW."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_cases import (
    A_KEY,
    B_KEY,
    HEAD,
    Problem,
    best_rank,
    dense_average,
    make_problem,
    problems,
    relative_error,
    singular_values,
)

from strategies import AGGREGATORS, AggregationOptions
from strategies.aggregator import truncate_to_rank
from strategies.exact_svd import ZERO_TOL, svd_of_product
from strategies.residual import stack

EXACT = AGGREGATORS.get("exact-svd")


def has_unique_best_rank(S: np.ndarray, r: int) -> bool:
    """The best rank-r approximation is unique (and stable) when s_r is clearly above s_{r+1}."""
    if len(S) <= r or S[r] <= 1e-12 * S[0]:
        return True  # rank(ΔW) ≤ r: the approximation is ΔW itself
    return S[r - 1] - S[r] >= 1e-3 * S[0]


def dropped(S: np.ndarray, r: int) -> np.ndarray:
    """The top-r singular values the rule treats as zero (below ZERO_TOL·s_1)."""
    top = S[:r]
    return top[top <= ZERO_TOL * S[0]]


@settings(max_examples=30, deadline=None)
@given(problems(heterogeneous=True))
def test_best_rank_r_approximation(problem: Problem) -> None:
    out, metrics = problem.run("exact-svd")
    dW, r = problem.dW, problem.r
    S = singular_values(dW)
    want, optimum = best_rank(dW, r)
    assert relative_error(dW, out[A_KEY], out[B_KEY]) == pytest.approx(optimum, abs=1e-9)
    assert metrics["agg_residual_mean"] == pytest.approx(optimum, abs=1e-6)  # Gram-trace floor ~1e-8
    if has_unique_best_rank(S, r):
        # components below ZERO_TOL are left out on purpose; each moves an entry by at most its s_i
        tol = 1e-9 * S[0] + dropped(S, r).sum()
        np.testing.assert_allclose(out[B_KEY] @ out[A_KEY], want, rtol=0, atol=tol)
    np.testing.assert_allclose(out[HEAD], dense_average(problem.heads, problem.p), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(problems(heterogeneous=True))
def test_components_are_balanced_sorted_signed_or_parked(problem: Problem) -> None:
    out, _ = problem.run("exact-svd")
    A, B, r = out[A_KEY], out[B_KEY], problem.r
    S = singular_values(problem.dW)
    dead = np.all(B == 0.0, axis=0)
    alive = ~dead
    for i in range(r):  # a component is parked exactly when its singular value is (numerically) zero
        s_i = S[i] if i < len(S) else 0.0
        if dead[i]:
            assert s_i <= 1.01 * ZERO_TOL * S[0]
            np.testing.assert_array_equal(A[i], problem.prev_A[i])  # not zero: B can still learn there
        else:
            assert s_i >= 0.99 * ZERO_TOL * S[0]
    assert not np.any(alive[1:] & dead[:-1])  # zeros only after the live components
    live = np.flatnonzero(alive)
    gram_B, gram_A = B[:, live].T @ B[:, live], A[live] @ A[live].T
    scale = 1e-9 * S[0]
    np.testing.assert_allclose(gram_B, np.diag(S[live]), rtol=0, atol=scale)  # B' = U S^½
    np.testing.assert_allclose(gram_A, np.diag(S[live]), rtol=0, atol=scale)  # A' = S^½ Vᵀ
    for row in A[live]:  # sign convention: the largest |entry| of each A row is positive
        assert row[np.argmax(np.abs(row))] > 0


@settings(max_examples=30, deadline=None)
@given(problems(heterogeneous=True))
def test_truncation_is_the_best_lower_rank_approximation(problem: Problem) -> None:
    out, _ = problem.run("exact-svd")
    for k in range(1, problem.r):  # what a client of rank k is sent
        cut = truncate_to_rank(out, k)
        assert cut[A_KEY].shape == (k, problem.n) and cut[B_KEY].shape == (problem.d, k)
        _, optimum_k = best_rank(problem.dW, k)
        assert relative_error(problem.dW, cut[A_KEY], cut[B_KEY]) == pytest.approx(optimum_k, abs=1e-9)


@st.composite
def within_rank(draw: st.DrawFn) -> Problem:
    """Clients whose ranks add up to at most the global rank: ΔW has rank ≤ r."""
    r = draw(st.integers(1, 4))
    ranks = draw(st.lists(st.integers(1, r), min_size=1, max_size=r).filter(lambda ks: sum(ks) <= r))
    d, n = draw(st.integers(r, 12)), draw(st.integers(r, 12))
    weights = draw(st.lists(st.floats(0.1, 10.0), min_size=len(ranks), max_size=len(ranks), unique=True))
    return make_problem(draw(st.integers(0, 2**32 - 1)), d=d, n=n, r=r, K=len(ranks), ranks=ranks, weights=weights)


@settings(max_examples=30, deadline=None)
@given(within_rank())
def test_exact_when_the_ranks_fit(problem: Problem) -> None:
    out, metrics = problem.run("exact-svd")
    S = singular_values(problem.dW)
    tol = 1e-10 * S[0] + dropped(S, problem.r).sum()
    np.testing.assert_allclose(out[B_KEY] @ out[A_KEY], problem.dW, rtol=0, atol=tol)
    assert metrics["agg_residual_max"] <= 1e-6


def test_rank_deficient_update_parks_the_spare_components() -> None:
    """Two rank-3 clients whose updates are both multiples of b·aᵀ: one live component, two parked."""
    rng = np.random.default_rng(0)
    d, n = 6, 5
    a, b = rng.normal(size=n), rng.normal(size=d)
    zeros = np.zeros((d, 2))
    As = [np.vstack([a, rng.normal(size=(2, n))]), np.vstack([a, rng.normal(size=(2, n))])]
    Bs = [np.column_stack([b, zeros]), np.column_stack([2 * b, zeros])]
    problem = Problem(As, Bs, [np.zeros(3)] * 2, [1.0, 3.0], rng.normal(size=(3, n)), np.zeros((d, 3)))
    out, metrics = problem.run("exact-svd")
    np.testing.assert_array_equal(out[B_KEY][:, 1:], 0.0)
    np.testing.assert_array_equal(out[A_KEY][1:], problem.prev_A[1:])
    np.testing.assert_allclose(out[B_KEY] @ out[A_KEY], 1.75 * np.outer(b, a), rtol=0, atol=1e-12)
    row = out[A_KEY][0]
    np.testing.assert_allclose(np.abs(row) / np.linalg.norm(row), np.abs(a) / np.linalg.norm(a), rtol=1e-12)
    assert row[np.argmax(np.abs(row))] > 0
    assert metrics["agg_residual_max"] <= 1e-6


def test_zero_update_keeps_the_previous_A() -> None:
    problem = make_problem(1, d=6, n=7, r=3, K=3)
    problem.Bs = [np.zeros_like(b) for b in problem.Bs]  # round 1 of LoRA: nobody moved B yet
    out, metrics = problem.run("exact-svd")
    np.testing.assert_array_equal(out[B_KEY], 0.0)
    np.testing.assert_array_equal(out[A_KEY], problem.prev_A)
    assert metrics == {"agg_residual_mean": 0.0, "agg_residual_max": 0.0, "agg_cosine_mean": 1.0,
                       "agg_cosine_min": 1.0, "agg_correction_mean": 0.0, "agg_correction_max": 0.0}  # fmt: skip


def test_fewer_stacked_components_than_the_rank() -> None:
    """One client of rank 1 under a rank-3 adapter: S has a single entry, rows 1–2 are parked."""
    problem = make_problem(2, d=5, n=4, r=3, K=1, ranks=[1])
    out, metrics = problem.run("exact-svd")
    np.testing.assert_array_equal(out[B_KEY][:, 1:], 0.0)
    np.testing.assert_array_equal(out[A_KEY][1:], problem.prev_A[1:])
    np.testing.assert_allclose(out[B_KEY] @ out[A_KEY], problem.dW, rtol=0, atol=1e-12 * np.abs(problem.dW).max())
    assert metrics["agg_residual_max"] <= 1e-6


def test_rank_above_the_layer_dimensions() -> None:
    """r = 4 > d = 3: at most 3 components exist; the fourth is parked."""
    problem = make_problem(3, d=3, n=8, r=4, K=3)
    out, _ = problem.run("exact-svd")
    np.testing.assert_array_equal(out[B_KEY][:, 3], 0.0)
    np.testing.assert_array_equal(out[A_KEY][3], problem.prev_A[3])
    np.testing.assert_allclose(out[B_KEY] @ out[A_KEY], problem.dW, rtol=0, atol=1e-10 * np.abs(problem.dW).max())


# --- the randomized path ---------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(problems(heterogeneous=True, min_clients=2))
def test_sketch_with_enough_columns_is_exact(problem: Problem) -> None:
    """exact_max_stack = 1 forces the sketch; with r + oversample ≥ Σ r_k it sees all of ΔW's range."""
    exact, _ = problem.run("exact-svd")
    sketch, _ = problem.run("exact-svd", exact_max_stack=1)
    S = singular_values(problem.dW)
    _, optimum = best_rank(problem.dW, problem.r)
    assert relative_error(problem.dW, sketch[A_KEY], sketch[B_KEY]) == pytest.approx(optimum, abs=1e-9)
    if has_unique_best_rank(S, problem.r):
        tol = 1e-9 * S[0] + dropped(S, problem.r).sum()
        np.testing.assert_allclose(sketch[B_KEY] @ sketch[A_KEY], exact[B_KEY] @ exact[A_KEY], rtol=0, atol=tol)


def low_rank_plus_noise(seed: int, *, noise: float = 1e-2, d: int = 30, n: int = 25, r: int = 3, K: int = 6) -> Problem:
    """One client carries a strong rank-r update, the others small noise: a decaying spectrum."""
    rng = np.random.default_rng(seed)
    As = [rng.normal(size=(r, n))] + [noise * rng.normal(size=(r, n)) for _ in range(K - 1)]
    Bs = [rng.normal(size=(d, r)) for _ in range(K)]
    return Problem(As, Bs, [rng.normal(size=3) for _ in range(K)], list(rng.uniform(1.0, 3.0, K)),
                   rng.normal(size=(r, n)), np.zeros((d, r)))  # fmt: skip


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize(("power_iters", "tol"), [(2, 1e-10), (1, 1e-6)])
def test_small_sketch_is_near_optimal_on_a_decaying_spectrum(seed: int, power_iters: int, tol: float) -> None:
    problem = low_rank_plus_noise(seed)  # Σ r_k = 18 stacked components, sketch of 3 + 2 columns
    exact, m_exact = problem.run("exact-svd")
    options = {"exact_max_stack": 2, "sketch_oversample": 2, "sketch_power_iters": power_iters}
    sketch, m_sketch = problem.run("exact-svd", **options)
    _, optimum = best_rank(problem.dW, problem.r)
    got = relative_error(problem.dW, sketch[A_KEY], sketch[B_KEY])
    assert optimum > 1e-3  # the tail is not empty: the sketch has something to miss
    assert optimum - 1e-12 <= got <= optimum + tol
    assert m_sketch["agg_residual_mean"] == pytest.approx(m_exact["agg_residual_mean"], abs=tol + 1e-7)
    scale = np.abs(problem.dW).max()
    np.testing.assert_allclose(sketch[B_KEY] @ sketch[A_KEY], exact[B_KEY] @ exact[A_KEY], rtol=0,
                               atol=(1e-6 if power_iters == 2 else 1e-3) * scale)  # fmt: skip


def test_sketch_is_seeded() -> None:
    problem = low_rank_plus_noise(7)
    options = {"exact_max_stack": 2, "sketch_oversample": 2, "sketch_power_iters": 2}
    a, _ = problem.run("exact-svd", seed=1, **options)
    b, _ = problem.run("exact-svd", seed=1, **options)
    c, _ = problem.run("exact-svd", seed=2, **options)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a[B_KEY], c[B_KEY])  # another test matrix …
    np.testing.assert_allclose(c[B_KEY] @ c[A_KEY], a[B_KEY] @ a[A_KEY], rtol=0,
                               atol=1e-6 * np.abs(problem.dW).max())  # … the same answer  # fmt: skip


@pytest.mark.parametrize("max_stack", [512, 1])
def test_svd_of_product_reconstructs_the_update(max_stack: int) -> None:
    problem = make_problem(4, d=9, n=7, r=2, K=3, ranks=[2, 1, 2])
    A_s, B_s = stack(problem.As, problem.Bs, problem.p)
    U, S, Vt = svd_of_product(B_s, A_s, 2, AggregationOptions(exact_max_stack=max_stack))
    np.testing.assert_allclose((U * S) @ Vt, problem.dW, rtol=0, atol=1e-12 * np.abs(problem.dW).max())
    np.testing.assert_allclose(S[:5], singular_values(problem.dW)[:5], rtol=1e-10)
    assert np.all(np.diff(S) <= 0)
    np.testing.assert_allclose(U.T @ U, np.eye(U.shape[1]), atol=1e-12)
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(Vt.shape[0]), atol=1e-12)


# --- ranks -----------------------------------------------------------------------------------------------


def test_mixed_client_ranks_are_accepted_and_match_dense() -> None:
    problem = make_problem(5, d=8, n=10, r=4, K=4, ranks=[4, 1, 2, 3])
    out, _ = problem.run("exact-svd")
    assert out[A_KEY].shape == (4, 10) and out[B_KEY].shape == (8, 4)
    want, optimum = best_rank(problem.dW, 4)
    assert relative_error(problem.dW, out[A_KEY], out[B_KEY]) == pytest.approx(optimum, abs=1e-9)
    np.testing.assert_allclose(out[B_KEY] @ out[A_KEY], want, rtol=0, atol=1e-9 * np.abs(want).max())


def test_only_exact_svd_takes_mixed_ranks() -> None:
    assert [n for n in AGGREGATORS.names() if AGGREGATORS.get(n).heterogeneous_ranks] == ["exact-svd"]
    assert EXACT.frozen == ()


def test_float32_close_to_float64() -> None:
    problem = make_problem(6, d=12, n=10, r=3, K=5)
    out64, _ = problem.run("exact-svd")
    out32, metrics = problem.astype(np.float32).run("exact-svd")
    assert out32[A_KEY].dtype == out32[B_KEY].dtype == np.float32
    scale = np.abs(problem.dW).max()
    np.testing.assert_allclose(out32[B_KEY] @ out32[A_KEY], out64[B_KEY] @ out64[A_KEY], rtol=0, atol=1e-5 * scale)
    _, optimum = best_rank(problem.dW, 3)
    assert metrics["agg_residual_mean"] == pytest.approx(optimum, abs=1e-3)
