"""Flower's internals: every name fedpeft takes from outside Flower's public API, and every change it makes to
Flower's behaviour. Nothing else in fedpeft, ``client/``, ``server/``, ``strategies/`` or ``privacy/`` imports a
non-public Flower module (``tests/fedpeft/test_flower_compat.py`` scans them).

Flower's public API is ``flwr.app``, ``flwr.clientapp`` (with ``flwr.clientapp.mod``), ``flwr.serverapp`` (with
``flwr.serverapp.strategy``) and ``flwr.simulation``. What fedpeft needs beyond it, each a :class:`Point`:

- the site worker in SuperExec's place (``client/worker/tasks.py``): the Runtime API client, its interceptors,
  requests and retries, the task calls ``flwr-clientapp`` makes (``pull_task_input``, ``push_message``,
  ``push_task_output``), the heartbeat, the message (de)serialisation for the note of the task in hand;
- message sizes for ``traffic.jsonl`` (``recorddict_to_proto``), the train config's clipping-norm key of
  Flower's central DP, the coordinate-wise median and trimmed mean (``strategies/robust.py``);
- ``flower-supernode`` itself, run by ``python -m fedpeft.deploy.supernode``.

And what fedpeft changes, each function below checking its target before it changes anything:

- :func:`eager_object_pulls`: object pulls retry first after :data:`fedpeft.deploy.objects.FIRST_RETRY` in the
  SuperNode's loop, the site worker's task input and the deployed ServerApp's grid (:data:`PULL_REBINDS`);
- :func:`patch_supernode_loop`: the SuperNode loop's sleeps and its ``_push_messages``
  (:mod:`fedpeft.deploy.supernode` says why);
- :func:`superexec_task_poll`: the environment variable Flower's SuperExec reads its task poll interval from;
- :func:`watch_object_pulls`: ``PullObject`` of one task's Runtime API client.

Names are re-exported lazily (``from fedpeft.deploy.flower_compat import RuntimeHttpClient`` imports Flower's
module on first use only), and each is verified when first resolved. :func:`check`, run by ``fedpeft node``,
``fedpeft link`` and at the ServerApp's start, verifies every point at once: that its module imports, that the
name exists, for callables that ``inspect.signature`` has the parameters fedpeft passes, the attributes and
protobuf fields fedpeft uses, and for each rebinding that the target is still Flower's own. Any failure is a
:class:`~fedpeft.errors.FedPeftError` of one line naming the point and the installed Flower version.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from fedpeft.deploy.objects import FIRST_RETRY
from fedpeft.errors import FedPeftError


@dataclass(frozen=True)
class Point:
    """One thing fedpeft takes from Flower: ``module``'s ``name`` (dotted for a class's attribute), with what
    fedpeft relies on."""

    module: str
    name: str
    params: tuple[str, ...] = ()  # parameters fedpeft passes (a callable's, by inspect.signature)
    attrs: tuple[str, ...] = ()  # attributes fedpeft uses (a class's or an enum's)
    fields: tuple[str, ...] = ()  # fields fedpeft sets or reads (a protobuf message's)
    kind: tuple[type, ...] = ()  # what the value must be an instance of (constants)
    same_as: str = ""  # a rebinding's target: must still be this Flower function (or fedpeft's eager copy of it)

    @property
    def where(self) -> str:
        return f"{self.module}.{self.name}"


_RUN_CLIENTAPP = "flwr.supernode.runtime.run_clientapp"
_LOOP = "flwr.supernode.start_client_internal"
_HTTP_GRID = "flwr.superlink.grid.http_grid"
_INFLATABLE = "flwr.supercore.inflatable.inflatable_utils"
_RUNTIME_PB2 = "flwr.proto.runtime_pb2"

# the names re-exported here: exported name → where Flower keeps it
NAMES: dict[str, Point] = {
    # messages: the note of a worker's task in hand, and sizes for traffic.jsonl
    "remove_content_from_message": Point("flwr.app.message", "remove_content_from_message", ("message",)),
    "message_from_proto": Point("flwr.common.serde", "message_from_proto", ("message_proto",)),
    "message_to_proto": Point("flwr.common.serde", "message_to_proto", ("message",)),
    "recorddict_to_proto": Point("flwr.common.serde", "recorddict_to_proto", ("recorddict",)),
    "ProtoMessage": Point("flwr.proto.message_pb2", "Message", attrs=("ParseFromString", "SerializeToString")),
    # the site worker's Runtime API calls, as flwr-clientapp and Flower's SuperExec make them
    "RuntimeHttpClient": Point("flwr.supercore.runtime", "RuntimeHttpClient",
                               attrs=("AcquireTask", "PullPendingTasks", "SendTaskHeartbeat", "close")),
    "RuntimeTokenHttpInterceptor": Point("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor", ("token",)),
    "RuntimeVersionHttpInterceptor": Point("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor",
                                           ("component_name",)),
    "SuperExecAuthHttpInterceptor": Point("flwr.supercore.interceptors", "SuperExecAuthHttpInterceptor",
                                          ("master_secret", "protected_methods")),
    "SUPEREXEC_AUTH_METHODS": Point("flwr.supercore.superexec.run_superexec", "_SUPEREXEC_AUTH_METHODS",
                                    kind=(frozenset, set)),
    "AcquireTaskRequest": Point(_RUNTIME_PB2, "AcquireTaskRequest", fields=("supported_task_types",
                                                                            "agentapp_fab_hashes")),
    "PullPendingTasksRequest": Point(_RUNTIME_PB2, "PullPendingTasksRequest"),
    "SendTaskHeartbeatRequest": Point(_RUNTIME_PB2, "SendTaskHeartbeatRequest"),
    "TaskType": Point("flwr.supercore.constant", "TaskType", attrs=("CLIENT_APP",)),
    "SubStatus": Point("flwr.common.constant", "SubStatus", attrs=("COMPLETED", "FAILED")),
    "MAX_RETRY_DELAY": Point("flwr.common.constant", "MAX_RETRY_DELAY", kind=(int, float)),
    "RetryInvoker": Point("flwr.supercore.retry", "RetryInvoker",
                          ("wait_gen_factory", "recoverable_exceptions", "max_tries", "max_time", "should_giveup")),
    "exponential": Point("flwr.supercore.retry", "exponential", ("max_delay",)),
    "HeartbeatSender": Point("flwr.supercore.heartbeat", "HeartbeatSender", ("heartbeat_fn",),
                             attrs=("start", "stop", "is_running")),
    "RunNotRunningException": Point("flwr.supercore.run", "RunNotRunningException", kind=(type,)),
    "ObjectPullError": Point(_INFLATABLE, "ObjectPullError", ("object_id", "reason")),
    "pull_task_input": Point(_RUN_CLIENTAPP, "pull_task_input", ("client",)),
    "push_message": Point(_RUN_CLIENTAPP, "push_message", ("client", "message", "context")),
    "push_task_output": Point(_RUN_CLIENTAPP, "push_task_output", ("client", "context", "sub_status", "details")),
    # central DP's clipping-norm key (privacy/central.py), robust statistics (strategies/robust.py)
    "KEY_CLIPPING_NORM": Point("flwr.supercore.differential_privacy", "KEY_CLIPPING_NORM", kind=(str,)),
    "aggregate_median": Point("flwr.server.strategy.aggregate", "aggregate_median", ("results",)),
    "aggregate_trimmed_avg": Point("flwr.server.strategy.aggregate", "aggregate_trimmed_avg",
                                   ("results", "proportiontocut")),
    # the SuperNode fedpeft node runs (fedpeft/deploy/supernode.py)
    "flower_supernode": Point("flwr.supernode.cli", "flower_supernode"),
}

# what the re-exported names hand back or take, which fedpeft uses without importing it
CLIENT_PULL = Point("flwr.supercore.runtime", "RuntimeHttpClient.PullObject", ("request",))  # watch_object_pulls
_USED = (
    Point("flwr.supercore.runtime", "RuntimeHttpClient.from_server_address",
          ("server_address", "insecure", "root_certificates", "interceptors", "retry_invoker")),
    CLIENT_PULL,
    Point(_RUNTIME_PB2, "AcquireTaskResponse", fields=("task", "token")),
    Point("flwr.proto.task_pb2", "Task", fields=("task_id", "pending_at")),
    Point(_RUNTIME_PB2, "PullPendingTasksResponse", fields=("tasks",)),
    Point(_RUNTIME_PB2, "SendTaskHeartbeatResponse", fields=("success",)),
    Point("flwr.supercore.run", "Run", ("fab_id", "fab_version")),  # pull_task_input's run: the app's version
)

# the object pulls fedpeft makes eager: module → the pull it imported by name from Flower's inflatable_utils
PULL_REBINDS: dict[str, Point] = {
    module: Point(module, name, ("initial_backoff",), same_as=f"{_INFLATABLE}.{name}")
    for module, name in ((_LOOP, "pull_objects"),  # a SuperNode pulling a message's objects
                         (_RUN_CLIENTAPP, "pull_and_inflate_object_from_tree"),  # the site worker taking a task
                         (_HTTP_GRID, "pull_objects"))  # the deployed ServerApp pulling a site's reply
}
# the module the SuperNode loop sleeps through
LOOP_TIME = Point(_LOOP, "time", attrs=("sleep", "monotonic"), kind=(types.ModuleType,))
LOOP_PUSH = Point(_LOOP, "_push_messages")  # wrapped to note when a reply went out (called as Flower calls it)
SUPEREXEC_POLL_ENV = Point("flwr.supercore.superexec.run_superexec", "_TASK_POLL_INTERVAL_ENV", kind=(str,))

POINTS: tuple[Point, ...] = (*NAMES.values(), *_USED, *PULL_REBINDS.values(), LOOP_TIME, LOOP_PUSH,
                             SUPEREXEC_POLL_ENV)

# --- verifying ------------------------------------------------------------------------------------------


def flower_version() -> str:
    """The installed Flower's version (its distribution's metadata; Flower itself is not imported)."""
    try:
        return metadata.version("flwr")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _supported() -> str:
    """The Flower versions fedpeft is made for, as its own metadata requires them."""
    try:
        needs = [r for r in metadata.requires("fedpeft") or () if re.match(r"flwr\s*(\[|[<>=!~;]|$)", r)]
    except metadata.PackageNotFoundError:
        needs = []
    return needs[0].split(";")[0].replace(" ", "") if needs else "the flwr version pyproject.toml names"


def fail(point: Point, problem: str) -> FedPeftError:
    """The one-line error for a ``point`` this Flower does not provide as fedpeft needs it."""
    problem = " ".join(str(problem).split())  # one line, whatever Flower's message held
    return FedPeftError(f"Flower {flower_version()}: {point.where} {problem}; fedpeft relies on it and supports "
                        f"{_supported()} (fedpeft/deploy/flower_compat.py)")


_MISSING = object()


def _module(point: Point) -> types.ModuleType:
    try:
        return importlib.import_module(point.module)
    except Exception as err:  # noqa: BLE001 — an ImportError, or a Flower module that breaks while importing
        raise fail(point, f"cannot be imported ({type(err).__name__}: {err})") from None


def _lookup(point: Point) -> tuple[Any, Any]:
    """``(owner, value)``: the module or class holding the point, and the point itself."""
    owner: Any = _module(point)
    *path, last = point.name.split(".")
    for part in path:
        owner = getattr(owner, part, _MISSING)
        if owner is _MISSING:
            raise fail(point, f"is missing ({part} is not found)")
    value = getattr(owner, last, _MISSING)
    if value is _MISSING:
        raise fail(point, "is missing")
    return owner, value


def _is_eager_copy(value: Any, original: Any) -> bool:
    return isinstance(value, functools.partial) and value.func is original and \
        value.keywords == {"initial_backoff": FIRST_RETRY}


def _verified(point: Point) -> Any:
    """The point's value, after checking it as the point says; raises :func:`fail`'s error otherwise."""
    _, value = _lookup(point)
    if point.kind and not isinstance(value, point.kind):
        raise fail(point, f"is a {type(value).__name__}, not a {' or '.join(k.__name__ for k in point.kind)}")
    if point.same_as:
        module, _, name = point.same_as.rpartition(".")
        original = _verified(Point(module, name, point.params))
        if value is not original and not _is_eager_copy(value, original):
            raise fail(point, f"is no longer {point.same_as} (another patch changed it?)")
        return value
    if point.params:
        try:
            signature = inspect.signature(value)
        except (TypeError, ValueError) as err:
            raise fail(point, f"has no signature to check ({err})") from None
        missing = [p for p in point.params if p not in signature.parameters]
        if missing:
            raise fail(point, f"takes no parameter {', '.join(missing)}")
    missing = [a for a in point.attrs if not hasattr(value, a)]
    if missing:
        raise fail(point, f"has no attribute {', '.join(missing)}")
    if point.fields:
        known = getattr(getattr(value, "DESCRIPTOR", None), "fields_by_name", None)
        if known is None:
            raise fail(point, "is not a protobuf message")
        missing = [f for f in point.fields if f not in known]
        if missing:
            raise fail(point, f"has no field {', '.join(missing)}")
    if not point.kind and not callable(value):
        raise fail(point, f"is a {type(value).__name__}, not callable")
    return value


def check() -> None:
    """Verify every point fedpeft takes from Flower (:data:`POINTS`). Raises
    :class:`~fedpeft.errors.FedPeftError`, one line naming the first point this Flower lacks and its version."""
    for point in POINTS:
        _verified(point)


def __getattr__(name: str) -> Any:
    """A re-exported name (:data:`NAMES`), verified and resolved on first use."""
    point = NAMES.get(name)
    if point is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = _verified(point)
    globals()[name] = value
    return value


# --- changing Flower's behaviour --------------------------------------------------------------------------


def eager_object_pulls(module: str) -> None:
    """Make ``module``'s object pulls (one of :data:`PULL_REBINDS`) retry first after ``FIRST_RETRY`` seconds,
    still doubling to Flower's cap. Idempotent; raises :func:`fail`'s error where the pull is not found."""
    point = PULL_REBINDS[module]
    owner, _ = _lookup(point)
    pull = _verified(point)
    if isinstance(pull, functools.partial):  # made eager already
        return
    setattr(owner, point.name, functools.partial(pull, initial_backoff=FIRST_RETRY))


def eager_task_pulls() -> None:
    """The site worker's: a task taken before its SuperNode holds the message's objects is asked for again soon."""
    eager_object_pulls(_RUN_CLIENTAPP)


def eager_reply_pulls(grid: Any) -> bool:
    """A deployed grid (Flower's ``HttpGrid``) pulls a site's reply objects eagerly: a reply seen before its
    objects finished uploading is asked for again after ``FIRST_RETRY`` seconds, not 1 s. Simulation's in-memory
    grid pulls nothing (False)."""
    http = sys.modules.get(_HTTP_GRID)
    grid_class = getattr(http, "HttpGrid", None)
    if grid_class is None or not isinstance(grid, grid_class):
        return False
    eager_object_pulls(_HTTP_GRID)
    return True


def patch_supernode_loop(sleeps: types.ModuleType, on_push: Callable[[], None]) -> None:
    """Make the SuperNode loop sleep through ``sleeps`` (a stand-in for its ``time`` module), call ``on_push``
    after each reply it pushes, and pull objects eagerly. Everything is checked before anything changes;
    a loop patched already, or one that no longer sleeps through ``time``, raises :func:`fail`'s error."""
    loop, clock = _lookup(LOOP_TIME)
    if clock is not time:
        raise fail(LOOP_TIME, "is not the time module (patched already, or this Flower sleeps otherwise)")
    _verified(LOOP_TIME)
    push = _verified(LOOP_PUSH)
    _verified(PULL_REBINDS[_LOOP])

    def push_messages(*args: object, **kwargs: object) -> object:
        try:
            return push(*args, **kwargs)
        finally:
            on_push()

    eager_object_pulls(_LOOP)
    loop.time = sleeps
    loop._push_messages = push_messages


def superexec_task_poll(seconds: float) -> None:
    """Have Flower's SuperExec (started by a SuperNode, inheriting this environment) look for a task every
    ``seconds`` (Flower: 1 s), unless the variable is set already."""
    os.environ.setdefault(_verified(SUPEREXEC_POLL_ENV), f"{seconds:g}")


def watch_object_pulls(client: Any, wrap: Callable[[Callable[[Any], Any]], Callable[[Any], Any]]) -> None:
    """Replace a Runtime API client's ``PullObject`` by ``wrap(PullObject)`` (Flower's task input pulls through
    the client's attribute). Raises :func:`fail`'s error where the client has none."""
    pull = getattr(client, "PullObject", None)
    if not callable(pull):
        raise fail(CLIENT_PULL, f"is missing on {type(client).__name__}")
    client.PullObject = wrap(pull)
