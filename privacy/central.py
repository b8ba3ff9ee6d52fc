"""Central (user-level) DP: each site's whole update clipped, the sum noised, divided by the fixed cohort.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, arXiv 1710.06963) with client-side clipping
(Andrew et al., NeurIPS 2021, arXiv 1905.03871) and its *fixed-denominator* estimator:

1. **clip** at the site: Flower's ``fixedclipping_mod`` clips the update (trained − broadcast) of
   all sent tensors to L2 norm C. :func:`clipping_mod` applies it only when the server asked for it
   (the train config carries ``KEY_CLIPPING_NORM``, :func:`train_config`), so the same ClientApp
   serves runs without central DP. The site's codec encodes the clipped update (with error
   feedback), so what arrives may exceed C slightly; the server clips every decoded update to C
   again (:func:`clip_update`), and :func:`central_release` clips once more, so no contribution
   exceeds C whatever the codec did;
2. **noise** the *sum* of the clipped updates of the sites whose replies were accepted with
   N(0, (σC)²) per coordinate (:func:`central_release`);
3. **divide** by m, the number of sites the server samples per round, fixed before the run from
   ``--clients`` and ``--fraction``, never by the number that answered. A sampled site that failed,
   was rejected or stayed silent contributes 0; the noise scale σC and the denominator m are the same
   whoever answered, so a round aggregates the replies it got;
4. **account** with Flower's ``RdpAccountant`` (:class:`CentralAccountant`): one sampled Gaussian
   release per round that releases, at the same noise multiplier whoever answered.

**Sensitivity and neighbours.** Under add/remove-one-site, one site changes the sum by its own
contribution, 0 or a clipped update: at most C, so the noise multiplier of the release is σ. Under
replace-one-site, the sum changes by the difference of two contributions: at most 2C, so the
multiplier is σ/2. The accountant uses add/remove when every site is sampled (m = N, no
amplification) and replace-one when m < N (sampling without replacement: Wang, Balle &
Kasiviswanathan, AISTATS 2019, the only relation dp-accounting supports for it), and composes the
multiplier of that relation (:attr:`CentralAccountant.accounted_sigma`).

**Which aggregators compose.** The release is the noised mean of clipped updates; anything computed
from it alone is post-processing and keeps the guarantee. ``fedit``, ``ffa-lora``, ``ssf-avg`` and ``fedins``
return exactly that mean (:attr:`strategies.aggregator.Aggregator.linear`), and under central DP the
strategy computes it here instead of calling the aggregator (whose per-site metrics are not covered).
``lora-fair``, ``lora-fair-ab`` and ``exact-svd`` read each client's factors through non-linear maps
(the products B_k A_k, QR/SVD of the stacked factors); their output is not a function of the noised
mean, so fedpeft refuses them with central DP.

**Sampling, stated honestly.** m of the N sites are drawn per round *without replacement*; the
accountant amplifies by that sampling only when m < N, and then the draw comes from the OS entropy
pool, not the run seed, because amplification holds only while the sampled set is secret.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)

from fedpeft.deploy.flower_compat import KEY_CLIPPING_NORM  # the train config's clipping-norm key (Flower-internal)
from fedpeft.errors import FedPeftError
from strategies import AGGREGATORS
from strategies.norm_bound import clip_to_norm


def clipping_mod(msg: Any, ctxt: Any, call_next: Any) -> Any:
    """Flower's ``fixedclipping_mod`` when the server sent a clipping norm, else a pass-through."""
    configs = list(msg.content.config_records.values())
    if len(configs) == 1 and KEY_CLIPPING_NORM in configs[0]:
        return fixedclipping_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def clip_update(update: dict[str, np.ndarray], *, clipping_norm: float) -> tuple[dict[str, np.ndarray], bool]:
    """``update`` scaled to L2 norm at most ``clipping_norm`` (over all tensors), and whether it was.

    The server applies it to every decoded update: a codec and its error feedback may send a little
    more than the clipped norm, and the noise only covers C (:func:`strategies.norm_bound.clip_to_norm`).
    """
    return clip_to_norm(update, max_norm=clipping_norm)


def check_composes(aggregator: Any) -> None:
    """Raise a one-line error unless ``aggregator`` keeps central DP (its output is the average)."""
    if not aggregator.linear:
        ok = sorted({AGGREGATORS.get(n).name for n in AGGREGATORS
                     if AGGREGATORS.get(n).linear and AGGREGATORS.get(n).adapter == aggregator.adapter})
        raise FedPeftError(
            f"strategy {aggregator.name!r} is not post-processing of the noised average, so central DP "
            f"would not cover it; use one of: {', '.join(ok)}"
        )


def train_config(*, clipping_norm: float) -> dict[str, float]:
    """The train-config entry that makes every sampled site clip its update to C (:func:`clipping_mod`)."""
    return {KEY_CLIPPING_NORM: float(clipping_norm)}


def central_release(
    updates: Sequence[Mapping[str, np.ndarray]],
    *,
    clipping_norm: float,
    noise_multiplier: float,
    sample_size: int,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The noised mean update of a round: (Σ_k clip_C(Δ_k) + N(0, (σC)² I)) / m.

    Parameters
    ----------
    updates : sequence of mappings
        The decoded updates of the sampled sites whose replies were accepted, in site order (all with
        the same keys and shapes); may be fewer than ``sample_size``, the absent sites count 0.
    clipping_norm : float
        C: every update is clipped to L2 norm C over all its tensors (a no-op for one already clipped).
    noise_multiplier : float
        σ: the noise on the sum has standard deviation σC per coordinate (0: no noise, for tests).
    sample_size : int
        m, the number of sites sampled per round, fixed for the run: the denominator, whoever answered.
    rng : numpy.random.Generator
        Source of the noise (the coordinator's comes from OS entropy; tests pass a seeded one).

    Returns
    -------
    tuple
        The release (float32 arrays, the updates' keys in their order) and its metrics:
        ``contributions`` (m'), ``noise_std`` (σC/m, the noise on the mean) and ``clipped`` (how many
        updates this step had to scale down).

    Raises
    ------
    ValueError
        No update, more updates than ``sample_size``, keys or shapes that differ, a clipping norm
        that is not positive or a negative noise multiplier.
    """
    if not updates:
        raise ValueError("a central release needs at least one update")
    if not 1 <= len(updates) <= sample_size:
        raise ValueError(f"{len(updates)} updates for a sampled cohort of {sample_size}")
    if not clipping_norm > 0 or not noise_multiplier >= 0:
        raise ValueError(f"need clipping_norm > 0 and noise_multiplier >= 0, got {clipping_norm}, {noise_multiplier}")
    keys = list(updates[0])
    total = {k: np.zeros(np.shape(updates[0][k]), dtype=np.float64) for k in keys}
    clipped = 0
    for i, update in enumerate(updates):
        if list(update) != keys or any(np.shape(update[k]) != total[k].shape for k in keys):
            raise ValueError(f"update {i} has other tensors than update 0")
        bounded, changed = clip_update(dict(update), clipping_norm=clipping_norm)
        clipped += int(changed)
        for k in keys:
            total[k] += np.asarray(bounded[k], dtype=np.float64)
    release, metrics = noised_mean_of_sum(total, len(updates), clipping_norm=clipping_norm,
                                          noise_multiplier=noise_multiplier, sample_size=sample_size, rng=rng)
    return release, {**metrics, "clipped": clipped}


def noised_mean_of_sum(
    total: Mapping[str, np.ndarray],
    contributions: int,
    *,
    clipping_norm: float,
    noise_multiplier: float,
    sample_size: int,
    rng: np.random.Generator,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(``total`` + N(0, (σC)² I)) / m: the release of a sum of ``contributions`` updates, each of L2 norm
    at most C, made by whoever summed them (:func:`central_release`; under secure aggregation, the
    secure sum of the sites' own clipped updates, :mod:`server.secure`)."""
    if not 1 <= contributions <= sample_size:
        raise ValueError(f"{contributions} updates for a sampled cohort of {sample_size}")
    std = noise_multiplier * clipping_norm
    release = {k: ((np.asarray(v, np.float64) + rng.normal(0.0, std, np.shape(v))) / sample_size).astype(np.float32)
               for k, v in total.items()}
    return release, {"contributions": contributions, "noise_std": std / sample_size}


class CentralAccountant:
    """User-level accounting of the noised rounds, with Flower's ``RdpAccountant``.

    Every release is composed at the same multiplier (:attr:`accounted_sigma`), however many of the m
    sampled sites answered: the noise std σC and the denominator m do not depend on it.

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
        σ: the noise on the sum of clipped updates has std σC.
    """

    def __init__(self, *, population: int, sample_size: int, delta: float, budget: float, noise_multiplier: float):
        self.population, self.sample_size = int(population), int(sample_size)
        self.delta, self.budget, self.noise_multiplier = float(delta), float(budget), float(noise_multiplier)
        amplified = self.sample_size < self.population
        self.sampling = "without-replacement" if amplified else "none"
        self.neighbours = "replace-one" if amplified else "add-or-remove-one"
        config = PrivacyConfig(
            target_delta=self.delta,
            population_size=self.population,
            neighboring_relation=NeighboringRelation.REPLACE_ONE
            if amplified
            else NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.WITHOUT_REPLACEMENT if amplified else SamplingMethod.NO_AMPLIFICATION,
        )
        self._accountant = RdpAccountant(config)
        self.releases: list[float] = []  # the accounted multiplier of every composed release

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of the sum of clipped updates, in units of C, under the accountant's neighbours."""
        return 2.0 if self.neighbours == "replace-one" else 1.0

    @property
    def accounted_sigma(self) -> float:
        """σ / sensitivity: the noise std σC over the sum's sensitivity (σ/2 under replace-one)."""
        return self.noise_multiplier / self.sensitivity

    def _event(self) -> Any:
        return GaussianPrivacyEvent(
            noise_multiplier=self.accounted_sigma, sample_size=self.sample_size, population_size=self.population
        )

    def would_exceed(self) -> bool:
        """Whether one more release would pass the budget."""
        if math.isinf(self.budget):
            return False
        sigmas = [accounted * self.sensitivity for accounted in self.releases] + [self.noise_multiplier]
        after = central_epsilon(sigmas=sigmas, population=self.population, sample_size=self.sample_size,
                                delta=self.delta)  # equal releases composed at once: Flower's replays one by one
        return after > self.budget

    def compose(self, count: int = 1) -> float:
        """Account ``count`` releases (whoever of the m sampled sites answered); return ε spent so far."""
        self._accountant.compose(self._event(), count)
        self.releases += [self.accounted_sigma] * count
        return self.epsilon()

    def epsilon(self) -> float:
        return 0.0 if not self.releases else float(self._accountant.get_epsilon(self.delta))


def central_epsilon(*, sigmas: Iterable[float], population: int, sample_size: int, delta: float) -> float:
    """ε of releases with noise multipliers ``sigmas`` (std σC on the sum), by the same model as the run."""
    accountant = CentralAccountant(
        population=population, sample_size=sample_size, delta=delta, budget=math.inf, noise_multiplier=1.0
    )
    for sigma, count in Counter(float(s) for s in sigmas).items():  # composition commutes: once per σ
        accountant.noise_multiplier = sigma
        accountant.compose(count)
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
