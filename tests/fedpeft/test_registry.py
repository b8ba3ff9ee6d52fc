"""Registry: register and look up by name, duplicates raise, unknown names list the known ones."""

from __future__ import annotations

import pytest

from fedpeft.adapters import PEFT_METHODS
from fedpeft.errors import FedPeftError
from fedpeft.registry import Registry
from strategies import AGGREGATORS


def test_register_returns_object_and_get_finds_it() -> None:
    reg: Registry[object] = Registry("widget")

    @reg.register("b")
    def b() -> int:
        return 2

    a = reg.register("a")(lambda: 1)
    assert b() == 2  # the decorator returns the function itself
    assert reg.get("a") is a
    assert reg.get("b") is b
    assert reg.names() == ["a", "b"]
    assert list(reg) == ["a", "b"]
    assert "a" in reg and "c" not in reg


def test_duplicate_name_raises() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("x")(1)
    with pytest.raises(ValueError, match="widget 'x' is already registered"):
        reg.register("x")(2)
    assert reg.get("x") == 1  # the first registration is kept


def test_unknown_name_lists_known_names() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("zeta")(1)
    reg.register("alpha")(2)
    with pytest.raises(FedPeftError, match=r"unknown widget 'nope'; known: alpha, zeta"):
        reg.get("nope")


def test_unknown_name_in_empty_registry() -> None:
    with pytest.raises(FedPeftError, match="known: none"):
        Registry("widget").get("x")


def test_builtin_registries_are_filled() -> None:
    assert "lora" in PEFT_METHODS
    assert "fedavg" in AGGREGATORS
    with pytest.raises(FedPeftError, match="fedavg"):
        AGGREGATORS.get("fedprox-typo")
