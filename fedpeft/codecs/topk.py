"""``topk:<fraction>``: send only the largest-magnitude entries of each tensor (magnitude top-k).

Steps, per tensor of n entries: k = ceil(fraction · n) (at least 1); keep the k entries of largest
|x|; send their positions and their values (raw fp32, or through the value codec composed after it:
``topk:0.1+int8``). Positions go as a bitmask (n/8 bytes) or as sorted uint16/uint32 indices,
whichever is smaller for this (n, k) — both sides compute the choice from (n, k) alone; none when
k = n.

Top-k alone drops most of every update; the client keeps what it did not send and adds it to its next
update (error feedback, :mod:`fedpeft.codecs.feedback`; Stich, Cordonnier, Jaggi, "Sparsified SGD with
memory", NeurIPS 2018; Karimireddy et al., "Error feedback fixes SignSGD", ICML 2019).
"""

from __future__ import annotations

import math

import numpy as np

from fedpeft.codecs.base import CodecError, Part, check_part
from fedpeft.codecs.registry import CODECS, Piece, fraction

MASK = np.dtype("u1")


def index_dtype(n: int) -> np.dtype:
    return np.dtype("<u2") if n <= 1 << 16 else np.dtype("<u4")


def positions_layout(n: int, k: int) -> Part:
    """Bitmask or sorted indices: the smaller for ``k`` of ``n`` positions."""
    mask = Part("mask", MASK, math.ceil(n / 8))
    index = Part("index", index_dtype(n), k)
    return mask if mask.nbytes <= index.nbytes else index


DENSE_BELOW = 1024


class TopK:
    """Keep ``ceil(fraction · n)`` entries of largest magnitude; keep all of a tensor smaller than
    ``dense_below`` entries (a bias; a classification head of any size goes whole by its name,
    :meth:`fedpeft.codecs.chain.Codec.for_tensor`)."""

    def __init__(self, fraction: float, dense_below: int = DENSE_BELOW) -> None:
        self.fraction = fraction
        self.dense_below = dense_below

    def kept(self, n: int) -> int:
        if n < self.dense_below:
            return n
        return min(n, max(1, math.ceil(self.fraction * n - 1e-9)))

    def layout(self, n: int) -> list[Part]:
        k = self.kept(n)
        return [] if k == n else [positions_layout(n, k)]  # keeping all: no positions to send

    def select(self, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        n, k = x.size, self.kept(x.size)
        if k == n:
            return [], np.arange(n)
        idx = np.sort(np.argpartition(-np.abs(x), k - 1)[:k])
        spec = positions_layout(n, k)
        if spec.name == "mask":
            chosen = np.zeros(n, dtype=bool)
            chosen[idx] = True
            return [np.packbits(chosen, bitorder="little")], idx
        return [idx.astype(spec.dtype)], idx

    def positions(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        if self.kept(n) == n:
            return np.arange(n)
        spec = self.layout(n)[0]
        part = check_part(parts[0], spec)
        k = self.kept(n)
        if spec.name == "mask":
            bits = np.unpackbits(part, bitorder="little")
            if bits[n:].any() or int(bits[:n].sum()) != k:
                raise CodecError(f"position mask marks {int(bits.sum())} entries, expected {k} of {n}")
            return np.flatnonzero(bits[:n])
        idx = part.astype(np.int64)
        if k and (idx[-1] >= n or (k > 1 and np.any(np.diff(idx) <= 0))):
            raise CodecError(f"positions are not {k} increasing indices below {n}")
        return idx


def factory(arg: str | None) -> Piece:
    return TopK(fraction("topk", arg, None)), None


CODECS.register("topk")(factory)
