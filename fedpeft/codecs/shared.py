"""``shared:<density>[:<bound>]``: a sparse codec whose payloads add up, for sums nobody may look inside.

Top-k codecs choose positions from each site's own update, so two sites' payloads mark different
entries and can only be added after decoding: a secure sum, which sees nothing but the total, cannot
use them. This codec fixes both halves in public:

- **positions**: the same ceil(density · n) entries of every tensor at every site, drawn from a seed the
  round shares (:func:`round_seed`: the run seed and the round number, nothing else), so none travel;
  a tensor under 1,024 entries, and the classification head whatever its size, is sent whole;
- **values**: int8 on a fixed public grid, step = bound / 127 (``bound`` 0.05 by default): a value
  beyond ±bound is clipped, and what clipping or rounding took stays in the site's error-feedback
  residual, as do the entries the round did not draw, so nothing is lost, only delayed. A tensor sent
  whole goes as int16 on the same step (±258 · bound): the head's update in a probe round is tens of
  times the bound, and at int8 its first round arrived 94 % clipped (seed 0 of the default job ended a
  probe round at 0.699 where ``none`` and ``compeft`` reach 0.756); it costs one byte an entry of the head.

Then the integer payloads of m sites add to the integer payload of their sum, and decoding the sum
gives the sum of the sites' decoded values (:func:`sum_parts`): a masked sum of such vectors decodes to
the sum of the sites' values. The seed rides in the spec (``shared:0.4@<seed>``, written by the site)
and the coordinator refuses a payload drawn from any other seed than its round's.

Bytes: one per kept entry (two for a tensor sent whole), so density 0.4 is 10x against fp32 (4 bytes),
before framing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedpeft.codecs.base import FLOAT, CodecError, Part, check_part
from fedpeft.codecs.registry import CODECS, Piece, fraction

INT8 = np.dtype("i1")
INT16 = np.dtype("<i2")
LEVELS = 127  # int8's levels each side: step = bound / LEVELS
DENSE_BELOW = 1024
DEFAULT_BOUND = 0.05
_TAG = 0x53484152  # "SHAR": keeps this stream apart from every other use of the run seed


def round_seed(run_seed: int, server_round: int) -> int:
    """The positions' seed of round ``server_round``: public, the same at every site and the coordinator."""
    return int(np.random.default_rng([int(run_seed) & 0xFFFFFFFF, int(server_round), _TAG]).integers(1 << 62))


class SharedPositions:
    """ceil(density · n) positions drawn from ``seed`` and the tensor's size: identical at every site."""

    def __init__(self, density: float, seed: int | None, bound: float = DEFAULT_BOUND,
                 dense_below: int = DENSE_BELOW) -> None:
        self.density, self.seed, self.dense_below = density, seed, dense_below
        self.dense_values = FixedGrid(bound, INT16)  # how a tensor sent whole is written (fedpeft.codecs.chain)

    def kept(self, n: int) -> int:
        if n < self.dense_below:
            return n
        return min(n, max(1, math.ceil(self.density * n - 1e-9)))

    def layout(self, n: int) -> list[Part]:
        return []  # the positions are known to both ends

    def _drawn(self, n: int) -> np.ndarray:
        k = self.kept(n)
        if k == n:
            return np.arange(n)
        if self.seed is None:
            raise CodecError("codec 'shared' needs the round's seed (shared:<density>@<seed>, written by the site)")
        return np.sort(np.random.default_rng([self.seed, n]).choice(n, size=k, replace=False))

    def select(self, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        return [], self._drawn(x.size)

    def positions(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        return self._drawn(n)


class FixedGrid:
    """Integers on the public grid step = bound / 127 (int8 by default, so ±bound; int16 reaches ±258 ·
    bound): every site's integers mean the same amounts, whatever their width."""

    lossless = False

    def __init__(self, bound: float, dtype: np.dtype = INT8) -> None:
        self.bound, self.dtype = bound, np.dtype(dtype)
        self.step = np.float32(bound / LEVELS)
        self.levels = int(np.iinfo(self.dtype).max)

    def layout(self, n: int) -> list[Part]:
        return [Part("q", self.dtype, n)]

    def encode(self, x: np.ndarray) -> list[np.ndarray]:
        return [np.clip(np.rint(x / self.step), -self.levels, self.levels).astype(self.dtype)]

    def decode(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        (q,) = (check_part(p, s) for p, s in zip(parts, self.layout(n), strict=True))
        return (q.astype(np.float32) * self.step).astype(FLOAT)


def sum_parts(codec: object, payloads: Sequence[list[np.ndarray]], shape: tuple[int, ...]) -> np.ndarray:
    """The decoded sum of several sites' ``shared`` payloads of one tensor, computed on the integers alone
    (what a secure sum of the payloads gives): equal to the sum of their decodings."""
    values, sparsifier = getattr(codec, "values", None), getattr(codec, "sparsifier", None)
    if not isinstance(values, FixedGrid) or not isinstance(sparsifier, SharedPositions | None):
        raise CodecError("only the 'shared' codec's payloads add up before decoding")  # None: a head, sent whole
    n = int(np.prod(shape, dtype=np.int64))
    positions = np.arange(n) if sparsifier is None else sparsifier.positions([], n)
    grid = codec.value_stage(n)  # int16 for a tensor sent whole: the same step, so the same sum
    total = np.zeros(positions.size, dtype=np.int64)
    for parts in payloads:
        (q,) = (check_part(p, s) for p, s in zip(parts, grid.layout(positions.size), strict=True))
        total += q
    flat = np.zeros(n, dtype=np.float64)
    flat[positions] = total * float(grid.step)
    return flat.reshape(shape)


def secure_positions(codec: object, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
    """The entries of each tensor a secure round sums: ``codec``'s shared positions of the round (its seed
    written in), or None for any other codec (every entry). Site and coordinator compute the same."""
    sparsifier = getattr(codec, "sparsifier", None)
    if not isinstance(sparsifier, SharedPositions):
        return None
    sizes = {k: int(np.prod(shape, dtype=np.int64)) for k, shape in shapes.items()}
    return {k: np.arange(n) if codec.for_tensor(k).sparsifier is None else sparsifier.positions([], n)
            for k, n in sizes.items()}  # a head goes whole


def factory(arg: str | None) -> Piece:
    text, _, seed_text = (arg or "").partition("@")
    density_text, _, bound_text = text.partition(":")
    density = fraction("shared", density_text or None, None)
    try:
        bound = float(bound_text) if bound_text else DEFAULT_BOUND
        seed = int(seed_text) if seed_text else None
    except ValueError:
        raise CodecError(f"shared:<density>[:<bound>][@<seed>] needs numbers, got {arg!r}") from None
    if not (math.isfinite(bound) and bound > 0):
        raise CodecError(f"shared: the bound must be a finite number > 0, got {bound_text!r}")
    return SharedPositions(density, seed, bound), FixedGrid(bound)


def with_seed(spec: str, seed: int) -> str:
    """``spec`` with the round's seed written in, for a ``shared`` codec (any other spec unchanged)."""
    name = spec.strip().split(":")[0].split("+")[0]
    return f"{spec.strip().split('@')[0]}@{seed}" if name == "shared" else spec


CODECS.register("shared")(factory)
