"""What every codec is made of: a value stage (how numbers are written) and an optional sparsifier
(which numbers are sent), both pure functions over flat float32 arrays.

A tensor is flattened (C order) before coding. An encoding is a list of *parts*, each a 1-D numpy
array whose dtype and length follow from the codec and the tensor's size alone (:meth:`layout`), so
the receiver knows how to cut the bytes without trusting a length field. All wire dtypes are
little-endian, so the bytes mean the same on every machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedpeft.errors import FedPeftError

FLOAT = np.dtype("<f4")  # what every codec decodes to


class CodecError(FedPeftError, ValueError):
    """A codec spec that does not parse, or a payload that does not decode."""


@dataclass(frozen=True)
class Part:
    """One array of an encoded tensor: its name, dtype and length."""

    name: str
    dtype: np.dtype
    count: int

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


class ValueStage(Protocol):
    """Writes ``n`` numbers as parts and reads them back."""

    lossless: bool

    def layout(self, n: int) -> list[Part]: ...

    def encode(self, x: np.ndarray) -> list[np.ndarray]: ...

    def decode(self, parts: list[np.ndarray], n: int) -> np.ndarray: ...


class Sparsifier(Protocol):
    """Chooses which of ``n`` numbers are sent; the chosen values go on to a value stage."""

    def kept(self, n: int) -> int: ...

    def layout(self, n: int) -> list[Part]: ...

    def select(self, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """``(position parts, sorted indices of the kept entries)``."""
        ...

    def positions(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        """The sorted indices the position parts stand for (validated)."""
        ...


def check_part(part: np.ndarray, spec: Part) -> np.ndarray:
    """``part`` as a 1-D array of ``spec``'s dtype and length, or a :class:`CodecError`."""
    part = np.asarray(part)
    if part.dtype != spec.dtype:
        raise CodecError(f"part {spec.name!r} has dtype {part.dtype}, expected {spec.dtype}")
    if part.ndim != 1 or part.size != spec.count:
        raise CodecError(f"part {spec.name!r} holds {part.size} values, expected {spec.count}")
    return part


def check_finite(x: np.ndarray, what: str = "update") -> None:
    """Refuse to code NaN or infinity: no codec can say what it means to the average."""
    if not np.all(np.isfinite(x)):
        raise CodecError(f"{what} holds non-finite values")


# --- block-wise absmax quantisation, shared by int8 and int4 ----------------------------------------


def num_blocks(n: int, block: int) -> int:
    return math.ceil(n / block)


def absmax_quantize(x: np.ndarray, *, block: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Round ``x`` to integers in [-levels, levels] with one fp32 scale (absmax / levels) per block
    of ``block`` consecutive entries; returns ``(q as int8, scales)``. An all-zero block has scale 0.

    Each entry is off by at most half its block's scale: |x - q·s| ≤ absmax / (2·levels).
    """
    n = x.size
    padded = np.zeros(num_blocks(n, block) * block, dtype=np.float32)
    padded[:n] = x
    rows = padded.reshape(-1, block)
    scales = (np.abs(rows).max(axis=1) / np.float32(levels)).astype(FLOAT)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    q = np.clip(np.rint(rows / safe[:, None]), -levels, levels).astype(np.int8)
    return q.reshape(-1)[:n], scales


def absmax_dequantize(q: np.ndarray, scales: np.ndarray, *, block: int) -> np.ndarray:
    """Inverse of :func:`absmax_quantize`: ``q · scale`` of its block, as float32."""
    n = q.size
    per_entry = np.repeat(scales.astype(np.float32), block)[:n]
    return (q.astype(np.float32) * per_entry).astype(np.float32)
