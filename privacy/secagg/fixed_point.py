"""Real vectors as integers in the ring ℤ/2^k and back.

A value is clipped to ``[-clip, clip]`` and rounded to one of the ``2^(bits-1) - 1`` steps each side of
zero (step ``clip / (2^(bits-1) - 1)``), times the site's integer weight. The ring holds the weighted
sum of the whole cohort without wrapping when ``2^k > 2 · total_weight · (2^(bits-1) - 1)``
(:func:`ring_bits`); the sum is read back as a signed integer. The error a value carries is at most half a
step (plus what clipping took off), which :func:`step` reports.
"""

from __future__ import annotations

import math

import numpy as np

from privacy.secagg.masks import ring_mask


def levels(bits: int) -> int:
    if not 2 <= bits <= 32:
        raise ValueError(f"quantisation bits must lie in 2..32, got {bits}")
    return (1 << (bits - 1)) - 1


def step(clip: float, bits: int) -> float:
    """The quantisation step: a value's rounding error is at most half of it."""
    return clip / levels(bits)


def ring_bits(bits: int, total_weight: int) -> int:
    """The fewest ring bits that hold a sum of weights up to ``total_weight`` of ``bits``-bit values."""
    need = math.ceil(math.log2(2 * total_weight * levels(bits) + 1))
    if need > 64:
        raise ValueError(f"a weighted sum of {bits}-bit values up to weight {total_weight} needs a {need}-bit ring; "
                         "at most 64 (fewer bits, or a smaller weight cap)")
    return need


def encode(values: np.ndarray, *, clip: float, bits: int, weight: int, ring: int) -> np.ndarray:
    """``weight`` × the fixed-point form of ``values`` (float), as uint64 elements of ℤ/2^ring."""
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0, got {clip}")
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    q = np.rint(np.clip(np.asarray(values, np.float64), -clip, clip) / step(clip, bits)).astype(np.int64)
    return (q * np.int64(weight)).astype(np.uint64) & ring_mask(ring)  # two's complement, reduced


def decode(total: np.ndarray, *, clip: float, bits: int, ring: int) -> np.ndarray:
    """The weighted sum (float64) from its ring form: elements at or above 2^(ring-1) are negative."""
    total = np.asarray(total, np.uint64) & ring_mask(ring)
    signed = total.astype(np.int64) if ring == 64 else \
        np.where(total >= np.uint64(1 << (ring - 1)), total.astype(np.int64) - (1 << ring), total.astype(np.int64))
    return signed.astype(np.float64) * step(clip, bits)


def packed_width(ring: int) -> int:
    """Bytes per ring element on the wire."""
    ring_mask(ring)  # checks 1..64
    return (ring + 7) // 8


def pack(values: np.ndarray, ring: int) -> np.ndarray:
    """Elements of ℤ/2^ring as :func:`packed_width` little-endian bytes each (a masked element is uniform
    over the ring, so no encoding could send it in fewer bits)."""
    width = packed_width(ring)
    rows = (np.asarray(values, np.uint64) & ring_mask(ring)).astype("<u8").view(np.uint8).reshape(-1, 8)
    return np.ascontiguousarray(rows[:, :width]).reshape(-1)


def unpack(data: np.ndarray, ring: int) -> np.ndarray:
    """:func:`pack`'s bytes back to uint64 elements of ℤ/2^ring.

    Raises
    ------
    ValueError
        Not a uint8 vector of whole elements.
    """
    width = packed_width(ring)
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 1 or data.size % width:
        raise ValueError(f"not a uint8 vector of {width}-byte ring elements")
    full = np.zeros((data.size // width, 8), np.uint8)
    full[:, :width] = data.reshape(-1, width)
    return full.view("<u8").reshape(-1).astype(np.uint64)


def add(a: np.ndarray, b: np.ndarray, *, ring: int) -> np.ndarray:
    return (np.asarray(a, np.uint64) + np.asarray(b, np.uint64)) & ring_mask(ring)


def subtract(a: np.ndarray, b: np.ndarray, *, ring: int) -> np.ndarray:
    return (np.asarray(a, np.uint64) - np.asarray(b, np.uint64)) & ring_mask(ring)
