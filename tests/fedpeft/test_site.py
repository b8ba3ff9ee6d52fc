"""Per-process site helpers: client ranks, frozen factors, the seeded initial adapter."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedpeft import site
from fedpeft.adapters import adapter_state, load_adapter_state
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


def test_initial_adapter_is_the_seeded_init(cfg: FedPeftConfig) -> None:
    model = site.peft_model(cfg, num_labels=2)
    init = site.initial_adapter(cfg, num_labels=2)
    state = adapter_state(model)
    load_adapter_state(model, {k: v + 1.0 for k, v in state.items()})  # the cached model moves on ...
    assert all(np.array_equal(init[k], site.initial_adapter(cfg, num_labels=2)[k]) for k in init)  # ... init not
    site._peft_model.cache_clear()
    fresh = site.initial_adapter(cfg, num_labels=2)  # another process builds the same init
    assert init.keys() == fresh.keys() and all(np.array_equal(init[k], fresh[k]) for k in init)


def test_frozen_factors_do_not_train_and_are_restored(cfg: FedPeftConfig) -> None:
    model = site.peft_model(cfg, num_labels=2)
    load_adapter_state(model, site.initial_adapter(cfg, num_labels=2))
    before = adapter_state(model)
    data = site.encoded_partition(cfg, 0, 2)
    first_adapter_round = cfg.probes + 1  # the probe rounds before it train the head alone
    site.train_client_round(cfg, model, data, server_round=first_adapter_round, partition_id=0, frozen=("lora_A",))
    after = adapter_state(model)
    a_keys = [k for k in before if ".lora_A." in k]
    b_keys = [k for k in before if ".lora_B." in k]
    assert a_keys and b_keys
    assert all(np.array_equal(before[k], after[k]) for k in a_keys)
    assert all(not np.array_equal(before[k], after[k]) for k in b_keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_A." in n for n in trainable)  # restored for the next strategy this process serves


def test_freezing_nothing_that_exists_raises(cfg: FedPeftConfig) -> None:
    model = site.peft_model(cfg, num_labels=2)
    with pytest.raises(FedPeftError, match="no trainable parameter"):
        with site.frozen_parameters(model, ("lora_Z",)):
            pass


def test_low_rank_client_model(cfg: FedPeftConfig) -> None:
    low = site.at_rank(dataclasses.replace(cfg, client_ranks="2"), 2)
    state = adapter_state(site.peft_model(low, num_labels=2))
    shapes = {k: v.shape for k, v in state.items() if ".lora_" in k}
    assert all(s[0] == 2 for k, s in shapes.items() if ".lora_A." in k)
    assert all(s[1] == 2 for k, s in shapes.items() if ".lora_B." in k)
