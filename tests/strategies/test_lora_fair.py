"""LoRA-FAIR as the paper does it: A' = Ā, B' = B̄ + ΔB with ΔB lowering f = 1 − cos(ΔW, (B̄ + ΔB)Ā) + λ‖ΔB‖²,
checked against a brute-force dense evaluation of the same objective (the d × n ΔW formed explicitly)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_cases import A_KEY, B_KEY, Problem, dense_average, make_problem, problems

from strategies import AGGREGATORS
from strategies.lora_fair import cosine_objective
from strategies.residual import LayerGrams

LAMS = st.sampled_from([1e-3, 1e-2, 0.1, 1.0])


def dense_objective(problem: Problem, B: np.ndarray, lam: float) -> float:
    """f(B − B̄) with the dense ΔW and (B)Ā, float64."""
    A_bar, B_bar = dense_average(problem.As, problem.p), dense_average(problem.Bs, problem.p)
    dW, X = problem.dW, np.asarray(B, dtype=np.float64) @ A_bar
    cosine = np.vdot(dW, X) / (np.linalg.norm(dW) * np.linalg.norm(X))
    return float(1.0 - cosine + lam * np.sum((B - B_bar) ** 2))


def fit(problem: Problem, name: str = "lora-fair", **options: object) -> np.ndarray:
    return problem.run(name, **options)[0][B_KEY]


@settings(max_examples=40, deadline=None)
@given(problems(), LAMS, st.integers(0, 2**32 - 1))
def test_gram_objective_is_the_dense_objective(problem: Problem, lam: float, seed: int) -> None:
    A_bar, B_bar = dense_average(problem.As, problem.p), dense_average(problem.Bs, problem.p)
    objective = cosine_objective(LayerGrams(problem.As, problem.Bs, problem.p), A_bar, B_bar, lam)
    B = B_bar + np.random.default_rng(seed).normal(size=B_bar.shape) * np.abs(B_bar).mean()
    assert objective.value(B)[0] == pytest.approx(dense_objective(problem, B, lam), rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(problems(), LAMS)
def test_correction_lowers_the_objective_below_fedit_and_the_ridge_fit(problem: Problem, lam: float) -> None:
    out, _ = problem.run("lora-fair", lam=lam)
    np.testing.assert_allclose(out[A_KEY], dense_average(problem.As, problem.p), rtol=1e-12, atol=1e-14)  # A kept
    f = dense_objective(problem, out[B_KEY], lam)
    f_fedit = dense_objective(problem, dense_average(problem.Bs, problem.p), lam)  # ΔB = 0
    f_ridge = dense_objective(problem, fit(problem, "lora-fair-ridge", lam=lam), lam)  # the closed form, same λ
    assert f <= f_fedit + 1e-12
    assert f <= f_ridge + 1e-9


@settings(max_examples=40, deadline=None)
@given(problems(), LAMS)
def test_more_steps_never_raise_the_objective(problem: Problem, lam: float) -> None:
    values = [dense_objective(problem, fit(problem, lam=lam, fair_steps=k), lam) for k in (1, 2, 5, 20, 100)]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:], strict=False))


@settings(max_examples=40, deadline=None)
@given(problems(tall=True))
def test_lambda_zero_reaches_the_best_cosine(problem: Problem) -> None:
    """λ = 0: the cosine alone, whose maximum over B is that of ΔW's projection onto Ā's row space."""
    A_bar = dense_average(problem.As, problem.p)
    projected = problem.dW @ np.linalg.pinv(A_bar) @ A_bar
    best = np.linalg.norm(projected) / np.linalg.norm(problem.dW)
    got = 1.0 - dense_objective(problem, fit(problem, lam=0.0), 0.0)
    assert got == pytest.approx(best, abs=1e-7)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_huge_lambda_is_fedit(problem: Problem) -> None:
    fair, _ = problem.run("lora-fair", lam=1e9)
    fedit, _ = problem.run("fedit")
    np.testing.assert_array_equal(fair[A_KEY], fedit[A_KEY])
    np.testing.assert_allclose(fair[B_KEY], fedit[B_KEY], rtol=0, atol=1e-7 * np.abs(fedit[B_KEY]).max())


@pytest.mark.parametrize("seed", range(5))
def test_larger_lambda_keeps_the_correction_smaller(seed: int) -> None:
    """The penalty is what keeps B' near B̄ (the paper's point): the correction shrinks as λ grows."""
    problem = make_problem(seed, d=20, n=16, r=4, K=6)
    B_bar = dense_average(problem.Bs, problem.p)
    sizes = [np.linalg.norm(fit(problem, lam=lam) - B_bar) for lam in (0.0, 1e-3, 1e-2, 0.1, 1.0)]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(sizes, sizes[1:], strict=False))
    assert sizes[-1] < sizes[0]


def test_metrics_report_the_cosine_and_the_correction() -> None:
    problem = make_problem(3, d=12, n=10, r=3, K=5)
    out, metrics = problem.run("lora-fair")
    _, fedit = problem.run("fedit")
    assert metrics["agg_cosine_min"] > fedit["agg_cosine_min"]  # the correction turns B'A' towards ΔW
    assert metrics["agg_correction_max"] > 0.0 == fedit["agg_correction_max"]
    B_bar = dense_average(problem.Bs, problem.p)
    want = np.linalg.norm(out[B_KEY] - B_bar) / np.linalg.norm(B_bar)
    assert metrics["agg_correction_max"] == pytest.approx(want, rel=1e-9)


def test_zero_update_or_zero_product_leaves_B_at_the_average() -> None:
    """ΔW = 0 or B̄Ā = 0: the cosine is undefined, ΔB = 0 and nothing is divided by zero."""
    problem = make_problem(2, d=5, n=4, r=2, K=2, weights=[1.0, 1.0])
    problem.Bs = [np.zeros_like(b) for b in problem.Bs]
    out, metrics = problem.run("lora-fair")
    np.testing.assert_array_equal(out[B_KEY], 0.0)
    problem = make_problem(2, d=5, n=4, r=2, K=2, weights=[1.0, 1.0])
    problem.As[1] = -problem.As[0]  # Ā = 0
    out, metrics = problem.run("lora-fair")
    np.testing.assert_array_equal(out[A_KEY], 0.0)
    np.testing.assert_allclose(out[B_KEY], dense_average(problem.Bs, problem.p), rtol=1e-12)
    assert all(np.isfinite(v) for v in metrics.values())


def test_registration() -> None:
    agg = AGGREGATORS.get("lora-fair")
    assert agg.name == "lora-fair" and agg.frozen == () and agg.held == () and not agg.linear
    assert not agg.heterogeneous_ranks and "LoRA-FAIR" in agg.summary


@pytest.mark.parametrize("name", ["lora-fair", "lora-fair-ridge", "exact-svd", "fedit"])
def test_each_layer_stacks_and_forms_its_grams_once(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The rule and the round's metrics share one ‖ΔW‖² per layer: the O((d + n) R²) products are the cost of
    aggregating a 7B-shaped adapter, so paying them twice doubles it (bench/aggregation.py)."""
    import strategies.residual as residual

    calls = {"stack": 0, "gram": 0}
    stack, gram = residual.stack, residual.LayerGrams.dw_sq.func

    def counted_stack(*args: object) -> tuple[np.ndarray, np.ndarray]:
        calls["stack"] += 1
        return stack(*args)

    def counted_gram(self: LayerGrams) -> float:
        calls["gram"] += 1
        return gram(self)

    counted = functools.cached_property(counted_gram)
    counted.__set_name__(residual.LayerGrams, "dw_sq")
    monkeypatch.setattr(residual, "stack", counted_stack)
    monkeypatch.setattr(residual.LayerGrams, "dw_sq", counted)
    problem = make_problem(0, d=6, n=5, r=2, K=4)
    out, metrics = problem.run(name)
    assert calls == {"stack": 1, "gram": 1}, calls
    assert 0.0 <= metrics["agg_residual_mean"] <= 1.0 and out[B_KEY].shape == (6, 2)
