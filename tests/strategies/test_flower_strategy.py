"""FedPeftStrategy driven without a Grid: outgoing messages from configure_train, hand-built replies."""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from replies import reply, sent

from fedpeft.codecs import parse_codec
from fedpeft.codecs.shared import round_seed
from fedpeft.wire import (
    ARRAYS,
    CODEC,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PAYLOAD,
    decode_payload,
    from_array_record,
    record_nbytes,
    to_array_record,
)
from strategies import AGGREGATORS, AggregationOptions, strategies_for
from strategies.fedit import FEDIT
from strategies.flower import FedPeftStrategy
from strategies.replies import RoundTraffic
from strategies.sampling import sample_sites

NODES = {1000 + 37 * i: f"partition-{i:05d}" for i in range(10)}  # node id -> site key


pytestmark = pytest.mark.usefixtures("server_identity")


class _Recorder:
    name = "recorder"
    frozen: tuple[str, ...] = ()
    held: tuple[str, ...] = ()
    heterogeneous_ranks = False
    adapter = "lora"

    def __init__(self, fn: object) -> None:
        self.fn = fn

    def for_round(self, server_round: int) -> _Recorder:
        return self

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.fn(*args, **kwargs)


class _NoGrid:
    """configure_train must not touch the grid."""

    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"configure_train used grid.{name}")


def _global_state() -> dict[str, np.ndarray]:
    return {"a.lora_A.weight": np.zeros((2, 4), np.float32), "a.lora_B.weight": np.zeros((5, 2), np.float32),
            "head.weight": np.zeros((3, 4), np.float32)}


def weighted_average(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    return FEDIT(states, weights, previous=_global_state())[0]


def _strategy(fraction: float = 1.0, seed: int = 0, sites: dict[int, str] | None = None) -> FedPeftStrategy:
    return FedPeftStrategy(aggregator="fedavg", sites=NODES if sites is None else sites, fraction=fraction, seed=seed)


def _configure(strategy: FedPeftStrategy, server_round: int = 1) -> list[Message]:
    return list(strategy.configure_train(server_round, to_array_record(_global_state()),
                                         ConfigRecord({"lr": 0.1, "label-names": ["a", "b"]}), _NoGrid()))


def _client_state(site: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(site.split("-")[1]))
    # magnitudes far apart, so a different summation order would change float32 results
    return {"a.lora_A.weight": (rng.normal(size=(2, 4)) * 10.0 ** rng.integers(-4, 5)).astype(np.float32),
            "a.lora_B.weight": rng.normal(size=(5, 2)).astype(np.float32),
            "head.weight": rng.normal(size=(3, 4)).astype(np.float32)}


def _reply(out: Message, *, num_examples: int | None = None, loss: float | None = None) -> Message:
    site = NODES[out.metadata.dst_node_id]
    pid = int(site.split("-")[1])
    metrics = MetricRecord({NUM_EXAMPLES: num_examples if num_examples is not None else 10 + 7 * pid,
                            "train-loss": loss if loss is not None else 0.1 * (pid + 1), "steps": 3})
    return reply(out, _client_state(site), metrics)


def test_reply_carries_the_site_node_as_source() -> None:
    out = _configure(_strategy())[0]
    reply = _reply(out)
    assert reply.metadata.src_node_id == out.metadata.dst_node_id
    assert Message(Error(code=0, reason="x"), reply_to=out).metadata.src_node_id == out.metadata.dst_node_id


# --- configure_train ----------------------------------------------------------------------------

@pytest.mark.parametrize(("fraction", "count"), [(0.3, 3), (0.5, 5), (0.05, 1), (1.0, 10)])
def test_sampling_respects_fraction(fraction: float, count: int) -> None:
    messages = _configure(_strategy(fraction=fraction, seed=3), server_round=2)
    chosen = [NODES[m.metadata.dst_node_id] for m in messages]
    assert len(chosen) == count == len(set(chosen))
    assert chosen == sample_sites(list(NODES.values()), fraction, seed=3, server_round=2)


def test_sampling_follows_seed_and_round() -> None:
    def chosen(seed: int, rnd: int) -> tuple[int, ...]:
        return tuple(m.metadata.dst_node_id for m in _configure(_strategy(fraction=0.3, seed=seed), rnd))

    assert chosen(1, 1) == chosen(1, 1)
    assert len({chosen(1, r) for r in range(1, 9)}) > 1
    assert len({chosen(s, 1) for s in range(8)}) > 1


def test_sampling_independent_of_node_ids() -> None:
    """Node ids are random in simulation; the sample depends only on the site keys."""
    renumbered = {node * 7 + 1: site for node, site in reversed(list(NODES.items()))}
    a = [NODES[m.metadata.dst_node_id] for m in _configure(_strategy(fraction=0.4, seed=5, sites=NODES))]
    b = [renumbered[m.metadata.dst_node_id]
         for m in _configure(_strategy(fraction=0.4, seed=5, sites=renumbered))]
    assert a == b


def test_outgoing_messages_carry_arrays_config_and_round() -> None:
    strategy = _strategy(fraction=0.5)
    messages = _configure(strategy, server_round=4)
    for msg in messages:
        assert msg.metadata.message_type == MessageType.TRAIN
        assert msg.metadata.dst_node_id in NODES
        config = msg.content.config_records[CONFIG]
        assert config["server-round"] == 4
        assert config["lr"] == 0.1
        arrays = sent(msg, _global_state())
        assert list(arrays) == list(_global_state())
        for key, value in _global_state().items():
            np.testing.assert_array_equal(arrays[key], value)


def test_bytes_sent_recorded_per_sampled_site() -> None:
    strategy = _strategy(fraction=0.5)
    messages = _configure(strategy, server_round=1)
    traffic = strategy.traffic[1]
    assert isinstance(traffic, RoundTraffic)
    assert set(traffic.sent) == {NODES[m.metadata.dst_node_id] for m in messages}
    for msg in messages:
        size = traffic.sent[NODES[msg.metadata.dst_node_id]]
        assert size == record_nbytes(msg.content)
        assert size > sum(v.nbytes for v in _global_state().values())


# --- aggregate_train ----------------------------------------------------------------------------

def _expected(sites: list[str], weights: list[float]) -> dict[str, np.ndarray]:
    return weighted_average([_client_state(s) for s in sorted(sites)],
                            [w for _, w in sorted(zip(sites, weights, strict=True))])


@pytest.mark.parametrize("shuffle_seed", [0, 1, 2, 3])
def test_aggregate_equals_weighted_average_in_site_order(shuffle_seed: int) -> None:
    strategy = _strategy(fraction=0.6, seed=2)
    messages = _configure(strategy)
    replies = [_reply(m) for m in messages]
    random.Random(shuffle_seed).shuffle(replies)
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert isinstance(arrays, ArrayRecord) and isinstance(metrics, MetricRecord)
    sites = [NODES[m.metadata.dst_node_id] for m in messages]
    weights = [10 + 7 * int(s.split("-")[1]) for s in sites]
    got, want = from_array_record(arrays), _expected(sites, weights)
    assert list(got) == list(want)
    for key in want:
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], want[key])
    assert metrics["clients"] == len(sites)
    losses = [0.1 * (int(s.split("-")[1]) + 1) for s in sites]
    assert metrics["train-loss"] == pytest.approx(np.average(losses, weights=weights))
    ordered = sorted(zip(sites, weights, strict=True))
    _, want_metrics = FEDIT([_client_state(s) for s, _ in ordered], [w for _, w in ordered], previous=_global_state())
    for key in ("agg_residual_mean", "agg_residual_max"):  # the aggregator's metrics reach the round record
        assert metrics[key] == want_metrics[key]
    assert 0.0 < metrics["agg_residual_mean"] <= 1.5  # FedIT is biased on differing factors


def test_aggregate_is_bitwise_independent_of_reply_order() -> None:
    strategy = _strategy(fraction=1.0)
    messages = _configure(strategy)
    results = []
    for seed in range(5):
        replies = [_reply(m) for m in messages]
        random.Random(seed).shuffle(replies)
        arrays, _ = strategy.aggregate_train(1, replies)
        results.append(from_array_record(arrays))
    for other in results[1:]:
        for key in results[0]:
            assert results[0][key].tobytes() == other[key].tobytes()


@pytest.mark.parametrize("shuffle_seed", [0, 1, 2])
def test_aggregator_receives_states_and_weights_in_site_order(shuffle_seed: int) -> None:
    strategy = _strategy(fraction=0.7, seed=1)
    calls: list[tuple[list[dict[str, np.ndarray]], list[float]]] = []

    def recorder(states: list[dict[str, np.ndarray]], weights: list[float], **kwargs: object) -> tuple[dict, dict]:
        calls.append((list(states), list(weights)))
        assert set(kwargs["previous"]) == set(_global_state())  # the round's broadcast
        return dict(states[0]), {"extra-metric": 1.5}

    strategy.aggregator = _Recorder(recorder)
    messages = _configure(strategy)
    replies = [_reply(m) for m in messages]
    random.Random(shuffle_seed).shuffle(replies)
    _, metrics = strategy.aggregate_train(1, replies)
    sites = sorted(NODES[m.metadata.dst_node_id] for m in messages)
    (states, weights), = calls
    assert weights == [float(10 + 7 * int(s.split("-")[1])) for s in sites]
    for site, state in zip(sites, states, strict=True):
        for key, value in _client_state(site).items():
            np.testing.assert_array_equal(state[key], value)
    assert metrics["extra-metric"] == 1.5  # aggregator metrics are passed through


def test_client_metrics_recorded_per_site() -> None:
    strategy = _strategy(fraction=0.3)
    messages = _configure(strategy)
    strategy.aggregate_train(1, [_reply(m) for m in messages])
    traffic = strategy.traffic[1]
    for msg in messages:
        site = NODES[msg.metadata.dst_node_id]
        pid = int(site.split("-")[1])
        expected = {NUM_EXAMPLES: 10 + 7 * pid, "train-loss": pytest.approx(0.1 * (pid + 1)), "steps": 3.0}
        assert traffic.client_metrics[site] == expected


def test_a_sites_seconds_go_to_its_traffic_row_and_nothing_else_does() -> None:
    strategy = _strategy(fraction=0.3)
    messages = _configure(strategy)
    replies = [_reply(m) for m in messages]
    timed = replies[0]
    timed.content["metrics"]["seconds-load"] = 0.01234
    timed.content["metrics"]["seconds-train"] = 31.5
    timed.content["metrics"]["seconds-wait"] = 0.5
    strategy.aggregate_train(1, replies)
    rows = {row["site"]: row for row in strategy.traffic[1].per_site()}
    site = NODES[timed.metadata.src_node_id]
    assert {k: v for k, v in rows[site].items() if k.startswith("seconds")} == {
        "seconds_load": 0.012, "seconds_train": 31.5, "seconds_wait": 0.5}
    assert all(not k.startswith("seconds") for s, row in rows.items() if s != site for k in row)
    assert all(not k.startswith("steps") and k != "train-loss" for row in rows.values() for k in row)


def test_bytes_received_recorded_per_site_and_positive() -> None:
    strategy = _strategy(fraction=0.5)
    messages = _configure(strategy)
    replies = [_reply(m) for m in messages]
    strategy.aggregate_train(1, replies)
    traffic = strategy.traffic[1]
    assert set(traffic.received) == set(traffic.sent) == {NODES[m.metadata.dst_node_id] for m in messages}
    for answer in replies:
        size = traffic.received[NODES[answer.metadata.src_node_id]]
        assert size == record_nbytes(answer.content) > 0
        raw = sum(v.nbytes for v in _client_state(NODES[answer.metadata.src_node_id]).values())
        assert size > raw


def test_error_replies_recorded_and_excluded() -> None:
    strategy = _strategy(fraction=1.0)
    messages = _configure(strategy)
    failed = {messages[1].metadata.dst_node_id, messages[4].metadata.dst_node_id}
    replies = [Message(Error(code=0, reason=f"boom {m.metadata.dst_node_id}"), reply_to=m)
               if m.metadata.dst_node_id in failed else _reply(m) for m in messages]
    arrays, metrics = strategy.aggregate_train(1, replies)
    traffic = strategy.traffic[1]
    assert traffic.failures == {NODES[n]: f"boom {n}" for n in failed}
    assert not set(traffic.received) & set(traffic.failures)
    assert not set(traffic.client_metrics) & set(traffic.failures)
    ok = [NODES[m.metadata.dst_node_id] for m in messages if m.metadata.dst_node_id not in failed]
    want = _expected(ok, [10 + 7 * int(s.split("-")[1]) for s in ok])
    got = from_array_record(arrays)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert metrics["clients"] == len(ok)


def test_reply_without_arrays_or_metrics_is_a_failure() -> None:
    strategy = _strategy(fraction=1.0)
    messages = _configure(strategy)
    no_arrays = Message(RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 5})}), reply_to=messages[0])
    no_metrics = Message(RecordDict({ARRAYS: to_array_record(_client_state(NODES[messages[1].metadata.dst_node_id]))}),
                         reply_to=messages[1])
    good = [_reply(m) for m in messages[2:]]
    arrays, metrics = strategy.aggregate_train(1, [no_arrays, *good, no_metrics])
    failures = strategy.traffic[1].failures
    assert set(failures) == {NODES[messages[0].metadata.dst_node_id], NODES[messages[1].metadata.dst_node_id]}
    assert all("lacks" in reason for reason in failures.values())
    assert metrics["clients"] == len(good)
    ok = [NODES[m.metadata.dst_node_id] for m in messages[2:]]
    want = _expected(ok, [10 + 7 * int(s.split("-")[1]) for s in ok])
    for key, value in from_array_record(arrays).items():
        np.testing.assert_array_equal(value, want[key])


def test_all_failed_returns_none() -> None:
    strategy = _strategy(fraction=0.5)
    messages = _configure(strategy)
    replies = [Message(Error(code=1, reason="down"), reply_to=m) for m in messages]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert set(strategy.traffic[1].failures) == {NODES[m.metadata.dst_node_id] for m in messages}
    assert strategy.traffic[1].received == {}


def test_no_replies_returns_none() -> None:
    strategy = _strategy()
    _configure(strategy)
    assert strategy.aggregate_train(1, []) == (None, None)


def test_unknown_source_node_named_by_id() -> None:
    strategy = _strategy(fraction=1.0)
    stranger = Message(RecordDict({}), dst_node_id=424242, message_type=MessageType.TRAIN)
    reply = Message(Error(code=0, reason="who am I"), reply_to=stranger)
    assert strategy.aggregate_train(1, [reply]) == (None, None)
    assert strategy.traffic[1].failures == {"node-424242": "who am I"}


def test_a_superlink_error_for_a_silent_node_names_its_site_as_no_reply() -> None:
    """The SuperLink answers for a node whose heartbeat lapsed with an error from node 1 (itself) that replies to
    the instruction: the round names the sampled site as silent, not a stranger "node-1" as failed."""
    strategy = _strategy(fraction=1.0)
    messages = _configure(strategy)
    for m in messages:  # what the grid's push does
        m.metadata.__dict__["_message_id"] = m.object_id
    silent = messages[2]
    from_link = Message(Error(code=3, reason="Node unavailable"), reply_to=silent)
    from_link.metadata.__dict__["_src_node_id"] = 1
    _, metrics = strategy.aggregate_train(1, [from_link, *(_reply(m) for m in messages if m is not silent)])
    rows = {row["site"]: row for row in strategy.traffic[1].per_site()}
    assert set(rows) == set(NODES.values())
    assert rows[NODES[silent.metadata.dst_node_id]]["status"] == "no reply"
    assert rows[NODES[silent.metadata.dst_node_id]]["reason"] == "Node unavailable"
    assert metrics["clients"] == len(messages) - 1


def test_rounds_keep_separate_traffic() -> None:
    strategy = _strategy(fraction=0.3)
    first = _configure(strategy, server_round=1)
    second = _configure(strategy, server_round=2)
    strategy.aggregate_train(2, [_reply(m) for m in second])
    assert set(strategy.traffic[1].sent) == {NODES[m.metadata.dst_node_id] for m in first}
    assert strategy.traffic[1].received == {}
    assert set(strategy.traffic[2].received) == {NODES[m.metadata.dst_node_id] for m in second}


def test_unknown_aggregator_rejected() -> None:
    from fedpeft.errors import FedPeftError

    with pytest.raises(FedPeftError, match="unknown strategy 'fedfoo'.*fedavg"):
        FedPeftStrategy(aggregator="fedfoo", sites=NODES, fraction=0.5, seed=0)


def test_evaluation_is_server_side() -> None:
    strategy = _strategy()
    assert list(strategy.configure_evaluate(1, to_array_record(_global_state()), ConfigRecord({}), _NoGrid())) == []
    assert strategy.aggregate_evaluate(1, []) is None


# --- what each strategy broadcasts ----------------------------------------------------------------

def test_ffa_lora_broadcast_leaves_out_A_and_names_it_frozen() -> None:
    strategy = FedPeftStrategy(aggregator="ffa-lora", sites=NODES, fraction=0.5, seed=0)
    messages = _configure(strategy)
    for msg in messages:
        assert set(sent(msg, _global_state())) == {"a.lora_B.weight", "head.weight"}
        assert msg.content[CONFIG]["frozen"] == "lora_A"
    assert set(strategy.previous) == set(_global_state())  # the server keeps A for aggregation


def test_low_rank_sites_get_truncated_factors() -> None:
    ranks = {site: 1 for site in list(NODES.values())[::2]}
    strategy = FedPeftStrategy(aggregator="exact-svd", sites=NODES, fraction=1.0, seed=0, ranks=ranks)
    glob = {"a.lora_A.weight": np.arange(8, dtype=np.float32).reshape(2, 4),
            "a.lora_B.weight": np.arange(10, dtype=np.float32).reshape(5, 2),
            "head.weight": np.ones((3, 4), np.float32)}
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), _NoGrid()))
    for msg in messages:
        got = sent(msg, glob)
        r = ranks.get(NODES[msg.metadata.dst_node_id], 2)
        np.testing.assert_array_equal(got["a.lora_A.weight"], glob["a.lora_A.weight"][:r])
        np.testing.assert_array_equal(got["a.lora_B.weight"], glob["a.lora_B.weight"][:, :r])
        np.testing.assert_array_equal(got["head.weight"], glob["head.weight"])
        assert msg.content[CONFIG]["frozen"] == ""
    small = [strategy.traffic[1].sent[s] for s in ranks]
    full = [v for s, v in strategy.traffic[1].sent.items() if s not in ranks]
    assert max(small) < min(full)


def test_equal_rank_strategy_refuses_a_low_rank_site() -> None:
    from fedpeft.errors import FedPeftError

    strategy = FedPeftStrategy(aggregator="lora-fair", sites=NODES, fraction=1.0, seed=0,
                               ranks={"partition-00003": 1})
    with pytest.raises(FedPeftError, match="use exact-svd"):
        _configure(strategy)


# --- real rules through the strategy: frozen A, mixed ranks ------------------------------------------------

def _random_global(rank: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.lora_A.weight": rng.normal(size=(rank, 4)).astype(np.float32),
            "a.lora_B.weight": rng.normal(size=(5, rank)).astype(np.float32),
            "head.weight": rng.normal(size=(3, 4)).astype(np.float32)}  # fmt: skip


def _trained(sent: dict[str, np.ndarray], site: str) -> dict[str, np.ndarray]:
    """What a site sends back: every tensor it was sent, moved (shapes kept)."""
    rng = np.random.default_rng(100 + int(site.split("-")[1]))
    return {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in sent.items()}


def _round(strategy: FedPeftStrategy, glob: dict[str, np.ndarray]) -> tuple[list[Message], list[Message]]:
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({"lr": 0.1}), _NoGrid()))
    replies = []
    for m in messages:
        site = NODES[m.metadata.dst_node_id]
        state = _trained(sent(m, glob), site)
        replies.append(reply(m, state, {NUM_EXAMPLES: 10 + 7 * int(site.split("-")[1]), "train-loss": 0.5}))
    return messages, replies


def test_ffa_lora_round_keeps_the_server_A_and_averages_B() -> None:
    glob = _random_global(2)
    strategy = FedPeftStrategy(aggregator="ffa-lora", sites=NODES, fraction=0.5, seed=4)
    messages, replies = _round(strategy, glob)
    for m in messages:
        assert set(sent(m, glob)) == {"a.lora_B.weight", "head.weight"}
        assert m.content[CONFIG]["frozen"] == "lora_A" and m.content[CONFIG]["server-round"] == 1
    random.Random(0).shuffle(replies)
    arrays, metrics = strategy.aggregate_train(1, replies)
    got = from_array_record(arrays)
    assert list(got) == list(glob)  # the full adapter again, A included
    np.testing.assert_array_equal(got["a.lora_A.weight"], glob["a.lora_A.weight"])
    sites = sorted(NODES[m.metadata.dst_node_id] for m in messages)
    weights = np.array([10 + 7 * int(s.split("-")[1]) for s in sites], dtype=np.float64)
    broadcast = {k: v for k, v in glob.items() if "lora_A" not in k}
    for key in ("a.lora_B.weight", "head.weight"):
        want = np.einsum("k,k...->...", weights / weights.sum(), np.stack([_trained(broadcast, s)[key] for s in sites]))
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-6)
    assert metrics["agg_residual_max"] <= 5e-3  # exact, up to the float32 Gram-trace floor


def test_ffa_lora_sends_fewer_bytes_than_fedit() -> None:
    glob = _random_global(2)
    sizes, raw = {}, {}
    for name in ("ffa-lora", "fedit"):
        strategy = FedPeftStrategy(aggregator=name, sites=NODES, fraction=1.0, seed=0)
        list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), _NoGrid()))
        sizes[name] = strategy.traffic[1].sent["partition-00000"]
        raw[name] = strategy.traffic[1].raw_sent["partition-00000"]
    assert raw["fedit"] - raw["ffa-lora"] == glob["a.lora_A.weight"].nbytes
    assert sizes["fedit"] - sizes["ffa-lora"] >= glob["a.lora_A.weight"].nbytes - 64  # npy pads its header to 64 B


def test_mixed_rank_round_sends_truncations_and_aggregates_at_the_global_rank() -> None:
    glob = _random_global(4, seed=1)
    ranks = {site: 2 for site in list(NODES.values())[1::3]}
    strategy = FedPeftStrategy(aggregator="exact-svd", sites=NODES, fraction=1.0, seed=0, ranks=ranks)
    messages, replies = _round(strategy, glob)
    states = {}
    for m, answer in zip(messages, replies, strict=True):
        site = NODES[m.metadata.dst_node_id]
        got = sent(m, glob)
        r = ranks.get(site, 4)
        np.testing.assert_array_equal(got["a.lora_A.weight"], glob["a.lora_A.weight"][:r])  # first r rows
        np.testing.assert_array_equal(got["a.lora_B.weight"], glob["a.lora_B.weight"][:, :r])  # first r columns
        np.testing.assert_array_equal(got["head.weight"], glob["head.weight"])
        update, _ = decode_payload(answer.content, {k: v.shape for k, v in got.items()})
        states[site] = {k: got[k] + update[k] for k in got}  # what the server aggregates
    arrays, metrics = strategy.aggregate_train(1, replies[::-1])
    got = from_array_record(arrays)
    assert got["a.lora_A.weight"].shape == (4, 4) and got["a.lora_B.weight"].shape == (5, 4)
    sites = sorted(states)
    want, want_metrics = AGGREGATORS.get("exact-svd")([states[s] for s in sites],
                                                      [float(10 + 7 * int(s.split("-")[1])) for s in sites],
                                                      previous=glob)  # fmt: skip
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert metrics["agg_residual_mean"] == want_metrics["agg_residual_mean"]


@pytest.mark.parametrize("name", [n for n in strategies_for("lora") if not AGGREGATORS.get(n).heterogeneous_ranks])
def test_every_equal_rank_rule_refuses_a_rank_2_site(name: str) -> None:
    from fedpeft.errors import FedPeftError

    strategy = FedPeftStrategy(aggregator=name, sites=NODES, fraction=1.0, seed=0, ranks={"partition-00004": 2})
    match = f"{AGGREGATORS.get(name).name!r} needs every client at LoRA rank 4, but partition-00004 trains rank 2"
    with pytest.raises(FedPeftError, match=match):
        list(strategy.configure_train(1, to_array_record(_random_global(4)), ConfigRecord({}), _NoGrid()))


@pytest.mark.parametrize("name", strategies_for("lora"))
def test_a_site_at_the_global_rank_is_fine_for_every_rule(name: str) -> None:
    strategy = FedPeftStrategy(aggregator=name, sites=NODES, fraction=1.0, seed=0, ranks={"partition-00004": 4})
    messages = list(strategy.configure_train(1, to_array_record(_random_global(4)), ConfigRecord({}), _NoGrid()))
    assert len(messages) == len(NODES)
    frozen = ",".join(AGGREGATORS.get(name).frozen)
    assert all(m.content[CONFIG]["frozen"] == frozen for m in messages)


def test_strategy_passes_its_options_to_the_rule() -> None:
    glob = _random_global(2, seed=3)
    results = []
    for lam in (1e-3, 10.0):
        strategy = FedPeftStrategy(aggregator="lora-fair", sites=NODES, fraction=0.5, seed=1,
                                   options=AggregationOptions(lam=lam))  # fmt: skip
        _, replies = _round(strategy, glob)
        arrays, _ = strategy.aggregate_train(1, replies)
        results.append(from_array_record(arrays)["a.lora_B.weight"])
    assert not np.allclose(results[0], results[1])
    assert FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=9).options == AggregationOptions(seed=9)


def test_low_rank_site_refused_even_when_not_sampled() -> None:
    from fedpeft.errors import FedPeftError

    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=0.1, seed=0)
    chosen = {NODES[m.metadata.dst_node_id] for m in _configure(strategy)}
    other = next(s for s in NODES.values() if s not in chosen)
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=0.1, seed=0, ranks={other: 1})
    with pytest.raises(FedPeftError, match=other):
        _configure(strategy)


# --- reply checks, refused rounds and uniform weights (privacy) --------------------------------------

def _privacy_reply(out: Message, status: str) -> Message:
    from fedpeft.wire import PRIVACY, privacy_record

    reply = _reply(out) if status == "trained" else Message(
        RecordDict({ARRAYS: ArrayRecord(), METRICS: MetricRecord({NUM_EXAMPLES: 0})}), reply_to=out)
    reply.content[PRIVACY] = privacy_record(status=status, entry={"site": NODES[out.metadata.dst_node_id]},
                                            signature="sig", public_key="key", reason="budget spent")
    return reply


def test_a_failed_check_keeps_the_reply_out_of_the_aggregate() -> None:
    seen: list[tuple[str, int]] = []

    def check(site: str, server_round: int, content: RecordDict) -> str | None:
        seen.append((site, server_round))
        return "bad signature" if site.endswith("3") else None

    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0, checks=[check])
    messages = _configure(strategy)
    arrays, metrics = strategy.aggregate_train(1, [_reply(m) for m in messages])
    assert sorted(seen) == sorted((NODES[m.metadata.dst_node_id], 1) for m in messages)
    assert strategy.traffic[1].failures == {"partition-00003": "bad signature"}
    ok = [s for s in sorted(NODES.values()) if s != "partition-00003"]
    want = _expected(ok, [10 + 7 * int(s.split("-")[1]) for s in ok])
    for key, value in from_array_record(arrays).items():
        np.testing.assert_allclose(value, want[key], rtol=1e-6)
    assert metrics["clients"] == 9


def test_refused_rounds_are_counted_not_aggregated_and_not_failures() -> None:
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0)
    messages = _configure(strategy)
    replies = [_privacy_reply(m, "refused" if i < 4 else "trained") for i, m in enumerate(messages)]
    _, metrics = strategy.aggregate_train(1, replies)
    traffic = strategy.traffic[1]
    assert len(traffic.refused) == 4 and set(traffic.refused.values()) == {"budget spent"}
    assert not traffic.failures and metrics["clients"] == 6
    every = [_privacy_reply(m, "refused") for m in messages]
    assert strategy.aggregate_train(2, every) == (None, None) and len(strategy.traffic[2].refused) == 10


def test_malformed_privacy_record_is_rejected() -> None:
    from fedpeft.wire import PRIVACY

    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0)
    messages = _configure(strategy)
    reply = _reply(messages[0])
    reply.content[PRIVACY] = ConfigRecord({"status": "trained"})
    strategy.aggregate_train(1, [reply, *(_reply(m) for m in messages[1:])])
    assert "malformed privacy record" in strategy.traffic[1].failures[NODES[messages[0].metadata.dst_node_id]]


def test_uniform_weights_ignore_num_examples() -> None:
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0, uniform_weights=True)
    messages = _configure(strategy)
    arrays, _ = strategy.aggregate_train(1, [_reply(m) for m in messages])
    sites = sorted(NODES.values())
    want = _expected(sites, [1.0] * len(sites))
    for key, value in from_array_record(arrays).items():
        np.testing.assert_allclose(value, want[key], rtol=1e-6)


# --- encoded payloads: codecs, corrupted replies, the downlink ---------------------------------------

def _big_global(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.lora_A.weight": rng.normal(size=(4, 320)).astype(np.float32),
            "a.lora_B.weight": rng.normal(size=(320, 4)).astype(np.float32) * 0.1,
            "head.weight": rng.normal(size=(2, 64)).astype(np.float32)}  # fmt: skip


def test_lossy_replies_aggregate_what_was_decoded() -> None:
    glob = _big_global()
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=0.5, seed=1)
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), _NoGrid()))
    replies, states, weights = [], {}, {}
    for m in messages:
        site = NODES[m.metadata.dst_node_id]
        trained = _trained(glob, site)
        weights[site] = 10.0 + int(site.split("-")[1])
        replies.append(reply(m, trained, {NUM_EXAMPLES: weights[site]}, codec="topk:0.2+int8"))
        codec = parse_codec("topk:0.2+int8")
        states[site] = {k: glob[k] + codec.round_trip(trained[k] - glob[k]) for k in glob}
    arrays, _ = strategy.aggregate_train(1, replies)
    sites = sorted(states)
    want, _ = FEDIT([states[s] for s in sites], [weights[s] for s in sites], previous=glob)
    for key, value in from_array_record(arrays).items():
        np.testing.assert_array_equal(value, want[key])
    rows = strategy.traffic[1].per_site()
    assert [r["status"] for r in rows] == ["accepted"] * len(sites)
    assert all(r["compression_ratio"] > 3 for r in rows)  # 20 % of entries at 1 byte, plus positions
    assert strategy.traffic[1].compression()["compression_ratio"] > 3


def test_corrupted_payloads_are_rejected_and_the_round_goes_on() -> None:
    glob = _big_global()
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=1)
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), _NoGrid()))
    replies = [reply(m, _trained(glob, NODES[m.metadata.dst_node_id]), {NUM_EXAMPLES: 5}) for m in messages]
    bad = {NODES[messages[i].metadata.dst_node_id] for i in (2, 5, 7)}
    truncated = replies[2].content[ARRAYS][PAYLOAD]
    replies[2].content[ARRAYS] = ArrayRecord({PAYLOAD: Array(dtype="uint8", shape=truncated.shape,
                                                             stype=truncated.stype, data=truncated.data[:-9])})
    replies[5].content[CODEC] = ConfigRecord({**replies[5].content[CODEC], "codec": "zstd"})
    replies[7].content[CODEC] = ConfigRecord({**replies[7].content[CODEC], "version": 9})
    arrays, metrics = strategy.aggregate_train(1, replies)
    traffic = strategy.traffic[1]
    assert set(traffic.failures) == bad
    assert "unreadable" in traffic.failures[NODES[messages[2].metadata.dst_node_id]]
    assert "unknown codec 'zstd'" in traffic.failures[NODES[messages[5].metadata.dst_node_id]]
    assert "version 9" in traffic.failures[NODES[messages[7].metadata.dst_node_id]]
    assert all(reason.startswith("payload rejected: ") for reason in traffic.failures.values())
    assert metrics["clients"] == len(NODES) - 3
    good = sorted(set(NODES.values()) - bad)
    got = from_array_record(arrays)
    for key in glob:  # equal weights: the plain mean of the good sites
        want = np.mean([_trained(glob, s)[key] for s in good], axis=0)
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-6)
    rows = {r["site"]: r for r in traffic.per_site()}
    assert {s for s, r in rows.items() if r["status"] == "rejected"} == bad
    assert all(rows[s]["reason"] == traffic.failures[s] and rows[s]["bytes_up"] > 0 for s in bad)


def test_a_reply_from_a_site_not_sampled_is_rejected() -> None:
    glob = _big_global()
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=0.3, seed=1)
    first = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), _NoGrid()))
    second = list(strategy.configure_train(2, to_array_record(glob), ConfigRecord({}), _NoGrid()))
    stale = next(m for m in first if m.metadata.dst_node_id not in {n.metadata.dst_node_id for n in second})
    replies = [reply(m, _trained(glob, NODES[m.metadata.dst_node_id]), {NUM_EXAMPLES: 5}) for m in [*second, stale]]
    _, metrics = strategy.aggregate_train(2, replies)
    reason = "replied to a round it was not sampled for"
    assert strategy.traffic[2].failures == {NODES[stale.metadata.dst_node_id]: reason}
    assert metrics["clients"] == len(second)


def test_downlink_codec_sites_and_server_start_from_the_same_numbers() -> None:
    glob = _big_global(2)
    plain = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=0.5, seed=1)
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=0.5, seed=1, downlink="int8")
    list(plain.configure_train(1, to_array_record(glob), ConfigRecord({}), _NoGrid()))
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), _NoGrid()))
    int8 = parse_codec("int8")
    for m in messages:
        got = sent(m, glob)
        for key in glob:
            np.testing.assert_array_equal(got[key], int8.round_trip(glob[key]))
            np.testing.assert_array_equal(strategy.previous[key], got[key])  # the aggregator's `previous`
    site = NODES[messages[0].metadata.dst_node_id]
    assert strategy.traffic[1].sent[site] * 2.5 < plain.traffic[1].sent[site]  # 2.5 KB of floats + framing
    assert strategy.traffic[1].per_site()[0]["compression_ratio_down"] > 2.5
    # a site that did not move sends a zero update: the server gets back exactly what it sent
    replies = [reply(m, sent(m, glob), {NUM_EXAMPLES: 5}) for m in messages]
    arrays, _ = strategy.aggregate_train(1, replies)
    for key, value in from_array_record(arrays).items():
        np.testing.assert_array_equal(value, int8.round_trip(glob[key]))


def test_server_bound_is_applied_to_decoded_updates() -> None:
    glob = _big_global()
    seen = []

    def halve(update: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
        seen.append(update)
        return {k: v / 2 for k, v in update.items()}, True

    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=0.2, seed=1, bound=halve)
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), _NoGrid()))
    replies = [reply(m, _trained(glob, NODES[m.metadata.dst_node_id]), {NUM_EXAMPLES: 5}) for m in messages]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert len(seen) == 2 and strategy.traffic[1].reclipped == {NODES[m.metadata.dst_node_id] for m in messages}
    sites = sorted(NODES[m.metadata.dst_node_id] for m in messages)
    for key, value in from_array_record(arrays).items():
        want = np.mean([glob[key] + (_trained(glob, s)[key] - glob[key]) / 2 for s in sites], axis=0)
        np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)


def test_downlink_must_be_a_known_codec() -> None:
    from fedpeft.errors import FedPeftError

    with pytest.raises(FedPeftError, match="unknown codec"):
        FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=0.5, seed=0, downlink="gzip")


# --- SCAFFOLD and a held head -----------------------------------------------------------------------

def _control_strategy(control: dict | None) -> FedPeftStrategy:
    return FedPeftStrategy(aggregator="fedavg", sites=NODES, fraction=0.5, seed=0, control=control)


def test_scaffold_sends_c_and_moves_it_by_the_mean_change_over_all_sites() -> None:
    from fedpeft.wire import CONTROL

    strategy = _control_strategy({})
    out = _configure(strategy)
    for m in out:  # c starts at zero, for every tensor the sites train
        c = from_array_record(m.content[CONTROL])
        assert set(c) == set(_global_state()) and all(not v.any() for v in c.values())
    changes = {NODES[m.metadata.dst_node_id]: {k: np.full(v.shape, 1.0 + i, np.float32) for k, v in
                                               _global_state().items()} for i, m in enumerate(out)}
    replies = [_reply(m) for m in out]
    for m, r in zip(out, replies, strict=True):
        r.content[CONTROL] = to_array_record(changes[NODES[m.metadata.dst_node_id]])
    strategy.aggregate_train(1, replies)
    expected = sum(1.0 + i for i in range(len(out))) / len(NODES)  # (1/N) Σ Δc_i, N = all ten sites
    for value in strategy.control.values():
        np.testing.assert_allclose(value, expected, rtol=1e-6)
    again = from_array_record(_configure(strategy, server_round=2)[0].content[CONTROL])
    np.testing.assert_allclose(again["head.weight"], expected, rtol=1e-6)


def test_scaffold_rejects_a_reply_without_a_fitting_control_change() -> None:
    from fedpeft.wire import CONTROL

    strategy = _control_strategy({})
    out = _configure(strategy)
    replies = [_reply(m) for m in out]
    replies[1].content[CONTROL] = to_array_record({"head.weight": np.zeros((2, 2), np.float32)})
    for r in replies[2:]:
        r.content[CONTROL] = to_array_record({"head.weight": np.ones((3, 4), np.float32)})
    strategy.aggregate_train(1, replies)
    failures = strategy.traffic[1].failures
    assert "lacks its SCAFFOLD" in failures[NODES[out[0].metadata.dst_node_id]]
    assert "has shape (2, 2)" in failures[NODES[out[1].metadata.dst_node_id]]
    np.testing.assert_allclose(strategy.control["head.weight"], (len(out) - 2) / len(NODES), rtol=1e-6)


def test_without_scaffold_no_control_travels() -> None:
    from fedpeft.wire import CONTROL

    strategy = _control_strategy(None)
    assert all(CONTROL not in m.content for m in _configure(strategy))
    assert strategy.control is None


def test_a_head_held_after_the_probe_is_neither_sent_back_nor_changed() -> None:
    strategy = FedPeftStrategy(aggregator="fedavg", sites=NODES, fraction=1.0, seed=0, head_frozen_after=1)
    state = {**_global_state(), "classifier.weight": np.ones((3, 4), np.float32)}

    def configure(rnd: int) -> list[Message]:
        return list(strategy.configure_train(rnd, to_array_record(state), ConfigRecord({"label-names": ["a"]}),
                                             _NoGrid()))

    assert configure(1)[0].content[CONFIG]["held"] == ""  # the probe round trains the head
    out = configure(2)
    assert out[0].content[CONFIG]["held"] == "classifier,score"
    replies = [reply(m, {**_client_state(NODES[m.metadata.dst_node_id]),
                         "classifier.weight": np.full((3, 4), 9.0, np.float32)}, MetricRecord({NUM_EXAMPLES: 5}))
               for m in out]
    arrays, _ = strategy.aggregate_train(2, replies)
    new = from_array_record(arrays)
    np.testing.assert_array_equal(new["classifier.weight"], state["classifier.weight"])
    assert not np.array_equal(new["a.lora_B.weight"], state["a.lora_B.weight"])


def test_shared_codec_replies_must_draw_the_rounds_positions() -> None:
    """A ``shared`` payload carries its seed; the coordinator takes only the round's (the run seed and round
    number), so no site can pick its own positions."""
    big = {"a.lora_A.weight": np.zeros((8, 200), np.float32), "a.lora_B.weight": np.zeros((200, 8), np.float32),
           "head.weight": np.zeros((3, 4), np.float32)}
    strategy = FedPeftStrategy(aggregator="fedavg", sites=NODES, fraction=1.0, seed=0,
                               options=AggregationOptions(seed=17))
    messages = list(strategy.configure_train(3, to_array_record(big), ConfigRecord({}), _NoGrid()))
    rng = np.random.default_rng(0)
    trained = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in big.items()}
    good = reply(messages[0], trained, {NUM_EXAMPLES: 5}, codec=f"shared:0.3@{round_seed(17, 3)}")
    bad = reply(messages[1], trained, {NUM_EXAMPLES: 5}, codec=f"shared:0.3@{round_seed(17, 2)}")
    arrays, metrics = strategy.aggregate_train(3, [good, bad])
    assert arrays is not None and metrics["clients"] == 1
    status = {row["site"]: (row["status"], row.get("reason", "")) for row in strategy.traffic[3].per_site()}
    site = NODES[messages[1].metadata.dst_node_id]
    assert status[site][0] == "rejected" and "not the round's" in status[site][1]


# --- the delta broadcast (fedpeft.downlink) -------------------------------------------------------------------

def _received(msg: Message, site_dir: object, initial: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a site rebuilds from a train message under the delta broadcast (client.exchange)."""
    from client.exchange import received_broadcast

    config = msg.content[CONFIG]
    base, digest = config.get("downlink-base"), config.get("downlink-digest")
    return received_broadcast(msg.content, {k: v.shape for k, v in initial.items()},
                              base=None if base is None else str(base), digest=str(digest),
                              store=site_dir / NODES[msg.metadata.dst_node_id] / "broadcast.npz",  # type: ignore[operator]
                              initial=initial, links=int(config.get("downlink-chain", 0)))


def _unmoved_reply(msg: Message, start: dict[str, np.ndarray]) -> Message:
    """The reply of a site that trained ``start`` and did not move it."""
    from fedpeft.wire import payload_records

    none = parse_codec("none")
    records = payload_records(none, {k: none.encode(np.zeros_like(v)) for k, v in start.items()},
                              {k: v.shape for k, v in start.items()})
    return Message(RecordDict({**records, METRICS: MetricRecord({NUM_EXAMPLES: 5})}), reply_to=msg)


def test_delta_broadcast_sends_the_changes_a_site_missed_and_keeps_what_it_did_not_send(tmp_path: object) -> None:
    from fedpeft.downlink import broadcast_digest
    from fedpeft.wire import raw_nbytes
    from strategies.flower import Broadcasts

    initial = _big_global(0)
    rng = np.random.default_rng(5)
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=0.5, seed=1, downlink="compeft:0.2",
                               broadcasts=Broadcasts(base=initial), site_config=lambda site: {"ledger-seq": 3})
    raw = raw_nbytes({k: v.shape for k, v in initial.items()})
    glob, last_seen = initial, {}  # site → the round it last received a broadcast in
    for rnd in (1, 2, 3, 4):
        glob = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in glob.items()}
        messages = list(strategy.configure_train(rnd, to_array_record(glob), ConfigRecord({}), _NoGrid()))
        start = strategy.baselines[4]
        assert all(np.array_equal(strategy.previous[k], start[k]) for k in start)  # the aggregator's `previous`
        for m in messages:
            site = NODES[m.metadata.dst_node_id]
            missed = rnd - last_seen.get(site, 0)  # every change since the broadcast it holds (the initial: 0)
            config = m.content[CONFIG]
            assert config["downlink-digest"] == broadcast_digest(start) and config["ledger-seq"] == 3
            assert int(config.get("downlink-chain", 0)) == missed - 1
            got = _received(m, tmp_path, initial)  # the changes applied, oldest first, to what the site holds
            for key in start:
                np.testing.assert_array_equal(got[key], start[key])
            assert strategy.traffic[rnd].sent[site] * 7 < raw * missed + 4_000  # each change ~1/8 of fp32
            last_seen[site] = rnd
        assert any(int(m.content[CONFIG].get("downlink-chain", 0)) > 0 for m in messages) or rnd == 1
        # the sites did not move: the aggregate is the global adapter (what the codec did not send is added back)
        arrays, _ = strategy.aggregate_train(rnd, [_unmoved_reply(m, start) for m in messages])
        for key, value in from_array_record(arrays).items():
            np.testing.assert_allclose(value, glob[key], rtol=0, atol=1e-6)
        assert any(not np.array_equal(start[k], glob[k]) for k in start)  # compeft left part of the change behind
        assert strategy.broadcasts.base is start
        assert {s for s, d in strategy.broadcasts.held.items() if d == broadcast_digest(start)} == \
            {NODES[m.metadata.dst_node_id] for m in messages}


def test_a_site_the_coordinator_cannot_reach_by_changes_gets_the_whole_adapter() -> None:
    from fedpeft.downlink import Change
    from strategies.flower import Broadcasts

    def change(base: str, digest: str, size: int) -> Change:
        return Change(base=base, digest=digest, payload=np.zeros(size, np.uint8))

    state = Broadcasts(base={}, held={"a": "d1", "b": "d0", "c": "lost"}, origin="d0",
                       changes=(change("d0", "d1", 40), change("d1", "d2", 40)))
    now = change("d2", "d3", 40)
    assert [c.digest for c in state.chain("a", "d2", now, whole_bytes=1000)] == ["d2", "d3"]
    assert [c.digest for c in state.chain("b", "d2", now, whole_bytes=1000)] == ["d1", "d2", "d3"]
    assert [c.digest for c in state.chain("never-sampled", "d2", now, whole_bytes=1000)] == ["d1", "d2", "d3"]
    assert state.chain("c", "d2", now, whole_bytes=1000) is None  # holds nothing the changes start from
    assert state.chain("b", "d2", now, whole_bytes=120) is None  # three changes weigh as much as the whole
    after = state.after({}, "d2", now, "d3", received=["b"], failed=["a"], whole_bytes=100)
    assert after.held == {"b": "d3", "c": "lost"}  # a failed: it counts as holding the initial adapter again
    assert [c.digest for c in after.changes] == ["d2", "d3"]  # older changes could not make a chain any more


def test_a_site_refuses_a_change_it_cannot_apply(tmp_path: object) -> None:
    from fedpeft.errors import FedPeftError
    from fedpeft.wire import PayloadError
    from strategies.flower import Broadcasts

    initial = _big_global(0)
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=0.2, seed=1, downlink="int8",
                               broadcasts=Broadcasts(base=initial))
    glob = {k: v + 0.5 for k, v in initial.items()}
    message = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), _NoGrid()))[0]
    other = {k: v * 2 for k, v in initial.items()}  # a site of another run: its initial adapter differs
    with pytest.raises(FedPeftError, match="does not hold"):
        _received(message, tmp_path, other)
    message.content[CONFIG]["downlink-chain"] = 1  # a change the request counts is not in the message
    with pytest.raises(PayloadError, match="counts 1 earlier broadcast changes, and 'arrays.0' is missing"):
        _received(message, tmp_path, initial)
    del message.content[CONFIG]["downlink-chain"]
    message.content[CONFIG]["downlink-digest"] = "0" * 32
    with pytest.raises(FedPeftError, match="not the coordinator's"):
        _received(message, tmp_path, initial)
