"""Label-skew correction in a site's local loss, from the site's own label counts, which never leave it.

When each site holds a few of the classes, plain cross-entropy teaches every site's head that the
classes it never sees are wrong, and the average of such heads is biased towards whatever classes the
largest sites hold. Both corrections add a per-class offset to the logits *in the training loss only*
(the model, the update and evaluation are untouched):

- ``balanced`` — balanced softmax (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual
  Recognition", NeurIPS 2020, arXiv 2007.10740): z_c + τ·log π_c with π_c = n_c / n, the site's label
  shares (τ = 1 in the paper). A class the site does not hold has π_c = 0, so it leaves the softmax:
  the site neither pushes it down nor moves its head row.
- ``fedlc`` — FedLC logit calibration (Zhang et al., "Federated Learning with Label Distribution Skew
  via Logits Calibration", ICML 2022, arXiv 2209.00189): z_c − τ·n_c^(−1/4), the paper's pairwise
  margin with its calibration strength τ (default 1). A class with n_c = 0 gets an infinite margin: it
  leaves the softmax too, as the paper's code makes it (n_c floored at 1e-8).

Steps at a site: count its labels once (:func:`label_counts`), turn them into offsets
(:func:`logit_offsets`), add them to every training step's logits. Only the update travels; neither
the counts nor the offsets are sent, logged or written. Under local DP the counts are private data that
DP-SGD does not cover, so the configuration checks refuse the combination.
"""

from __future__ import annotations

import math

import numpy as np

from fedpeft.errors import FedPeftError

METHODS = ("none", "balanced", "fedlc")


def parse_label_correction(spec: str) -> tuple[str, float]:
    """``none`` | ``balanced[:tau]`` | ``fedlc[:tau]`` → ``(method, tau)``; τ defaults to 1."""
    name, _, arg = spec.strip().partition(":")
    if name not in METHODS or (name == "none" and arg):
        raise FedPeftError(f"label_correction must be none, balanced[:tau] or fedlc[:tau], got {spec!r}")
    if not arg:
        return name, 1.0
    try:
        tau = float(arg)
    except ValueError:
        tau = math.nan
    if not (math.isfinite(tau) and tau > 0):
        raise FedPeftError(f"label_correction {spec!r}: tau must be a finite number > 0")
    return name, tau


def label_counts(labels: np.ndarray, num_labels: int) -> np.ndarray:
    """How many examples of each class ``labels`` holds (int64, length ``num_labels``)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(f"labels must lie in 0..{num_labels - 1}")
    return np.bincount(labels, minlength=num_labels).astype(np.int64)


def logit_offsets(counts: np.ndarray, *, method: str, tau: float = 1.0) -> np.ndarray | None:
    """The per-class offsets the training loss adds to the logits (float32; −inf for an absent class),
    or None for ``none`` (and for a site that holds no example)."""
    counts = np.asarray(counts, dtype=np.float64)
    if method == "none" or counts.sum() <= 0:
        return None
    present = counts > 0
    if method == "balanced":
        with np.errstate(divide="ignore"):
            offsets = tau * np.log(counts / counts.sum())
    elif method == "fedlc":
        offsets = np.where(present, -tau * np.power(np.where(present, counts, 1.0), -0.25), -np.inf)
    else:
        raise ValueError(f"unknown label correction {method!r}")
    return np.where(present, offsets, -np.inf).astype(np.float32)
