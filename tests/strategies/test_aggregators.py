"""Every LoRA aggregation rule against dense brute force (hypothesis), plus one contract for all.

Random factors in float64: d, n up to 12, rank r up to 4, 1–5 clients with unequal weights. ΔW is
formed densely here (never by the product code) as the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import AGGREGATORS, AggregationOptions
from strategies.aggregator import truncate_to_rank
from strategies.lora_fair_ab import fair_ab_objective
from strategies.residual import relative_residual

A_KEY, B_KEY, HEAD = "m.layer.lora_A.weight", "m.layer.lora_B.weight", "m.head.weight"


def make_case(seed: int, *, clients: int, d: int, n: int, r: int, ranks: list[int] | None = None) -> dict:
    rng = np.random.default_rng(seed)
    ranks = ranks or [r] * clients
    states = [{A_KEY: rng.normal(size=(rk, n)), B_KEY: rng.normal(size=(d, rk)), HEAD: rng.normal(size=(3,))}
              for rk in ranks]
    weights = list(rng.uniform(0.1, 5.0, size=clients))
    previous = {A_KEY: rng.normal(size=(r, n)), B_KEY: np.zeros((d, r)), HEAD: np.zeros(3)}
    p = np.array(weights) / sum(weights)
    dense = sum(pk * s[B_KEY] @ s[A_KEY] for pk, s in zip(p, states, strict=True))
    return {"states": states, "weights": weights, "previous": previous, "p": p, "dW": dense}


cases = st.builds(
    lambda seed, k, d, n, r: make_case(seed, clients=k, d=d, n=n, r=r),
    st.integers(0, 2**31), st.integers(1, 5), st.integers(3, 12), st.integers(3, 12), st.integers(1, 4),
)  # fmt: skip


def run(name: str, case: dict, **options: float) -> tuple[dict, dict]:
    states = case["states"]
    if AGGREGATORS.get(name).frozen:
        states = [{k: v for k, v in s.items() if ".lora_A." not in k} for s in states]
    return AGGREGATORS.get(name)(states, case["weights"], previous=case["previous"],
                                 options=AggregationOptions(**options))


def dense_residual(case: dict, out: dict) -> float:
    return float(np.linalg.norm(case["dW"] - out[B_KEY] @ out[A_KEY]) / np.linalg.norm(case["dW"]))


def factors(case: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
    return [s[A_KEY] for s in case["states"]], [s[B_KEY] for s in case["states"]]


@settings(max_examples=40, deadline=None)
@given(cases)
def test_residual_metric_matches_dense(case: dict) -> None:
    rng = np.random.default_rng(1)
    new_A, new_B = rng.normal(size=case["previous"][A_KEY].shape), rng.normal(size=case["previous"][B_KEY].shape)
    As, Bs = factors(case)
    want = np.linalg.norm(case["dW"] - new_B @ new_A) / np.linalg.norm(case["dW"])
    assert relative_residual(As, Bs, case["p"], new_A, new_B) == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_residual_conventions_for_zero_update() -> None:
    A, B = np.ones((2, 3)), np.zeros((4, 2))
    assert relative_residual([A], [B], np.array([1.0]), A, B) == 0.0
    assert relative_residual([A], [B], np.array([1.0]), A, np.ones((4, 2))) == 1.0


@settings(max_examples=40, deadline=None)
@given(cases)
def test_fedit_is_the_average_of_each_factor(case: dict) -> None:
    out, metrics = run("fedit", case)
    As, Bs = factors(case)
    np.testing.assert_allclose(out[A_KEY], sum(p * a for p, a in zip(case["p"], As, strict=True)), atol=1e-12)
    np.testing.assert_allclose(out[B_KEY], sum(p * b for p, b in zip(case["p"], Bs, strict=True)), atol=1e-12)
    heads = sum(p * s[HEAD] for p, s in zip(case["p"], case["states"], strict=True))
    np.testing.assert_allclose(out[HEAD], heads, atol=1e-12)
    assert metrics["agg_residual_mean"] == pytest.approx(dense_residual(case, out), abs=1e-7)


@settings(max_examples=40, deadline=None)
@given(cases, st.sampled_from([1e-6, 1e-2, 1.0]))
def test_lora_fair_is_the_dense_ridge_solution(case: dict, lam: float) -> None:
    out, _ = run("lora-fair", case, lam=lam)
    fedit, _ = run("fedit", case)
    A_bar, B_bar = fedit[A_KEY], fedit[B_KEY]
    lam_eff = lam * np.trace(A_bar @ A_bar.T) / A_bar.shape[0]
    # argmin_B ‖ΔW − B Ā‖² + λ_eff ‖B − B̄‖², solved densely: B (ĀĀᵀ + λI) = ΔW Āᵀ + λ B̄
    system = A_bar @ A_bar.T + lam_eff * np.eye(A_bar.shape[0])
    want = np.linalg.lstsq(system, (case["dW"] @ A_bar.T + lam_eff * B_bar).T, rcond=None)[0].T
    np.testing.assert_allclose(out[A_KEY], A_bar, atol=1e-12)
    np.testing.assert_allclose(out[B_KEY] @ A_bar, want @ A_bar, atol=1e-6 * (1 + np.abs(want @ A_bar).max()))
    assert dense_residual(case, out) <= dense_residual(case, fedit) + 1e-9


@settings(max_examples=30, deadline=None)
@given(cases)
def test_lora_fair_with_huge_lambda_is_fedit(case: dict) -> None:
    out, _ = run("lora-fair", case, lam=1e12)
    fedit, _ = run("fedit", case)
    np.testing.assert_allclose(out[B_KEY], fedit[B_KEY], atol=1e-8)


@settings(max_examples=40, deadline=None)
@given(cases, st.sampled_from([1e-4, 1e-2, 1.0]))
def test_lora_fair_ab_objective_at_most_lora_fair_and_non_increasing(case: dict, lam: float) -> None:
    As, Bs = factors(case)
    fair, _ = run("lora-fair", case, lam=lam)
    f_fair = fair_ab_objective(As, Bs, case["p"], fair[A_KEY], fair[B_KEY], lam)
    values = []
    for sweeps in (1, 2, 5, 20):
        out, _ = run("lora-fair-ab", case, lam=lam, ab_iterations=sweeps)
        values.append(fair_ab_objective(As, Bs, case["p"], out[A_KEY], out[B_KEY], lam))
    tol = 1e-9 * (1 + f_fair)
    assert values[0] <= f_fair + tol
    assert all(b <= a + tol for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("seed", range(8))
def test_lora_fair_ab_approaches_exact_svd_as_lambda_vanishes(seed: int) -> None:
    case = make_case(seed, clients=4, d=10, n=9, r=3)
    exact = dense_residual(case, run("exact-svd", case)[0])
    fair = dense_residual(case, run("lora-fair", case, lam=1e-9)[0])
    ab = [dense_residual(case, run("lora-fair-ab", case, lam=lam, ab_iterations=300)[0]) for lam in (1.0, 1e-2, 1e-9)]
    assert ab[-1] == pytest.approx(exact, abs=1e-3)
    assert ab[-1] <= ab[1] + 1e-9 <= ab[0] + 2e-9  # smaller λ, smaller residual
    assert exact < fair


@settings(max_examples=30, deadline=None)
@given(cases)
def test_lora_fair_ab_with_huge_lambda_stays_at_the_averages(case: dict) -> None:
    out, _ = run("lora-fair-ab", case, lam=1e12)
    fedit, _ = run("fedit", case)
    for key in (A_KEY, B_KEY):
        np.testing.assert_allclose(out[key], fedit[key], atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(cases)
def test_ffa_lora_keeps_A_and_averages_B_exactly(case: dict) -> None:
    out, metrics = run("ffa-lora", case)
    A = case["previous"][A_KEY]
    np.testing.assert_array_equal(out[A_KEY], A)
    B_bar = sum(p * s[B_KEY] for p, s in zip(case["p"], case["states"], strict=True))
    np.testing.assert_allclose(out[B_KEY], B_bar, atol=1e-12)
    assert metrics["agg_residual_max"] < 1e-6  # clients trained B under the shared A: exact


def test_ffa_lora_rejects_a_client_that_sends_A() -> None:
    case = make_case(0, clients=2, d=4, n=5, r=2)
    with pytest.raises(ValueError, match="extra"):
        AGGREGATORS.get("ffa-lora")(case["states"], case["weights"], previous=case["previous"])


def best_rank(dW: np.ndarray, r: int) -> tuple[np.ndarray, float]:
    U, S, Vt = np.linalg.svd(dW, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r], float(np.sqrt((S[r:] ** 2).sum()) / np.linalg.norm(S))


@settings(max_examples=40, deadline=None)
@given(cases)
def test_exact_svd_is_the_best_rank_r_approximation(case: dict) -> None:
    r = case["previous"][A_KEY].shape[0]
    out, metrics = run("exact-svd", case)
    _, optimum = best_rank(case["dW"], r)
    assert dense_residual(case, out) == pytest.approx(optimum, abs=1e-7)
    assert metrics["agg_residual_mean"] == pytest.approx(optimum, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_exact_svd_heterogeneous_ranks(seed: int, ranks: list[int]) -> None:
    r = max(ranks)
    case = make_case(seed, clients=len(ranks), d=9, n=11, r=r, ranks=ranks)
    out, _ = run("exact-svd", case)
    assert out[A_KEY].shape == (r, 11) and out[B_KEY].shape == (9, r)
    _, optimum = best_rank(case["dW"], r)
    assert dense_residual(case, out) == pytest.approx(optimum, abs=1e-7)
    if sum(ranks) <= r:
        assert dense_residual(case, out) < 1e-7
    for k in range(1, r):  # a client of rank k gets the best rank-k truncation
        cut = truncate_to_rank(out, k)
        assert cut[A_KEY].shape == (k, 11) and cut[B_KEY].shape == (9, k)
        _, optimum_k = best_rank(case["dW"], k)
        assert dense_residual(case, cut) == pytest.approx(optimum_k, abs=1e-7)


@pytest.mark.parametrize("seed", range(5))
def test_exact_svd_randomized_path_matches_exact_on_a_decaying_spectrum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    d, n, r, K = 60, 50, 4, 12
    core_A, core_B = rng.normal(size=(r, n)), rng.normal(size=(d, r))
    states = [{A_KEY: core_A + 0.01 * rng.normal(size=(r, n)), B_KEY: core_B + 0.01 * rng.normal(size=(d, r))}
              for _ in range(K)]
    weights, previous = list(rng.uniform(1, 3, K)), {A_KEY: rng.normal(size=(r, n)), B_KEY: np.zeros((d, r))}
    exact, m_exact = AGGREGATORS.get("exact-svd")(states, weights, previous=previous)
    sketch, m_sketch = AGGREGATORS.get("exact-svd")(states, weights, previous=previous,
                                                    options=AggregationOptions(exact_max_stack=8))  # K·r = 48 > 8
    assert m_sketch["agg_residual_mean"] == pytest.approx(m_exact["agg_residual_mean"], rel=1e-3, abs=1e-9)
    np.testing.assert_allclose(sketch[B_KEY] @ sketch[A_KEY], exact[B_KEY] @ exact[A_KEY], atol=1e-8)


def test_exact_svd_zero_update_keeps_previous_A_rows() -> None:
    case = make_case(3, clients=3, d=6, n=7, r=3)
    for s in case["states"]:
        s[B_KEY][:] = 0.0  # round 1 of LoRA: nobody moved B yet
    out, metrics = run("exact-svd", case)
    np.testing.assert_array_equal(out[B_KEY], 0.0)
    np.testing.assert_array_equal(out[A_KEY], case["previous"][A_KEY])  # not zero: B can still learn
    assert metrics["agg_residual_max"] == 0.0


@pytest.mark.parametrize("name", ["fedit", "lora-fair", "lora-fair-ab", "ffa-lora"])
def test_equal_rank_rules_reject_lower_rank_clients(name: str) -> None:
    case = make_case(0, clients=2, d=5, n=6, r=3, ranks=[3, 2])
    with pytest.raises(ValueError, match="rank|shapes"):
        run(name, case)


# --- one contract for every registered rule ------------------------------------------------------

@pytest.mark.parametrize("name", AGGREGATORS.names())
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_contract(name: str, dtype: type) -> None:
    case = make_case(7, clients=4, d=8, n=6, r=3)
    case["states"] = [{k: v.astype(dtype) for k, v in s.items()} for s in case["states"]]
    case["previous"] = {k: v.astype(dtype) for k, v in case["previous"].items()}
    out, metrics = run(name, case)
    assert list(out) == list(case["previous"])
    for key, value in out.items():
        assert value.dtype == dtype and value.shape == case["previous"][key].shape
        assert np.isfinite(value).all()
    assert 0.0 <= metrics["agg_residual_mean"] <= metrics["agg_residual_max"] <= 1.5
    # client order does not matter (weights permuted with them)
    order = [2, 0, 3, 1]
    permuted = {**case, "states": [case["states"][i] for i in order], "weights": [case["weights"][i] for i in order]}
    again, _ = run(name, permuted)
    for key in out:
        np.testing.assert_allclose(again[key], out[key], rtol=1e-4 if dtype == np.float32 else 1e-9, atol=1e-6)


@pytest.mark.parametrize("name", AGGREGATORS.names())
def test_identical_clients_are_reproduced_exactly(name: str) -> None:
    case = make_case(5, clients=3, d=7, n=5, r=2)
    one = case["states"][0]
    if AGGREGATORS.get(name).frozen:
        one = {**one, A_KEY: case["previous"][A_KEY]}  # FFA-LoRA clients keep the shared A
    case["states"] = [dict(one) for _ in range(3)]
    out, metrics = run(name, case)
    np.testing.assert_allclose(out[B_KEY] @ out[A_KEY], one[B_KEY] @ one[A_KEY], atol=1e-9)
    assert metrics["agg_residual_max"] < 1e-6


def test_unknown_strategy_lists_known() -> None:
    from fedpeft.errors import FedPeftError

    with pytest.raises(FedPeftError, match="known: exact-svd, fedavg, fedit, ffa-lora, lora-fair, lora-fair-ab"):
        AGGREGATORS.get("fedprox")


def test_options_validate() -> None:
    for bad in ({"lam": -1.0}, {"ab_iterations": 0}, {"exact_max_stack": 0}, {"sketch_oversample": -1}):
        with pytest.raises(ValueError):
            AggregationOptions(**bad)
