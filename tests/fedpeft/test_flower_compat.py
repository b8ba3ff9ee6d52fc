"""fedpeft/deploy/flower_compat.py: every Flower internal fedpeft relies on is checked, and a missing or changed one
is one line naming it; no other product module reaches past Flower's public API."""

from __future__ import annotations

import ast
import importlib
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from fedpeft.deploy import flower_compat
from fedpeft.deploy.flower_compat import NAMES, POINTS, PULL_REBINDS, Point, check
from fedpeft.errors import FedPeftError

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("fedpeft", "client", "server", "strategies", "privacy")
COMPAT = Path("fedpeft/deploy/flower_compat.py")
PUBLIC = frozenset({"flwr.app", "flwr.clientapp", "flwr.clientapp.mod", "flwr.serverapp", "flwr.serverapp.strategy",
                    "flwr.simulation"})


def refusal(point: Point) -> FedPeftError:
    """check()'s error, which must be one line naming the point and the installed Flower."""
    with pytest.raises(FedPeftError) as raised:
        check()
    message = str(raised.value)
    assert "\n" not in message, message
    assert point.where in message, message
    assert f"Flower {flower_compat.flower_version()}:" in message, message
    return raised.value


def holder(point: Point) -> tuple[Any, str]:
    """The object whose own attribute the point is (for a class's method: the class in its MRO defining it)."""
    owner: Any = importlib.import_module(point.module)
    *path, last = point.name.split(".")
    for part in path:
        owner = getattr(owner, part)
    if isinstance(owner, type):
        owner = next(k for k in owner.__mro__ if last in vars(k))
    return owner, last


def test_check_passes_on_the_installed_flower() -> None:
    check()


@pytest.mark.parametrize("point", POINTS, ids=lambda p: p.where)
def test_a_point_this_flower_lacks_is_one_line_naming_it(point: Point, monkeypatch: pytest.MonkeyPatch) -> None:
    owner, name = holder(point)
    monkeypatch.delattr(owner, name)
    refusal(point)


@pytest.mark.parametrize("point", [p for p in POINTS if p.params], ids=lambda p: p.where)
def test_a_changed_signature_is_one_line_naming_the_point(point: Point, monkeypatch: pytest.MonkeyPatch) -> None:
    def changed(*, something_else: int = 0) -> None:  # callable, but without the parameters fedpeft passes
        pass

    owner, name = holder(point)
    monkeypatch.setattr(owner, name, changed)
    message = str(refusal(point))
    assert "takes no parameter" in message or "is no longer" in message, message


@pytest.mark.parametrize("point", [p for p in POINTS if p.attrs or p.fields or p.kind], ids=lambda p: p.where)
def test_a_value_of_another_shape_is_one_line_naming_the_point(point: Point, monkeypatch: pytest.MonkeyPatch) -> None:
    owner, name = holder(point)
    monkeypatch.setattr(owner, name, lambda: None)  # no attributes, no protobuf fields, and a function, not a value
    refusal(point)


@pytest.mark.parametrize("point", list(PULL_REBINDS.values()), ids=lambda p: p.where)
def test_a_rebinding_whose_target_is_not_flowers_own_is_refused(point: Point, monkeypatch: pytest.MonkeyPatch) -> None:
    original = getattr(importlib.import_module(point.module), point.name)
    monkeypatch.setattr(importlib.import_module(point.module), point.name, lambda *a, initial_backoff=1.0: original)
    assert "is no longer flwr.supercore.inflatable.inflatable_utils" in str(refusal(point))
    with pytest.raises(FedPeftError, match="is no longer"):
        flower_compat.eager_object_pulls(point.module)  # each rebinding checks its own target too


@pytest.mark.parametrize("module", sorted({p.module for p in POINTS}))
def test_a_module_that_does_not_import_is_one_line_not_a_traceback(module: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what `import module` then raises: ImportError
    with pytest.raises(FedPeftError, match=r"cannot be imported \(ModuleNotFoundError") as raised:
        check()
    assert f"Flower {flower_compat.flower_version()}: {module}." in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_re_exported_name_is_flowers_own_and_an_unknown_one_is_an_attribute_error() -> None:
    for name, point in NAMES.items():
        assert getattr(flower_compat, name) is getattr(importlib.import_module(point.module), point.name), name
    with pytest.raises(AttributeError, match="no_such_name"):
        flower_compat.no_such_name  # noqa: B018


def test_a_name_that_does_not_resolve_raises_at_its_import(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.server.strategy import aggregate

    monkeypatch.delitem(vars(flower_compat), "aggregate_median", raising=False)  # not resolved yet
    monkeypatch.delattr(aggregate, "aggregate_median")
    with pytest.raises(FedPeftError, match=r"flwr\.server\.strategy\.aggregate\.aggregate_median is missing"):
        from fedpeft.deploy.flower_compat import aggregate_median  # noqa: F401


def test_the_superexec_poll_is_set_through_the_variable_flower_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.superexec import run_superexec

    monkeypatch.delenv(run_superexec._TASK_POLL_INTERVAL_ENV, raising=False)
    flower_compat.superexec_task_poll(0.2)
    assert os.environ[run_superexec._TASK_POLL_INTERVAL_ENV] == "0.2"
    assert run_superexec._get_task_poll_interval() == 0.2  # what Flower's SuperExec will wait
    flower_compat.superexec_task_poll(0.5)
    assert os.environ[run_superexec._TASK_POLL_INTERVAL_ENV] == "0.2"  # one the user set is kept


def test_a_task_clients_object_pulls_are_wrapped_or_refused() -> None:
    class Client:
        def PullObject(self, request: object) -> str:  # noqa: N802 — Flower's name
            return f"pulled {request}"

    client = Client()
    flower_compat.watch_object_pulls(client, lambda pull: lambda request: pull(request).upper())
    assert client.PullObject("x") == "PULLED X"
    with pytest.raises(FedPeftError, match=r"RuntimeHttpClient\.PullObject is missing on object"):
        flower_compat.watch_object_pulls(object(), lambda pull: pull)


def test_a_deployed_grid_pulls_replies_eagerly_and_simulations_grid_is_left_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.superlink.grid import http_grid, inmemory_grid

    from fedpeft.deploy.objects import FIRST_RETRY

    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)  # restored after the test
    assert not flower_compat.eager_reply_pulls(object.__new__(inmemory_grid.InMemoryGrid))  # nothing to pull
    assert not hasattr(http_grid.pull_objects, "keywords")
    assert flower_compat.eager_reply_pulls(object.__new__(http_grid.HttpGrid))  # what flwr-serverapp hands a run
    assert http_grid.pull_objects.keywords == {"initial_backoff": FIRST_RETRY}


# --- no product module reaches past Flower's public API --------------------------------------------------


def flower_imports(source: str) -> list[tuple[int, str]]:
    """``(line, module)`` of each Flower module ``source`` imports, statically or by ``import_module``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            if node.module == "flwr":  # from flwr import supernode
                found += [(node.lineno, f"flwr.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and \
                isinstance(node.args[0].value, str) and \
                (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) in ("import_module", "__import__"):
            found.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in found if name == "flwr" or name.startswith("flwr.")]


def non_public(source: str) -> list[tuple[int, str]]:
    return [(line, name) for line, name in flower_imports(source) if name not in PUBLIC and name != "flwr"]


def test_the_scan_finds_what_it_must() -> None:
    source = ("import flwr.common.serde\nfrom flwr.proto.message_pb2 import Message\nfrom flwr import supernode\n"
              "from flwr.app import Message\nfrom flwr.clientapp.mod import fixedclipping_mod\nimport flwr_datasets\n"
              "from flwr.serverapp.strategy import Strategy\nimport importlib\n"
              "importlib.import_module('flwr.supercore.run')\ndef f():\n    from flwr.app.message import x\n")
    assert non_public(source) == [(1, "flwr.common.serde"), (2, "flwr.proto.message_pb2"), (3, "flwr.supernode"),
                                  (9, "flwr.supercore.run"), (11, "flwr.app.message")]


def test_no_product_module_but_the_compat_module_imports_flowers_internals() -> None:
    offending = []
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative == COMPAT:
                continue
            offending += [f"{relative}:{line}: {name}" for line, name in non_public(path.read_text())]
    assert not offending, "import these through fedpeft/deploy/flower_compat.py:\n" + "\n".join(offending)



@pytest.mark.parametrize("command", [
    ["link", "--certs", "/no/certs", "--state-dir", "/no/state", "--print"],
    ["node", "--link", "h:1", "--ca", "/no/ca.crt", "--key", "/no/k", "--data", "/no/d.jsonl", "--print"],
])
def test_fedpeft_link_and_node_check_flower_first(command: list[str], monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from flwr.supernode import start_client_internal

    from fedpeft.cli.main import main

    monkeypatch.delattr(start_client_internal, "_push_messages")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedpeft: error: Flower ") and err.count("\n") == 1
    assert "flwr.supernode.start_client_internal._push_messages is missing" in err
