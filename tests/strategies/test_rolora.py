"""RoLoRA: odd rounds average only B (A held as broadcast), even rounds only A (B held); exact each round.
Checked against the dense ΣpBA, through the driver and through the Flower strategy."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import given, settings
from lora_cases import A_KEY, B_KEY, HEAD, Problem, dense_average, dense_update, problems
from replies import reply, sent

from fedpeft.wire import CONFIG, NUM_EXAMPLES, from_array_record, to_array_record
from strategies import AGGREGATORS, AggregationOptions
from strategies.flower import FedPeftStrategy

ROLORA = AGGREGATORS.get("rolora")
NODES = {2000 + 11 * i: f"partition-{i:05d}" for i in range(6)}


def trained_in(problem: Problem, server_round: int) -> Problem:
    """The clients of ``problem`` as RoLoRA lets them train in ``server_round``: the held factor is the previous."""
    odd = server_round % 2 == 1
    As = [problem.prev_A.copy() for _ in problem.As] if odd else problem.As
    Bs = problem.Bs if odd else [problem.prev_B.copy() for _ in problem.Bs]
    return Problem(As, Bs, problem.heads, problem.weights, problem.prev_A, problem.prev_B, problem.prev_head)


def test_rounds_alternate_between_B_and_A() -> None:
    assert [ROLORA.for_round(t).held for t in (1, 2, 3, 4, 7, 8)] == [("lora_A",), ("lora_B",)] * 3
    for t in (1, 2):
        rule = ROLORA.for_round(t)
        assert rule.name == "rolora" and rule.frozen == () and rule.linear and not rule.alternates
    with pytest.raises(ValueError, match="rounds count from 1"):
        ROLORA.for_round(0)


@settings(max_examples=40, deadline=None)
@given(problems())
def test_odd_round_averages_B_and_keeps_A_exactly(problem: Problem) -> None:
    problem = trained_in(problem, 1)
    out, metrics = problem.run("rolora", server_round=1)
    np.testing.assert_array_equal(out[A_KEY], problem.prev_A)  # the broadcast A, bit for bit
    np.testing.assert_allclose(out[B_KEY], dense_average(problem.Bs, problem.p), rtol=1e-12, atol=1e-14)
    dW = dense_update(problem.As, problem.Bs, problem.p)  # Σ p_k B_k A: exact
    np.testing.assert_allclose(out[B_KEY] @ out[A_KEY], dW, rtol=0, atol=1e-10 * max(np.abs(dW).max(), 1.0))
    assert metrics["agg_residual_max"] <= 1e-6


@settings(max_examples=40, deadline=None)
@given(problems())
def test_even_round_averages_A_and_keeps_B_exactly(problem: Problem) -> None:
    problem = trained_in(problem, 2)
    out, metrics = problem.run("rolora", server_round=2)
    np.testing.assert_array_equal(out[B_KEY], problem.prev_B)
    np.testing.assert_allclose(out[A_KEY], dense_average(problem.As, problem.p), rtol=1e-12, atol=1e-14)
    dW = dense_update(problem.As, problem.Bs, problem.p)  # Σ p_k B A_k: exact
    np.testing.assert_allclose(out[B_KEY] @ out[A_KEY], dW, rtol=0, atol=1e-10 * max(np.abs(dW).max(), 1.0))
    assert metrics["agg_residual_max"] <= 1e-6
    np.testing.assert_allclose(out[HEAD], dense_average(problem.heads, problem.p), rtol=1e-12)


@pytest.mark.parametrize(("server_round", "key"), [(1, A_KEY), (2, B_KEY)])
def test_a_client_that_sends_the_held_factor_is_refused(server_round: int, key: str) -> None:
    problem = trained_in(_problem(), server_round)
    rule = ROLORA.for_round(server_round)
    states = problem.states(rule.fixed)
    states[1][key] = problem.prev_A if key == A_KEY else problem.prev_B
    with pytest.raises(ValueError, match="client 1 sent keys .* extra"):
        rule(states, problem.weights, previous=problem.previous())


def test_the_registered_rule_needs_a_round() -> None:
    problem = _problem()
    with pytest.raises(ValueError, match="alternates by round"):
        ROLORA(problem.states(), problem.weights, previous=problem.previous())


def test_robust_statistics_apply_to_the_trained_factor_only() -> None:
    problem = trained_in(_problem(), 2)
    rule = ROLORA.for_round(2)
    out, _ = rule(problem.states(rule.fixed), problem.weights, previous=problem.previous(),
                  options=AggregationOptions(robust="median"))  # fmt: skip
    np.testing.assert_array_equal(out[B_KEY], problem.prev_B)
    np.testing.assert_allclose(out[A_KEY], np.median(np.stack(problem.As), axis=0), rtol=1e-12)


def _problem() -> Problem:
    from lora_cases import make_problem

    return make_problem(5, d=6, n=5, r=2, K=4)


# --- through the Flower strategy: what crosses the wire each round ----------------------------------


def _glob(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a.lora_A.weight": rng.normal(size=(2, 40)).astype(np.float32),
            "a.lora_B.weight": rng.normal(size=(30, 2)).astype(np.float32),
            "head.weight": rng.normal(size=(3, 4)).astype(np.float32)}  # fmt: skip


def _train(broadcast: dict[str, np.ndarray], site: str, held: str) -> dict[str, np.ndarray]:
    """A site's trained adapter: every tensor moved except the held factor."""
    rng = np.random.default_rng(100 + int(site.split("-")[1]))
    return {k: v if held in k else (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in broadcast.items()}


@pytest.mark.usefixtures("server_identity")
@pytest.mark.parametrize(("server_round", "held", "trained"), [(1, "lora_A", "lora_B"), (2, "lora_B", "lora_A"),
                                                                (3, "lora_A", "lora_B")])  # fmt: skip
def test_round_through_the_strategy(server_round: int, held: str, trained: str) -> None:
    glob = _glob(server_round)
    strategy = FedPeftStrategy(aggregator="rolora", sites=NODES, fraction=1.0, seed=0)
    messages = list(strategy.configure_train(server_round, to_array_record(glob), ConfigRecord({}), None))
    replies, states, weights = [], {}, {}
    for m in messages:
        assert m.content[CONFIG]["held"] == held and m.content[CONFIG]["frozen"] == ""
        broadcast = sent(m, glob)
        assert set(broadcast) == set(glob)  # both factors go down: the held one changed last round
        site = NODES[m.metadata.dst_node_id]
        states[site], weights[site] = _train(broadcast, site, held), 5 + int(site.split("-")[1])
        replies.append(reply(m, states[site], {NUM_EXAMPLES: weights[site]}))
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    traffic = strategy.traffic[server_round]
    assert not traffic.failures
    got = from_array_record(arrays)
    held_key, trained_key = f"a.{held}.weight", f"a.{trained}.weight"
    np.testing.assert_array_equal(got[held_key], glob[held_key])  # exactly the broadcast
    sites = sorted(states)
    p = np.array([weights[s] for s in sites], dtype=np.float64)
    p /= p.sum()
    want = np.einsum("k,k...->...", p, np.stack([states[s][trained_key] for s in sites]))
    np.testing.assert_allclose(got[trained_key], want, rtol=1e-5, atol=1e-6)
    assert metrics["agg_residual_max"] <= 5e-3  # exact, up to the float32 Gram-trace floor
    # the upload holds the trained factor and the head only: about half the LoRA bytes
    raw_up = traffic.raw_received[sites[0]]
    assert raw_up == (glob[trained_key].nbytes + glob["head.weight"].nbytes)
    assert traffic.raw_sent[sites[0]] == sum(v.nbytes for v in glob.values())


@pytest.mark.usefixtures("server_identity")
def test_a_reply_carrying_the_held_factor_is_rejected() -> None:
    glob = _glob()
    strategy = FedPeftStrategy(aggregator="rolora", sites=NODES, fraction=1.0, seed=0)
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), None))
    bad = messages[0]
    config = bad.content[CONFIG]  # shared by the round's messages
    config["held"] = ""  # this site ignores the held factor and sends A too
    replies = [reply(bad, _train(sent(bad, glob), NODES[bad.metadata.dst_node_id], "lora_A"), {NUM_EXAMPLES: 5})]
    config["held"] = "lora_A"
    replies += [reply(m, _train(sent(m, glob), NODES[m.metadata.dst_node_id], "lora_A"), {NUM_EXAMPLES: 5})
                for m in messages[1:]]  # fmt: skip
    arrays, _ = strategy.aggregate_train(1, replies)
    site = NODES[bad.metadata.dst_node_id]
    assert "payload rejected" in strategy.traffic[1].failures[site]
    np.testing.assert_array_equal(from_array_record(arrays)["a.lora_A.weight"], glob["a.lora_A.weight"])
