"""``int8[:block]``: symmetric absmax quantisation to 8-bit integers, one fp32 scale per row.

A row is ``block`` consecutive entries of the flattened tensor (default 256), a block-wise scale as in
bitsandbytes: LoRA's B factor (out × r) has natural rows of only r entries, where one fp32 scale per
row would cost half as much as the row itself. Steps: per row s = max|x| / 127; q = round(x / s) in
[-127, 127]; decode q · s. Error per entry ≤ s / 2.
"""

from __future__ import annotations

import numpy as np

from fedpeft.codecs.base import FLOAT, Part, absmax_dequantize, absmax_quantize, check_part, num_blocks
from fedpeft.codecs.registry import CODECS, block_argument

INT8 = np.dtype("i1")
LEVELS = 127


class Int8:
    lossless = False

    def __init__(self, block: int = 256) -> None:
        self.block = block

    def layout(self, n: int) -> list[Part]:
        return [Part("q", INT8, n), Part("scales", FLOAT, num_blocks(n, self.block))]

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        q, scales = absmax_quantize(x, block=self.block, levels=LEVELS)
        return [q, scales]

    def decode(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        q, scales = (check_part(p, s) for p, s in zip(parts, self.layout(n), strict=True))
        return absmax_dequantize(q, scales, block=self.block)


CODECS.register("int8")(block_argument("int8", Int8))
