"""Reply validation: the pure checks (norm, median outliers, size bound) against brute force, and the
fault-injection matrix through the Flower strategy: each bad reply rejected with its reason, the round
aggregating the rest, and a round with too few valid replies aggregating nothing."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from replies import reply

from fedpeft.codecs import parse_codec
from fedpeft.wire import (
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    PAYLOAD,
    from_array_record,
    payload_records,
    to_array_record,
)
from strategies.flower import FedPeftStrategy
from strategies.validation import REPLY_SLACK, ReplyLimits, norm_rejection, relative_outliers, reply_bound, update_norm

pytestmark = pytest.mark.usefixtures("server_identity")


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3), min_size=1, max_size=4),
       seed=st.integers(0, 2**16))
def test_update_norm_is_the_l2_norm_of_everything(shapes: list[list[int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    update = {f"t{i}": (rng.normal(size=s) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
              for i, s in enumerate(shapes)}
    flat = np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in update.values()])
    assert update_norm(update) == pytest.approx(float(np.linalg.norm(flat)), rel=1e-12)


def test_absolute_bound() -> None:
    assert norm_rejection(5.0, ReplyLimits()) is None
    assert norm_rejection(5.0, ReplyLimits(max_norm=5.0)) is None
    assert norm_rejection(5.1, ReplyLimits(max_norm=5.0)) == "update norm 5.1 exceeds the bound 5"


def test_relative_outliers_use_the_median_of_the_others() -> None:
    limits = ReplyLimits(ratio=10)
    norms = {"a": 1.0, "b": 1.2, "c": 0.9, "d": 1000.0}
    assert set(relative_outliers(norms, limits)) == {"d"}
    assert "1000.0x the round's median 1" in relative_outliers({"a": 1.0, "b": 1.0, "d": 1000.0}, limits)["d"]
    # two huge ones among four: each is compared with the others' median (1000 vs median(1, 1, 1000) = 1)
    assert set(relative_outliers({"a": 1.0, "b": 1.0, "c": 1000.0, "d": 1000.0}, limits)) == {"c", "d"}
    assert relative_outliers({"a": 1.0, "d": 1000.0}, limits) == {}  # two cannot say which is odd
    assert relative_outliers(norms, ReplyLimits()) == {}  # off
    assert relative_outliers({"a": 0.0, "b": 0.0, "c": 3.0}, limits) == {}  # a zero median bounds nothing


@pytest.mark.parametrize("kwargs", [{"max_norm": -1.0}, {"ratio": 0.5}, {"ratio": 1.0}, {"max_norm": np.inf}])
def test_limits_validate(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ReplyLimits(**kwargs)


def test_reply_bound() -> None:
    assert reply_bound(1000) == 2000 + REPLY_SLACK


# --- fault injection through the strategy ------------------------------------------------------------

NODES = {500 + i: f"partition-{i:05d}" for i in range(12)}
FAULTS = ["nan", "inf", "wrong shape", "missing key", "extra key", "oversized", "norm 1000x", "random bytes"]


def _global() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"q.lora_A.weight": rng.normal(size=(4, 64)).astype(np.float32),
            "q.lora_B.weight": (rng.normal(size=(64, 4)) * 0.1).astype(np.float32),
            "classifier.weight": rng.normal(size=(2, 64)).astype(np.float32)}


def _trained(glob: dict[str, np.ndarray], site: str, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(site.split("-")[1]))
    return {k: (v + scale * 0.01 * rng.normal(size=v.shape)).astype(np.float32) for k, v in glob.items()}


def _raw_reply(out: Message, update: dict[str, np.ndarray]) -> Message:
    """A reply carrying exactly ``update`` (any keys, any values) with the `none` codec."""
    codec = parse_codec("none")
    records = payload_records(codec, {k: [v] for k, v in update.items()}, {k: v.shape for k, v in update.items()})
    return Message(RecordDict({**records, METRICS: MetricRecord({NUM_EXAMPLES: 10})}), reply_to=out)


def _with_payload(msg: Message, data: bytes) -> Message:
    msg.content[ARRAYS] = ArrayRecord({PAYLOAD: Array(np.frombuffer(data, dtype=np.uint8))})
    return msg


def _faulty(fault: str, out: Message, glob: dict[str, np.ndarray], site: str) -> Message:
    update = {k: v - glob[k] for k, v in _trained(glob, site).items()}
    good = reply(out, _trained(glob, site), {NUM_EXAMPLES: 10})
    payload = bytes(good.content[ARRAYS][PAYLOAD].numpy().tobytes())
    first = np.frombuffer(payload, dtype="<f4").copy()
    if fault in ("nan", "inf"):
        first[3] = np.nan if fault == "nan" else np.inf
        return _with_payload(good, first.tobytes())
    if fault == "wrong shape":
        return _raw_reply(out, {**update, "classifier.weight": np.zeros((3, 64), np.float32)})
    if fault == "missing key":
        return _raw_reply(out, {k: v for k, v in update.items() if k != "classifier.weight"})
    if fault == "extra key":
        return _raw_reply(out, {**update, "bert.embeddings.word_embeddings.weight": np.zeros((8, 64), np.float32)})
    if fault == "oversized":
        return _with_payload(good, payload + bytes(3 * REPLY_SLACK))
    if fault == "norm 1000x":
        return reply(out, {k: glob[k] + 1000 * v for k, v in update.items()}, {NUM_EXAMPLES: 10})
    assert fault == "random bytes"
    return _with_payload(good, np.random.default_rng(7).integers(0, 256, len(payload), dtype=np.uint8).tobytes())


def test_each_fault_is_rejected_with_its_reason_and_the_round_goes_on() -> None:
    glob = _global()
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0,
                               limits=ReplyLimits(ratio=10.0))
    messages = sorted(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), None),
                      key=lambda m: NODES[m.metadata.dst_node_id])
    faulty = {NODES[m.metadata.dst_node_id]: fault for m, fault in zip(messages, FAULTS, strict=False)}
    replies = [_faulty(faulty[NODES[m.metadata.dst_node_id]], m, glob, NODES[m.metadata.dst_node_id])
               if NODES[m.metadata.dst_node_id] in faulty else reply(m, _trained(glob, NODES[m.metadata.dst_node_id]),
                                                                       {NUM_EXAMPLES: 10})
               for m in messages]
    arrays, metrics = strategy.aggregate_train(1, replies)
    traffic = strategy.traffic[1]
    reasons = {faulty[s]: r for s, r in traffic.failures.items()}
    assert set(reasons) == set(FAULTS) and traffic.rejected() == sorted(faulty)
    assert "non-finite" in reasons["nan"] and "non-finite" in reasons["inf"]
    assert "payload rejected" in reasons["wrong shape"]
    assert "payload rejected" in reasons["missing key"] and "payload rejected" in reasons["extra key"]
    assert "exceeds the bound" in reasons["oversized"] and "bytes" in reasons["oversized"]
    assert "x the round's median" in reasons["norm 1000x"]
    assert reasons["random bytes"]  # refused for whatever the bytes decode to (non-finite or far too large)
    good = sorted(set(NODES.values()) - set(faulty))
    assert metrics["clients"] == len(good) == 4
    got = from_array_record(arrays)
    for key in glob:  # equal weights: the plain mean of the good sites, untouched by the faulty ones
        want = np.mean([_trained(glob, s)[key] for s in good], axis=0)
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-6)
    rows = {r["site"]: r for r in traffic.per_site()}
    assert {s for s, r in rows.items() if r["status"] == "rejected"} == set(faulty)


def test_an_absolute_norm_bound_rejects_a_large_update() -> None:
    glob = _global()
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0, limits=ReplyLimits(max_norm=1.0))
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), None))
    big = NODES[messages[0].metadata.dst_node_id]
    replies = [reply(m, _trained(glob, NODES[m.metadata.dst_node_id], scale=500.0 if i == 0 else 1.0),
                     {NUM_EXAMPLES: 10}) for i, m in enumerate(messages)]
    _, metrics = strategy.aggregate_train(1, replies)
    assert list(strategy.traffic[1].failures) == [big] and "exceeds the bound 1" in strategy.traffic[1].failures[big]
    assert metrics["clients"] == len(NODES) - 1


def test_too_few_valid_replies_aggregate_nothing() -> None:
    glob = _global()
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0, min_replies=5)
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), None))
    replies = [reply(m, _trained(glob, NODES[m.metadata.dst_node_id]), {NUM_EXAMPLES: 10}) for m in messages[:4]]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is None and metrics is None
    traffic = strategy.traffic[1]
    assert len(traffic.failures) == 4 and all("had 4 of 5 needed" in r for r in traffic.failures.values())
    assert not traffic.raw_received and {r["status"] for r in traffic.per_site() if r["bytes_up"]} == {"rejected"}
