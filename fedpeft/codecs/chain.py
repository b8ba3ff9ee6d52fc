"""A codec: an optional sparsifier followed by one value stage, parsed from a spec like ``topk:0.1+int8``.

Rules of composition: a sparsifier (``topk``, ``ternary``) comes first; at most one stage says how
values are written (``none``, ``fp16``, ``int8``, ``int4``; ``ternary`` writes its own signs, so
nothing follows it). ``topk:0.1`` alone writes its kept values as raw fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from fedpeft.adapters.state import is_head_key
from fedpeft.codecs.base import CodecError, Part, check_finite
from fedpeft.codecs.none import Float32
from fedpeft.codecs.registry import CODECS


@dataclass(frozen=True)
class Codec:
    """Encode and decode one tensor at a time; the same object serves both ends of the wire."""

    spec: str
    sparsifier: Any  # Sparsifier | None
    values: Any  # ValueStage

    @property
    def lossless(self) -> bool:
        """Whether decode(encode(x)) == x bit for bit (then no error feedback is needed)."""
        return self.sparsifier is None and self.values.lossless

    def for_tensor(self, name: str) -> Codec:
        """The codec for the tensor called ``name``: a classification head's tensors go whole, written as
        the sparsifier says a whole tensor is (``dense_values``) or by the value stage. A head is small,
        fresh and dense, and a probe round trains nothing else; sparsified, a 3-class head (1,155 entries)
        arrived after the probe round 4 points short under ``compeft`` and starved under ``shared``."""
        if self.sparsifier is None or not is_head_key(name):
            return self
        return _whole(self)

    def value_stage(self, n: int) -> Any:
        """The value stage for a tensor of ``n`` entries: a sparsifier that sends a tensor whole may say how
        (``compeft``: small tensors as int8, not as signs)."""
        dense = getattr(self.sparsifier, "dense_values", None)
        return dense if dense is not None and self.sparsifier.kept(n) == n else self.values

    def layout(self, shape: tuple[int, ...]) -> list[Part]:
        """The parts of a tensor of ``shape``, in order; known to both sides from the shape alone."""
        n = int(np.prod(shape, dtype=np.int64))
        if self.sparsifier is None:
            return self.values.layout(n)
        return self.sparsifier.layout(n) + self.value_stage(n).layout(self.sparsifier.kept(n))

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        """The parts of ``x`` (any shape; finite values only)."""
        flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
        check_finite(flat)
        if self.sparsifier is None:
            return self.values.encode(flat)
        positions, idx = self.sparsifier.select(flat)
        return positions + self.value_stage(flat.size).encode(flat[idx])

    def decode(self, parts: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        """The float32 tensor of ``shape`` the parts stand for; :class:`CodecError` if they do not fit."""
        layout = self.layout(shape)
        if len(parts) != len(layout):
            raise CodecError(f"{len(parts)} parts, expected {len(layout)} for codec {self.spec!r}")
        n = int(np.prod(shape, dtype=np.int64))
        if self.sparsifier is None:
            flat = self.values.decode(list(parts), n)
        else:
            held = len(self.sparsifier.layout(n))
            idx = self.sparsifier.positions(list(parts[:held]), n)
            flat = np.zeros(n, dtype=np.float32)
            flat[idx] = self.value_stage(n).decode(list(parts[held:]), idx.size)
        return flat.reshape(shape)

    def round_trip(self, x: np.ndarray) -> np.ndarray:
        """What the receiver will see of ``x``."""
        return self.decode(self.encode(x), tuple(np.shape(x)))


@lru_cache(maxsize=64)
def _whole(codec: Codec) -> Codec:
    dense = getattr(codec.sparsifier, "dense_values", None)
    return Codec(spec=codec.spec, sparsifier=None, values=dense if dense is not None else codec.values)


@lru_cache(maxsize=64)
def parse_codec(spec: str) -> Codec:
    """The codec ``spec`` names, e.g. ``none``, ``int8``, ``topk:0.05+int4``, ``ternary:0.2``.

    Raises
    ------
    CodecError
        An unknown name, a bad argument, or pieces that do not compose; the message names the rule.
    """
    text = spec.strip()
    if not text:
        raise CodecError("codec spec is empty; use e.g. none, fp16, int8, topk:0.1+int8")
    sparsifier, values, values_from = None, None, ""
    for i, item in enumerate(text.split("+")):
        name, _, arg = item.strip().partition(":")
        if name not in CODECS:
            known = ", ".join(CODECS.names())
            raise CodecError(f"unknown codec {name!r} in {spec!r}; known: {known} (compose with +)")
        piece_sparsifier, piece_values = CODECS.get(name)(arg if arg else None)
        if piece_sparsifier is not None:
            if i > 0:
                raise CodecError(f"{name!r} chooses which values are sent, so it must come first in {spec!r}")
            sparsifier = piece_sparsifier
        if piece_values is not None:
            if values is not None:
                raise CodecError(f"{values_from!r} already says how values are written in {spec!r}; drop {name!r}")
            values, values_from = piece_values, name
    return Codec(spec=text, sparsifier=sparsifier, values=values if values is not None else Float32())
