"""fedins: every SSF pool entry, key and head tensor averaged by FedAvg's weights, checked against a hand
computation; it takes SSF-pool adapters only, and it is linear (central DP, robust statistics)."""

from __future__ import annotations

import numpy as np
import pytest

from strategies import AGGREGATORS
from strategies.fedins import FEDINS

PREVIOUS = {
    "enc.0.query.ssf_pool.scale": np.ones((2, 3), np.float32),
    "enc.0.query.ssf_pool.shift": np.zeros((2, 3), np.float32),
    "ssf_pool.keys": np.zeros((2, 4), np.float32),
    "classifier.bias": np.zeros(2, np.float32),
}


def test_registered_linear_and_for_ssf_pools() -> None:
    assert AGGREGATORS.get("fedins") is FEDINS
    assert FEDINS.linear and FEDINS.adapter == "ssf-pool"


def test_each_entry_is_the_weighted_mean_computed_by_hand() -> None:
    # two sites, 30 and 10 examples: p = (0.75, 0.25)
    a = {
        "enc.0.query.ssf_pool.scale": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32),
        "enc.0.query.ssf_pool.shift": np.array([[0.5, 0.0, -0.5], [1.0, 1.0, 1.0]], np.float32),
        "ssf_pool.keys": np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], np.float32),
        "classifier.bias": np.array([2.0, -2.0], np.float32),
    }
    b = {
        "enc.0.query.ssf_pool.scale": np.array([[5.0, 6.0, 7.0], [0.0, 1.0, 2.0]], np.float32),
        "enc.0.query.ssf_pool.shift": np.array([[-0.5, 4.0, 0.5], [1.0, -3.0, 5.0]], np.float32),
        "ssf_pool.keys": np.array([[0.0, 0.0, 4.0, 0.0], [0.0, 1.0, 0.0, 8.0]], np.float32),
        "classifier.bias": np.array([-2.0, 2.0], np.float32),
    }
    out, metrics = FEDINS([a, b], [30, 10], previous=PREVIOUS)
    # entry 0 of the scale: 0.75·[1, 2, 3] + 0.25·[5, 6, 7] = [2, 3, 4]; entry 1: 0.75·[4, 5, 6] + 0.25·[0, 1, 2]
    np.testing.assert_allclose(out["enc.0.query.ssf_pool.scale"], [[2.0, 3.0, 4.0], [3.0, 4.0, 5.0]])
    np.testing.assert_allclose(out["enc.0.query.ssf_pool.shift"], [[0.25, 1.0, -0.25], [1.0, 0.0, 2.0]])
    np.testing.assert_allclose(out["ssf_pool.keys"], [[0.75, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 2.0]])
    np.testing.assert_allclose(out["classifier.bias"], [1.0, -1.0])
    assert list(out) == list(PREVIOUS) and all(out[k].dtype == np.float32 for k in out)
    assert metrics == {}


def test_other_adapters_are_refused() -> None:
    ssf = {"enc.0.query.ssf.scale": np.ones(3, np.float32)}
    with pytest.raises(ValueError, match="aggregates SSF-POOL adapters, but this adapter is SSF"):
        FEDINS([ssf], [1], previous=ssf)
    with pytest.raises(ValueError, match="aggregates SSF adapters, but this adapter is SSF-POOL"):
        AGGREGATORS.get("ssf-avg")([PREVIOUS], [1], previous=PREVIOUS)


def test_robust_median_replaces_the_average() -> None:
    from strategies.aggregator import AggregationOptions

    states = [{k: v + i for k, v in PREVIOUS.items()} for i in (0.0, 1.0, 5.0)]
    out, _ = FEDINS(states, [1, 1, 1], previous=PREVIOUS, options=AggregationOptions(robust="median"))
    np.testing.assert_allclose(out["ssf_pool.keys"], PREVIOUS["ssf_pool.keys"] + 1.0)


@pytest.mark.parametrize("settings", [
    {"dp": "central", "dp_epsilon": 8.0, "dp_delta": 1e-5, "codec": "int8"},
    {"secure_aggregation": True},
], ids=["central DP with int8", "secure aggregation"])
def test_fedins_passes_the_coordinators_checks_where_a_weighted_sum_is_needed(settings: dict) -> None:
    """A weighted sum: the central release and the masked sum take it (the LoRA rules that are not are refused)."""
    from fedpeft.config import FedPeftConfig
    from privacy.central import check_composes
    from server.checks import check_config

    check_composes(FEDINS)
    check_config(FedPeftConfig(peft="ssf-pool", strategy="fedins", clients=4, fraction=1.0, **settings))
