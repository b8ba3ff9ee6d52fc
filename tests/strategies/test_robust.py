"""Coordinate-wise median and trimmed mean in place of the average, against numpy brute force; what a
poisoned minority can do to each; and where they are refused."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import AGGREGATORS, AggregationOptions
from strategies.robust import parse_robust


def states(seed: int, k: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"q.lora_A.weight": rng.normal(size=(2, 5)).astype(np.float32),
             "q.lora_B.weight": rng.normal(size=(4, 2)).astype(np.float32),
             "classifier.weight": rng.normal(size=(3, 5)).astype(np.float32)} for _ in range(k)]


def trimmed(stack: np.ndarray, beta: float) -> np.ndarray:
    cut = int(beta * len(stack))
    return np.sort(stack, axis=0)[cut : len(stack) - cut].mean(axis=0)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 9), seed=st.integers(0, 2**16), beta=st.sampled_from([0.1, 0.2, 0.34, 0.49]),
       weights=st.lists(st.integers(1, 100), min_size=9, max_size=9))
def test_median_and_trimmed_mean_per_coordinate(k: int, seed: int, beta: float, weights: list[int]) -> None:
    clients = states(seed, k)
    previous = {key: np.zeros_like(v) for key, v in clients[0].items()}
    for spec, want in (("median", lambda s: np.median(s, axis=0)), (f"trimmed:{beta}", lambda s: trimmed(s, beta))):
        out, _ = AGGREGATORS.get("fedit")(clients, weights[:k], previous=previous,
                                          options=AggregationOptions(robust=spec))
        for key in previous:  # the example counts do not matter
            stack = np.stack([c[key].astype(np.float64) for c in clients])
            np.testing.assert_allclose(out[key], want(stack), rtol=1e-6, atol=1e-6)


def test_a_poisoned_minority_moves_the_average_but_not_the_robust_statistics() -> None:
    clients = states(1, 7)
    for c in clients[:2]:  # two of seven send enormous values, and claim many examples
        for key in c:
            c[key] = c[key] + 1e6
    honest = np.stack([c["classifier.weight"] for c in clients[2:]])
    previous = {key: np.zeros_like(v) for key, v in clients[0].items()}
    weights = [1000, 1000, 10, 10, 10, 10, 10]
    mean, _ = AGGREGATORS.get("fedit")(clients, weights, previous=previous)
    assert np.abs(mean["classifier.weight"]).min() > 1e5
    for spec in ("median", "trimmed:0.3"):
        out, _ = AGGREGATORS.get("fedit")(clients, weights, previous=previous, options=AggregationOptions(robust=spec))
        assert np.all(out["classifier.weight"] <= honest.max(axis=0) + 1e-6)
        assert np.all(out["classifier.weight"] >= honest.min(axis=0) - 1e-6)


def test_ffa_lora_keeps_its_frozen_factor_and_ssf_avg_is_robust_too() -> None:
    clients = states(2, 5)
    previous = {key: np.full_like(v, 7.0) for key, v in clients[0].items()}
    sent = [{k: v for k, v in c.items() if "lora_A" not in k} for c in clients]
    out, _ = AGGREGATORS.get("ffa-lora")(sent, [1] * 5, previous=previous, options=AggregationOptions(robust="median"))
    np.testing.assert_array_equal(out["q.lora_A.weight"], previous["q.lora_A.weight"])
    np.testing.assert_allclose(out["q.lora_B.weight"], np.median([c["q.lora_B.weight"] for c in clients], axis=0),
                               rtol=1e-6)
    ssf = [{"l.ssf.scale": c["classifier.weight"][0]} for c in clients]
    out, _ = AGGREGATORS.get("ssf-avg")(ssf, [1] * 5, previous={"l.ssf.scale": np.ones(5, np.float32)},
                                        options=AggregationOptions(robust="median"))
    np.testing.assert_allclose(out["l.ssf.scale"], np.median([s["l.ssf.scale"] for s in ssf], axis=0), rtol=1e-6)


@pytest.mark.parametrize("name", ["lora-fair", "lora-fair-ab", "exact-svd"])
def test_rules_that_do_not_average_refuse_a_robust_statistic(name: str) -> None:
    clients = states(3, 3)
    with pytest.raises(ValueError, match=f"robust=median replaces averages; '{name}' does not average"):
        AGGREGATORS.get(name)(clients, [1, 1, 1], previous=clients[0], options=AggregationOptions(robust="median"))


@pytest.mark.parametrize(("spec", "ok"), [("none", True), ("median", True), ("trimmed:0.1", True),
                                          ("trimmed:0.5", False), ("trimmed:0", False), ("trimmed:x", False),
                                          ("median:1", False), ("krum", False)])
def test_parse_robust(spec: str, ok: bool) -> None:
    if ok:
        parse_robust(spec)
    else:
        with pytest.raises(ValueError):
            parse_robust(spec)
