"""Where the randomness that protects privacy comes from: the operating system's entropy pool.

DP noise, the batch sampling of DP-SGD, and central DP's secret draw of sites must be unpredictable to
anyone who knows the run's seed, so they are never drawn from it. :func:`secret_seed` is the one place
they take their seeds from.

``FEDPEFT_UNSAFE_NOISE_SEED``: when set (to an integer), those seeds are derived from it and from what
they are for instead, so that two runs draw the same noise. This exists for one purpose: checking that a
change of code leaves a DP run's every byte unchanged (``bench/behaviour_unchanged.py``). A run under it
has **no privacy** (anyone who knows the value can subtract the noise); every use logs a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets

logger = logging.getLogger(__name__)

UNSAFE_SEED_ENV = "FEDPEFT_UNSAFE_NOISE_SEED"


def secret_seed(bits: int, *, purpose: str) -> int:
    """A seed of ``bits`` bits for privacy-protecting randomness (``purpose`` names the draw, e.g.
    ``dpsgd/<site>/<run>/<round>``): from the OS entropy pool, or derived from
    ``FEDPEFT_UNSAFE_NOISE_SEED`` when that is set (see the module docstring)."""
    unsafe = os.environ.get(UNSAFE_SEED_ENV)
    if unsafe is None:
        return secrets.randbits(bits)
    logger.warning("%s is set: the noise of %s is reproducible, and the run has no privacy", UNSAFE_SEED_ENV, purpose)
    digest = hashlib.sha256(f"{unsafe}/{purpose}".encode()).digest()
    return int.from_bytes(digest, "big") >> (256 - bits)
