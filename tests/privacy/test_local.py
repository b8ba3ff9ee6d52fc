"""A site's private round: σ fixed once for the planned run, accounting persisted across restarts,
budget refusal that spends nothing, signed entries."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from toy_models import tiny_lora_bert, toy_task

from fedpeft.adapters import adapter_state
from fedpeft.config import FedPeftConfig
from privacy.accounting import epsilon
from privacy.ledger import verify_signature
from privacy.local import LocalPolicy, private_round
from privacy.state import account_path, load_account

TRAIN = {"epochs": 1, "max_steps": 3, "batch_size": 8, "lr": 1e-2, "weight_decay": 0.0}


def policy(**kw: Any) -> LocalPolicy:
    base = dict(
        budget=4.0,
        delta=1e-5,
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        clipping="hooks",
        accountant="rdp",
        planned_rounds=3,
    )
    return LocalPolicy(**{**base, **kw})  # type: ignore[arg-type]


def one_round(pol: LocalPolicy, state_dir: Path, rnd: int, model: Any = None, **kw: Any) -> Any:
    return private_round(
        pol,
        model if model is not None else tiny_lora_bert(),
        toy_task(40, seed=0),
        train=TRAIN,
        site="partition-00000",
        run_id="run1",
        server_round=rnd,
        state_dir=state_dir,
        generator_seed=rnd,
        **kw,
    )


def test_policy_from_config_and_a_sites_own_budget() -> None:
    cfg = FedPeftConfig(dp="local", dp_epsilon=8.0, dp_delta=1e-5, rounds=7)
    # probe_rounds auto: a fifth of 7 rounds, rounded, is one probe round
    assert LocalPolicy.from_config(cfg) == LocalPolicy(8.0, 1e-5, 0.0, 1.0, "hooks", "prv", 7, probe_rounds=1)
    assert LocalPolicy.from_config(dataclasses.replace(cfg, probe_rounds=0)).probe_rounds == 0
    assert LocalPolicy.from_config(cfg, site_budget=2.0).budget == 2.0
    only_sigma = FedPeftConfig(dp="local", dp_noise_multiplier=1.0, dp_delta=1e-5)
    assert LocalPolicy.from_config(only_sigma).budget == math.inf


def test_sigma_is_calibrated_once_for_the_planned_run_and_the_budget_holds(tmp_path: Path) -> None:
    pol = policy()
    reports = [one_round(pol, tmp_path, rnd) for rnd in (1, 2, 3)]
    assert all(r.trained for r in reports)
    sigmas = {r.entry["noise_multiplier"] for r in reports}
    assert len(sigmas) == 1  # fixed at the first round, reused
    eps = [r.entry["epsilon"] for r in reports]
    assert eps[0] < eps[1] < eps[2] <= 4.0
    assert eps[2] > 4.0 - 0.011  # calibrated tightly to the budget over the planned 3 rounds
    account = load_account(account_path(tmp_path, "partition-00000", "run1"))
    assert account.history == [(sigmas.pop(), 0.2, 3)] * 3 and account.entries == 3
    assert eps[2] == pytest.approx(epsilon(account.history, delta=1e-5, accountant="rdp"), rel=1e-12)

    # a fourth round (beyond the plan) would pass the budget: refused, nothing trained, nothing spent
    model = tiny_lora_bert()
    before = adapter_state(model)
    refused = one_round(pol, tmp_path, 4, model=model)
    assert not refused.trained and "budget" in refused.reason
    assert refused.entry["status"] == "refused" and refused.entry["steps"] == 0
    assert refused.entry["epsilon"] == pytest.approx(eps[2]) and refused.entry["site_seq"] == 4
    assert all(np.array_equal(before[k], v) for k, v in adapter_state(model).items())
    after = load_account(account_path(tmp_path, "partition-00000", "run1"))
    assert after.history == account.history and after.entries == 4
    assert verify_signature(refused.public_key, refused.entry, refused.signature)


def test_a_round_that_cannot_fit_is_refused_from_the_start(tmp_path: Path) -> None:
    report = one_round(policy(noise_multiplier=0.3, budget=1.0), tmp_path, 1)
    assert not report.trained
    assert load_account(account_path(tmp_path, "partition-00000", "run1")).history == []


def test_entries_are_signed_with_the_sites_key(tmp_path: Path) -> None:
    first, second = one_round(policy(), tmp_path, 1), one_round(policy(), tmp_path, 2)
    assert first.public_key == second.public_key
    for r in (first, second):
        assert verify_signature(r.public_key, r.entry, r.signature)
    assert [first.entry["site_seq"], second.entry["site_seq"]] == [1, 2]
    assert set(first.entry) >= {
        "run_id",
        "site",
        "round",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "delta",
        "epsilon",
        "budget",
        "accountant",
    }
    assert first.metrics["dp-epsilon"] == first.entry["epsilon"]


def test_accounting_survives_a_client_restart(tmp_path: Path) -> None:
    """Round 1 in another process (then gone); round 2 here continues its account."""
    repo = Path(__file__).resolve().parents[2]
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(repo)!r}, {str(repo / "tests")!r}]
        from privacy.local import LocalPolicy, private_round
        from toy_models import tiny_lora_bert, toy_task
        pol = LocalPolicy(4.0, 1e-5, 0.0, 1.0, "hooks", "rdp", 3)
        r = private_round(pol, tiny_lora_bert(), toy_task(40, seed=0), train={TRAIN!r}, site="partition-00000",
                          run_id="run1", server_round=1, state_dir={str(tmp_path)!r})
        print(r.entry["epsilon"])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    eps1 = float(proc.stdout.strip().splitlines()[-1])
    second = one_round(policy(), tmp_path, 2)
    account = load_account(account_path(tmp_path, "partition-00000", "run1"))
    assert len(account.history) == 2 and account.entries == 2 and second.entry["site_seq"] == 2
    assert second.entry["epsilon"] > eps1
    assert second.entry["epsilon"] == pytest.approx(epsilon(account.history, delta=1e-5, accountant="rdp"))


def test_an_unreadable_account_stops_training(tmp_path: Path) -> None:
    path = account_path(tmp_path, "partition-00000", "run1")
    path.parent.mkdir(parents=True)
    path.write_text("{")
    with pytest.raises(ValueError, match="refusing to train"):
        one_round(policy(), tmp_path, 1)


def test_a_site_applies_its_own_budget_and_state_dir(tmp_path: Path) -> None:
    from privacy.local import configured_private_round

    cfg = FedPeftConfig(
        dp="local",
        dp_epsilon=8.0,
        dp_delta=1e-5,
        rounds=2,
        max_local_steps=2,
        batch_size=8,
        dp_accountant="rdp",
        run_id="study",
    )
    report = configured_private_round(
        cfg,
        tiny_lora_bert(),
        toy_task(40, seed=0),
        node_config={"dp-epsilon": "2.5", "state-dir": str(tmp_path / "site")},
        site="hospital-a",
        server_round=1,
    )
    assert report.trained and report.entry["budget"] == 2.5 and report.entry["epsilon"] <= 2.5
    assert load_account(account_path(tmp_path / "site", "hospital-a", "study")).budget == 2.5


def test_entries_the_ledger_lacks_travel_again(tmp_path: Path) -> None:
    """Round 2's reply was lost: the coordinator's ledger holds 1 of the site's entries when round 3 asks."""
    first = one_round(policy(), tmp_path, 1, ledger_seq=0)
    assert first.backlog == ()  # the current entry travels as the entry, never twice
    second = one_round(policy(), tmp_path, 2, ledger_seq=1)
    assert second.backlog == ()
    third = one_round(policy(), tmp_path, 3, ledger_seq=1)  # round 2's reply never arrived
    assert [b["entry"] for b in third.backlog] == [second.entry]
    assert third.backlog[0]["signature"] == second.signature
    account = load_account(account_path(tmp_path, "partition-00000", "run1"))
    assert [s["entry"] for s in account.signed] == [first.entry, second.entry, third.entry]
    assert account.unledgered(None) == [] and len(account.unledgered(0)) == 3
