"""Every registered codec through one contract, and each one's error bound against a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedpeft.codecs import CODECS, CodecError, parse_codec
from fedpeft.codecs.int4 import pack_nibbles, unpack_nibbles
from fedpeft.codecs.shared import round_seed, sum_parts, with_seed
from fedpeft.codecs.topk import DENSE_BELOW

SPECS = ["none", "fp16", "int8", "int8:16", "int4", "int4:7", "topk:0.1", "topk:1", "topk:0.5+int8:8",
         "topk:0.3+int4", "topk:0.2+fp16", "topk:0.05+none", "ternary", "ternary:0.3", "compeft", "compeft:0.3",
         "compeft:1", "shared:0.4@7", "shared:0.1:0.5@8"]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (8, 384), (384, 8), (2, 3, 40), (70000,)]

finite = st.floats(-1e4, 1e4, allow_nan=False, width=32)
arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40), elements=finite)
# tensors big enough to be sparsified (smaller ones are sent whole)
large = hnp.arrays(np.float32, st.one_of(st.integers(DENSE_BELOW, 5000).map(lambda n: (n,)),
                                         st.tuples(st.integers(32, 70), st.integers(32, 70))), elements=finite)


def test_every_registered_codec_is_in_the_matrix() -> None:
    assert {s.split(":")[0].split("+")[0] for s in SPECS} == set(CODECS.names())


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_parts_follow_the_layout_and_decode_to_the_shape(spec: str, shape: tuple[int, ...]) -> None:
    codec = parse_codec(spec)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    parts = codec.encode(x)
    layout = codec.layout(shape)
    assert [(p.dtype, p.ndim, p.size) for p in parts] == [(s.dtype, 1, s.count) for s in layout]
    assert all(s.dtype.byteorder in "<|=" for s in layout)  # little-endian on the wire
    y = codec.decode(parts, shape)
    assert y.shape == shape and y.dtype == np.float32
    if codec.lossless:
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("spec", SPECS)
def test_sizes_shrink_as_promised(spec: str) -> None:
    codec = parse_codec(spec)
    n = 8 * 384
    size = sum(p.nbytes for p in codec.layout((8, 384)))
    bound = {"none": 4.0, "fp16": 2.0, "int8": 1 + 4 / 256, "int4": 0.5 + 4 / 256}
    base = spec.split(":")[0]
    if base in bound and "+" not in spec and spec.count(":") == 0:
        assert size == math.ceil(n * bound[base])
    assert size <= 4 * n


@pytest.mark.parametrize("spec", SPECS)
def test_non_finite_input_is_refused(spec: str) -> None:
    x = np.ones(10, np.float32)
    x[3] = np.nan
    with pytest.raises(CodecError, match="non-finite"):
        parse_codec(spec).encode(x)


# --- error bounds, against brute force ------------------------------------------------------------


def block_absmax(x: np.ndarray, block: int) -> np.ndarray:
    """Per entry, the largest |x| of its block (brute force)."""
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    for start in range(0, flat.size, block):
        out[start : start + block] = np.abs(flat[start : start + block]).max()
    return out


def topk_reference(flat: np.ndarray, fraction: float) -> tuple[int, np.ndarray]:
    k = flat.size if flat.size < DENSE_BELOW else min(flat.size, max(1, math.ceil(fraction * flat.size - 1e-9)))
    return k, np.sort(np.abs(flat))[::-1]


@settings(max_examples=60, deadline=None)
@given(x=arrays)
def test_fp16_error_is_half_an_ulp(x: np.ndarray) -> None:
    y = parse_codec("fp16").round_trip(x)
    assert np.all(np.abs(y - x) <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25))


@pytest.mark.parametrize(("name", "levels"), [("int8", 127), ("int4", 7)])
@pytest.mark.parametrize("block", [1, 5, 256])
@settings(max_examples=40, deadline=None)
@given(x=arrays)
def test_quantisers_err_by_at_most_half_a_step_of_their_row(name: str, levels: int, block: int, x: np.ndarray) -> None:
    y = parse_codec(f"{name}:{block}").round_trip(x).reshape(-1)
    step = block_absmax(x, block) / levels
    assert np.all(np.abs(y - x.reshape(-1)) <= step / 2 * (1 + 1e-5) + 1e-30)
    assert np.all(np.abs(y) <= block_absmax(x, block) * (1 + 1e-6) + 1e-37)  # within the row's absmax


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 1.0])
@settings(max_examples=40, deadline=None)
@given(x=large)
def test_topk_keeps_exactly_the_k_largest(fraction: float, x: np.ndarray) -> None:
    flat = x.reshape(-1)
    y = parse_codec(f"topk:{fraction}").round_trip(x).reshape(-1)
    k, ordered = topk_reference(flat, fraction)
    sent = np.flatnonzero(y != 0)
    assert sent.size <= k
    np.testing.assert_array_equal(y[sent], flat[sent])  # kept values exact (fp32)
    dropped = np.setdiff1d(np.arange(flat.size), sent)
    kth = ordered[k - 1]
    assert np.all(np.abs(flat[dropped][np.abs(flat[dropped]) > 0]) <= kth)  # nothing bigger was dropped
    assert np.sum(np.abs(y) > 0) == np.sum(np.abs(flat[sent]) > 0)


@settings(max_examples=40, deadline=None)
@given(x=large)
def test_topk_then_int8_quantises_the_kept_values(x: np.ndarray) -> None:
    flat = x.reshape(-1)
    codec = parse_codec("topk:0.3+int8")
    parts = codec.encode(x)
    held = len(codec.sparsifier.layout(flat.size))
    idx = codec.sparsifier.positions(parts[:held], flat.size)
    y = codec.decode(parts, x.shape).reshape(-1)
    kept = flat[idx]
    step = block_absmax(kept, 256) / 127
    assert np.all(np.abs(y[idx] - kept) <= step / 2 * (1 + 1e-5) + 1e-30)
    assert not np.any(np.delete(y, idx))


@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.5])
@settings(max_examples=40, deadline=None)
@given(x=large)
def test_ternary_is_mean_magnitude_times_sign_on_the_top_k(fraction: float, x: np.ndarray) -> None:
    flat = x.reshape(-1)
    codec = parse_codec(f"ternary:{fraction}")
    parts = codec.encode(x)
    idx = codec.sparsifier.positions(parts[: len(codec.sparsifier.layout(flat.size))], flat.size)
    y = codec.decode(parts, x.shape).reshape(-1)
    k, ordered = topk_reference(flat, fraction)
    assert idx.size == k
    scale = np.float32(np.abs(flat[idx].astype(np.float64)).mean())
    np.testing.assert_allclose(np.abs(ordered[:k]).sum(), np.abs(flat[idx]).sum(), rtol=1e-5)  # the k largest
    np.testing.assert_array_equal(y[idx], np.where(flat[idx] >= 0, scale, -scale))
    assert not np.any(np.delete(y, idx))
    # the scale is least-squares optimal for these signs: no other scale is closer
    signs = np.where(flat[idx] >= 0, 1.0, -1.0)
    err = lambda a: np.sum((flat[idx] - a * signs) ** 2)  # noqa: E731
    assert err(float(scale)) <= min(err(float(scale) * 1.01), err(float(scale) * 0.99)) + 1e-6


def block_topk_reference(flat: np.ndarray, density: float) -> set[int]:
    """Brute force: in each block of 64 (the last may be shorter), the round(density · size) largest |x|."""
    chosen: set[int] = set()
    for start in range(0, flat.size, 64):
        block = flat[start:start + 64]
        k = min(block.size, max(1, round(density * block.size)))
        order = sorted(range(block.size), key=lambda i: (-abs(float(block[i])), i))
        kth = abs(float(block[order[k - 1]]))
        assert sum(abs(float(v)) > kth for v in block) < k  # the k-th magnitude bounds the choice (ties aside)
        chosen |= {start + i for i in order[:k]}
    return chosen


@pytest.mark.parametrize("density", [0.05, 0.25, 0.5])
@settings(max_examples=40, deadline=None)
@given(x=large)
@example(x=np.full(1451, 7282.285, dtype=np.float32))  # CI's counterexample: the optimum is between two float32s
def test_compeft_is_the_least_squares_scale_times_sign_on_each_blocks_top_k(density: float, x: np.ndarray) -> None:
    flat = x.reshape(-1)
    codec = parse_codec(f"compeft:{density}")
    parts = codec.encode(x)
    held = len(codec.sparsifier.layout(flat.size))
    idx = codec.sparsifier.positions(parts[:held], flat.size)
    assert np.all(np.diff(idx) > 0) and idx.size == codec.sparsifier.kept(flat.size)
    want = block_topk_reference(flat, density)
    magnitudes = lambda ids: sorted(abs(float(flat[i])) for i in ids)  # noqa: E731 - equal up to ties
    assert magnitudes(idx) == magnitudes(want)
    y = codec.decode(parts, x.shape).reshape(-1)
    scale = np.float32(np.abs(flat[idx].astype(np.float64)).mean())
    np.testing.assert_array_equal(y[idx], np.where(flat[idx] >= 0, scale, -scale))
    assert not np.any(np.delete(y, idx))
    signs = np.where(flat[idx] >= 0, 1.0, -1.0)  # brute force over scales: none is closer to the kept values
    err = lambda a: float(np.sum((flat[idx].astype(np.float64) - a * signs) ** 2))  # noqa: E731
    grid = np.linspace(0, 2 * float(scale) + 1e-6, 401)
    # up to float32's rounding of the optimum: half a unit in the last place costs at most idx.size · (ulp/2)²
    rounding = idx.size * (float(np.spacing(scale)) / 2) ** 2
    assert err(float(scale)) <= min(err(a) for a in grid) + rounding + 1e-9 * (1 + err(float(scale)))


def test_compeft_positions_cost_their_subset_rank_bits() -> None:
    """ceil(log2 C(64, k)) bits a block: at density 0.25, 49 of them for 64 entries, plus one sign bit per kept
    entry and one scale: about 31x smaller than fp32."""
    codec = parse_codec("compeft:0.25")
    n = 8 * 384
    assert sum(p.nbytes for p in codec.layout((8, 384))) == math.ceil(48 * 49 / 8) + math.ceil(768 / 8) + 4
    assert 4 * n / sum(p.nbytes for p in codec.layout((8, 384))) > 30


def test_compeft_refuses_a_rank_past_the_subsets() -> None:
    codec = parse_codec("compeft:0.25")
    x = np.random.default_rng(4).normal(size=(65, 64)).astype(np.float32)  # 65 ranks of 49 bits: 7 bits of padding
    parts = codec.encode(x)
    bad = [p.copy() for p in parts]
    bad[0][:7] = 0xFF  # the first block's 49-bit rank set to all ones: 2^49 - 1 >= C(64, 16)
    with pytest.raises(CodecError, match="exceeds C"):
        codec.decode(bad, x.shape)
    tail = [p.copy() for p in parts]
    tail[0][-1] |= 0x80  # a bit past the last rank
    with pytest.raises(CodecError, match="past their end"):
        codec.decode(tail, x.shape)


@settings(max_examples=25, deadline=None)
@given(sites=st.sampled_from([(1024,), (40, 60), (3000,), (2, 385)]).flatmap(
    lambda shape: st.lists(hnp.arrays(np.float32, shape, elements=st.floats(-1, 1, width=32)), min_size=1,
                           max_size=4)), seed=st.integers(0, 1 << 40))
def test_shared_payloads_add_up_to_the_sum_of_their_decodings(sites: list[np.ndarray], seed: int) -> None:
    """Every site draws the same positions from the round's seed, so summing the integer payloads (what a
    secure sum computes) and decoding once equals decoding each and summing."""
    codec = parse_codec(f"shared:0.3:0.5@{seed}")
    shape = sites[0].shape
    payloads = [codec.encode(x) for x in sites]
    want = np.sum([codec.decode(p, shape).astype(np.float64) for p in payloads], axis=0)
    np.testing.assert_allclose(sum_parts(codec, payloads, shape), want, rtol=1e-6, atol=1e-7 * len(sites))  # fp32
    flat = sites[0].reshape(-1)
    idx = codec.sparsifier.positions([], flat.size)
    assert idx.size == codec.sparsifier.kept(flat.size) and np.all(np.diff(idx) > 0)
    decoded = codec.decode(payloads[0], shape).reshape(-1)
    assert not np.any(np.delete(decoded, idx))
    grid = codec.value_stage(flat.size)  # int8 (±0.5) for drawn entries, int16 (±129) for a tensor sent whole
    assert grid.step == np.float32(0.5 / 127) and (flat.size < 1024) == (grid.levels == 32767)
    limit = 0.5 if flat.size >= 1024 else 1.0  # the hypothesis floats stay within ±1
    np.testing.assert_allclose(decoded[idx], np.clip(flat[idx], -limit, limit), atol=0.5 / 127 / 2 + 1e-7)
    other = parse_codec(f"shared:0.3:0.5@{seed + 1}").sparsifier.positions([], flat.size)
    assert flat.size < 1024 or not np.array_equal(other, idx)  # another round, other positions


def test_shared_sends_a_small_tensor_whole_on_a_wide_grid() -> None:
    """A probe round's head update (770 entries, values far beyond the bound) arrives to within half a step,
    as int16 on the drawn entries' step: clipping it to ±bound lost 94 % of it (docs/compression.md)."""
    head = np.random.default_rng(6).normal(scale=0.5, size=(2, 385)).astype(np.float32)
    codec = parse_codec("shared:0.4@3")  # the default bound, 0.05
    (q,) = codec.encode(head)
    assert q.dtype == np.dtype("<i2") and q.size == head.size
    step = np.float32(0.05 / 127)
    np.testing.assert_allclose(codec.decode([q], head.shape), head, atol=float(step) / 2 * (1 + 1e-5))
    big = np.full((2, 385), 20.0, np.float32)  # beyond ±32767 steps (12.9): clipped there, not at 0.05
    np.testing.assert_allclose(codec.decode(codec.encode(big), big.shape), 32767 * step, rtol=1e-6)
    lora = np.full((8, 384), 0.2, np.float32)  # a drawn tensor: int8, clipped at the bound
    parts = codec.encode(lora)
    assert parts[0].dtype == np.dtype("i1")
    assert np.abs(codec.decode(parts, lora.shape)).max() == pytest.approx(0.05, rel=1e-6)


def test_shared_needs_the_rounds_seed_and_only_its_own_payloads_add_up() -> None:
    x = np.random.default_rng(5).normal(size=(8, 384)).astype(np.float32)
    with pytest.raises(CodecError, match="needs the round's seed"):
        parse_codec("shared:0.4").encode(x)
    assert with_seed("shared:0.4:0.1", 9) == "shared:0.4:0.1@9" and with_seed("shared:0.4@3", 9) == "shared:0.4@9"
    assert with_seed("compeft", 9) == "compeft"
    with pytest.raises(CodecError, match="only the 'shared' codec"):
        sum_parts(parse_codec("int8"), [parse_codec("int8").encode(x)], x.shape)
    assert round_seed(0, 1) == round_seed(0, 1) != round_seed(0, 2) != round_seed(1, 2)


# --- int4 packing ------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-8, 7), max_size=301))
def test_int4_packing_round_trips_every_representable_value(values: list[int]) -> None:
    q = np.array(values, dtype=np.int8)
    packed = pack_nibbles(q)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(q.size / 2)
    np.testing.assert_array_equal(unpack_nibbles(packed, q.size), q)


def test_int4_nibble_order_is_low_first() -> None:
    np.testing.assert_array_equal(pack_nibbles(np.array([1, -1, 7], np.int8)), np.array([0xF1, 0x07], np.uint8))
    with pytest.raises(CodecError, match=r"\[-8, 7\]"):
        pack_nibbles(np.array([8], np.int8))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-7, 7), min_size=1, max_size=300), st.integers(-20, 20))
def test_int4_round_trips_representable_values_exactly(levels: list[int], exponent: int) -> None:
    q = np.array(levels + [7], dtype=np.float32)  # one entry at the row's absmax fixes the scale
    x = q * np.float32(2.0**exponent)
    np.testing.assert_array_equal(parse_codec(f"int4:{x.size}").round_trip(x), x)


# --- specs and payloads that must be refused ------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("zip", "unknown codec 'zip'.*known: compeft, fp16, int4, int8, none, shared, ternary, topk"),
        ("topk", "needs a fraction"),
        ("topk:0", r"fraction in \(0, 1\]"),
        ("topk:1.5", r"fraction in \(0, 1\]"),
        ("topk:abc", r"fraction in \(0, 1\]"),
        ("int8:0", "row length"),
        ("int4:x", "row length"),
        ("fp16:2", "takes no argument"),
        ("int8+topk:0.1", "must come first"),
        ("ternary+int8", "'ternary' already says how values are written"),
        ("fp16+int8", "'fp16' already says"),
        ("topk:0.1+ternary", "must come first"),
    ],
)
def test_bad_specs_are_refused_with_the_rule(spec: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        parse_codec(spec)


@pytest.mark.parametrize("spec", ["int8", "topk:0.1", "ternary", "topk:0.5+int4", "compeft", "shared:0.3@1"])
def test_parts_of_the_wrong_dtype_or_length_are_refused(spec: str) -> None:
    codec = parse_codec(spec)
    parts = codec.encode(np.random.default_rng(1).normal(size=(160, 8)).astype(np.float32))
    short = [p.copy() for p in parts]
    short[-1] = short[-1][:-1]
    with pytest.raises(CodecError, match="holds"):
        codec.decode(short, (160, 8))
    wrong = [p.copy() for p in parts]
    wrong[0] = wrong[0].astype(np.int32)
    with pytest.raises(CodecError, match="dtype"):
        codec.decode(wrong, (160, 8))
    with pytest.raises(CodecError, match="parts"):
        codec.decode(parts[:-1], (160, 8))


def test_positions_that_do_not_match_k_are_refused() -> None:
    codec = parse_codec("topk:0.1")
    x = np.random.default_rng(2).normal(size=(128, 16)).astype(np.float32)  # 2048 entries: k 205, a bitmask
    parts = codec.encode(x)
    assert codec.layout(x.shape)[0].name == "mask"
    extra = [p.copy() for p in parts]
    extra[0][0] |= 0xFF
    with pytest.raises(CodecError, match="mask marks"):
        codec.decode(extra, x.shape)
    sparse = parse_codec("topk:0.01")  # 2048 entries: k 21, sorted uint16 indices
    parts = sparse.encode(x)
    assert sparse.layout(x.shape)[0].name == "index"
    repeated = [p.copy() for p in parts]
    repeated[0][1] = repeated[0][0]
    with pytest.raises(CodecError, match="increasing"):
        sparse.decode(repeated, x.shape)
    outside = [p.copy() for p in parts]
    outside[0][-1] = 2048
    with pytest.raises(CodecError, match="increasing indices below 2048"):
        sparse.decode(outside, x.shape)


@pytest.mark.parametrize("spec", ["topk:0.01", "topk:0.1+int8", "ternary", "compeft", "shared:0.1:4@2"])
def test_tensors_below_the_dense_size_are_sent_whole(spec: str) -> None:
    codec = parse_codec(spec)
    small = np.random.default_rng(3).normal(size=(2, 384)).astype(np.float32)  # a 2-label head: 768 entries
    layout = codec.layout(small.shape)
    assert all(part.name not in ("mask", "index") for part in layout)
    y = codec.round_trip(small)
    assert np.count_nonzero(y) > 0.9 * small.size  # every entry moves (int8 may round a tiny one to 0)
    big = np.random.default_rng(3).normal(size=(8, 384)).astype(np.float32)
    assert layout != codec.layout(big.shape) and np.count_nonzero(codec.round_trip(big)) < big.size
