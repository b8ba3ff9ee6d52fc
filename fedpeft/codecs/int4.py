"""``int4[:block]``: symmetric absmax quantisation to 4-bit integers, packed two per byte.

Steps: per row of ``block`` entries (default 256) s = max|x| / 7; q = round(x / s) in [-7, 7]; q is
stored as a 4-bit two's-complement nibble, entry 2i in the low nibble of byte i and entry 2i+1 in its
high nibble (an odd count leaves the last high nibble 0); decode q · s. Error per entry ≤ s / 2.
"""

from __future__ import annotations

import math

import numpy as np

from fedpeft.codecs.base import FLOAT, CodecError, Part, absmax_dequantize, absmax_quantize, check_part, num_blocks
from fedpeft.codecs.registry import CODECS, block_argument

BYTE = np.dtype("u1")
LEVELS = 7


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Integers in [-8, 7] → bytes, two per byte (low nibble first)."""
    q = np.asarray(q, dtype=np.int8)
    if q.size and (q.min() < -8 or q.max() > 7):
        raise CodecError("int4 values must lie in [-8, 7]")
    nibbles = (q.astype(np.uint8) & 0x0F).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(BYTE)


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: the first ``n`` signed nibbles as int8."""
    packed = np.asarray(packed, dtype=np.uint8)
    nibbles = np.empty(packed.size * 2, dtype=np.uint8)
    nibbles[0::2], nibbles[1::2] = packed & 0x0F, packed >> 4
    signed = nibbles.astype(np.int8)
    signed[signed > 7] -= 16
    return signed[:n]


class Int4:
    lossless = False

    def __init__(self, block: int = 256) -> None:
        self.block = block

    def layout(self, n: int) -> list[Part]:
        return [Part("q", BYTE, math.ceil(n / 2)), Part("scales", FLOAT, num_blocks(n, self.block))]

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        q, scales = absmax_quantize(x, block=self.block, levels=LEVELS)
        return [pack_nibbles(q), scales]

    def decode(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        packed, scales = (check_part(p, s) for p, s in zip(parts, self.layout(n), strict=True))
        return absmax_dequantize(unpack_nibbles(packed, n), scales, block=self.block)


CODECS.register("int4")(block_argument("int4", Int4))
