"""DP-DyLoRA (fedpeft.adapters.lora.dynamic): the coordinator's rank draw ignores data, a round at rank b
trains exactly the first b components at scale alpha/b (also per example under opacus), what travels
and what central DP releases lives on those components, the rest stays as broadcast, and error feedback
keeps the residual of components a round does not train."""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from replies import sent as broadcast_of
from toy_models import tiny_lora_bert, toy_task

from client.encoding import encoded_exchange
from fedpeft.adapters import adapter_state
from fedpeft.adapters.lora.dynamic import (
    RankSchedule,
    active_masks,
    draw_rank,
    keep_active,
    project_update,
    split_active,
    train_at_rank,
)
from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.feedback_state import load_residual, save_residual
from fedpeft.protocol import ACTIVE_RANK
from fedpeft.training import padded_batch
from fedpeft.wire import ARRAYS, METRICS, NUM_EXAMPLES, decode_payload, from_array_record, to_array_record
from privacy.central import central_release, clip_update, train_config
from strategies import AGGREGATORS
from strategies.flower import FedPeftStrategy

pytestmark = pytest.mark.usefixtures("server_identity")

NODES = {700 + i: f"partition-{i:05d}" for i in range(8)}


class _NoGrid:
    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"configure_train used grid.{name}")


def global_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"l.lora_A.weight": rng.normal(size=(8, 24)).astype(np.float32),
            "l.lora_B.weight": rng.normal(size=(16, 8)).astype(np.float32),
            "classifier.weight": rng.normal(size=(2, 16)).astype(np.float32)}  # fmt: skip


# ------------------------------------------------------------------------------------- the rank draw


def test_the_drawn_ranks_depend_on_the_seed_and_round_only() -> None:
    """The same seed gives the same ranks whatever the data, partition or federation; another seed other ones;
    every rank of the range comes up about equally often."""
    runs = [FedPeftConfig(lora_dynamic_rank=True, lora_r=8, seed=5),
            FedPeftConfig(lora_dynamic_rank=True, lora_r=8, seed=5, data="tests/data/tiny.jsonl", clients=3,
                          partition="dirichlet:0.1", lr=1.0, rounds=40)]  # fmt: skip
    ranks = [[RankSchedule.of(cfg).rank(t) for t in range(1, 2001)] for cfg in runs]
    assert ranks[0] == ranks[1]
    other = [RankSchedule.of(FedPeftConfig(lora_dynamic_rank=True, lora_r=8, seed=6)).rank(t) for t in range(1, 2001)]
    assert other != ranks[0]
    counts = np.bincount(ranks[0], minlength=9)[1:]
    assert counts.min() > 200 and counts.max() < 300  # uniform on 1..8: 250 each
    assert set(draw_rank(0, t, low=3, high=5) for t in range(100)) == {3, 4, 5}
    assert RankSchedule.of(FedPeftConfig()) is None


def test_the_coordinator_sends_the_same_rank_whatever_sites_and_data_it_has() -> None:
    """The rank is part of every sampled site's request, the same for all, from the schedule alone."""
    schedule = RankSchedule(seed=11, low=1, high=8)
    seen = []
    for sites in (NODES, {800 + i: f"partition-{i:05d}" for i in range(3)}):
        strategy = FedPeftStrategy(aggregator="fedit", sites=sites, fraction=1.0, seed=99, ranks_drawn=schedule)
        per_round = []
        for rnd in (1, 2, 3):
            messages = list(strategy.configure_train(rnd, to_array_record(global_state()), ConfigRecord({}),
                                                     _NoGrid()))
            assert {int(m.content["config"][ACTIVE_RANK]) for m in messages} == {schedule.rank(rnd)}
            per_round.append(schedule.rank(rnd))
        seen.append(per_round)
    assert seen[0] == seen[1]


@pytest.mark.parametrize("strategy", ["lora-fair", "exact-svd", "rolora", "ssf-avg"])
def test_a_rule_that_reads_whole_factors_is_refused(strategy: str) -> None:
    if not AGGREGATORS.get(strategy).linear or AGGREGATORS.get(strategy).adapter != "lora":
        with pytest.raises(FedPeftError, match="cannot train a drawn LoRA rank"):
            FedPeftStrategy(aggregator=strategy, sites=NODES, fraction=1.0, seed=0,
                            ranks_drawn=RankSchedule(seed=0, low=1, high=8))
    with pytest.raises(FedPeftError, match="reads whole factors"):
        FedPeftConfig(lora_dynamic_rank=True, strategy=strategy)


# --------------------------------------------------------------------------------- numpy projections


def test_keep_active_and_projection() -> None:
    glob, other = global_state(0), global_state(1)
    kept = keep_active(other, glob, 3)
    np.testing.assert_array_equal(kept["l.lora_A.weight"][:3], other["l.lora_A.weight"][:3])
    np.testing.assert_array_equal(kept["l.lora_A.weight"][3:], glob["l.lora_A.weight"][3:])
    np.testing.assert_array_equal(kept["l.lora_B.weight"][:, :3], other["l.lora_B.weight"][:, :3])
    np.testing.assert_array_equal(kept["l.lora_B.weight"][:, 3:], glob["l.lora_B.weight"][:, 3:])
    np.testing.assert_array_equal(kept["classifier.weight"], other["classifier.weight"])  # the head: always trained
    masks = active_masks({k: v.shape for k, v in glob.items()}, 3)
    projected = project_update(other, 3)
    for key, value in other.items():
        np.testing.assert_array_equal(projected[key], np.where(masks[key], value, 0.0))
    active, rest = split_active(other, 3)
    for key, value in other.items():
        np.testing.assert_array_equal(active[key] + rest[key], value)
        assert not np.any(active[key][~masks[key]]) and not np.any(rest[key][masks[key]])


# ------------------------------------------------------------------------------------ training at b


def lora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict)]


def test_training_at_rank_b_uses_the_first_b_components_at_alpha_over_b() -> None:
    model = tiny_lora_bert(seed=0).eval()
    for layer in lora_layers(model):  # B starts at zero: give it values so that every component matters
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    layer = lora_layers(model)[0]
    x = torch.randn(3, 5, 32)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    base = layer.base_layer(x)
    full = layer(x)
    with torch.no_grad():
        torch.testing.assert_close(full, base + x @ a.T @ b.T * (8 / 4))
        with train_at_rank(model, 2):
            torch.testing.assert_close(layer(x), base + x @ a[:2].T @ b[:, :2].T * (8 / 2))
        torch.testing.assert_close(layer(x), full)  # hooks removed and scale restored
    assert layer.scaling["default"] == 2.0


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # frozen embeddings: no input needs a gradient
def test_components_above_the_rank_get_exactly_zero_gradient_also_per_example() -> None:
    """Plain autograd and opacus's per-example gradients: zero outside the active block, so per-example
    clipping over the trainable tensors is clipping over the active rank."""
    from opacus.grad_sample import GradSampleModule

    data = toy_task(6, seed=0)
    batch = padded_batch(data, np.arange(6))
    labels = batch.pop("labels")
    model = tiny_lora_bert(seed=1).train()
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    with train_at_rank(model, 2):
        torch.nn.functional.cross_entropy(gsm(**batch).logits, labels, reduction="sum").backward()
    factors = {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert len(factors) == 8
    for name, p in factors.items():
        inactive = p.grad[2:] if "lora_A" in name else p.grad[:, 2:]
        active = p.grad[:2] if "lora_A" in name else p.grad[:, :2]
        assert torch.count_nonzero(inactive) == 0, name
        assert torch.count_nonzero(active) > 0, name
        per_example = p.grad_sample[:, 2:] if "lora_A" in name else p.grad_sample[:, :, 2:]
        assert torch.count_nonzero(per_example) == 0, name
    gsm._close()


# ---------------------------------------------------------------------- what travels, central DP


def client_reply(instruction: Message) -> Message:
    """A site that changes every component and does not clip (a faulty or dishonest one), through the codec
    exchange: the coordinator must project before it clips."""
    site = NODES[instruction.metadata.dst_node_id]

    def handler(msg: Message, ctxt: object) -> Message:
        rng = np.random.default_rng(int(site.split("-")[1]))
        state = {k: (v + rng.normal(size=v.shape)).astype(np.float32)
                 for k, v in from_array_record(msg.content[ARRAYS]).items()}  # fmt: skip
        metrics = MetricRecord({NUM_EXAMPLES: 10})
        return Message(RecordDict({ARRAYS: to_array_record(state), METRICS: metrics}), reply_to=msg)

    shapes = {k: v.shape for k, v in global_state().items()}
    return encoded_exchange(instruction, None, handler, expected=shapes,
                            codec="none", residual_file=__import__("pathlib").Path("/nonexistent/r.npz"))



def test_the_release_is_the_noised_sum_on_the_active_rank_and_inactive_components_stay(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under central DP the aggregate equals (Σ clip_C(projected update) + noise)/m on the round's active
    components, the broadcast elsewhere, and the rule's own code is never called (post-processing of
    the release alone)."""
    sigma, clip, m = 0.8, 0.5, 8
    schedule = RankSchedule(seed=4, low=1, high=8)
    glob = global_state()
    release = partial(central_release, clipping_norm=clip, noise_multiplier=sigma, sample_size=m,
                      rng=np.random.default_rng(21))

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the rule read the sites' factors")

    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=3, uniform_weights=True,
                               bound=partial(clip_update, clipping_norm=clip), release=release,
                               ranks_drawn=schedule)
    monkeypatch.setattr(strategy, "aggregator", dataclasses.replace(strategy.aggregator, pair=never))
    rnd = next(t for t in range(1, 50) if 1 < schedule.rank(t) < 8)
    b = schedule.rank(rnd)
    messages = list(strategy.configure_train(rnd, to_array_record(glob), ConfigRecord(train_config(clipping_norm=clip)),
                                             _NoGrid()))
    sent = broadcast_of(messages[0], glob)
    replies = [client_reply(msg) for msg in messages]
    arrays, metrics = strategy.aggregate_train(rnd, replies)
    got = from_array_record(arrays)

    updates = []
    for reply in replies:  # in site order, as the strategy aggregates them
        update, _ = decode_payload(reply.content, {k: v.shape for k, v in sent.items()})
        updates.append(project_update(update, b))
    want, _ = central_release(updates, clipping_norm=clip, noise_multiplier=sigma, sample_size=m,
                              rng=np.random.default_rng(21))
    masks = active_masks({k: v.shape for k, v in sent.items()}, b)
    for key in sent:
        np.testing.assert_allclose(got[key][masks[key]], (sent[key] + want[key])[masks[key]], atol=1e-6)
        np.testing.assert_array_equal(got[key][~masks[key]], sent[key][~masks[key]])
    assert metrics["active_rank"] == b and metrics["dp_contributions"] == m


def test_error_feedback_keeps_the_residual_of_components_the_round_does_not_train(tmp_path) -> None:
    """A lossy codec at rank b: the inactive part of the carried residual is neither sent nor lost, and the
    sent update is zero outside the active block."""
    glob = global_state()
    residual_file = tmp_path / "r.npz"
    rng = np.random.default_rng(3)
    old = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in glob.items()}


    save_residual(residual_file, old)
    strategy = FedPeftStrategy(aggregator="fedit", sites={1: "partition-00000"}, fraction=1.0, seed=0,
                               ranks_drawn=RankSchedule(seed=0, low=3, high=3))
    (msg,) = strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), _NoGrid())

    def handler(m: Message, ctxt: object) -> Message:
        trained = keep_active({k: v + 0.1 for k, v in from_array_record(m.content[ARRAYS]).items()}, glob, 3)
        return Message(RecordDict({ARRAYS: to_array_record(trained), METRICS: MetricRecord({NUM_EXAMPLES: 4})}),
                       reply_to=m)

    reply = encoded_exchange(msg, None, handler, expected={k: v.shape for k, v in glob.items()}, codec="int8",
                             residual_file=residual_file, active_rank=3)
    sent_update, _ = decode_payload(reply.content, {k: v.shape for k, v in glob.items()})
    new = load_residual(residual_file)
    masks = active_masks({k: v.shape for k, v in glob.items()}, 3)
    for key in glob:
        assert not np.any(sent_update[key][~masks[key]]), key
        np.testing.assert_array_equal(new[key][~masks[key]], old[key][~masks[key]])  # waits, whole
        target = np.where(masks[key], 0.1 + old[key], 0.0)  # what the round meant to send on the block
        np.testing.assert_allclose((sent_update[key] + new[key])[masks[key]], target[masks[key]], atol=1e-5)


def test_a_site_keeps_only_the_active_block_of_what_it_trained() -> None:
    model = tiny_lora_bert(seed=0)
    before = adapter_state(model)
    after = {k: v + 1.0 for k, v in before.items()}
    kept = keep_active(after, before, 1)
    changed = {k: kept[k] != before[k] for k in before}
    for key, mask in active_masks({k: v.shape for k, v in before.items()}, 1).items():
        np.testing.assert_array_equal(changed[key], mask)
