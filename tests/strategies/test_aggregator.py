"""The shared driver: pairing LoRA factors, averaging the rest, checks, options; then one contract that
every registered rule must meet.

Rule-specific maths lives in test_<rule>.py; here the references are dense float64 numpy.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lora_cases import (
    A_KEY,
    B_KEY,
    HEAD,
    Problem,
    assert_close_to_scale,
    dense_average,
    dense_update,
    make_problem,
    relative_error,
)

from fedpeft.adapters.state import key_matches, without_keys
from strategies import AGGREGATORS, AggregationOptions, Aggregator, strategies_for
from strategies.aggregator import lora_layers, normalised, truncate_to_rank, weighted_sum

LORA_NAMES = strategies_for("lora")  # the LoRA contract; SSF's aggregator has its own tests
METRIC_KEYS = {"agg_residual_mean", "agg_residual_max", "agg_cosine_mean", "agg_cosine_min", "agg_correction_mean",
               "agg_correction_max"}  # fmt: skip

# --- lora_layers -----------------------------------------------------------------------------------


def test_lora_layers_pairs_factors_and_sorts() -> None:
    keys = ["z.head.weight", "b.q.lora_B.weight", "a.v.lora_A.weight", "b.q.lora_A.weight", "a.v.lora_B.weight",
            "a.head.bias"]  # fmt: skip
    pairs, others = lora_layers(keys)
    assert pairs == [("a.v.lora_A.weight", "a.v.lora_B.weight"), ("b.q.lora_A.weight", "b.q.lora_B.weight")]
    assert others == ["a.head.bias", "z.head.weight"]
    assert lora_layers(iter(keys)) == (pairs, others)  # any iterable of keys


@pytest.mark.parametrize(
    "key",
    ["x.lora_A.bias", "lora_A.weight", "x.lora_A.weight.extra", "x.lora_A_weight", "x.lora_a.weight", "x.lora_B"],
)
def test_lora_layers_only_pairs_the_exact_suffix(key: str) -> None:
    assert lora_layers([key, "h"]) == ([], sorted([key, "h"]))


@pytest.mark.parametrize("key", ["m.lora_A.weight", "m.lora_B.weight"])
def test_lora_layers_rejects_an_unpaired_factor(key: str) -> None:
    with pytest.raises(ValueError, match="no matching"):
        lora_layers([key, "m.head.weight"])


# --- normalised / weighted_sum ---------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 1e6), min_size=1, max_size=8).filter(lambda w: sum(w) > 0))
def test_normalised_sums_to_one_in_proportion(weights: list[float]) -> None:
    p = normalised(weights)
    assert p.dtype == np.float64 and p.shape == (len(weights),)
    assert p.sum() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(p * sum(weights), weights, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("weights", [[], [0.0, 0.0], [1.0, -1.0], [np.nan, 1.0], [np.inf, 1.0], [[1.0, 2.0]]])
def test_normalised_rejects(weights: list) -> None:
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        normalised(weights)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.lists(st.integers(1, 4), max_size=3).map(tuple), st.integers(0, 2**16))
def test_weighted_sum_matches_dense(K: int, shape: tuple[int, ...], seed: int) -> None:
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=shape) * 10.0 ** rng.integers(-3, 4) for _ in range(K)]
    p = normalised(rng.uniform(0.1, 5.0, size=K))
    got = weighted_sum(arrays, p)
    assert got.shape == shape and got.dtype == np.float64
    np.testing.assert_allclose(got, dense_average(arrays, p), rtol=1e-12, atol=1e-15)


def test_weighted_sum_accumulates_float32_in_float64() -> None:
    arrays = [np.array([1e8], np.float32), np.array([1.0], np.float32), np.array([-1e8], np.float32)]
    got = weighted_sum(arrays, normalised([1.0, 1.0, 1.0]))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [1 / 3], rtol=1e-6)  # float32 accumulation would give 0 or ±2


@pytest.mark.parametrize(("dtype", "want"), [(np.float16, np.float32), (np.float32, np.float32),
                                             (np.float64, np.float64)])  # fmt: skip
def test_weighted_sum_dtype_is_at_least_float32(dtype: type, want: type) -> None:
    got = weighted_sum([np.ones(2, dtype), np.zeros(2, dtype)], np.array([0.25, 0.75]))
    assert got.dtype == want
    np.testing.assert_array_equal(got, [0.25, 0.25])


# --- the driver ------------------------------------------------------------------------------------


def two_layer_problem(seed: int, *, K: int = 3) -> tuple[list[dict], list[float], dict]:
    """Two LoRA layers of different shapes and ranks, a head and a bias."""
    rng = np.random.default_rng(seed)
    shapes = {"q": (6, 5, 2), "v": (4, 7, 3)}  # d, n, r
    previous = {"cls.bias": rng.normal(size=2), "cls.weight": rng.normal(size=(2, 6))}
    for name, (d, n, r) in shapes.items():
        previous[f"m.{name}.lora_A.weight"] = rng.normal(size=(r, n))
        previous[f"m.{name}.lora_B.weight"] = np.zeros((d, r))
    states = [{k: rng.normal(size=v.shape) for k, v in previous.items()} for _ in range(K)]
    return states, list(rng.uniform(0.5, 3.0, size=K)), previous


@pytest.mark.parametrize("name", ["fedit", "lora-fair", "exact-svd"])
def test_driver_averages_heads_and_reports_mean_and_max_over_layers(name: str) -> None:
    states, weights, previous = two_layer_problem(0)
    out, metrics = AGGREGATORS.get(name)(states, weights, previous=previous)
    p = normalised(weights)
    assert list(out) == list(previous)  # the broadcast's key order
    for key in ("cls.bias", "cls.weight"):
        np.testing.assert_allclose(out[key], dense_average([s[key] for s in states], p), rtol=1e-12)
    residuals = []
    for layer in ("q", "v"):
        a_key, b_key = f"m.{layer}.lora_A.weight", f"m.{layer}.lora_B.weight"
        dW = dense_update([s[a_key] for s in states], [s[b_key] for s in states], p)
        residuals.append(relative_error(dW, out[a_key], out[b_key]))
    assert metrics["agg_residual_mean"] == pytest.approx(np.mean(residuals), abs=1e-7)
    assert metrics["agg_residual_max"] == pytest.approx(np.max(residuals), abs=1e-7)
    assert set(metrics) == METRIC_KEYS


def test_driver_without_lora_layers_reports_no_metrics() -> None:
    out, metrics = AGGREGATORS.get("fedit")([{"h": np.ones(2)}, {"h": np.zeros(2)}], [1, 3], previous={"h": np.ones(2)})
    assert metrics == {}
    np.testing.assert_allclose(out["h"], [0.25, 0.25])


@pytest.mark.parametrize("name", ["fedit", "exact-svd"])
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("cls.bias"), "missing \\['cls.bias'\\]"),
        (lambda s: s.update(extra=np.ones(1)), "extra \\['extra'\\]"),
        (lambda s: s.pop("m.q.lora_A.weight"), "keys"),
        (lambda s: s.update({"cls.weight": np.ones((6, 2))}), "cls.weight has shape"),
        (lambda s: s.update({"m.q.lora_A.weight": np.ones((2, 4))}), "shapes"),  # n differs
        (lambda s: s.update({"m.q.lora_B.weight": np.ones((5, 2))}), "shapes"),  # d differs
        (lambda s: s.update({"m.q.lora_A.weight": np.ones((3, 5)), "m.q.lora_B.weight": np.ones((6, 3))}), "shapes"),
        (lambda s: s.update({"m.q.lora_B.weight": np.ones((6, 1))}), "shapes"),  # A rank 2, B rank 1
        (lambda s: s.update({"m.q.lora_A.weight": np.ones(10)}), "shapes"),
    ],
)
def test_driver_rejects_malformed_client_states(name: str, edit: object, match: str) -> None:
    states, weights, previous = two_layer_problem(1)
    edit(states[2])  # type: ignore[operator]
    with pytest.raises(ValueError, match=f"client 2.*{match}"):
        AGGREGATORS.get(name)(states, weights, previous=previous)


@pytest.mark.parametrize(
    ("weights", "match"),
    [([1.0, 1.0], "3 states for 2 weights"), ([1.0, -1.0, 1.0], "non-negative"), ([0.0, 0.0, 0.0], "positive sum")],
)
def test_driver_rejects_bad_weights(weights: list[float], match: str) -> None:
    states, _, previous = two_layer_problem(2)
    with pytest.raises(ValueError, match=match):
        AGGREGATORS.get("fedit")(states, weights, previous=previous)


@pytest.mark.parametrize("name", [n for n in LORA_NAMES if not AGGREGATORS.get(n).heterogeneous_ranks])
def test_equal_rank_rules_reject_a_lower_rank_client(name: str) -> None:
    problem = make_problem(3, d=5, n=6, r=3, K=3, ranks=[3, 2, 3])
    with pytest.raises(ValueError, match="needs every client at rank 3; client 1 has rank 2|client 1 .*shapes"):
        problem.run(name)


@pytest.mark.parametrize("name", LORA_NAMES)
def test_no_rule_accepts_a_client_above_the_global_rank(name: str) -> None:
    problem = make_problem(4, d=5, n=6, r=3, K=2)
    problem.prev_A, problem.prev_B = problem.prev_A[:2], problem.prev_B[:, :2]  # global rank 2, clients rank 3
    with pytest.raises(ValueError, match="shapes"):
        problem.run(name)


class LazyState(Mapping[str, np.ndarray]):
    """A client state that builds each tensor when it is asked for (as a streaming reader would)."""

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self._state = state
        self.reads: list[str] = []

    def __getitem__(self, key: str) -> np.ndarray:
        value = self._state[key].copy()
        self.reads.append(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


@pytest.mark.parametrize("name", LORA_NAMES)
def test_driver_accepts_lazy_mappings(name: str) -> None:
    states, weights, previous = two_layer_problem(5)
    agg = AGGREGATORS.get(name).for_round(1)
    states = [without_keys(s, agg.fixed) for s in states]
    want, want_metrics = agg(states, weights, previous=previous)
    lazy = [LazyState(s) for s in states]
    got, metrics = agg(lazy, weights, previous=LazyState(previous))
    assert metrics == want_metrics
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    for state in lazy:
        assert set(state.reads) == set(state)  # every tensor read, none made up


def test_default_options_are_the_documented_defaults() -> None:
    options = AggregationOptions()
    assert (options.lam, options.ab_iterations, options.fair_steps, options.exact_max_stack) == (1e-2, 5, 20, 512)
    assert (options.sketch_oversample, options.sketch_power_iters, options.seed) == (16, 2, 0)
    problem = make_problem(6, d=5, n=4, r=2, K=3)
    agg = AGGREGATORS.get("lora-fair-ab")
    a, _ = agg(problem.states(), problem.weights, previous=problem.previous())
    b, _ = agg(problem.states(), problem.weights, previous=problem.previous(), options=options)
    c, _ = agg(problem.states(), problem.weights, previous=problem.previous(), options=AggregationOptions(lam=0.5))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.allclose(a[B_KEY], c[B_KEY])  # options do reach the rule


@pytest.mark.parametrize(
    "bad",
    [{"lam": -1e-3}, {"lam": float("nan")}, {"lam": float("inf")}, {"ab_iterations": 0}, {"fair_steps": 0},
     {"exact_max_stack": 0},
     {"sketch_power_iters": -1}, {"sketch_oversample": -1}],
)  # fmt: skip
def test_options_validate(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        AggregationOptions(**bad)


def test_options_edge_values_are_allowed() -> None:
    AggregationOptions(lam=0.0, ab_iterations=1, exact_max_stack=1, sketch_power_iters=0, sketch_oversample=0)


# --- truncate_to_rank / key helpers ------------------------------------------------------------------


def test_truncate_to_rank_slices_factors_and_keeps_the_rest() -> None:
    state = {A_KEY: np.arange(12.0).reshape(3, 4), B_KEY: np.arange(15.0).reshape(5, 3), HEAD: np.ones(3)}
    cut = truncate_to_rank(state, 2)
    assert list(cut) == list(state)
    np.testing.assert_array_equal(cut[A_KEY], state[A_KEY][:2])
    np.testing.assert_array_equal(cut[B_KEY], state[B_KEY][:, :2])
    assert cut[B_KEY].flags.c_contiguous and cut[A_KEY].flags.c_contiguous  # ready for the wire
    assert cut[HEAD] is state[HEAD]
    full = truncate_to_rank(state, 3)
    for key in state:
        np.testing.assert_array_equal(full[key], state[key])


def test_key_helpers_match_whole_path_components() -> None:
    assert key_matches("m.q.lora_A.weight", ("lora_A",))
    assert not key_matches("m.q.lora_B.weight", ("lora_A",))
    assert not key_matches("m.q.lora_AB.weight", ("lora_A",))
    assert not key_matches("m.q.lora_A.weight", ())
    state = {"m.q.lora_A.weight": 1, "m.q.lora_B.weight": 2, "lora_A": 3, "head": 4}
    assert without_keys(state, ("lora_A",)) == {"m.q.lora_B.weight": 2, "head": 4}
    assert without_keys(state, ()) == state


# --- one contract for every registered rule ------------------------------------------------------------

NAMES = LORA_NAMES
SEEDS = [11, 12, 13]


def contract_problem(seed: int) -> Problem:
    return make_problem(seed, d=7, n=6, r=3, K=4)


CASES = [*NAMES, "rolora@2"]  # name@round: a rule that alternates by round, in its other round


def rule(case: str) -> Aggregator:
    name, _, server_round = case.partition("@")
    return AGGREGATORS.get(name).for_round(int(server_round or 1))


def as_trained(case: str, problem: Problem) -> Problem:
    """``problem`` as the clients of ``case`` train it: a factor the rule freezes or holds is the previous one."""
    fixed = rule(case).fixed
    As = [problem.prev_A.copy() for _ in problem.As] if "lora_A" in fixed else problem.As
    Bs = [problem.prev_B.copy() for _ in problem.Bs] if "lora_B" in fixed else problem.Bs
    return Problem(As, Bs, problem.heads, problem.weights, problem.prev_A, problem.prev_B, problem.prev_head)


def run_as(case: str, problem: Problem, **options: object) -> tuple[dict[str, np.ndarray], dict]:
    agg, problem = rule(case), as_trained(case, problem)
    return agg(problem.states(agg.fixed), problem.weights, previous=problem.previous(),
               options=AggregationOptions(**options))  # type: ignore[arg-type]  # fmt: skip


def dW_as(case: str, problem: Problem) -> np.ndarray:
    problem = as_trained(case, problem)
    return dense_update(problem.As, problem.Bs, problem.p)


def test_registry_names() -> None:
    assert NAMES == ["exact-svd", "fedavg", "fedit", "ffa-lora", "lora-fair", "lora-fair-ab", "lora-fair-ridge",
                     "rolora"]  # fmt: skip
    assert AGGREGATORS.names() == sorted([*NAMES, "ssf-avg", "fedins"])  # test_ssf_avg.py, test_fedins.py
    for name in NAMES:
        assert AGGREGATORS.get(name).name == ("fedit" if name == "fedavg" else name)
        assert AGGREGATORS.get(name).summary


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", CASES)
def test_contract_keys_shapes_dtypes_and_metrics(name: str, seed: int) -> None:
    problem = contract_problem(seed)
    out, metrics = run_as(name, problem)
    previous = problem.previous()
    assert list(out) == list(previous)
    for key, value in out.items():
        assert isinstance(value, np.ndarray)
        assert value.dtype == previous[key].dtype and value.shape == previous[key].shape, key
        assert np.isfinite(value).all()
    np.testing.assert_allclose(out[HEAD], dense_average(problem.heads, problem.p), rtol=1e-12)
    assert set(metrics) == METRIC_KEYS
    assert all(np.isfinite(v) for v in metrics.values())
    assert 0.0 <= metrics["agg_residual_mean"] <= metrics["agg_residual_max"]
    assert -1.0 <= metrics["agg_cosine_min"] <= metrics["agg_cosine_mean"] <= 1.0
    assert 0.0 <= metrics["agg_correction_mean"] <= metrics["agg_correction_max"]
    dW = dW_as(name, problem)
    assert metrics["agg_residual_max"] == pytest.approx(relative_error(dW, out[A_KEY], out[B_KEY]), abs=1e-7)
    product = out[B_KEY] @ out[A_KEY]  # dense references of the cosine and of the correction of B
    cosine = np.vdot(dW, product) / (np.linalg.norm(dW) * np.linalg.norm(product))
    B_bar = dense_average(as_trained(name, problem).Bs, problem.p)
    assert metrics["agg_cosine_min"] == pytest.approx(cosine, abs=1e-7)
    assert metrics["agg_correction_max"] == pytest.approx(np.linalg.norm(out[B_KEY] - B_bar) / np.linalg.norm(B_bar),
                                                          abs=1e-7)  # fmt: skip


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", CASES)
def test_contract_identical_clients_are_reproduced_exactly(name: str, seed: int) -> None:
    problem = contract_problem(seed)
    K = len(problem.As)
    same = Problem([problem.As[0]] * K, [problem.Bs[0]] * K, problem.heads, problem.weights, problem.prev_A,
                   problem.prev_B, problem.prev_head)  # fmt: skip
    out, metrics = run_as(name, same)
    want = dW_as(name, same)  # = B_1 A_1 (with the previous A for a rule that freezes it)
    assert_close_to_scale(out[B_KEY] @ out[A_KEY], want, 1e-10)
    assert metrics["agg_residual_max"] <= 1e-6


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", CASES)
def test_contract_client_order_does_not_matter(name: str, seed: int) -> None:
    problem = contract_problem(seed)
    out, metrics = run_as(name, problem)
    for order in ([3, 1, 0, 2], [1, 2, 3, 0]):
        again, again_metrics = run_as(name, problem.permuted(order))
        for key in out:  # the factors themselves, not just their product
            assert_close_to_scale(again[key], out[key], 1e-10)
        # (the metric itself has a float64 floor of ~1e-8: a difference of squares)
        assert again_metrics["agg_residual_max"] == pytest.approx(metrics["agg_residual_max"], abs=1e-7)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", CASES)
def test_contract_weights_are_relative_and_zero_weight_clients_ignored(name: str, seed: int) -> None:
    problem = contract_problem(seed)
    out, _ = run_as(name, problem)
    scaled = Problem(problem.As, problem.Bs, problem.heads, [w * 37.5 for w in problem.weights], problem.prev_A,
                     problem.prev_B, problem.prev_head)  # fmt: skip
    rng = np.random.default_rng(seed)
    padded = Problem([*problem.As, rng.normal(size=problem.prev_A.shape)],
                     [*problem.Bs, 1e3 * rng.normal(size=problem.prev_B.shape)],
                     [*problem.heads, 1e3 * rng.normal(size=3)], [*problem.weights, 0.0], problem.prev_A,
                     problem.prev_B, problem.prev_head)  # fmt: skip
    for other in (scaled, padded):
        again, _ = run_as(name, other)
        for key in out:
            assert_close_to_scale(again[key], out[key], 1e-9)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", CASES)
def test_contract_float32_in_float32_out(name: str, seed: int) -> None:
    problem = contract_problem(seed)
    out64, _ = run_as(name, problem)
    out32, metrics = run_as(name, problem.astype(np.float32))
    for key, value in out32.items():
        assert value.dtype == np.float32, key
    assert_close_to_scale(out32[HEAD], out64[HEAD], 1e-6)
    assert_close_to_scale(out32[B_KEY] @ out32[A_KEY], out64[B_KEY] @ out64[A_KEY], 1e-4)
    assert 0.0 <= metrics["agg_residual_mean"] <= metrics["agg_residual_max"] < 1.5


@pytest.mark.parametrize("name", CASES)
def test_contract_inputs_are_not_modified_and_outputs_not_aliased(name: str) -> None:
    problem = as_trained(name, contract_problem(SEEDS[0]))
    agg = rule(name)
    states, previous = problem.states(agg.fixed), problem.previous()
    copies = [{k: v.copy() for k, v in s.items()} for s in states], {k: v.copy() for k, v in previous.items()}
    out, _ = agg(states, problem.weights, previous=previous)
    for state, copy in zip(states, copies[0], strict=True):
        for key in state:
            np.testing.assert_array_equal(state[key], copy[key])
    for key in previous:
        np.testing.assert_array_equal(previous[key], copies[1][key])
    for value in out.values():
        value[...] = 12345.0
    for key in previous:
        np.testing.assert_array_equal(previous[key], copies[1][key])
    for state, copy in zip(states, copies[0], strict=True):
        for key in state:
            np.testing.assert_array_equal(state[key], copy[key])
