"""Accountants: three implementations agree where they should, σ calibration meets the budget."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.accounting import ACCOUNTANTS, compact, epsilon, noise_for_budget


def test_registered_accountants() -> None:
    assert ACCOUNTANTS.names() == ["pld", "prv", "rdp"]


def test_trivial_histories() -> None:
    for name in ACCOUNTANTS:
        assert epsilon([], delta=1e-5, accountant=name) == 0.0
        assert epsilon([(1.0, 0.1, 0)], delta=1e-5, accountant=name) == 0.0
        assert epsilon([(0.0, 0.1, 3)], delta=1e-5, accountant=name) == math.inf


def test_compact_merges_equal_steps_and_keeps_epsilon() -> None:
    history = [(1.0, 0.1, 5), (1.2, 0.1, 3), (1.0, 0.1, 5), (1.0, 0.1, 0)]
    assert compact(history) == [(1.0, 0.1, 10), (1.2, 0.1, 3)]
    for name in ("rdp", "pld"):
        assert epsilon(history, delta=1e-5, accountant=name) == pytest.approx(
            epsilon([(1.0, 0.1, 10), (1.2, 0.1, 3)], delta=1e-5, accountant=name), rel=1e-9
        )


@pytest.mark.parametrize("sigma,q,steps", [(0.7, 1 / 18, 50), (1.0, 0.2, 25), (2.0, 0.01, 1000)])
def test_near_tight_accountants_agree_and_rdp_bounds_them(sigma: float, q: float, steps: int) -> None:
    history = [(sigma, q, steps)]
    rdp, prv, pld = (epsilon(history, delta=1e-5, accountant=n) for n in ("rdp", "prv", "pld"))
    assert prv == pytest.approx(pld, rel=0.02)  # Opacus PRV vs dp-accounting PLD: independent, both near-tight
    assert rdp >= pld * 0.999  # RDP is an upper bound


@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 1000), (0.8, 0.1, 40)])
def test_opacus_rdp_matches_dp_accounting_rdp(sigma: float, q: float, steps: int) -> None:
    """The same RDP analysis in two libraries (different grids of orders) gives nearly the same ε."""
    import dp_accounting
    from dp_accounting.rdp import rdp_privacy_accountant

    ref = rdp_privacy_accountant.RdpAccountant()
    ref.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert epsilon([(sigma, q, steps)], delta=1e-5, accountant="rdp") == pytest.approx(ref.get_epsilon(1e-5), rel=0.03)


def test_delta_must_be_a_probability() -> None:
    with pytest.raises(ValueError):
        epsilon([(1.0, 0.1, 1)], delta=0.0, accountant="rdp")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("budget", [1.0, 8.0])
def test_noise_for_budget_meets_it_tightly(accountant: str, budget: float) -> None:
    q, steps = 0.05, 200
    sigma = noise_for_budget(epsilon_budget=budget, delta=1e-5, sample_rate=q, steps=steps, accountant=accountant)
    spent = epsilon([(sigma, q, steps)], delta=1e-5, accountant=accountant)
    assert budget - 0.011 <= spent <= budget
    assert epsilon([(sigma * 0.97, q, steps)], delta=1e-5, accountant=accountant) > budget - 0.011


def test_noise_for_budget_rejects_impossible_budgets() -> None:
    with pytest.raises(ValueError):
        noise_for_budget(epsilon_budget=0.0, delta=1e-5, sample_rate=0.1, steps=10, accountant="rdp")


@settings(max_examples=15, deadline=None)
@given(sigma=st.floats(0.5, 4.0), q=st.floats(0.005, 0.5), steps=st.integers(1, 300), extra=st.integers(1, 100))
def test_epsilon_grows_with_steps_and_falls_with_noise(sigma: float, q: float, steps: int, extra: int) -> None:
    eps = epsilon([(sigma, q, steps)], delta=1e-5, accountant="rdp")
    assert epsilon([(sigma, q, steps + extra)], delta=1e-5, accountant="rdp") >= eps
    assert epsilon([(sigma * 1.5, q, steps)], delta=1e-5, accountant="rdp") <= eps


def test_noise_for_budget_over_a_composed_plan() -> None:
    plan = [(1.0, 40), (0.05, 200)]
    sigma = noise_for_budget(epsilon_budget=8.0, delta=1e-5, plan=plan, accountant="rdp")
    spent = epsilon([(sigma, q, n) for q, n in plan], delta=1e-5, accountant="rdp")
    assert 8.0 - 0.011 <= spent <= 8.0
    alone = noise_for_budget(epsilon_budget=8.0, delta=1e-5, sample_rate=0.05, steps=200, accountant="rdp")
    assert sigma > alone  # the probe's steps cost budget too
