"""FFA-LoRA: A frozen at the shared init, never sent; B' = Σ_k p_k B_k, so B'A = ΔW exactly.

(The broadcast side — no lora_A in the ArrayRecord, config ``frozen`` — is in test_flower_strategy.py.)
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from lora_cases import A_KEY, B_KEY, HEAD, Problem, dense_average, make_problem, problems

from strategies import AGGREGATORS

FFA = AGGREGATORS.get("ffa-lora")


@settings(max_examples=30, deadline=None)
@given(problems(frozen_A=True))
def test_keeps_A_averages_B_and_is_exact(problem: Problem) -> None:
    states = problem.states(FFA.frozen)
    assert all(A_KEY not in s for s in states)  # clients send B and the head only
    out, metrics = FFA(states, problem.weights, previous=problem.previous())
    np.testing.assert_array_equal(out[A_KEY], problem.prev_A)
    B_bar = dense_average(problem.Bs, problem.p)
    np.testing.assert_allclose(out[B_KEY], B_bar, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out[HEAD], dense_average(problem.heads, problem.p), rtol=1e-12, atol=1e-14)
    # Σ_k p_k B_k A = B'A: the ideal update is reproduced
    np.testing.assert_allclose(out[B_KEY] @ out[A_KEY], problem.dW, rtol=0, atol=1e-12 * np.abs(problem.dW).max())
    assert metrics["agg_residual_max"] <= 1e-6


def test_float32_keeps_A_bit_for_bit() -> None:
    problem = make_problem(0, d=8, n=6, r=3, K=4, frozen_A=True).astype(np.float32)
    out, metrics = problem.run("ffa-lora")
    assert out[A_KEY].dtype == out[B_KEY].dtype == np.float32
    np.testing.assert_array_equal(out[A_KEY], problem.prev_A)
    np.testing.assert_allclose(out[B_KEY], dense_average(problem.Bs, problem.p), rtol=1e-6, atol=1e-6)
    assert metrics["agg_residual_max"] <= 5e-3  # float32 Gram-trace floor


def test_result_does_not_alias_the_previous_A() -> None:
    problem = make_problem(1, d=4, n=5, r=2, K=2, frozen_A=True)
    previous = problem.previous()
    out, _ = FFA(problem.states(FFA.frozen), problem.weights, previous=previous)
    out[A_KEY][...] = 0.0
    np.testing.assert_array_equal(previous[A_KEY], problem.prev_A)
    assert np.abs(previous[A_KEY]).max() > 0


def test_rejects_a_client_that_sends_A_anyway() -> None:
    problem = make_problem(2, d=4, n=5, r=2, K=3, frozen_A=True)
    states = problem.states(FFA.frozen)
    states[1][A_KEY] = problem.prev_A.copy()  # even an unchanged A is a protocol error
    with pytest.raises(ValueError, match=f"client 1 .*extra \\['{A_KEY}'\\]"):
        FFA(states, problem.weights, previous=problem.previous())


def test_rejects_a_client_without_B() -> None:
    problem = make_problem(3, d=4, n=5, r=2, K=2, frozen_A=True)
    states = problem.states(FFA.frozen)
    del states[0][B_KEY]
    with pytest.raises(ValueError, match=f"client 0 .*missing \\['{B_KEY}'\\]"):
        FFA(states, problem.weights, previous=problem.previous())


def test_rejects_a_lower_rank_B() -> None:
    problem = make_problem(4, d=4, n=5, r=3, K=2, frozen_A=True)
    states = problem.states(FFA.frozen)
    states[1][B_KEY] = states[1][B_KEY][:, :2]
    with pytest.raises(ValueError, match="client 1 .*shapes"):
        FFA(states, problem.weights, previous=problem.previous())


def test_every_lora_A_in_a_multi_layer_adapter_is_frozen() -> None:
    rng = np.random.default_rng(5)
    previous = {f"m.{i}.lora_A.weight": rng.normal(size=(2, 3)) for i in range(3)}
    previous |= {f"m.{i}.lora_B.weight": rng.normal(size=(4, 2)) for i in range(3)}
    states = [{k: rng.normal(size=v.shape) for k, v in previous.items() if "lora_B" in k} for _ in range(2)]
    out, metrics = FFA(states, [1.0, 3.0], previous=previous)
    for i in range(3):
        np.testing.assert_array_equal(out[f"m.{i}.lora_A.weight"], previous[f"m.{i}.lora_A.weight"])
        want = 0.25 * states[0][f"m.{i}.lora_B.weight"] + 0.75 * states[1][f"m.{i}.lora_B.weight"]
        np.testing.assert_allclose(out[f"m.{i}.lora_B.weight"], want, rtol=1e-12)
    assert metrics["agg_residual_max"] <= 1e-6


def test_registration() -> None:
    assert FFA.name == "ffa-lora" and FFA.frozen == ("lora_A",) and not FFA.heterogeneous_ranks
