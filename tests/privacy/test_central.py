"""Central DP: the client mod clips whole updates, Flower's wrapper noises the uniform average at σC/m,
frozen tensors stay exact, non-linear aggregators are refused, the accountant states its sampling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from replies import sent as broadcast_of

from client.transport import encoded_exchange
from fedpeft.errors import FedPeftError
from fedpeft.wire import ARRAYS, METRICS, NUM_EXAMPLES, decode_payload, from_array_record, to_array_record
from privacy.central import (
    KEY_CLIPPING_NORM,
    CentralAccountant,
    calibrate_central_sigma,
    check_composes,
    clipping_mod,
    wrap_strategy,
)
from strategies import AGGREGATORS
from strategies.flower import FedPeftStrategy

pytestmark = pytest.mark.usefixtures("server_identity")

NODES = {500 + i: f"partition-{i:05d}" for i in range(10)}


class _NoGrid:
    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"configure_train used grid.{name}")


def global_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"l.lora_A.weight": rng.normal(size=(8, 160)).astype(np.float32),
            "l.lora_B.weight": np.zeros((160, 8), np.float32),
            "head.weight": rng.normal(size=(2, 64)).astype(np.float32)}  # fmt: skip


def trained(sent: dict[str, np.ndarray], site: str, scale: float) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + int(site.split("-")[1]))
    return {k: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in sent.items()}


def client_reply(
    instruction: Message, scale: float, *, codec: str = "none", residual_dir: Path | None = None
) -> Message:
    """What the ClientApp's train handler returns, through the site's mods as Flower runs them:
    the codec exchange (outermost) around :func:`clipping_mod` around the handler."""
    site = NODES[instruction.metadata.dst_node_id]

    def handler(msg: Message, ctxt: object) -> Message:
        state = trained(from_array_record(msg.content[ARRAYS]), site, scale)
        metrics = MetricRecord({NUM_EXAMPLES: 10 + int(site.split("-")[1]), "train-loss": 0.5})
        return Message(RecordDict({ARRAYS: to_array_record(state), METRICS: metrics}), reply_to=msg)

    shapes = {k: v.shape for k, v in broadcast_of(instruction, global_state()).items()}
    residual = (residual_dir or Path("/nonexistent")) / f"{site}.npz"
    return encoded_exchange(instruction, None, lambda m, c: clipping_mod(m, c, handler), expected=shapes,
                            codec=codec, residual_file=residual)


def received(reply: Message, sent: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the server reconstructs from a reply: the broadcast plus the decoded update."""
    update, _ = decode_payload(reply.content, {k: v.shape for k, v in sent.items()})
    return {k: sent[k] + update[k] for k in sent}


def central_round(aggregator: str, *, sigma: float, clip: float, scale: float, m: int = 5):
    glob = global_state()
    strategy = FedPeftStrategy(
        aggregator=aggregator, sites=NODES, fraction=m / len(NODES), seed=3, uniform_weights=True
    )
    wrapped = wrap_strategy(strategy, noise_multiplier=sigma, clipping_norm=clip, sample_size=m)
    messages = list(wrapped.configure_train(1, to_array_record(glob), ConfigRecord({"lr": 0.1}), _NoGrid()))
    assert all(msg.content["config"][KEY_CLIPPING_NORM] == clip for msg in messages)
    sent = broadcast_of(messages[0], glob)
    replies = [client_reply(msg, scale) for msg in messages]
    arrays, metrics = wrapped.aggregate_train(1, replies)
    return sent, replies, from_array_record(arrays), metrics, glob


def update_norm(reply: Message, sent: dict[str, np.ndarray]) -> float:
    got = received(reply, sent)
    return float(np.sqrt(sum(np.sum((got[k].astype(np.float64) - sent[k]) ** 2) for k in sent)))


@pytest.mark.parametrize("aggregator", ["fedit", "ffa-lora"])
def test_clipped_uniform_average_without_noise(aggregator: str) -> None:
    sent, replies, got, metrics, glob = central_round(aggregator, sigma=0.0, clip=0.5, scale=1.0)
    for reply in replies:
        assert update_norm(reply, sent) == pytest.approx(0.5, rel=1e-4)  # clipped at the site
    clipped = [received(r, sent) for r in replies]
    for key in sent:
        np.testing.assert_allclose(got[key], np.mean([c[key] for c in clipped], axis=0), atol=1e-6)  # uniform
    if aggregator == "ffa-lora":
        assert "l.lora_A.weight" not in sent
        np.testing.assert_array_equal(got["l.lora_A.weight"], glob["l.lora_A.weight"])


def test_small_updates_are_not_clipped() -> None:
    sent, replies, _, _, _ = central_round("fedit", sigma=0.0, clip=1e3, scale=0.01)
    for reply in replies:
        want = trained(sent, NODES[reply.metadata.src_node_id], 0.01)
        got = received(reply, sent)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-9)  # subtract-and-add rounding


@pytest.mark.parametrize("aggregator", ["fedit", "ffa-lora"])
def test_noise_on_the_average_has_std_sigma_c_over_m(aggregator: str) -> None:
    sigma, clip, m = 4.0, 0.5, 5
    sent, replies, got, _, _ = central_round(aggregator, sigma=sigma, clip=clip, scale=1.0, m=m)
    clipped = [received(r, sent) for r in replies]
    noise = np.concatenate([(got[k] - np.mean([c[k] for c in clipped], axis=0)).ravel() for k in sent])
    assert noise.size >= 600
    assert np.std(noise) == pytest.approx(sigma * clip / m, rel=0.08)


def test_client_mod_passes_through_without_a_clipping_norm() -> None:
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=0.5, seed=3)
    glob = global_state()
    (msg, *_) = strategy.configure_train(1, to_array_record(glob), ConfigRecord({"lr": 0.1}), _NoGrid())
    sent = broadcast_of(msg, glob)
    reply = client_reply(msg, scale=5.0)
    assert update_norm(reply, sent) > 50


@pytest.mark.parametrize("name", ["lora-fair", "lora-fair-ab", "exact-svd"])
def test_non_linear_aggregators_are_refused(name: str) -> None:
    with pytest.raises(FedPeftError, match="use one of: fedit, ffa-lora"):
        check_composes(AGGREGATORS.get(name))
    strategy = FedPeftStrategy(aggregator=name, sites=NODES, fraction=0.5, seed=0)
    with pytest.raises(FedPeftError, match="not post-processing"):
        wrap_strategy(strategy, noise_multiplier=1.0, clipping_norm=1.0, sample_size=5)


def test_accountant_sampling_is_stated_and_amplifies_only_when_sampling() -> None:
    full = CentralAccountant(population=10, sample_size=10, delta=1e-5, budget=math.inf, noise_multiplier=1.0)
    half = CentralAccountant(population=10, sample_size=5, delta=1e-5, budget=math.inf, noise_multiplier=1.0)
    assert (full.sampling, half.sampling) == ("none", "without-replacement")
    assert full.epsilon() == 0.0
    for _ in range(3):
        full.compose(10)
        half.compose(5)
    assert 0 < half.epsilon() < full.epsilon()


def test_fewer_replies_are_accounted_with_a_smaller_effective_sigma() -> None:
    a = CentralAccountant(population=10, sample_size=5, delta=1e-5, budget=math.inf, noise_multiplier=2.0)
    b = CentralAccountant(population=10, sample_size=5, delta=1e-5, budget=math.inf, noise_multiplier=2.0)
    assert a.effective_sigma(4) == pytest.approx(1.6)
    assert a.compose(5) < b.compose(4)


def test_calibrated_sigma_spends_the_budget_over_the_planned_rounds() -> None:
    sigma = calibrate_central_sigma(budget=3.0, delta=1e-5, population=100, sample_size=20, rounds=10)
    acc = CentralAccountant(population=100, sample_size=20, delta=1e-5, budget=3.0, noise_multiplier=sigma)
    for _ in range(10):
        assert not acc.would_exceed()
        acc.compose(20)
    assert 2.9 < acc.epsilon() <= 3.0
    assert acc.would_exceed()


def test_clip_update_bounds_the_norm_and_leaves_small_updates_alone() -> None:
    from privacy.central import clip_update

    rng = np.random.default_rng(0)
    big = {"a": rng.normal(size=(8, 8)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    clipped, changed = clip_update(big, clipping_norm=0.5)
    assert changed
    assert math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in clipped.values())) == pytest.approx(0.5)
    ratio = clipped["a"] / big["a"]
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-6)  # a scaling, not a projection
    small = {k: v * 1e-3 for k, v in big.items()}
    same, changed = clip_update(small, clipping_norm=0.5)
    assert not changed and same is small


@pytest.mark.parametrize("codec", ["int4", "topk:0.1+int8", "ternary"])
def test_lossy_codec_with_error_feedback_stays_within_the_clipping_norm(codec: str, tmp_path: Path) -> None:
    """Error feedback lets a site send more than C; the server clips what it decoded to C again."""
    from functools import partial

    from privacy.central import clip_update

    clip, m = 0.5, 5
    glob = global_state()
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=m / len(NODES), seed=3, uniform_weights=True,
                               bound=partial(clip_update, clipping_norm=clip))
    wrapped = wrap_strategy(strategy, noise_multiplier=0.0, clipping_norm=clip, sample_size=m)
    sent_norms: list[float] = []
    for rnd in range(1, 9):  # residuals build up over rounds
        messages = list(wrapped.configure_train(rnd, to_array_record(glob), ConfigRecord({}), _NoGrid()))
        sent = broadcast_of(messages[0], glob)
        replies = [client_reply(msg, 1.0, codec=codec, residual_dir=tmp_path) for msg in messages]
        norms = [update_norm(r, sent) for r in replies]
        sent_norms += norms
        arrays, _ = wrapped.aggregate_train(rnd, replies)
        got = from_array_record(arrays)
        step = math.sqrt(sum(float(np.sum((got[k].astype(np.float64) - sent[k]) ** 2)) for k in sent))
        assert step <= clip * (1 + 1e-5)  # the mean of updates of norm <= C
        over = {NODES[r.metadata.src_node_id] for r, n in zip(replies, norms, strict=True) if n > clip * (1 + 1e-6)}
        assert strategy.traffic[rnd].reclipped == over
    assert max(sent_norms) > clip * 1.01  # the codec did send more than C: the bound mattered
