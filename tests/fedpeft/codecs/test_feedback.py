"""Error feedback: the sum of what was sent tracks the sum of the true updates."""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.codecs import compress, parse_codec

LOSSY = ["topk:0.05", "topk:0.1+int8", "ternary", "int4", "topk:0.02+int4", "compeft:0.1"]


def updates(rounds: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """A drifting signal plus noise, like successive local updates of one site."""
    rng = np.random.default_rng(seed)
    drift = {"a": rng.normal(size=(8, 256)), "b": rng.normal(size=(256, 8)) * 0.1, "h": rng.normal(size=(2, 640))}
    return [{k: (0.01 * v + 0.02 * rng.normal(size=v.shape)).astype(np.float32) for k, v in drift.items()}
            for _ in range(rounds)]


def run(spec: str, stream: list[dict[str, np.ndarray]], *, feedback: bool) -> list[float]:
    """Relative gap ‖Σ sent − Σ true‖ / ‖Σ true‖ after every round."""
    codec = parse_codec(spec)
    residual: dict[str, np.ndarray] | None = None
    total_sent = {k: np.zeros_like(v, dtype=np.float64) for k, v in stream[0].items()}
    total_true = {k: np.zeros_like(v, dtype=np.float64) for k, v in stream[0].items()}
    gaps = []
    for update in stream:
        parts, left, _ = compress(codec, update, residual if feedback else None)
        for k, v in update.items():
            total_sent[k] += codec.decode(parts[k], v.shape)
            total_true[k] += v
        residual = left
        if feedback:  # the identity behind error feedback: what is missing is exactly the residual
            for k in update:
                np.testing.assert_allclose(total_true[k] - total_sent[k], left[k], atol=1e-4)
        gap = sum(np.sum((total_sent[k] - total_true[k]) ** 2) for k in update) ** 0.5
        gaps.append(gap / sum(np.sum(total_true[k] ** 2) for k in update) ** 0.5)
    return gaps


@pytest.mark.parametrize("spec", LOSSY)
def test_sum_of_sent_tracks_sum_of_true_updates(spec: str) -> None:
    stream = updates(300)
    with_feedback = run(spec, stream, feedback=True)
    without = run(spec, stream, feedback=False)
    assert with_feedback[-1] < 0.1  # off by one residual, not by 300 rounds of error
    assert with_feedback[-1] < with_feedback[30]  # and shrinking relative to the growing sum
    assert without[-1] > 3 * with_feedback[-1]


def test_lossless_codec_carries_nothing() -> None:
    update = updates(1)[0]
    parts, left, metrics = compress(parse_codec("none"), update, None)
    assert left == {} and metrics["codec-error"] == 0.0
    for k, v in update.items():
        np.testing.assert_array_equal(parse_codec("none").decode(parts[k], v.shape), v)


def test_residual_is_added_and_reported() -> None:
    codec = parse_codec("topk:0.1")
    first, second = updates(2, seed=3)
    _, left, m1 = compress(codec, first)
    assert m1["codec-residual-carried"] == 0.0 and 0.5 < m1["codec-error"] < 1.0
    parts, _, m2 = compress(codec, second, left)
    want = {k: second[k] + left[k] for k in second}
    for k, v in want.items():
        for got, expected in zip(parts[k], codec.encode(v), strict=True):
            np.testing.assert_array_equal(got, expected)
    carried = sum(np.sum(left[k].astype(np.float64) ** 2) for k in left) ** 0.5
    assert m2["codec-residual-carried"] == pytest.approx(
        carried / sum(np.sum(second[k].astype(np.float64) ** 2) for k in second) ** 0.5, rel=1e-6)


def test_a_residual_of_another_shape_is_dropped() -> None:
    codec = parse_codec("topk:0.1")
    update = {"a": np.ones((4, 8), np.float32)}
    parts, _, metrics = compress(codec, update, {"a": np.ones((2, 8), np.float32), "gone": np.ones(3, np.float32)})
    np.testing.assert_array_equal(codec.decode(parts["a"], (4, 8)), codec.round_trip(update["a"]))
    assert metrics["codec-residual-carried"] == 0.0


def test_shared_positions_drawn_anew_each_round_deliver_everything_with_feedback() -> None:
    """The ``shared`` codec sends the entries the round's seed draws; the rest (and what the public grid
    clipped or rounded) waits in the residual: sent + residual equals the true total every round, and with
    a new seed each round every entry is delivered (a fixed seed would starve the undrawn ones)."""
    stream = updates(300)
    residual = None
    sent = {k: np.zeros_like(v, dtype=np.float64) for k, v in stream[0].items()}
    true = {k: np.zeros_like(v, dtype=np.float64) for k, v in stream[0].items()}
    for rnd, update in enumerate(stream, start=1):
        codec = parse_codec(f"shared:0.3:0.5@{rnd}")  # a grid wide enough for this stream
        parts, residual, _ = compress(codec, update, residual)
        for k, v in update.items():
            sent[k] += codec.decode(parts[k], v.shape)
            true[k] += v
            np.testing.assert_allclose(true[k] - sent[k], residual[k], atol=1e-4)
    gap = sum(np.sum((sent[k] - true[k]) ** 2) for k in true) ** 0.5 / sum(np.sum(v ** 2) for v in true.values()) ** 0.5
    assert gap < 0.1
