"""FedIT (registered as ``fedit`` and ``fedavg``): separate weighted averages of A and B, and of every
other tensor, checked against brute-force float64 numpy.

The first part drives states without LoRA pairs (no key ends in ``.lora_A.weight``), so every tensor
goes through the driver's weighted average (:func:`strategies.aggregator.weighted_sum`); the second
part checks the LoRA factors and the residual FedIT reports.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_cases import A_KEY, B_KEY, HEAD, Problem, dense_average, make_problem, problems, relative_error

from strategies import AGGREGATORS, AggregationOptions
from strategies.aggregator import normalised, weighted_sum
from strategies.fedit import FEDIT, fedit_pair


def weighted_average(states, weights):  # noqa: ANN001, ANN201 - the driver over non-LoRA tensors
    states = list(states)
    previous = {k: np.zeros_like(v) for k, v in states[0].items()} if states else {}
    return FEDIT(states, weights, previous=previous)[0]


shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def states_and_weights(draw: st.DrawFn) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    layout = draw(st.dictionaries(st.sampled_from(["a", "b.lora_A", "b.lora_B", "head", "z"]), shapes,
                                  min_size=1, max_size=4))
    num_clients = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    states = [{key: rng.normal(size=shape).astype(np.float32) * 10 for key, shape in layout.items()}
              for _ in range(num_clients)]
    weights = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 1e4), st.integers(0, 1000).map(float)),
                            min_size=num_clients, max_size=num_clients).filter(lambda w: sum(w) > 0))
    return states, weights


def _brute_force(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    out = {}
    for key in states[0]:
        stacked = np.stack([s[key].astype(np.float64) for s in states])  # (clients, *shape)
        w = np.array(weights, dtype=np.float64).reshape((-1,) + (1,) * (stacked.ndim - 1))
        out[key] = (stacked * w).sum(axis=0) / sum(weights)
    return out


@settings(max_examples=50, deadline=None)
@given(states_and_weights())
def test_matches_brute_force(case: tuple[list[dict[str, np.ndarray]], list[float]]) -> None:
    states, weights = case
    got = weighted_average(states, weights)
    want = _brute_force(states, weights)
    assert list(got) == list(states[0])
    for key in want:
        assert got[key].shape == states[0][key].shape
        assert got[key].dtype == np.float32
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5)


@settings(max_examples=50, deadline=None)
@given(states_and_weights(), st.floats(1e-3, 1e3))
def test_weights_are_normalised(case: tuple[list[dict[str, np.ndarray]], list[float]], scale: float) -> None:
    states, weights = case
    a = weighted_average(states, weights)
    b = weighted_average(states, [w * scale for w in weights])
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(states_and_weights(), st.floats(0.5, 100))
def test_equal_weights_give_plain_mean(case: tuple[list[dict[str, np.ndarray]], list[float]], w: float) -> None:
    states, _ = case
    got = weighted_average(states, [w] * len(states))
    for key in got:
        np.testing.assert_allclose(got[key], np.mean([s[key] for s in states], axis=0), rtol=1e-5, atol=1e-5)


def test_hand_computed() -> None:
    states = [{"x": np.array([1.0, 2.0], dtype=np.float32)}, {"x": np.array([3.0, 6.0], dtype=np.float32)}]
    got = weighted_average(states, [1, 3])
    np.testing.assert_array_equal(got["x"], np.array([2.5, 5.0], dtype=np.float32))


def test_zero_weight_client_is_ignored() -> None:
    states = [{"x": np.ones(3, np.float32)}, {"x": np.full(3, 1e6, np.float32)}]
    np.testing.assert_array_equal(weighted_average(states, [5, 0])["x"], np.ones(3, np.float32))


def test_single_client_returns_its_state() -> None:
    state = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.array(4.0, dtype=np.float32)}
    got = weighted_average([state], [17])
    for key in state:
        np.testing.assert_array_equal(got[key], state[key])


def test_accepts_a_generator_of_states() -> None:
    states = [{"x": np.full(2, float(i), np.float32)} for i in range(3)]
    got = weighted_average((s for s in states), [1, 1, 1])
    np.testing.assert_allclose(got["x"], [1.0, 1.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_dtype_preserved(dtype: type) -> None:
    states = [{"x": np.array([1, 2], dtype=dtype)}, {"x": np.array([2, 4], dtype=dtype)}]
    got = weighted_average(states, [1, 1])
    assert got["x"].dtype == dtype
    np.testing.assert_allclose(got["x"].astype(np.float64), [1.5, 3.0])


def test_inputs_not_modified() -> None:
    states = [{"x": np.ones(3, np.float32)}, {"x": np.zeros(3, np.float32)}]
    weighted_average(states, [1, 1])
    np.testing.assert_array_equal(states[0]["x"], np.ones(3))
    np.testing.assert_array_equal(states[1]["x"], np.zeros(3))


def _two() -> list[dict[str, np.ndarray]]:
    return [{"x": np.ones(2, np.float32), "y": np.ones(1, np.float32)},
            {"x": np.ones(2, np.float32), "y": np.ones(1, np.float32)}]


def test_mismatched_keys() -> None:
    states = _two()
    states[1]["z"] = states[1].pop("y")
    with pytest.raises(ValueError, match="keys"):
        weighted_average(states, [1, 1])


def test_extra_key_in_later_client() -> None:
    states = _two()
    states[1]["extra"] = np.ones(1, np.float32)
    with pytest.raises(ValueError, match="keys"):
        weighted_average(states, [1, 1])


def test_mismatched_shapes() -> None:
    states = _two()
    states[1]["x"] = np.ones((2, 1), np.float32)
    with pytest.raises(ValueError, match="shape"):
        weighted_average(states, [1, 1])


@pytest.mark.parametrize("weights", [[1, -1], [-0.5, 2]])
def test_negative_weights(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="non-negative"):
        weighted_average(_two(), weights)


def test_zero_total() -> None:
    with pytest.raises(ValueError, match="positive sum"):
        weighted_average(_two(), [0, 0])


def test_no_weights() -> None:
    with pytest.raises(ValueError):
        weighted_average([], [])


@pytest.mark.parametrize("weights", [[1], [1, 1, 1]])
def test_count_mismatch(weights: list[float]) -> None:
    with pytest.raises(ValueError, match="states|weights"):
        weighted_average(_two(), weights)


def test_registered_fedavg_is_fedit_and_without_lora_reports_no_residual() -> None:
    assert AGGREGATORS.get("fedavg") is AGGREGATORS.get("fedit") is FEDIT
    states = [{"x": np.array([0.0, 4.0], np.float32)}, {"x": np.array([2.0, 0.0], np.float32)}]
    state, metrics = AGGREGATORS.get("fedavg")(states, [1.0, 1.0], previous={"x": np.zeros(2, np.float32)})
    assert metrics == {}
    np.testing.assert_array_equal(state["x"], np.array([1.0, 2.0], np.float32))


@settings(max_examples=30, deadline=None)
@given(states_and_weights())
def test_weighted_sum_is_the_driver_average(case: tuple[list[dict[str, np.ndarray]], list[float]]) -> None:
    states, weights = case
    got = weighted_average(states, weights)
    p = normalised(weights)
    for key in got:
        np.testing.assert_array_equal(got[key], weighted_sum([s[key] for s in states], p))


# --- LoRA layers -------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(problems())
def test_lora_factors_are_averaged_separately(problem: Problem) -> None:
    out, metrics = problem.run("fedit")
    A_bar, B_bar = dense_average(problem.As, problem.p), dense_average(problem.Bs, problem.p)
    np.testing.assert_allclose(out[A_KEY], A_bar, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out[B_KEY], B_bar, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out[HEAD], dense_average(problem.heads, problem.p), rtol=1e-12, atol=1e-14)
    want = relative_error(problem.dW, A_bar, B_bar)  # the bias of averaging factors separately
    assert metrics["agg_residual_mean"] == pytest.approx(want, abs=1e-7)
    assert metrics["agg_residual_max"] == metrics["agg_residual_mean"]  # one layer


@settings(max_examples=30, deadline=None)
@given(problems())
def test_pair_rule_ignores_the_previous_factors(problem: Problem) -> None:
    A, B = fedit_pair(problem.As, problem.Bs, problem.p, prev_A=problem.prev_A * 0 + 7.0,
                      prev_B=problem.prev_B * 0 - 7.0, options=AggregationOptions())  # fmt: skip
    np.testing.assert_allclose(A, dense_average(problem.As, problem.p), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(B, dense_average(problem.Bs, problem.p), rtol=1e-12, atol=1e-14)


def test_one_client_is_exact_and_two_are_biased() -> None:
    problem = make_problem(0, d=5, n=4, r=2, K=1)
    out, metrics = problem.run("fedit")
    np.testing.assert_allclose(out[B_KEY] @ out[A_KEY], problem.dW, rtol=1e-12)
    assert metrics["agg_residual_max"] <= 1e-6
    # ΔW = ½·1·1 + ½·0·0 = ½, but B̄Ā = ½·½ = ¼: a relative error of exactly ½
    one, zero = np.ones((1, 1)), np.zeros((1, 1))
    states = [{"l.lora_A.weight": one, "l.lora_B.weight": one}, {"l.lora_A.weight": zero, "l.lora_B.weight": zero}]
    out, metrics = FEDIT(states, [2, 2], previous={"l.lora_A.weight": zero, "l.lora_B.weight": zero})
    assert out["l.lora_B.weight"] @ out["l.lora_A.weight"] == pytest.approx(0.25)
    assert metrics == {"agg_residual_mean": pytest.approx(0.5), "agg_residual_max": pytest.approx(0.5),
                       "agg_cosine_mean": 1.0, "agg_cosine_min": 1.0,  # 0.25 points the way ΔW = 0.5 does
                       "agg_correction_mean": 0.0, "agg_correction_max": 0.0}  # fmt: skip


def test_fedavg_alias_runs_the_same_rule() -> None:
    problem = make_problem(1, d=6, n=5, r=3, K=4)
    a, ma = problem.run("fedavg")
    b, mb = problem.run("fedit")
    assert ma == mb
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not FEDIT.frozen and not FEDIT.heterogeneous_ranks
