"""Central DP: the client mod clips whole updates, the release noises the sum of clipped updates with σC
and divides by the fixed sampled cohort m (whoever answered), frozen tensors stay exact, non-linear
aggregators are refused, the accountant states its sampling and neighbours."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from replies import sent as broadcast_of

from client.encoding import encoded_exchange
from fedpeft.errors import FedPeftError
from fedpeft.wire import ARRAYS, METRICS, NUM_EXAMPLES, decode_payload, from_array_record, to_array_record
from privacy.central import (
    KEY_CLIPPING_NORM,
    CentralAccountant,
    calibrate_central_sigma,
    central_release,
    check_composes,
    clip_update,
    clipping_mod,
    train_config,
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


def central_strategy(aggregator: str, *, sigma: float, clip: float, m: int, seed: int = 0, **kw) -> FedPeftStrategy:
    """The strategy as ``RunPrivacy`` configures it for central DP (server clip, release), noise seeded."""
    from functools import partial

    release = partial(central_release, clipping_norm=clip, noise_multiplier=sigma, sample_size=m,
                      rng=np.random.default_rng(seed))
    return FedPeftStrategy(aggregator=aggregator, sites=NODES, fraction=m / len(NODES), seed=3, uniform_weights=True,
                           bound=partial(clip_update, clipping_norm=clip), release=release, **kw)


def central_round(aggregator: str, *, sigma: float, clip: float, scale: float, m: int = 5):
    glob = global_state()
    strategy = central_strategy(aggregator, sigma=sigma, clip=clip, m=m)
    config = ConfigRecord({"lr": 0.1, **train_config(clipping_norm=clip)})
    messages = list(strategy.configure_train(1, to_array_record(glob), config, _NoGrid()))
    assert len(messages) == m and all(msg.content["config"][KEY_CLIPPING_NORM] == clip for msg in messages)
    sent = broadcast_of(messages[0], glob)
    replies = [client_reply(msg, scale) for msg in messages]
    arrays, metrics = strategy.aggregate_train(1, replies)
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
    with pytest.raises(FedPeftError, match="does not average"):
        central_strategy(name, sigma=1.0, clip=1.0, m=5)


def test_accountant_sampling_is_stated_and_amplifies_only_when_sampling() -> None:
    full = CentralAccountant(population=100, sample_size=100, delta=1e-5, budget=math.inf, noise_multiplier=4.0)
    tenth = CentralAccountant(population=100, sample_size=10, delta=1e-5, budget=math.inf, noise_multiplier=4.0)
    assert (full.sampling, tenth.sampling) == ("none", "without-replacement")
    assert full.epsilon() == 0.0
    for _ in range(3):
        full.compose()
        tenth.compose()
    # sampling a tenth amplifies even at half the multiplier (replace-one: sensitivity 2C)
    assert 0 < tenth.epsilon() < full.epsilon()


def test_the_accounted_multiplier_is_sigma_over_the_sensitivity_of_the_sum() -> None:
    """Add/remove one site changes the sum by at most C, replace-one by at most 2C."""
    from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    full = CentralAccountant(population=10, sample_size=10, delta=1e-5, budget=math.inf, noise_multiplier=2.0)
    half = CentralAccountant(population=10, sample_size=5, delta=1e-5, budget=math.inf, noise_multiplier=2.0)
    assert (full.neighbours, full.accounted_sigma) == ("add-or-remove-one", 2.0)
    assert (half.neighbours, half.accounted_sigma) == ("replace-one", 1.0)
    flower = RdpAccountant(PrivacyConfig(target_delta=1e-5, population_size=10,
                                         neighboring_relation=NeighboringRelation.REPLACE_ONE,
                                         sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))
    for _ in range(3):
        half.compose()
        flower.compose(GaussianPrivacyEvent(noise_multiplier=1.0, sample_size=5, population_size=10))
    assert half.epsilon() == pytest.approx(flower.get_epsilon(1e-5))
    assert half.releases == [1.0] * 3


def test_calibrated_sigma_spends_the_budget_over_the_planned_rounds() -> None:
    sigma = calibrate_central_sigma(budget=3.0, delta=1e-5, population=100, sample_size=20, rounds=10)
    acc = CentralAccountant(population=100, sample_size=20, delta=1e-5, budget=3.0, noise_multiplier=sigma)
    for _ in range(10):
        assert not acc.would_exceed()
        acc.compose()
    assert 2.9 < acc.epsilon() <= 3.0
    assert acc.would_exceed()


def test_clip_update_bounds_the_norm_and_leaves_small_updates_alone() -> None:
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
    clip, m = 0.5, 5
    glob = global_state()
    strategy = central_strategy("fedit", sigma=0.0, clip=clip, m=m)
    sent_norms: list[float] = []
    for rnd in range(1, 9):  # residuals build up over rounds
        config = ConfigRecord(train_config(clipping_norm=clip))
        messages = list(strategy.configure_train(rnd, to_array_record(glob), config, _NoGrid()))
        sent = broadcast_of(messages[0], glob)
        replies = [client_reply(msg, 1.0, codec=codec, residual_dir=tmp_path) for msg in messages]
        norms = [update_norm(r, sent) for r in replies]
        sent_norms += norms
        arrays, _ = strategy.aggregate_train(rnd, replies)
        got = from_array_record(arrays)
        step = math.sqrt(sum(float(np.sum((got[k].astype(np.float64) - sent[k]) ** 2)) for k in sent))
        assert step <= clip * (1 + 1e-5)  # the mean of updates of norm <= C
        over = {NODES[r.metadata.src_node_id] for r, n in zip(replies, norms, strict=True) if n > clip * (1 + 1e-6)}
        assert strategy.traffic[rnd].reclipped == over
    assert max(sent_norms) > clip * 1.01  # the codec did send more than C: the bound mattered


def updates_of(n: int, *, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"a": (scale * rng.normal(size=(6, 4))).astype(np.float32),
             "b": (scale * rng.normal(size=3)).astype(np.float32)} for _ in range(n)]  # fmt: skip


def test_the_release_is_the_noised_sum_of_clipped_updates_over_the_fixed_cohort() -> None:
    sigma, clip, m = 1.5, 0.5, 5
    answered = updates_of(3)  # two of the five sampled sites did not answer
    got, metrics = central_release(answered, clipping_norm=clip, noise_multiplier=sigma, sample_size=m,
                                   rng=np.random.default_rng(11))
    clipped = [clip_update(u, clipping_norm=clip)[0] for u in answered]
    noise = np.random.default_rng(11)
    for key in ("a", "b"):  # the noise is drawn key by key, in the updates' order
        total = sum(c[key].astype(np.float64) for c in clipped)
        want = (total + noise.normal(0.0, sigma * clip, total.shape)) / m
        np.testing.assert_allclose(got[key], want, rtol=1e-6, atol=1e-7)
        assert got[key].dtype == np.float32
    assert metrics == {"contributions": 3, "noise_std": pytest.approx(sigma * clip / m), "clipped": 3}
    with pytest.raises(ValueError, match="6 updates for a sampled cohort of 5"):
        central_release(updates_of(6), clipping_norm=clip, noise_multiplier=sigma, sample_size=m,
                        rng=np.random.default_rng(0))


@pytest.mark.parametrize("who", [(0, 1, 2, 3, 4), (0, 2), (3,)])
def test_noise_scale_and_denominator_do_not_depend_on_who_answered(who: tuple[int, ...]) -> None:
    """m · release − Σ contributions is the same noise vector, of std σC, whichever sites answered."""
    sigma, clip, m = 2.0, 0.5, 5
    everyone = [{"w": np.full(4000, 0.001 * (i + 1), np.float32)} for i in range(m)]  # norms below C
    got, metrics = central_release([everyone[i] for i in who], clipping_norm=clip, noise_multiplier=sigma,
                                   sample_size=m, rng=np.random.default_rng(5))
    noise = m * got["w"].astype(np.float64) - sum(everyone[i]["w"].astype(np.float64) for i in who)
    reference = np.random.default_rng(5).normal(0.0, sigma * clip, 4000)
    np.testing.assert_allclose(noise, reference, atol=1e-5)
    assert np.std(noise) == pytest.approx(sigma * clip, rel=0.05)
    assert metrics["noise_std"] == pytest.approx(sigma * clip / m) and metrics["contributions"] == len(who)


def test_a_failed_a_rejected_and_a_silent_site_leave_the_round_to_the_others() -> None:
    """Under central DP a failed, rejected or silent site is one more absent contribution: the round
    releases (Σ clipped updates of the others + noise) / m, never nothing."""
    sigma, clip, m = 1.0, 0.5, 5
    glob = global_state()
    forged: list[str] = []  # the site whose reply the coordinator's check rejects
    strategy = central_strategy("fedit", sigma=sigma, clip=clip, m=m, seed=21,
                                checks=[lambda site, rnd, content: "forged" if site in forged else None])
    config = ConfigRecord(train_config(clipping_norm=clip))
    messages = list(strategy.configure_train(1, to_array_record(glob), config, _NoGrid()))
    sites = [NODES[msg.metadata.dst_node_id] for msg in messages]
    forged.append(sites[2])
    sent = broadcast_of(messages[0], glob)
    replies = [Message(Error(code=0, reason="disk full"), reply_to=messages[0])]  # messages[1]: no reply
    replies += [client_reply(msg, 1.0) for msg in messages[2:]]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None, "the round was voided"
    used = replies[2:]  # sites[3:], in site order
    want, _ = central_release([{k: received(r, sent)[k] - sent[k] for k in sent} for r in used], clipping_norm=clip,
                              noise_multiplier=sigma, sample_size=m, rng=np.random.default_rng(21))
    got = from_array_record(arrays)
    for key in sent:
        np.testing.assert_allclose(got[key], sent[key] + want[key], atol=1e-6)
    assert metrics["clients"] == metrics["dp_contributions"] == len(used) == m - 3
    assert metrics["dp_noise_std"] == pytest.approx(sigma * clip / m)
    status = {row["site"]: (row["status"], row.get("reason", "")) for row in strategy.traffic[1].per_site()}
    assert status[sites[0]] == ("failed", "disk full")
    assert status[sites[1]] == ("no reply", "")
    assert status[sites[2]] == ("rejected", "forged")
    assert sorted(s for s, (st, _) in status.items() if st == "accepted") == sites[3:]


def test_the_release_of_a_secure_sum_is_the_release_of_the_updates_it_sums() -> None:
    """Under secure aggregation the coordinator noises the sum it unmasked: the same release as from the
    updates themselves, for the same noise."""
    from privacy.central import noised_mean_of_sum

    rng = np.random.default_rng(5)
    updates = [{"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)} for _ in range(3)]
    clipped = [clip_update(u, clipping_norm=1.0)[0] for u in updates]
    total = {k: sum(np.asarray(c[k], np.float64) for c in clipped) for k in ("a", "b")}
    want, w_metrics = central_release(updates, clipping_norm=1.0, noise_multiplier=0.7, sample_size=5,
                                      rng=np.random.default_rng(9))
    got, g_metrics = noised_mean_of_sum(total, 3, clipping_norm=1.0, noise_multiplier=0.7, sample_size=5,
                                        rng=np.random.default_rng(9))
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
    assert g_metrics["noise_std"] == w_metrics["noise_std"] == pytest.approx(0.7 / 5)
    with pytest.raises(ValueError, match="6 updates for a sampled cohort of 5"):
        noised_mean_of_sum(total, 6, clipping_norm=1.0, noise_multiplier=0.7, sample_size=5, rng=rng)
