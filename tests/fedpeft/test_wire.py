"""The wire format: adapter tensors in ArrayRecords, encoded payloads, message sizes (requests: test_protocol.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.codecs import compress, parse_codec
from fedpeft.wire import (
    ARRAYS,
    CODEC,
    CONFIG,
    METRICS,
    PAYLOAD,
    PayloadError,
    decode_payload,
    encode_tensors,
    from_array_record,
    payload_records,
    record_nbytes,
    to_array_record,
)


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # deliberately not in sorted key order
    return {
        "z.lora_B.weight": rng.normal(size=(8, 2)).astype(np.float32),
        "a.lora_A.weight": rng.normal(size=(2, 8)).astype(np.float32),
        "m.half": rng.normal(size=(3, 4, 5)).astype(np.float16),
        "head.bias": rng.normal(size=(2,)).astype(np.float32),
        "counts": np.arange(5, dtype=np.int64),
    }


def test_array_record_round_trip_keeps_keys_order_dtype_values() -> None:
    state = _state()
    record = to_array_record(state)
    assert isinstance(record, ArrayRecord)
    back = from_array_record(record)
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype
        assert back[key].shape == value.shape
        np.testing.assert_array_equal(back[key], value)


def test_round_trip_through_serialized_message_content() -> None:
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    state = _state(1)
    content = RecordDict({ARRAYS: to_array_record(state)})
    decoded = recorddict_from_proto(recorddict_to_proto(content))
    back = from_array_record(decoded.array_records[ARRAYS])
    assert list(back) == list(state)
    for key in state:
        assert back[key].dtype == state[key].dtype
        np.testing.assert_array_equal(back[key], state[key])


def test_non_contiguous_input_packed_correctly() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    state = {"t": base.T, "s": base[:, ::2]}
    back = from_array_record(to_array_record(state))
    np.testing.assert_array_equal(back["t"], base.T)
    np.testing.assert_array_equal(back["s"], base[:, ::2])


def test_packing_copies_the_data() -> None:
    state = {"x": np.zeros(4, np.float32)}
    record = to_array_record(state)
    state["x"][:] = 7.0
    np.testing.assert_array_equal(from_array_record(record)["x"], np.zeros(4, np.float32))


def test_scalar_array_keeps_its_shape() -> None:
    back = from_array_record(to_array_record({"scale": np.array(2.5, dtype=np.float32)}))
    assert back["scale"].shape == ()
    assert back["scale"] == np.float32(2.5)


@settings(max_examples=30, deadline=None)
@given(
    layout=st.dictionaries(st.text("abcdefgh._", min_size=1, max_size=8),
                           st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), min_size=1, max_size=5),
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(layout: dict[str, tuple[int, ...]], dtype: type, seed: int) -> None:
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(size=shape).astype(dtype) for k, shape in layout.items()}
    back = from_array_record(to_array_record(state))
    assert list(back) == list(state)
    for key in state:
        assert back[key].dtype == state[key].dtype and back[key].shape == state[key].shape
        np.testing.assert_array_equal(back[key], state[key])


def test_record_nbytes_grows_with_payload() -> None:
    sizes = [record_nbytes(RecordDict({ARRAYS: to_array_record({"x": np.zeros(n, np.float32)})}))
             for n in (0, 10, 1_000, 10_000)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert sizes[3] - sizes[2] >= 9_000 * 4


def test_record_nbytes_close_to_raw_payload() -> None:
    state = {f"layer{i}.lora_A.weight": np.random.default_rng(i).normal(size=(8, 1250)).astype(np.float32)
             for i in range(7)}
    state["head.weight"] = np.ones((2, 1250), np.float32)
    raw = sum(v.nbytes for v in state.values())
    assert 250_000 < raw < 350_000  # about 300 KB
    content = RecordDict({ARRAYS: to_array_record(state), METRICS: MetricRecord({"num-examples": 10})})
    size = record_nbytes(content)
    assert raw <= size < raw * 1.05 + 2048


def test_record_nbytes_counts_every_record() -> None:
    arrays = RecordDict({ARRAYS: to_array_record(_state())})
    both = RecordDict({ARRAYS: to_array_record(_state()), CONFIG: ConfigRecord({"fedpeft.lora_r": 3})})
    assert record_nbytes(both) > record_nbytes(arrays) > 0
    assert record_nbytes(RecordDict({})) == 0


# --- encoded adapter payloads -----------------------------------------------------------------------

PAYLOAD_SPECS = ["none", "fp16", "int8", "int4", "topk:0.25", "topk:0.25+int8", "ternary"]


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"z.lora_B.weight": rng.normal(size=(400, 4)).astype(np.float32),
            "a.lora_A.weight": rng.normal(size=(4, 400)).astype(np.float32),
            "head.bias": rng.normal(size=(2,)).astype(np.float32)}


def _payload(spec: str = "topk:0.25+int8", update: dict[str, np.ndarray] | None = None) -> RecordDict:
    update = update if update is not None else _update()
    codec = parse_codec(spec)
    parts, _, _ = compress(codec, update)
    return RecordDict({**payload_records(codec, parts, {k: v.shape for k, v in update.items()}),
                       METRICS: MetricRecord({"num-examples": 3})})


def _shapes(update: dict[str, np.ndarray] | None = None) -> dict[str, tuple[int, ...]]:
    return {k: v.shape for k, v in (update if update is not None else _update()).items()}


@pytest.mark.parametrize("spec", PAYLOAD_SPECS)
def test_payload_decodes_to_the_round_trip_of_every_tensor(spec: str) -> None:
    update = _update()
    got, codec = decode_payload(_payload(spec, update), _shapes())
    assert codec.spec == spec and set(got) == set(update)
    for key, value in update.items():
        np.testing.assert_array_equal(got[key], codec.round_trip(value))
    header = _payload(spec, update)[CODEC]
    assert header["codec"] == spec and header["version"] == 1 and header["dtype"] == "float32"
    assert header["shapes"] == "4x400;2;400x4"  # sorted names: a.lora_A, head.bias, z.lora_B


def test_payload_is_one_byte_array_and_compresses() -> None:
    content = _payload("topk:0.25+int8")
    assert list(content[ARRAYS].keys()) == [PAYLOAD] and content[ARRAYS][PAYLOAD].dtype == "uint8"
    assert record_nbytes(_payload("topk:0.25+int8")) * 2 < record_nbytes(_payload("none"))


def test_encode_tensors_returns_what_the_receiver_decodes() -> None:
    state = _update(3)
    records, decoded = encode_tensors(parse_codec("int4"), state)
    got, _ = decode_payload(RecordDict(records), _shapes(state))
    for key in state:
        np.testing.assert_array_equal(got[key], decoded[key])
        assert not np.array_equal(decoded[key], state[key])  # int4 is lossy


def _with_payload_bytes(content: RecordDict, data: np.ndarray) -> RecordDict:
    content[ARRAYS] = ArrayRecord({PAYLOAD: Array(data)})
    return content


def _truncated_npy(content: RecordDict) -> RecordDict:
    array = content[ARRAYS][PAYLOAD]
    content[ARRAYS] = ArrayRecord({PAYLOAD: Array(dtype=array.dtype, shape=array.shape, stype=array.stype,
                                                  data=array.data[:-7])})
    return content


def _header(**changes: object) -> Callable[[RecordDict], RecordDict]:
    def change(content: RecordDict) -> RecordDict:
        content[CODEC] = ConfigRecord({**content[CODEC], **changes})
        return content

    return change


CORRUPTIONS: dict[str, tuple[Callable[[RecordDict], RecordDict], str]] = {
    "truncated npy bytes": (_truncated_npy, "unreadable"),
    "short payload": (lambda c: _with_payload_bytes(c, c[ARRAYS][PAYLOAD].numpy()[:-1]), "needs"),
    "long payload": (lambda c: _with_payload_bytes(c, np.append(c[ARRAYS][PAYLOAD].numpy(), np.uint8(0))), "needs"),
    "float payload": (lambda c: _with_payload_bytes(c, c[ARRAYS][PAYLOAD].numpy().astype(np.float32)), "uint8"),
    "2-d payload": (lambda c: _with_payload_bytes(c, c[ARRAYS][PAYLOAD].numpy()[None, :]), "1-D uint8"),
    "plain arrays": (lambda c: c.__setitem__(ARRAYS, to_array_record(_update())) or c, "one array"),
    "no header": (lambda c: c.__delitem__(CODEC) or c, "no codec header"),
    "no payload": (lambda c: c.__delitem__(ARRAYS) or c, "no payload"),
    "unknown codec": (_header(codec="zstd"), "unknown codec 'zstd'"),
    "unknown version": (_header(version=2), "version 2"),
    "other codec": (_header(codec="int4"), "needs"),
    "wrong shapes": (_header(shapes="4x400;2;4x400"), "shapes"),
    "wrong dtype": (_header(dtype="bfloat16"), "bfloat16"),
    "other tensors": (_header(tensors="0123456789abcdef"), "another set of tensors"),
    "header without version": (lambda c: c.__setitem__(CODEC, ConfigRecord({"codec": "none"})) or c, "malformed"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupted_payloads_are_refused_with_the_reason(name: str) -> None:
    corrupt, reason = CORRUPTIONS[name]
    content = corrupt(_payload("topk:0.25+int8"))
    with pytest.raises(PayloadError, match=reason):
        decode_payload(content, _shapes())


def test_non_finite_values_are_refused() -> None:
    update = _update()
    content = _payload("none", update)
    blob = content[ARRAYS][PAYLOAD].numpy().copy()
    blob[:4] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    with pytest.raises(PayloadError, match="non-finite"):
        decode_payload(_with_payload_bytes(content, blob), _shapes())


def test_flipped_position_bits_are_refused() -> None:
    content = _payload("topk:0.25")  # 1600 entries, k 400: a 200-byte bitmask first
    blob = content[ARRAYS][PAYLOAD].numpy().copy()
    blob[0] ^= 0xFF
    with pytest.raises(PayloadError, match="a.lora_A.weight: position mask"):
        decode_payload(_with_payload_bytes(content, blob), _shapes())



def test_a_control_change_travels_fp32_or_int8_in_the_payload_format() -> None:
    """SCAFFOLD's change of c_i: exact in fp32, within half an int8 step per row of 256 when quantised (under a
    third of the bytes); a header that does not fit its payload is refused."""
    from fedpeft.wire import CONTROL_CODEC, pack_control, unpack_control

    rng = np.random.default_rng(0)
    change = {"classifier.weight": rng.normal(size=(2, 384)).astype(np.float32),
              "classifier.bias": rng.normal(size=(2,)).astype(np.float32)}  # fmt: skip
    plain = RecordDict(pack_control(change, quantize=False))
    assert all(np.array_equal(unpack_control(plain)[k], v) for k, v in change.items())
    packed = RecordDict(pack_control(change, quantize=True))
    got = unpack_control(packed)
    for key, value in change.items():
        rows = np.array_split(value.reshape(-1), range(256, value.size, 256))
        step = max(np.abs(r).max() for r in rows) / 127
        assert got[key].shape == value.shape and np.abs(got[key] - value).max() <= step / 2 + 1e-7
    assert record_nbytes(packed) < record_nbytes(plain) / 3
    assert unpack_control(RecordDict({})) is None
    forged = RecordDict(pack_control(change, quantize=True))
    forged[CONTROL_CODEC] = ConfigRecord({**forged[CONTROL_CODEC], "names": '["classifier.bias", "other"]'})
    with pytest.raises(PayloadError, match="another set of tensors"):
        unpack_control(forged)


HEAD = "base_model.model.classifier.weight"
FACTOR = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"


@pytest.mark.parametrize("spec", ["compeft", "shared:0.4@5", "topk:0.1+int8"])
def test_a_head_goes_whole_whatever_its_size(spec: str) -> None:
    """A 3-class head on a 384-wide model (1,152 entries, over the 1,024 below which any tensor goes whole)
    arrives entry for entry, at the codec's whole-tensor width; a LoRA factor of the same shape is sparsified."""
    from fedpeft.adapters.state import is_head_key
    from fedpeft.codecs.shared import secure_positions, sum_parts

    assert all(map(is_head_key, (HEAD, "base_model.model.score.weight", "base_model.classifier.bias")))
    assert not is_head_key(FACTOR) and not is_head_key("base_model.model.bert.encoder.layer.0.output.dense.ssf.scale")
    rng = np.random.default_rng(7)
    values = lambda: (rng.choice([-1.0, 1.0], size=(3, 384)) * rng.uniform(0.01, 0.04, (3, 384))).astype(np.float32)  # noqa: E731
    update = {HEAD: values(), FACTOR: values()}  # within shared's default bound, so nothing is clipped
    codec = parse_codec(spec)
    parts, residual, _ = compress(codec, update)
    got, _ = decode_payload(RecordDict({**payload_records(codec, parts, _shapes(update)),
                                        METRICS: MetricRecord({"num-examples": 3})}), _shapes(update))
    whole = codec.for_tensor(HEAD)
    assert whole.sparsifier is None and codec.for_tensor(FACTOR) is codec
    np.testing.assert_array_equal(got[HEAD], whole.round_trip(update[HEAD]))
    assert np.count_nonzero(got[HEAD]) == update[HEAD].size
    assert np.linalg.norm(residual[HEAD]) < 0.02 * np.linalg.norm(update[HEAD])  # rounding only
    assert np.count_nonzero(got[FACTOR]) <= 0.4 * update[FACTOR].size + 1
    if spec.startswith("shared"):
        positions = secure_positions(codec, _shapes(update))
        np.testing.assert_array_equal(positions[HEAD], np.arange(update[HEAD].size))  # summed whole under secagg
        assert positions[FACTOR].size == np.ceil(0.4 * update[FACTOR].size)
        np.testing.assert_allclose(sum_parts(whole, [parts[HEAD], parts[HEAD]], update[HEAD].shape), 2 * got[HEAD],
                                   rtol=1e-6)
