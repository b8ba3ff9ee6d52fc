"""The site's codec exchange: decode the broadcast, encode trained − broadcast with error feedback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from client.encoding import encoded_exchange
from fedpeft.codecs import parse_codec
from fedpeft.errors import FedPeftError
from fedpeft.feedback_state import load_residual
from fedpeft.wire import (
    ARRAYS,
    CODEC,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PayloadError,
    decode_payload,
    encode_tensors,
    from_array_record,
    to_array_record,
)

pytestmark = pytest.mark.usefixtures("server_identity")


def broadcast(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"l.lora_A.weight": rng.normal(size=(4, 320)).astype(np.float32),
            "l.lora_B.weight": rng.normal(size=(320, 4)).astype(np.float32),
            "head.weight": rng.normal(size=(2, 32)).astype(np.float32)}  # fmt: skip


SHAPES = {k: v.shape for k, v in broadcast().items()}


def instruction(state: dict[str, np.ndarray], downlink: str = "none") -> Message:
    records, _ = encode_tensors(parse_codec(downlink), state)
    content = RecordDict({**records, CONFIG: ConfigRecord({"server-round": 1})})
    return Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)


def step(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(100 + seed)
    return {k: (0.01 * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}


def handler_moving_by(delta: dict[str, np.ndarray], seen: list[RecordDict] | None = None):
    def handler(msg: Message, ctxt: object) -> Message:
        if seen is not None:
            seen.append(msg.content)
        state = from_array_record(msg.content[ARRAYS])
        trained = {k: state[k] + delta[k] for k in state}
        return Message(RecordDict({ARRAYS: to_array_record(trained), METRICS: MetricRecord({NUM_EXAMPLES: 4})}),
                       reply_to=msg)

    return handler


def exchange(msg: Message, handler: object, codec: str, residual: Path) -> Message:
    held = tuple(c for c in str(msg.content[CONFIG].get("held", "")).split(",") if c)  # as the request says
    return encoded_exchange(msg, None, handler, expected=SHAPES, codec=codec, residual_file=residual, held=held)


def test_handler_sees_plain_arrays_and_one_config() -> None:
    seen: list[RecordDict] = []
    state = broadcast()
    exchange(instruction(state, downlink="int8"), handler_moving_by(step(0), seen), "none", Path("/nonexistent/r"))
    (content,) = seen
    assert CODEC not in content.config_records and list(content.config_records) == [CONFIG]  # as clipping needs
    got = from_array_record(content[ARRAYS])
    for key, value in state.items():
        np.testing.assert_array_equal(got[key], parse_codec("int8").round_trip(value))


def test_reply_carries_the_encoded_update(tmp_path: Path) -> None:
    state, delta = broadcast(), step(0)
    reply = exchange(instruction(state), handler_moving_by(delta), "int8", tmp_path / "r.npz")
    assert reply.content[CODEC]["codec"] == "int8"
    update, codec = decode_payload(reply.content, SHAPES)
    for key in state:
        sent = (state[key] + delta[key]) - state[key]
        np.testing.assert_array_equal(update[key], codec.round_trip(sent))
    metrics = reply.content[METRICS]
    assert metrics[NUM_EXAMPLES] == 4 and 0 < metrics["codec-error"] < 0.02 and metrics["codec-residual-carried"] == 0


def test_error_feedback_is_persisted_and_added_next_round(tmp_path: Path) -> None:
    path = tmp_path / "site" / "residual.npz"
    state = broadcast()
    codec = parse_codec("topk:0.1")
    first, second = step(1), step(2)
    reply = exchange(instruction(state), handler_moving_by(first), "topk:0.1", path)
    sent1, _ = decode_payload(reply.content, SHAPES)
    saved = load_residual(path)
    assert saved is not None
    for key in state:
        target = (state[key] + first[key]) - state[key]
        np.testing.assert_allclose(saved[key], target - sent1[key], atol=1e-7)
    # next round, a fresh process: the residual comes from disk
    reply = exchange(instruction(state), handler_moving_by(second), "topk:0.1", path)
    sent2, _ = decode_payload(reply.content, SHAPES)
    for key in state:
        target = ((state[key] + second[key]) - state[key]) + saved[key]
        np.testing.assert_array_equal(sent2[key], codec.round_trip(target))
    assert reply.content[METRICS]["codec-residual-carried"] > 0.5


def test_without_error_feedback_what_is_not_sent_is_dropped(tmp_path: Path) -> None:
    state, codec = broadcast(), parse_codec("topk:0.1")
    for seed in (1, 2):  # each round sends top-k of its own update alone; nothing is kept anywhere
        reply = encoded_exchange(instruction(state), None, handler_moving_by(step(seed)), expected=SHAPES,
                                 codec="topk:0.1", residual_file=None)
        sent, _ = decode_payload(reply.content, SHAPES)
        for key in state:
            np.testing.assert_array_equal(sent[key], codec.round_trip((state[key] + step(seed)[key]) - state[key]))
        assert reply.content[METRICS]["codec-residual-carried"] == 0
    assert list(tmp_path.iterdir()) == []


def test_lossless_codec_and_refused_round_keep_no_residual(tmp_path: Path) -> None:
    path = tmp_path / "r.npz"
    exchange(instruction(broadcast()), handler_moving_by(step(0)), "none", path)
    assert not path.exists()
    exchange(instruction(broadcast()), handler_moving_by(step(0)), "topk:0.1", path)
    before = path.read_bytes()

    def refuse(msg: Message, ctxt: object) -> Message:
        return Message(RecordDict({ARRAYS: to_array_record({}), METRICS: MetricRecord({NUM_EXAMPLES: 0})}),
                       reply_to=msg)

    reply = exchange(instruction(broadcast()), refuse, "topk:0.1", path)
    assert path.read_bytes() == before  # what the site still owes waits for a round it trains
    assert decode_payload(reply.content, {})[0] == {}


def test_unreadable_residual_restarts_feedback_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "r.npz"
    path.write_bytes(b"garbage")
    reply = exchange(instruction(broadcast()), handler_moving_by(step(0)), "topk:0.1", path)
    assert "unreadable" in caplog.text and "from zero" in caplog.text
    assert reply.content[METRICS]["codec-residual-carried"] == 0.0
    assert load_residual(path) is not None  # replaced by a good one


def test_a_broadcast_that_does_not_decode_raises() -> None:
    msg = instruction(broadcast())
    msg.content[CODEC] = ConfigRecord({**msg.content[CODEC], "shapes": "1x1;1x1;1x1"})
    with pytest.raises(PayloadError, match="shapes"):
        exchange(msg, handler_moving_by(step(0)), "none", Path("/nonexistent/r"))


@pytest.mark.parametrize(("node_codec", "frozen"), [(None, ""), ("int8", ""), ("ternary", "lora_A")])
def test_codec_mod_takes_the_site_codec_and_its_tensors_from_the_model(
    node_codec: str | None, frozen: str, tiny_model_dir: Path, small_data: Path, tmp_path: Path
) -> None:
    from types import SimpleNamespace

    from client.encoding import codec_mod
    from fedpeft.adapters.state import without_keys
    from fedpeft.config import FedPeftConfig
    from fedpeft.protocol import FROZEN, SERVER_ROUND, request_record
    from fedpeft.site import SiteModel

    cfg = FedPeftConfig(model=str(tiny_model_dir), data=str(small_data), clients=3, codec="fp16", run_id="r1")
    state = without_keys(SiteModel(cfg, 2).initial, (frozen,) if frozen else ())
    records, _ = encode_tensors(parse_codec("none"), state)
    config = request_record(cfg, label_names=["fresh", "rotten"], **{FROZEN: frozen, SERVER_ROUND: 1})
    msg = Message(content=RecordDict({**records, CONFIG: config}), dst_node_id=7, message_type=MessageType.TRAIN)
    node = {"partition-id": 1, "num-partitions": 3, "state-dir": str(tmp_path)}
    if node_codec:
        node["codec"] = node_codec
    reply = codec_mod(msg, SimpleNamespace(node_config=node), handler_moving_by(
        {k: np.full(v.shape, 0.01, np.float32) for k, v in state.items()}))
    assert reply.content[CODEC]["codec"] == (node_codec or "fp16")
    update, _ = decode_payload(reply.content, {k: v.shape for k, v in state.items()})
    assert set(update) == set(state) and all("lora_A" not in k for k in update) == bool(frozen)
    residual = tmp_path / "partition-00001" / "codec-residual-r1.npz"
    assert residual.exists()  # fp16, int8 and ternary are all lossy


def held_instruction(state: dict[str, np.ndarray], held: str) -> Message:
    msg = instruction(state)
    msg.content[CONFIG] = ConfigRecord({"server-round": 2, "held": held})
    return msg


def moving_all_but(held: str, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (np.zeros_like(v) if held in k else v) for k, v in delta.items()}


def test_a_held_factor_is_not_sent_and_its_residual_waits(tmp_path: Path) -> None:
    """RoLoRA: the factor held this round is broadcast and kept, but neither sent back nor forgotten by
    error feedback (its residual waits for the round that sends it)."""
    path, state = tmp_path / "r.npz", broadcast()
    exchange(instruction(state), handler_moving_by(step(0)), "topk:0.1", path)  # a round that sent everything
    owed = load_residual(path)
    assert owed is not None
    reply = exchange(held_instruction(state, "lora_A"), handler_moving_by(moving_all_but("lora_A", step(1))),
                     "topk:0.1", path)  # fmt: skip
    kept = {k: v for k, v in SHAPES.items() if "lora_A" not in k}
    update, _ = decode_payload(reply.content, kept)  # only B and the head come back
    assert set(update) == set(kept)
    saved = load_residual(path)
    np.testing.assert_array_equal(saved["l.lora_A.weight"], owed["l.lora_A.weight"])
    assert not np.array_equal(saved["l.lora_B.weight"], owed["l.lora_B.weight"])


def test_a_site_that_moves_a_held_factor_raises() -> None:
    with pytest.raises(FedPeftError, match="holds this round \\(lora_B\\)"):
        exchange(held_instruction(broadcast(), "lora_B"), handler_moving_by(step(0)), "none", Path("/nonexistent/r"))


def test_a_sites_node_config_sets_its_own_device_and_precision_and_a_bad_one_is_named() -> None:
    from flwr.app import Context

    from client.sites import site_config
    from fedpeft.config import FedPeftConfig

    def ctx(node: dict) -> Context:
        return Context(run_id=1, node_id=2, node_config=node, state=RecordDict(), run_config={})

    cfg = FedPeftConfig(device="auto", precision="auto", lora_r=8)
    own = site_config(cfg, ctx({"device": "cpu", "precision": "fp32", "lora-r": 4}), 0)
    assert (own.device, own.precision, own.lora_r) == ("cpu", "fp32", 4)
    assert site_config(cfg, ctx({}), 0) is cfg  # nothing of its own: the run's settings, as they were
    with pytest.raises(FedPeftError, match="this site's node config: device must be one of"):
        site_config(cfg, ctx({"device": "tpu"}), 0)


def test_a_secure_sites_weight_is_clamped_to_the_rounds_cap_so_the_ring_cannot_wrap(
        caplog: pytest.LogCaptureFixture) -> None:
    import json

    from flwr.app import Context

    from client.secure import VECTOR, masked, secure_exchange
    from privacy.secagg import fixed_point

    for cap, weight in ((0, 4), (3, 3), (100, 4)):  # the handler trains on 4 examples
        context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
        secagg = {"number": 1, "threshold": 2, "bits": 16, "clip": 50.0, "uniform": False, "tag": "t/round-1",
                  **({"ring": fixed_point.ring_bits(16, 2 * cap), "cap": cap} if cap else {})}
        with caplog.at_level("WARNING", logger="client.secure"):
            secure_exchange(instruction(broadcast()), context, handler_moving_by(step(0)), expected=SHAPES, held=(),
                            secagg=secagg)
        vector = context.state[VECTOR]["vector"].numpy()
        assert int(vector[-1]) == weight  # the weight rides last in the masked sum
        assert ("above the round's cap 3" in caplog.text) == (cap == 3)
        ring = int(context.state[VECTOR]["ring"].numpy()[0])
        assert ring == (64 if not cap else fixed_point.ring_bits(16, 2 * cap))
        stage = Message(RecordDict({"secagg-stage": ConfigRecord({"json": json.dumps(
            {"tag": "t/round-1", "shared": [1], "shares": {}})})}), dst_node_id=7, message_type="query.secagg_masked")
        sent = masked(stage, context).content["masked"]["vector"].numpy()
        assert sent.dtype == np.uint8 and sent.size == vector.size * ((ring + 7) // 8)  # not 8 bytes an element
        caplog.clear()
