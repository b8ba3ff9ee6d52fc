"""A site's privacy account survives on disk, is written atomically and never silently reset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from privacy.state import RoundSpend, SiteAccount, account_path, load_account, save_account


def account(**kw: object) -> SiteAccount:
    base = dict(
        run_id="run1",
        site="partition-00001",
        accountant="prv",
        delta=1e-5,
        budget=8.0,
        noise_multiplier=1.1,
        max_grad_norm=1.0,
    )
    return SiteAccount(**{**base, **kw})  # type: ignore[arg-type]


def test_round_trip(tmp_path: Path) -> None:
    path = account_path(tmp_path, "partition-00001", "run1")
    assert path == tmp_path / "partition-00001" / "privacy-run1.json"
    assert load_account(path) is None
    a = account().spend(RoundSpend(1, 1.1, 0.2, 5)).counted().spend(RoundSpend(3, 1.1, 0.2, 5)).counted()
    save_account(path, a)
    again = load_account(path)
    assert again == a and again.history == [(1.1, 0.2, 5), (1.1, 0.2, 5)] and again.entries == 2
    save_account(path, account(budget=math.inf))
    assert load_account(path).budget == math.inf
    assert not list(path.parent.glob(".*"))  # no temporary file left behind


def test_unreadable_account_refuses_instead_of_resetting(tmp_path: Path) -> None:
    path = account_path(tmp_path, "s", "r")
    path.parent.mkdir(parents=True)
    path.write_text('{"version": 1, "rounds": [')
    with pytest.raises(ValueError, match="refusing to train"):
        load_account(path)


def test_names_are_made_safe(tmp_path: Path) -> None:
    assert account_path(tmp_path, "site/../x", "r:1").parent.name == "site_.._x"
    with pytest.raises(ValueError):
        account_path(tmp_path, "..", "r")
