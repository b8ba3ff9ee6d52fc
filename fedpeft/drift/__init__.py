"""Drift correction at the sites: what keeps local training of differing sites from pulling the federation
apart. One method a file, parsed from ``--drift``:

- ``auto`` (the default) — ``scaffold:head`` for a classifier trained without differential privacy,
  ``none`` otherwise (:func:`resolve_drift`, and the privacy mode under DP): what won the natural splits of
  ``bench/heterogeneity.py`` (docs/strategies.md, "Which recipe for which federation");
- ``none`` — plain local training;
- ``fedprox:<mu>`` — FedProx's proximal term (:mod:`fedpeft.drift.fedprox`);
- ``scaffold`` — SCAFFOLD's control variates for every trained tensor; ``scaffold:head`` for the
  classification head alone, where label skew pulls sites apart most, at a few kB of traffic
  (:mod:`fedpeft.drift.scaffold`).

Both act on the gradient of each local step (:class:`fedpeft.training.GradientTerm`), so the model and
the loss stay what they are. Neither runs under local DP: a term added to the gradient bypasses
DP-SGD's per-example clipping, and SCAFFOLD's variate would be a second upload of the site's data the
noise does not cover; the configuration checks refuse both in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fedpeft.adapters.state import HEAD_MODULES
from fedpeft.errors import FedPeftError

METHODS = ("none", "fedprox", "scaffold")


@dataclass(frozen=True)
class DriftSpec:
    """A parsed ``--drift``: ``method``, FedProx's μ, and the tensors SCAFFOLD's variates cover
    (``scope``: key components, empty for every trained tensor)."""

    method: str = "none"
    mu: float = 0.0
    scope: tuple[str, ...] = ()


def resolve_drift(cfg: Any) -> DriftSpec:
    """The drift correction a run without differential privacy uses: its ``drift`` setting, with ``auto``
    resolved — SCAFFOLD on the classification head for ``seq-cls``, nothing for a causal LM (no head).
    Under DP the run's privacy mode decides what ``auto`` means (:meth:`privacy.modes.PrivacyMode.drift`:
    none, since the term would bypass clipping and the variate would be an unprotected upload). Under
    secure aggregation ``auto`` is none too: a site's change of its variate would be a second upload the
    masked sum does not cover."""
    if cfg.drift.strip() == "auto":
        return parse_drift("scaffold:head" if cfg.task == "seq-cls" and not cfg.secure_aggregation else "none")
    return parse_drift(cfg.drift)


def parse_drift(spec: str) -> DriftSpec:
    """``none`` | ``fedprox:<mu>`` (μ >= 0) | ``scaffold`` | ``scaffold:head`` (``auto``: see
    :func:`resolve_drift`)."""
    name, sep, arg = spec.strip().partition(":")
    if name in ("none", "scaffold") and not sep:
        return DriftSpec(name)
    if name == "scaffold" and arg == "head":
        return DriftSpec("scaffold", scope=HEAD_MODULES)
    if name == "fedprox" and arg:
        try:
            mu = float(arg)
        except ValueError:
            mu = math.nan
        if math.isfinite(mu) and mu >= 0:
            return DriftSpec("fedprox", mu)
    raise FedPeftError(f"drift must be auto, none, fedprox:<mu> (mu >= 0, e.g. fedprox:0.01), scaffold or "
                       f"scaffold:head, got {spec!r}")
