"""Central (user-level) DP: each site's whole update clipped, Gaussian noise added to the average.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, arXiv 1710.06963) with client-side clipping
(Andrew et al., NeurIPS 2021, arXiv 1905.03871), built from Flower's pieces:

1. **clip** at the site: Flower's ``fixedclipping_mod`` clips the update (trained − broadcast) of
   all sent tensors to L2 norm C. :func:`clipping_mod` applies it only when the server asked for it,
   so the same ClientApp serves runs without central DP. The site's codec encodes the clipped update
   (with error feedback), so what arrives may exceed C slightly; the server clips every decoded
   update to C again (:func:`clip_update`) before averaging, so the sensitivity is C/m whatever the
   codec did;
2. **average** uniformly on the server (every sampled client counts 1/m; weighting by examples would
   let one client move the average by more than C/m);
3. **noise**: Flower's ``DifferentialPrivacyClientSideFixedClipping`` wrapper adds N(0, (σC/m)²) to
   every aggregated tensor;
4. **account** with Flower's ``RdpAccountant``: one sampled Gaussian release per round.

**Which aggregators compose.** The release is the noised *average of clipped updates*; anything
computed from it alone is post-processing and keeps the guarantee. ``fedit`` and ``ffa-lora`` return
exactly that average (:attr:`strategies.aggregator.Aggregator.linear`). ``lora-fair``,
``lora-fair-ab`` and ``exact-svd`` read each client's factors through non-linear maps (the products
B_k A_k, QR/SVD of the stacked factors); their output is not a function of the noised average and
the noise scale C/m does not bound their sensitivity, so fedpeft refuses them with central DP.

**Sampling, stated honestly.** m of the N sites are drawn per round *without replacement*; the
accountant amplifies by that sampling (Flower's ``without-replacement`` model, replace-one
neighbours) only when m < N, and then the draw comes from the OS entropy pool, not the run seed,
because amplification holds only while the sampled set is secret. With m = N there is no
amplification. If fewer than m sites reply, the noise (fixed at σC/m) covers a sensitivity of C/m'
and the round is accounted with the smaller effective σ·m'/m.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM  # the train config's clipping-norm key

from fedpeft.adapters.state import key_matches
from fedpeft.errors import FedPeftError


def clipping_mod(msg: Any, ctxt: Any, call_next: Any) -> Any:
    """Flower's ``fixedclipping_mod`` when the server sent a clipping norm, else a pass-through."""
    from flwr.clientapp.mod import fixedclipping_mod

    configs = list(msg.content.config_records.values())
    if len(configs) == 1 and KEY_CLIPPING_NORM in configs[0]:
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def clip_update(update: dict[str, np.ndarray], *, clipping_norm: float) -> tuple[dict[str, np.ndarray], bool]:
    """``update`` scaled to L2 norm at most ``clipping_norm`` (over all tensors), and whether it was.

    The server applies it to every decoded update: a codec and its error feedback may send a little
    more than the clipped norm, and the noise only covers C (:func:`strategies.norm_bound.clip_to_norm`).
    """
    from strategies.norm_bound import clip_to_norm

    return clip_to_norm(update, max_norm=clipping_norm)


def check_composes(aggregator: Any) -> None:
    """Raise a one-line error unless ``aggregator`` keeps central DP (its output is the average)."""
    if not aggregator.linear:
        from strategies import AGGREGATORS

        ok = sorted({AGGREGATORS.get(n).name for n in AGGREGATORS if AGGREGATORS.get(n).linear})
        raise FedPeftError(
            f"strategy {aggregator.name!r} is not post-processing of the noised average, so central DP "
            f"would not cover it; use one of: {', '.join(ok)}"
        )


class CentralAccountant:
    """User-level accounting of the noised rounds, with Flower's ``RdpAccountant``.

    Parameters
    ----------
    population : int
        N, the sites that can be sampled.
    sample_size : int
        m, the sites sampled per round.
    delta : float
        δ of the reported ε.
    budget : float
        ε not to exceed (``inf``: none).
    noise_multiplier : float
        σ of every release.
    """

    def __init__(self, *, population: int, sample_size: int, delta: float, budget: float, noise_multiplier: float):
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

        self.population, self.sample_size = int(population), int(sample_size)
        self.delta, self.budget, self.noise_multiplier = float(delta), float(budget), float(noise_multiplier)
        amplified = self.sample_size < self.population
        self.sampling = "without-replacement" if amplified else "none"
        config = PrivacyConfig(
            target_delta=self.delta,
            population_size=self.population,
            neighboring_relation=NeighboringRelation.REPLACE_ONE
            if amplified
            else NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.WITHOUT_REPLACEMENT if amplified else SamplingMethod.NO_AMPLIFICATION,
        )
        self._accountant = RdpAccountant(config)
        self.releases: list[float] = []  # effective σ of every composed release

    def effective_sigma(self, replies: int) -> float:
        """σ·m'/m: the noise multiplier of a release averaged over ``replies`` of the m sampled sites."""
        return self.noise_multiplier * min(replies, self.sample_size) / self.sample_size

    def _event(self, replies: int) -> Any:
        from flwr.serverapp import GaussianPrivacyEvent

        return GaussianPrivacyEvent(
            noise_multiplier=self.effective_sigma(replies),
            sample_size=self.sample_size,
            population_size=self.population,
        )

    def would_exceed(self, replies: int | None = None) -> bool:
        """Whether one more release (of all m replies by default) would pass the budget."""
        if math.isinf(self.budget):
            return False
        return self._accountant.would_exceed(self._event(replies or self.sample_size), max_epsilon=self.budget)

    def compose(self, replies: int) -> float:
        """Account one release averaged over ``replies`` sites; return ε spent so far."""
        self._accountant.compose(self._event(replies))
        self.releases.append(self.effective_sigma(replies))
        return self.epsilon()

    def epsilon(self) -> float:
        return 0.0 if not self.releases else float(self._accountant.get_epsilon(self.delta))


def central_epsilon(*, sigmas: Iterable[float], population: int, sample_size: int, delta: float) -> float:
    """ε of releases with noise multipliers ``sigmas``, by the same sampling model as the run."""
    sigmas = list(sigmas)
    accountant = CentralAccountant(
        population=population, sample_size=sample_size, delta=delta, budget=math.inf, noise_multiplier=1.0
    )
    for sigma in sigmas:
        accountant.noise_multiplier = sigma
        accountant.compose(sample_size)
    return accountant.epsilon()


def calibrate_central_sigma(*, budget: float, delta: float, population: int, sample_size: int, rounds: int) -> float:
    """The smallest σ (within 1 %) for which ``rounds`` full releases spend at most ``budget``."""

    def eps(sigma: float) -> float:
        return central_epsilon(sigmas=[sigma] * rounds, population=population, sample_size=sample_size, delta=delta)

    low, high = 0.0, 1.0
    while eps(high) > budget:
        low, high = high, high * 2
        if high > 1e6:
            raise FedPeftError(f"no noise level meets central epsilon {budget} at delta {delta} over {rounds} rounds")
    while high - low > 0.005 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if eps(mid) > budget else (low, mid)
    return high


def wrap_strategy(strategy: Any, *, noise_multiplier: float, clipping_norm: float, sample_size: int) -> Any:
    """``strategy`` inside Flower's client-side fixed-clipping DP wrapper.

    Tensors the aggregator freezes (FFA-LoRA's A) are neither trained nor sent; the wrapper's noise
    on them is dropped, so they stay at the shared initial value every site uses.
    """
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

    check_composes(strategy.aggregator)

    class _Wrapped(DifferentialPrivacyClientSideFixedClipping):
        def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> tuple[Any, Any]:
            from flwr.app import ArrayRecord

            arrays, metrics = super().aggregate_train(server_round, replies)
            frozen = self.strategy.aggregator.frozen
            if arrays is not None and frozen:
                previous = self.strategy.previous
                arrays = ArrayRecord(
                    {k: (previous_array(previous, k) if key_matches(k, frozen) else v) for k, v in arrays.items()}
                )
            return arrays, metrics

    return _Wrapped(strategy, noise_multiplier, clipping_norm, sample_size)


def previous_array(previous: dict[str, Any], key: str) -> Any:
    from flwr.app import Array

    return Array(previous[key])
