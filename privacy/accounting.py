"""Privacy accounting for DP-SGD: ε of a history of steps, and the σ that meets a target ε.

A *history* is Opacus's accountant format: a list of ``(σ, q, steps)``, one entry per run of steps
with the same noise multiplier σ and Poisson sampling rate q. Accountants are registered by name:

- ``rdp`` — Rényi DP of the sampled Gaussian mechanism (Mironov 2017; Mironov, Talwar, Zhang 2019),
  Opacus's ``RDPAccountant``: an upper bound, a little loose;
- ``prv`` — privacy random variables (Gopi, Lee, Wutschitz, NeurIPS 2021), Opacus's
  ``PRVAccountant``: near-tight, with a small numerical error bound;
- ``pld`` — privacy loss distributions from Google's ``dp-accounting`` (Koskela et al. 2020;
  Doroshenko et al. 2022): near-tight, and an implementation independent of Opacus, which is why
  ``fedpeft audit`` recomputes every site's ε with it.

Each function is pure: history in, ε out, no state kept.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache

from fedpeft.registry import Registry

History = Sequence[tuple[float, float, int]]
EpsilonFn = Callable[..., float]

ACCOUNTANTS: Registry[EpsilonFn] = Registry("accountant")

# The accountants a site may count with (Opacus's); ``pld`` is the auditor's independent check.
SITE_ACCOUNTANTS = ("rdp", "prv")


def compact(history: History) -> list[tuple[float, float, int]]:
    """The history with steps of equal (σ, q) merged; composition is commutative, so ε is unchanged."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        if int(n) > 0:
            key = (float(sigma), float(q))
            steps[key] = steps.get(key, 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def _trivial(history: History) -> float | None:
    """ε for the cases every accountant agrees on: nothing spent (0) or a noiseless step (∞)."""
    steps = [(s, q, n) for s, q, n in history if n > 0 and q > 0]
    if not steps:
        return 0.0
    if any(s <= 0 for s, _, _ in steps):
        return math.inf
    return None


@ACCOUNTANTS.register("rdp")
def rdp_epsilon(history: History, *, delta: float) -> float:
    """ε at ``delta`` by Opacus's RDP accountant."""
    trivial = _trivial(history)
    if trivial is not None:
        return trivial
    from opacus.accountants import RDPAccountant  # deferred: heavy (opacus, torch) on `fedpeft audit`'s path

    accountant = RDPAccountant()
    accountant.history = compact(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": the bound is still valid
        return float(accountant.get_epsilon(delta=delta))


@ACCOUNTANTS.register("prv")
def prv_epsilon(history: History, *, delta: float) -> float:
    """ε at ``delta`` by Opacus's PRV accountant (the upper end of its error interval)."""
    trivial = _trivial(history)
    if trivial is not None:
        return trivial
    from opacus.accountants import PRVAccountant  # deferred: heavy (opacus, torch) on `fedpeft audit`'s path

    accountant = PRVAccountant()
    accountant.history = compact(history)
    return float(accountant.get_epsilon(delta=delta))


@ACCOUNTANTS.register("pld")
def pld_epsilon(history: History, *, delta: float) -> float:
    """ε at ``delta`` by dp-accounting's PLD accountant: each step a Poisson-sampled Gaussian."""
    trivial = _trivial(history)
    if trivial is not None:
        return trivial
    return _pld(tuple(compact(history)), float(delta))


@lru_cache(maxsize=256)
def _pld(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    # deferred: heavy (dp_accounting, ~1 s) on `fedpeft audit`'s path
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return float(accountant.get_epsilon(delta))


def epsilon(history: History, *, delta: float, accountant: str) -> float:
    """ε at ``delta`` of ``history`` by the accountant registered as ``accountant``."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return ACCOUNTANTS.get(accountant)(history, delta=delta)


def noise_for_budget(
    *,
    epsilon_budget: float,
    delta: float,
    accountant: str,
    sample_rate: float = 0.0,
    steps: int = 0,
    plan: Sequence[tuple[float, int]] = (),
    tolerance: float = 0.01,
) -> float:
    """The smallest σ (to within the search) whose ``steps`` Poisson steps at rate q spend at most
    ``epsilon_budget`` at ``delta``; ε(σ) is within ``tolerance`` below the budget.

    ``plan`` instead of (``sample_rate``, ``steps``): several runs of steps ``[(q, steps), ...]``, all at
    the same σ, composed (e.g. probe rounds at one rate, then adapter rounds at another).

    Raises
    ------
    ValueError
        If even σ = 10⁶ cannot meet the budget.
    """
    if not epsilon_budget > 0:
        raise ValueError(f"epsilon budget must be > 0, got {epsilon_budget}")
    runs = [(float(q), int(n)) for q, n in plan] if plan else [(float(sample_rate), int(steps))]

    def eps(sigma: float) -> float:
        return epsilon([(sigma, q, n) for q, n in runs], delta=delta, accountant=accountant)

    low, high = 0.0, 1.0
    while eps(high) > epsilon_budget:
        low, high = high, 2 * high
        if high > 1e6:
            described = " then ".join(f"{n} steps at rate {q:.4g}" for q, n in runs)
            raise ValueError(f"no noise level meets epsilon {epsilon_budget} at delta {delta} over {described}")
    while True:
        spent = eps(high)
        if epsilon_budget - spent <= tolerance or high - low < 1e-6:
            return high
        mid = (low + high) / 2
        if eps(mid) > epsilon_budget:
            low = mid
        else:
            high = mid
