"""A site's runtime: client ranks, the site objects a process holds, frozen factors, the initial adapter."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedpeft import site
from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.client_round import frozen_parameters, train_client_round
from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError


@pytest.mark.parametrize(
    ("ranks", "pid", "node", "expected"),
    [("", 3, None, 8), ("2,4", 0, None, 2), ("2,4", 1, None, 4), ("2,4", 5, None, 4), ("2,4", 0, 6, 6), ("", 0, 8, 8)],
)
def test_client_rank(ranks: str, pid: int, node: int | None, expected: int) -> None:
    assert site.client_rank(FedPeftConfig(client_ranks=ranks), pid, node) == expected


@pytest.mark.parametrize("node", [0, 9])
def test_client_rank_outside_global_rank_raises(node: int) -> None:
    with pytest.raises(FedPeftError, match="1..lora_r=8"):
        site.client_rank(FedPeftConfig(), 0, node)


def test_at_rank_keeps_alpha_over_r() -> None:
    cfg = FedPeftConfig(lora_r=8, lora_alpha=16, client_ranks="2,8")
    low = site.at_rank(cfg, 2)
    assert (low.lora_r, low.client_ranks) == (2, "")
    assert low.lora_alpha / low.lora_r == cfg.lora_alpha / cfg.lora_r
    assert site.at_rank(cfg, 8) is cfg


@pytest.fixture()
def cfg(tiny_model_dir: Path, small_data: Path) -> FedPeftConfig:
    return FedPeftConfig(model=str(tiny_model_dir), data=str(small_data), lora_r=4, lora_alpha=8, clients=2,
                         max_local_steps=3, batch_size=8, client_cpus=1)


def _node(pid: int) -> dict:
    return {"partition-id": pid, "num-partitions": 2}


def test_initial_adapter_is_the_seeded_init(cfg: FedPeftConfig) -> None:
    held = site.SiteModel(cfg, 2)
    init = {k: v.copy() for k, v in held.initial.items()}
    load_adapter_state(held.model, {k: v + 1.0 for k, v in adapter_state(held.model).items()})  # the model moves on
    assert all(np.array_equal(init[k], held.initial[k]) for k in init)  # ... its initial adapter does not
    fresh = site.SiteModel(cfg, 2).initial  # another process builds the same init
    assert init.keys() == fresh.keys() and all(np.array_equal(init[k], fresh[k]) for k in init)


def test_a_process_shares_one_model_between_the_sites_it_serves(cfg: FedPeftConfig) -> None:
    sites = site.Sites()
    a, b = (sites.site(cfg, _node(pid), label_names=["fresh", "rotten"]) for pid in (0, 1))
    assert a.model is b.model and a.key == "partition-00000" and b.key == "partition-00001"
    assert len(a.data) + len(b.data) == 360 and a.features is not b.features  # each its own data and features
    assert sites.site(cfg, _node(0), label_names=["fresh", "rotten"]) is a  # kept between messages
    other = sites.site(dataclasses.replace(cfg, seed=1), _node(0), label_names=["fresh", "rotten"])
    assert other is not a and other.model is not a.model  # a new run's settings: built again


def test_a_process_holds_a_few_models_and_drops_the_sites_of_one_it_drops(cfg: FedPeftConfig) -> None:
    sites = site.Sites()
    ranks = [1, 2, 3, 4]  # clients of four ranks in one actor: every model stays
    held = [sites.site(cfg, _node(0), label_names=["a", "b"], model_cfg=site.at_rank(cfg, r)) for r in ranks]
    assert [sites.model(site.at_rank(cfg, r), 2) for r in ranks] == [h.model for h in held]
    first = held[0].model
    sites.site(cfg, _node(1), label_names=["a", "b"], model_cfg=site.at_rank(cfg, 2))  # rank 2 is at hand
    assert sites.model(site.at_rank(cfg, 1), 2) is first  # ... so rank 1 still is
    newest = sites.model(dataclasses.replace(cfg, seed=7), 2)  # a fifth setting: the oldest goes
    assert newest is not first and sites.model(site.at_rank(cfg, 2), 2) is held[1].model
    assert sites.model(site.at_rank(cfg, 1), 2) is not first  # built again
    again = sites.site(cfg, _node(0), label_names=["a", "b"], model_cfg=site.at_rank(cfg, 1))
    assert again is not held[0]


def test_frozen_factors_do_not_train_and_are_restored(cfg: FedPeftConfig) -> None:
    held = site.Sites().site(cfg, _node(0), label_names=["fresh", "rotten"])
    model = held.model.model
    load_adapter_state(model, held.model.initial)
    before = adapter_state(model)
    first_adapter_round = cfg.probes + 1  # the probe rounds before it train the head alone
    train_client_round(cfg, model, held.data, server_round=first_adapter_round, partition_id=0, frozen=("lora_A",))
    after = adapter_state(model)
    a_keys = [k for k in before if ".lora_A." in k]
    b_keys = [k for k in before if ".lora_B." in k]
    assert a_keys and b_keys
    assert all(np.array_equal(before[k], after[k]) for k in a_keys)
    assert all(not np.array_equal(before[k], after[k]) for k in b_keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable)  # restored for the next strategy this process serves


def test_freezing_nothing_that_exists_raises(cfg: FedPeftConfig) -> None:
    model = site.SiteModel(cfg, 2).model
    with pytest.raises(FedPeftError, match="no trainable parameter"):
        with frozen_parameters(model, ("lora_Z",)):
            pass


def test_low_rank_client_model(cfg: FedPeftConfig) -> None:
    low = site.at_rank(dataclasses.replace(cfg, client_ranks="2"), 2)
    state = site.SiteModel(low, 2).initial
    shapes = {k: v.shape for k, v in state.items() if ".lora_" in k}
    assert all(s[0] == 2 for k, s in shapes.items() if ".lora_A." in k)
    assert all(s[1] == 2 for k, s in shapes.items() if ".lora_B." in k)
