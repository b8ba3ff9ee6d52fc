"""``fp16``: values cast to IEEE half precision (2 bytes each; relative error ≤ 2⁻¹¹).

Values beyond fp16's range (|x| > 65504) are refused rather than turned into infinity.
"""

from __future__ import annotations

import numpy as np

from fedpeft.codecs.base import CodecError, Part, check_part
from fedpeft.codecs.registry import CODECS, no_argument

HALF = np.dtype("<f2")
HALF_MAX = float(np.finfo(np.float16).max)


class Float16:
    lossless = False

    def layout(self, n: int) -> list[Part]:
        return [Part("values", HALF, n)]

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        if x.size and float(np.abs(x).max()) > HALF_MAX:
            raise CodecError(f"a value of {float(np.abs(x).max()):.3g} is outside fp16's range; use int8 or none")
        return [x.astype(HALF)]

    def decode(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        return check_part(parts[0], self.layout(n)[0]).astype(np.float32)


CODECS.register("fp16")(no_argument("fp16", Float16))
