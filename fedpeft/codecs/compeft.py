"""``compeft[:density]``: ComPEFT's sign-and-scale update with its positions written near their entropy.

ComPEFT (Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates via
Sparsification and Quantization", arXiv 2311.13171; code: prateeky2806/ComPEFT, ``compress_and_update_parms``)
keeps the top-k entries of a PEFT residual by magnitude, replaces each by its sign, and multiplies all of
them by one scale α·std(residual), with α picked on a validation set. It counts the positions' cost with
Golomb-coded gaps (as STC does). fedpeft's codec, per tensor, with error feedback around it:

1. **Which entries.** The tensor is cut into blocks of 64 consecutive entries (the last block may be
   shorter) and each block keeps its round(density · 64) entries of largest magnitude (at least one;
   density 0.2 by default).
   ComPEFT takes one top-k over the whole flattened update; a fixed count per block costs little
   selection quality and gives every tensor a payload size known from its shape alone, which fedpeft's
   wire format requires (the receiver never trusts a length field).
2. **Where they are.** Each block's chosen set is written as its rank among all subsets of that size
   (the combinatorial number system), in exactly ceil(log2 C(64, k)) bits, packed back to back. That is
   within a bit per block of the entropy of the positions: at density 0.25, 0.77 bits per entry
   against a bitmask's 1 and uint16 indices' 4.
3. **What they are.** One sign bit each and one fp32 scale per tensor. The scale is not ComPEFT's
   α·std (α needs a validation search that a federation round cannot run): it is mean |kept values| of
   the *target* the codec encodes, update + error-feedback residual, which is the closed-form minimiser
   of ‖target − scale · signs‖² over the kept positions (tested against brute force), so the residual
   the site carries is as small as signs allow.
4. **Small tensors** (under 1,024 entries: a bias) and **the classification head** whatever its size
   (:meth:`fedpeft.codecs.chain.Codec.for_tensor`) are sent whole as ``int8``, as ``topk`` sends them
   whole; signs alone would move a head by one common step per entry.

Bits per entry at density d: ceil(log2 C(64, round(64 d))) / 64 for the positions plus d for the signs:
1.02 bits at d = 0.25 (31× against fp32's 32), 1.14 bits at d = 0.3 (28×), framing and small tensors aside.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from fedpeft.codecs.base import CodecError, Part, check_part
from fedpeft.codecs.int8 import Int8
from fedpeft.codecs.registry import CODECS, Piece, fraction
from fedpeft.codecs.ternary import SignScale

BLOCK = 64
DENSE_BELOW = 1024
DEFAULT_DENSITY = 0.2  # 27x with 0.18 points lost over 3 seeds on the default job (docs/compression.md)
BYTES = np.dtype("u1")


@lru_cache(maxsize=1)
def binomials() -> np.ndarray:
    """C(c, j) for 0 <= c <= 64, 0 <= j <= 64 as uint64 (all fit: C(64, 32) < 2^61)."""
    table = np.zeros((BLOCK + 1, BLOCK + 1), dtype=np.uint64)
    for c in range(BLOCK + 1):
        for j in range(c + 1):
            table[c, j] = math.comb(c, j)
    return table


def rank_bits(size: int, k: int) -> int:
    """Bits of a rank of ``k`` chosen among ``size``: ceil(log2 C(size, k)), 0 when there is one choice."""
    return (math.comb(size, k) - 1).bit_length()


class BlockTopK:
    """Top ``round(density · 64)`` entries by magnitude in every block of 64, positions as subset ranks."""

    def __init__(self, density: float, block: int = BLOCK, dense_below: int = DENSE_BELOW) -> None:
        if block > BLOCK:
            raise ValueError(f"block must be at most {BLOCK}")
        self.density, self.block, self.dense_below = density, block, dense_below
        self.dense_values = Int8()  # how a tensor sent whole is written (fedpeft.codecs.chain)

    def per_block(self, size: int) -> int:
        return min(size, max(1, round(self.density * size)))

    def _blocks(self, n: int) -> list[tuple[int, int, int]]:
        """(count, block size, k) for the full blocks and the last partial one."""
        full, last = divmod(n, self.block)
        out = [(full, self.block, self.per_block(self.block))] if full else []
        if last:
            out.append((1, last, self.per_block(last)))
        return out

    def kept(self, n: int) -> int:
        if n < self.dense_below:
            return n
        return sum(count * k for count, _, k in self._blocks(n))

    def _bits(self, n: int) -> int:
        return sum(count * rank_bits(size, k) for count, size, k in self._blocks(n))

    def layout(self, n: int) -> list[Part]:
        if self.kept(n) == n:
            return []
        return [Part("ranks", BYTES, math.ceil(self._bits(n) / 8))]

    def select(self, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        n = x.size
        if self.kept(n) == n:
            return [], np.arange(n)
        table = binomials()
        chunks, indices, at = [], [], 0
        for count, size, k in self._blocks(n):
            blocks = np.abs(x[at:at + count * size]).reshape(count, size)
            chosen = np.sort(np.argpartition(-blocks, k - 1, axis=1)[:, :k], axis=1)  # (count, k) increasing
            ranks = table[chosen, np.arange(1, k + 1)].sum(axis=1, dtype=np.uint64)  # Σ_j C(p_j, j + 1)
            chunks.append(_pack(ranks, rank_bits(size, k)))
            indices.append((chosen + at + size * np.arange(count)[:, None]).ravel())
            at += count * size
        return [np.packbits(np.concatenate(chunks), bitorder="little")], np.concatenate(indices)

    def positions(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        if self.kept(n) == n:
            return np.arange(n)
        (spec,) = self.layout(n)
        bits = np.unpackbits(check_part(parts[0], spec), bitorder="little")
        if bits[self._bits(n):].any():
            raise CodecError("position ranks carry bits past their end")
        table = binomials()
        out, at, bit = [], 0, 0
        for count, size, k in self._blocks(n):
            width = rank_bits(size, k)
            ranks = _unpack(bits[bit:bit + count * width], count, width)
            bit += count * width
            if np.any(ranks >= np.uint64(math.comb(size, k))):
                raise CodecError(f"a position rank exceeds C({size}, {k})")
            chosen = np.zeros((k, count), dtype=np.int64)
            columns = np.ascontiguousarray(table[:size].T)  # columns[j][c] = C(c, j), increasing in c from c = j
            for j in range(k, 0, -1):  # greedy unranking: the largest c with C(c, j) <= rank
                c = np.searchsorted(columns[j], ranks, side="right") - 1
                chosen[j - 1] = c
                ranks -= columns[j][c]
            chosen = chosen.T
            out.append((chosen + at + size * np.arange(count)[:, None]).ravel())
            at += count * size
        return np.concatenate(out)


def _pack(values: np.ndarray, width: int) -> np.ndarray:
    """Each uint64 of ``values`` as its low ``width`` bits, least significant first, as one bit array."""
    if width == 0:
        return np.zeros(0, dtype=np.uint8)
    shifts = np.arange(width, dtype=np.uint64)
    return ((values[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).ravel()


def _unpack(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    if width == 0:
        return np.zeros(count, dtype=np.uint64)
    shifts = np.arange(width, dtype=np.uint64)
    return (bits.reshape(count, width).astype(np.uint64) << shifts).sum(axis=1, dtype=np.uint64)


def factory(arg: str | None) -> Piece:
    return BlockTopK(fraction("compeft", arg, DEFAULT_DENSITY)), SignScale()


CODECS.register("compeft")(factory)
