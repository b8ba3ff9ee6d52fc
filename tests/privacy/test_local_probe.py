"""Local DP with probe rounds: the head alone through DP-SGD first, then the adapter, one σ calibrated
over the composed plan, every step accounted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from toy_models import tiny_lora_bert, toy_task

from fedpeft.adapters import adapter_state
from fedpeft.errors import FedPeftError
from fedpeft.probe import probe_plan
from privacy.accounting import epsilon
from privacy.local import LocalPolicy, private_round, run_plan
from privacy.state import account_path, load_account

TRAIN = {"epochs": 1, "max_steps": 3, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.0}


def probe(n: int, **kw) -> dict:
    return {**probe_plan(n, batch_size=kw.get("batch_size", 0), steps=kw.get("steps", 4)), "lr": 0.1,
            "weight_decay": 0.0, "feature_batch_size": 16, **({"runtime": kw["runtime"]} if "runtime" in kw else {})}


def policy(**kw) -> LocalPolicy:
    base = dict(budget=4.0, delta=1e-5, noise_multiplier=0.0, max_grad_norm=1.0, clipping="hooks",
                accountant="rdp", planned_rounds=3, probe_rounds=2)
    return LocalPolicy(**{**base, **kw})


def test_probe_rounds_then_adapter_rounds_spend_one_composed_budget(tmp_path: Path) -> None:
    from fedpeft.runtime import CPU

    pol, data, model = policy(), toy_task(40, seed=0), tiny_lora_bert()
    settings = {**probe(40), "runtime": CPU}
    start = adapter_state(model)
    reports = []
    for rnd in (1, 2, 3):
        before = adapter_state(model)
        reports.append(private_round(pol, model, data, train=TRAIN, probe=settings, site="s", run_id="r",
                                     server_round=rnd, state_dir=tmp_path, generator_seed=rnd))
        moved = {k for k, v in adapter_state(model).items() if not np.array_equal(before[k], v)}
        if rnd <= 2:  # a probe round: the head alone, full batch (q = 1), probe steps
            assert moved and all("classifier" in k for k in moved)
            assert (reports[-1].entry["sample_rate"], reports[-1].entry["steps"]) == (1.0, 4)
        else:
            assert any("lora_B" in k for k in moved)
            assert (reports[-1].entry["sample_rate"], reports[-1].entry["steps"]) == (0.2, 3)
    assert all(r.trained for r in reports) and len({r.entry["noise_multiplier"] for r in reports}) == 1
    account = load_account(account_path(tmp_path, "s", "r"))
    sigma = account.noise_multiplier
    assert account.history == [(sigma, 1.0, 4), (sigma, 1.0, 4), (sigma, 0.2, 3)]
    spent = epsilon(account.history, delta=1e-5, accountant="rdp")
    assert 4.0 - 0.011 <= spent <= 4.0  # calibrated to the whole composed plan, tightly
    assert reports[-1].entry["epsilon"] == pytest.approx(spent)
    assert any(not np.array_equal(start[k], v) for k, v in adapter_state(model).items())


def test_run_plan_composes_probe_and_adapter_rounds() -> None:
    assert run_plan(policy(planned_rounds=5, probe_rounds=2), adapter=(0.1, 7), probe=(1.0, 3)) == \
        [(1.0, 6), (0.1, 21)]
    assert run_plan(policy(planned_rounds=5, probe_rounds=5), adapter=(0.1, 7), probe=(1.0, 3)) == [(1.0, 15)]
    assert run_plan(policy(planned_rounds=5, probe_rounds=0), adapter=(0.1, 7)) == [(0.1, 35)]


def test_delta_at_or_above_one_over_examples_is_refused_naming_the_site(tmp_path: Path) -> None:
    with pytest.raises(FedPeftError, match=r"site hospital-a: delta 0.05 is not below 1/examples \(1/40\)"):
        private_round(policy(delta=0.05, probe_rounds=0), tiny_lora_bert(), toy_task(40, seed=0), train=TRAIN,
                      site="hospital-a", run_id="r", server_round=1, state_dir=tmp_path)
    assert not account_path(tmp_path, "hospital-a", "r").exists()  # nothing spent, nothing written
