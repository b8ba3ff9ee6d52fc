"""``none``: the update as raw little-endian float32, bit for bit."""

from __future__ import annotations

import numpy as np

from fedpeft.codecs.base import FLOAT, Part, check_part
from fedpeft.codecs.registry import CODECS, no_argument


class Float32:
    """Raw float32 values (also the value stage of a bare sparsifier: ``topk:0.1``)."""

    lossless = True

    def layout(self, n: int) -> list[Part]:
        return [Part("values", FLOAT, n)]

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        return [np.ascontiguousarray(x, dtype=FLOAT)]

    def decode(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        return check_part(parts[0], self.layout(n)[0]).astype(np.float32)


CODECS.register("none")(no_argument("none", Float32))
