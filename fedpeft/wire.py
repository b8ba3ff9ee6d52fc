"""The one place that defines how adapter tensors and run settings are packed into Flower records.

Client and server both pack and unpack through these functions, so the formats cannot drift. Only
record *types* from ``flwr.app`` are used here; sending and receiving stay in ``client/`` and
``server/``.

**Adapter payloads** (the broadcast, and every reply's update) travel encoded by a codec
(:mod:`fedpeft.codecs`) as two records:

- ``arrays``: an ArrayRecord with one uint8 array, ``payload``: every tensor's parts back to back,
  tensors in sorted-name order, parts in the codec's layout order, little-endian;
- ``codec``: a ConfigRecord header: ``codec`` (the spec, e.g. ``topk:0.1+int8``), ``version``
  (:data:`WIRE_VERSION`), ``tensors`` (a digest of the sorted tensor names: both sides know the names,
  so they are not resent), ``shapes`` (``8x384;384x8;…`` in the same order) and ``dtype`` (float32,
  what the tensors decode to).

The receiver checks the header against the tensors it expects, cuts the payload by the codec's layout
(the byte count must match exactly) and decodes; anything that does not fit raises
:class:`PayloadError` with the reason.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedpeft.codecs import Codec, CodecError, parse_codec
from fedpeft.deploy import flower_compat

# the keys are named in fedpeft.protocol; the ones packed here are re-exported for the code that packs them
from fedpeft.protocol import (  # noqa: F401 - re-exported names
    ARRAYS,
    CANARIES,
    CODEC,
    CONFIG,
    CONTROL,
    LEDGER_SEQ,
    METRICS,
    NUM_EXAMPLES,
    PAYLOAD,
    PRIVACY,
    REFUSED,
    SECONDS,
    SECONDS_LOAD,
    SECONDS_TRAIN,
    SECONDS_WAIT,
    TRAINED,
    WIRE_VERSION,
)


class PayloadError(ValueError):
    """An encoded payload that cannot be decoded into the expected tensors; the message says why."""


def to_array_record(state: Mapping[str, np.ndarray]) -> Any:
    """Pack a name → array mapping; bf16 has no numpy dtype, so callers pass fp16/fp32."""
    return ArrayRecord({key: Array(np.asarray(value, order="C")) for key, value in state.items()})  # keeps 0-d shapes


def from_array_record(record: Any) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into name → numpy array, keeping its order."""
    return {key: array.numpy() for key, array in record.items()}


def record_nbytes(content: Any) -> int:
    """Serialized size in bytes of a message's RecordDict, as it is framed for the wire."""
    return int(flower_compat.recorddict_to_proto(content).ByteSize())


def privacy_record(
    *,
    status: str,
    entry: Mapping[str, Any],
    signature: str,
    public_key: str,
    reason: str = "",
    backlog: Sequence[Mapping[str, Any]] = (),
) -> Any:
    """A site's privacy report for one round: ``status`` (trained/refused), the signed entry, why; and
    ``backlog``: earlier signed entries (``{"entry", "signature"}``) the coordinator's ledger lacks."""
    return ConfigRecord(
        {
            "status": status,
            "entry": json.dumps(dict(entry), sort_keys=True),
            "signature": signature,
            "public-key": public_key,
            "reason": reason,
            "backlog": json.dumps([dict(b) for b in backlog], sort_keys=True),
        }
    )


def read_privacy(content: Any) -> dict[str, Any] | None:
    """Inverse of :func:`privacy_record` for a reply's RecordDict; None when the reply has none.

    Raises
    ------
    ValueError
        A privacy record that is not well formed.
    """
    if PRIVACY not in content.config_records:
        return None
    record = content.config_records[PRIVACY]
    try:
        entry = json.loads(str(record["entry"]))
        out = {
            "status": str(record["status"]),
            "entry": entry,
            "signature": str(record["signature"]),
            "public_key": str(record["public-key"]),
            "reason": str(record.get("reason", "")),
            "backlog": json.loads(str(record.get("backlog", "[]"))),
        }
    except (KeyError, json.JSONDecodeError) as err:
        raise ValueError(f"malformed privacy record: {err}") from None
    backlog = out["backlog"]
    if (
        not isinstance(entry, dict)
        or out["status"] not in (TRAINED, REFUSED)
        or not isinstance(backlog, list)
        or not all(isinstance(b, dict) and isinstance(b.get("entry"), dict) and "signature" in b for b in backlog)
    ):
        raise ValueError("malformed privacy record")
    return out


# --- encoded adapter payloads ------------------------------------------------------------------


def tensor_digest(names: list[str]) -> str:
    """A short digest of the sorted tensor names (the header names the set without resending it)."""
    return hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()[:16]


def _shapes_text(shapes: list[tuple[int, ...]]) -> str:
    return ";".join("x".join(str(d) for d in shape) for shape in shapes)


def payload_records(
    codec: Codec, parts: Mapping[str, list[np.ndarray]], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Any]:
    """``{arrays: ArrayRecord, codec: ConfigRecord}`` for tensors already encoded by ``codec``."""
    names = sorted(parts)
    chunks = []
    for name in names:
        layout = codec.for_tensor(name).layout(tuple(shapes[name]))
        for part, spec in zip(parts[name], layout, strict=True):
            chunks.append(np.ascontiguousarray(part, dtype=spec.dtype).tobytes())
    blob = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    header = {
        "codec": codec.spec,
        "version": WIRE_VERSION,
        "tensors": tensor_digest(names),
        "shapes": _shapes_text([tuple(shapes[n]) for n in names]),
        "dtype": "float32",
    }
    return {ARRAYS: ArrayRecord({PAYLOAD: Array(blob)}), CODEC: ConfigRecord(header)}


def encode_tensors(codec: Codec, tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Encode ``tensors`` without error feedback (the broadcast); return the records and what the
    receiver will decode from them, so that the sender can start from exactly the same numbers."""
    own = {k: codec.for_tensor(k) for k in tensors}
    parts = {k: own[k].encode(v) for k, v in tensors.items()}
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    decoded = {k: v if own[k].lossless else own[k].decode(parts[k], shapes[k]) for k, v in tensors.items()}
    return payload_records(codec, parts, shapes), {k: np.asarray(v, dtype=np.float32) for k, v in decoded.items()}


def decode_payload(content: Any, expected: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], Codec]:
    """The float32 tensors an encoded payload in ``content`` (a RecordDict) stands for, and its codec.

    ``expected`` maps every tensor name the sender must send to its shape.

    Raises
    ------
    PayloadError
        A missing or unknown header, another tensor set or shape, a payload of the wrong type or
        length, parts the codec rejects, or non-finite values.
    """
    if CODEC not in content.config_records:
        raise PayloadError("no codec header (record 'codec')")
    header = content.config_records[CODEC]
    try:
        version, spec = int(header["version"]), str(header["codec"])
        digest, shapes_text, dtype = str(header["tensors"]), str(header["shapes"]), str(header["dtype"])
    except (KeyError, TypeError, ValueError) as err:
        raise PayloadError(f"malformed codec header: {err}") from None
    if version != WIRE_VERSION:
        raise PayloadError(f"wire format version {version}; this fedpeft reads version {WIRE_VERSION}")
    try:
        codec = parse_codec(spec)
    except CodecError as err:
        raise PayloadError(str(err)) from None
    names = sorted(expected)
    if digest != tensor_digest(names):
        raise PayloadError(f"payload holds another set of tensors than the {len(names)} expected")
    if dtype != "float32":
        raise PayloadError(f"payload tensors declared as {dtype}, expected float32")
    want_shapes = _shapes_text([tuple(expected[n]) for n in names])
    if shapes_text != want_shapes:
        raise PayloadError(f"payload shapes {shapes_text[:80]!r} differ from the expected {want_shapes[:80]!r}")
    blob = _payload_bytes(content)
    layouts = [codec.for_tensor(n).layout(tuple(expected[n])) for n in names]
    need = sum(part.nbytes for layout in layouts for part in layout)
    if blob.size != need:
        raise PayloadError(f"payload holds {blob.size} bytes; codec {spec!r} needs {need} for these shapes")
    out: dict[str, np.ndarray] = {}
    offset = 0
    try:
        for name, layout in zip(names, layouts, strict=True):
            parts = []
            for part in layout:
                parts.append(np.frombuffer(blob, dtype=part.dtype, count=part.count, offset=offset).copy())
                offset += part.nbytes
            out[name] = codec.for_tensor(name).decode(parts, tuple(expected[name]))
    except CodecError as err:
        raise PayloadError(f"{name}: {err}") from None
    bad = [n for n, v in out.items() if not np.all(np.isfinite(v))]
    if bad:
        raise PayloadError(f"{bad[0]} decodes to non-finite values")
    return out, codec


def _payload_bytes(content: Any) -> np.ndarray:
    if ARRAYS not in content.array_records:
        raise PayloadError("no payload (record 'arrays')")
    record = content.array_records[ARRAYS]
    if list(record.keys()) != [PAYLOAD]:
        raise PayloadError(f"payload record must hold one array {PAYLOAD!r}, holds {list(record.keys())[:3]}")
    array = record[PAYLOAD]
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise PayloadError(f"payload array is {array.dtype} of shape {tuple(array.shape)}, expected 1-D uint8")
    try:
        blob = array.numpy()
    except Exception as err:  # np.load of truncated or garbled bytes raises several types
        raise PayloadError(f"payload array is unreadable ({type(err).__name__}: {err})") from None
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise PayloadError(f"payload bytes are {blob.dtype} of shape {blob.shape}, expected 1-D uint8")
    return blob


def raw_nbytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes of the tensors as raw float32: the baseline of ``compression_ratio``."""
    return int(sum(4 * int(np.prod(shape, dtype=np.int64)) for shape in shapes.values()))



CONTROL_CODEC = "control-codec"  # ConfigRecord: the header of a quantised control change (SCAFFOLD), with its names


def pack_control(change: Mapping[str, np.ndarray], *, quantize: bool) -> dict[str, Any]:
    """SCAFFOLD's change of c_i as it travels, as reply records: fp32 (``{control: ArrayRecord}``), or, when the
    site's codec is lossy (``quantize``), int8 with one scale per row of 256 in the payload format, a quarter
    of the bytes (``{control: payload, control-codec: header}``, the header naming the tensors), so that a
    compressed reply is not dominated by its variate. The site keeps its exact c_i; the coordinator's c moves
    by what arrives."""
    if not quantize:
        return {CONTROL: to_array_record(change)}
    codec = parse_codec("int8")
    shapes = {k: tuple(np.shape(v)) for k, v in change.items()}
    records = payload_records(codec, {k: codec.encode(np.asarray(v, np.float32)) for k, v in change.items()}, shapes)
    header = ConfigRecord({**records[CODEC], "names": json.dumps(sorted(change))})
    return {CONTROL: records[ARRAYS], CONTROL_CODEC: header}


def unpack_control(content: Any) -> dict[str, np.ndarray] | None:
    """The change of c_i a reply carries (:func:`pack_control`'s inverse), None when it carries none.

    Raises
    ------
    PayloadError
        A quantised change whose header or payload does not decode.
    """
    if CONTROL not in content.array_records:
        return None
    if CONTROL_CODEC not in content.config_records:
        return from_array_record(content.array_records[CONTROL])
    header = content.config_records[CONTROL_CODEC]
    try:
        names = [str(n) for n in json.loads(str(header["names"]))]
        shapes = [tuple(int(d) for d in part.split("x") if d) for part in str(header["shapes"]).split(";")] \
            if str(header["shapes"]) else []
    except (KeyError, TypeError, ValueError) as err:
        raise PayloadError(f"malformed control header: {err}") from None
    if len(names) != len(shapes) or names != sorted(names):
        raise PayloadError("control header names and shapes do not match")
    from flwr.app import RecordDict

    framed = RecordDict({ARRAYS: content.array_records[CONTROL], CODEC: header})
    decoded, _ = decode_payload(framed, dict(zip(names, shapes, strict=True)))
    return decoded
