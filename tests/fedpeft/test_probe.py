"""Linear-probe rounds: the head's inputs computed once, the head alone trained on them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from toy_models import tiny_lora_bert, tiny_ssf_bert, toy_task

from fedpeft.adapters import adapter_state
from fedpeft.client_round import train_client_round
from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.probe import FeatureCache, HeadProbe, head_inputs, head_module, probe_plan
from fedpeft.site import SiteModel
from fedpeft.training import padded_batch


@pytest.mark.parametrize("make", [tiny_lora_bert, tiny_ssf_bert])
def test_head_inputs_are_what_the_head_reads_in_the_full_forward(make) -> None:
    model = make(seed=3)
    model.eval()
    data = toy_task(23, seed=1)  # lengths vary: inputs are computed in length order, returned in data order
    inputs = head_inputs(model, data, batch_size=5)
    assert inputs.features.shape[0] == 23 and np.array_equal(inputs.labels, data.labels)
    batch = padded_batch(data, np.arange(23))
    batch.pop("labels")
    with torch.no_grad():
        want = model(**batch).logits
        got = HeadProbe(head_module(model))(inputs.features).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_head_inputs_are_cached_until_the_adapter_or_the_data_change() -> None:
    model = tiny_lora_bert(seed=1)
    data = toy_task(12, seed=0)
    cache = FeatureCache()
    first = head_inputs(model, data, batch_size=4, cache=cache)
    assert head_inputs(model, data, batch_size=4, cache=cache) is first
    assert head_inputs(model, data, batch_size=4) is not first  # no cache: computed again
    assert head_inputs(model, toy_task(12, seed=5), batch_size=4, cache=cache) is not first
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.add_(0.5)
    again = head_inputs(model, data, batch_size=4, cache=cache)
    assert again is not first and not torch.allclose(again.features, first.features)


def test_the_feature_cache_drops_the_oldest_entry_past_its_budget() -> None:
    model = tiny_lora_bert(seed=1)
    one = head_inputs(model, toy_task(12, seed=0), batch_size=4)
    cache = FeatureCache(max_bytes=int(1.5 * one.features.nelement() * one.features.element_size()))
    cache.put("a", "x", one)
    cache.put("b", "x", one)
    assert cache.get("a", "x") is None and cache.get("b", "x") is one
    assert cache.get("b", "y") is None  # another adapter: a miss


def test_probe_plan_full_batch_and_minibatch() -> None:
    assert probe_plan(100, batch_size=0, steps=7) == {"epochs": 7, "max_steps": 7, "batch_size": 100}
    assert probe_plan(100, batch_size=30, steps=7) == {"epochs": 28, "max_steps": 7, "batch_size": 30}
    assert probe_plan(10, batch_size=64, steps=2)["batch_size"] == 10


def test_a_probe_round_trains_the_head_alone_and_later_rounds_the_adapter(tiny_st_model_dir) -> None:
    cfg = FedPeftConfig(model=str(tiny_st_model_dir), rounds=2, probe_rounds=1, probe_steps=5, probe_lr=0.05,
                        max_local_steps=2, batch_size=4, lr=0.05)
    model = SiteModel(cfg, 2).model
    data = toy_task(16, seed=2)
    start = adapter_state(model)
    metrics = train_client_round(cfg, model, data, server_round=1, partition_id=0)
    assert metrics["steps"] == 5 and metrics["examples_seen"] == 5 * 16  # full batch
    after = adapter_state(model)
    moved = {k for k in start if not np.array_equal(start[k], after[k])}
    assert moved and all("classifier" in k for k in moved)  # only the head moved
    train_client_round(cfg, model, data, server_round=2, partition_id=0)
    later = adapter_state(model)
    assert any("lora_B" in k and not np.array_equal(after[k], later[k]) for k in later)


def test_probe_needs_class_labels() -> None:
    from fedpeft.training import Encoded

    tokens = Encoded(input_ids=[[1, 2, 3]], labels=[[-100, 2, 3]], pad_id=0)
    with pytest.raises(FedPeftError, match="seq-cls only"):
        head_inputs(tiny_lora_bert(), tokens, batch_size=2)


def test_probe_settings_are_refused_for_causal_lm() -> None:
    with pytest.raises(FedPeftError, match="probe_rounds is a seq-cls setting"):
        FedPeftConfig(task="causal-lm", model="x", data="y", probe_rounds=1)
    with pytest.raises(FedPeftError, match="probe_rounds must lie in 0..rounds=2"):
        FedPeftConfig(rounds=2, probe_rounds=3)
    with pytest.raises(FedPeftError, match="probe_lr must be a finite number > 0"):
        dataclasses.replace(FedPeftConfig(), probe_lr=0.0)


@pytest.mark.parametrize("make", [tiny_lora_bert, tiny_ssf_bert])
def test_probed_evaluation_equals_the_full_one(make) -> None:
    from fedpeft.probe import evaluate_probed
    from fedpeft.training import evaluate

    model = make(seed=5)
    data = toy_task(30, seed=4)
    want = evaluate(model, data, batch_size=7)
    got = evaluate_probed(model, data, batch_size=7)
    assert got["accuracy"] == want["accuracy"] and got["num_examples"] == 30
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_head_inputs_of_many_sites_stay_cached_in_one_process() -> None:
    model = tiny_lora_bert(seed=2)
    sites = [toy_task(8, seed=s) for s in range(12)]  # a simulation actor serves every site in turn
    cache = FeatureCache()
    first = [head_inputs(model, d, batch_size=4, cache=cache) for d in sites]
    assert all(head_inputs(model, d, batch_size=4, cache=cache) is f for d, f in zip(sites, first, strict=True))
