"""``ternary[:fraction]``: ComPEFT-style compression, sign × one scale per tensor after top-k.

ComPEFT (Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates via
Sparsification and Quantization", arXiv 2311.13171). Steps, per tensor:

1. keep the top-k entries by magnitude (k = ceil(fraction · n), default fraction 0.1; positions as in
   :mod:`fedpeft.codecs.topk`);
2. send only their signs (1 bit each) and one fp32 scale α;
3. decode α · sign at the kept positions, 0 elsewhere.

ComPEFT sets α = γ · std(x) with γ tuned per task; here α = mean |kept values|, the least-squares
optimal scale for the chosen signs, so there is nothing to tune. The error of one round is large by
design; error feedback (:mod:`fedpeft.codecs.feedback`) carries it into the next.
"""

from __future__ import annotations

import math

import numpy as np

from fedpeft.codecs.base import FLOAT, Part, check_part
from fedpeft.codecs.registry import CODECS, Piece, fraction
from fedpeft.codecs.topk import TopK

BITS = np.dtype("u1")
DEFAULT_FRACTION = 0.1


class SignScale:
    """``n`` values as their signs and one scale, the mean magnitude."""

    lossless = False

    def layout(self, n: int) -> list[Part]:
        return [Part("signs", BITS, math.ceil(n / 8)), Part("scale", FLOAT, 1)]

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        scale = np.float32(np.abs(x).mean(dtype=np.float64)) if x.size else np.float32(0)  # the mean in float64,
        # rounded once: the float32 nearest the least-squares scale
        return [np.packbits(x >= 0, bitorder="little"), np.array([scale], dtype=FLOAT)]

    def decode(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        signs, scale = (check_part(p, s) for p, s in zip(parts, self.layout(n), strict=True))
        positive = np.unpackbits(signs, bitorder="little")[:n].astype(bool)
        return np.where(positive, scale[0], -scale[0]).astype(np.float32)


def factory(arg: str | None) -> Piece:
    return TopK(fraction("ternary", arg, DEFAULT_FRACTION)), SignScale()


CODECS.register("ternary")(factory)
