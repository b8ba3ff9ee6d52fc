"""ssf-avg: the weighted average of SSF scales, shifts and head, exact against brute force; SSF and LoRA
states each refused by the other kind of strategy, in the maths and in the Flower strategy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from replies import reply

from fedpeft.errors import FedPeftError
from fedpeft.wire import NUM_EXAMPLES, from_array_record, to_array_record
from strategies import AGGREGATORS, strategies_for
from strategies.checks import check_adapter_kind
from strategies.flower import FedPeftStrategy
from strategies.ssf_avg import SSF_AVG

KEYS = {"enc.0.query.ssf.scale": (6,), "enc.0.query.ssf.shift": (6,), "enc.0.LayerNorm.ssf.scale": (6,),
        "enc.0.LayerNorm.ssf.shift": (6,), "classifier.weight": (3, 6), "classifier.bias": (3,)}
LORA = {"q.lora_A.weight": np.zeros((2, 6), np.float32), "q.lora_B.weight": np.zeros((6, 2), np.float32),
        "classifier.weight": np.zeros((3, 6), np.float32)}


def ssf_state(rng: np.random.Generator, *, spread: bool = True) -> dict[str, np.ndarray]:
    """Random SSF tensors, with magnitudes far apart across tensors when ``spread``."""
    return {k: (rng.normal(size=s) * (10.0 ** rng.integers(-3, 3) if spread else 1.0)).astype(np.float32)
            for k, s in KEYS.items()}


@settings(max_examples=80, deadline=None)
@given(clients=st.integers(1, 7), seed=st.integers(0, 2**32 - 1), data=st.data())
def test_ssf_avg_is_the_weighted_average(clients: int, seed: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    states = [ssf_state(rng) for _ in range(clients)]
    weights = data.draw(st.lists(st.integers(1, 500).map(float), min_size=clients, max_size=clients))
    out, metrics = SSF_AVG(states, weights, previous=ssf_state(rng))
    assert metrics == {}  # no factor pairs: nothing is lost, no residual to report
    w = np.asarray(weights) / sum(weights)
    for key in KEYS:
        want = sum(wk * s[key].astype(np.float64) for wk, s in zip(w, states, strict=True))
        assert out[key].dtype == np.float32
        np.testing.assert_allclose(out[key], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_ssf_avg_is_registered_linear_and_for_ssf_only() -> None:
    assert AGGREGATORS.get("ssf-avg") is SSF_AVG
    assert SSF_AVG.linear and SSF_AVG.adapter == "ssf" and not SSF_AVG.frozen
    assert strategies_for("ssf") == ["ssf-avg"]
    assert "fedit" in strategies_for("lora") and "ssf-avg" not in strategies_for("lora")


def test_ssf_avg_refuses_a_lora_state() -> None:
    with pytest.raises(ValueError, match="'ssf-avg' aggregates SSF adapters, but this adapter is LORA$"):
        SSF_AVG([LORA], [1.0], previous=LORA)
    with pytest.raises(FedPeftError, match="'ssf-avg' aggregates SSF adapters, but this adapter is LORA; "
                                           "use --strategy exact-svd or fedit or ffa-lora"):
        check_adapter_kind(SSF_AVG, "lora")  # what the coordinator says first


@pytest.mark.parametrize("name", strategies_for("lora"))
def test_every_lora_strategy_refuses_an_ssf_state(name: str) -> None:
    state = ssf_state(np.random.default_rng(0))
    agg = AGGREGATORS.get(name)  # fedavg is fedit under a second name
    with pytest.raises(ValueError, match=f"'{agg.name}' aggregates LORA adapters, but this adapter is SSF$"):
        agg([state], [1.0], previous=state)
    with pytest.raises(FedPeftError, match=f"'{agg.name}' aggregates LORA adapters, but this adapter is SSF; "
                                           "use --strategy ssf-avg"):
        check_adapter_kind(agg, "ssf")


def test_a_head_alone_is_accepted_by_both() -> None:
    head = {"classifier.weight": np.ones((3, 6), np.float32)}
    for name in ("ssf-avg", "fedit"):
        out, _ = AGGREGATORS.get(name)([head, head], [1.0, 3.0], previous=head)
        np.testing.assert_array_equal(out["classifier.weight"], head["classifier.weight"])


NODES = {11: "partition-00000", 12: "partition-00001"}


@pytest.mark.usefixtures("server_identity")
def test_flower_strategy_runs_an_ssf_round() -> None:
    rng = np.random.default_rng(3)
    start = ssf_state(rng, spread=False)  # the server adds each decoded update to it in float32
    strategy = FedPeftStrategy(aggregator="ssf-avg", sites=NODES, fraction=1.0, seed=0)
    messages = list(strategy.configure_train(1, to_array_record(start), ConfigRecord({"label-names": ["a"]}), None))
    trained = {m.metadata.dst_node_id: ssf_state(rng, spread=False) for m in messages}
    replies = [reply(m, trained[m.metadata.dst_node_id], MetricRecord({NUM_EXAMPLES: 10 * (i + 1)}))
               for i, m in enumerate(sorted(messages, key=lambda m: m.metadata.dst_node_id))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = from_array_record(arrays)
    for key in KEYS:
        want = (trained[11][key].astype(np.float64) + 2 * trained[12][key]) / 3
        np.testing.assert_allclose(out[key], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert metrics["clients"] == 2


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize(("aggregator", "state", "fix"), [
    ("fedit", ssf_state(np.random.default_rng(0)), "ssf-avg"),
    ("ssf-avg", LORA, "exact-svd or fedit"),
])
def test_flower_strategy_refuses_the_wrong_adapter_before_anyone_trains(aggregator: str, state: dict,
                                                                        fix: str) -> None:
    strategy = FedPeftStrategy(aggregator=aggregator, sites=NODES, fraction=1.0, seed=0)
    with pytest.raises(FedPeftError, match=f"use --strategy {fix}"):
        list(strategy.configure_train(1, to_array_record(state), ConfigRecord({"label-names": ["a"]}), None))
