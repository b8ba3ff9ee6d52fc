"""The site worker's task loop: it takes the SuperNode's ClientApp tasks in SuperExec's place, so deployed
messages are trained with no per-message process at all.

Flower 1.39's SuperNode stores each message it pulls as a *task*; in its default ``--isolation subprocess`` a
SuperExec it starts looks for tasks and launches one ``flwr-clientapp`` process per task (1.3-2.0 s of process
start and imports per message, measured in ``bench/deployed.py``). With ``--isolation process`` the SuperNode
starts no SuperExec and waits for one to connect to its Runtime API. ``fedpeft node`` starts its SuperNode
that way, and the site worker is what connects: :class:`TaskLoop` acquires the node's ClientApp tasks and
runs each in the worker's own process, exactly as ``flwr-clientapp`` would (pull the task's message and
context, call the ClientApp, push the reply and the task's output, heartbeating meanwhile), except that
the ClientApp is the worker's in-process one, whose model and data stay loaded between rounds. The Runtime
API's names are Flower internals, taken from :mod:`fedpeft.deploy.flower_compat`.

- The Runtime API is the SuperNode's local address (``127.0.0.1:--port``). ``fedpeft node`` gives the
  SuperNode and the worker one shared secret (``<state-dir>/worker/superexec.secret``, 0600 in the 0700
  worker directory), so only a process of the site's user can take the node's tasks.
- The run's app must be this fedpeft: a task whose FAB is another version is refused with the reason.
- While a task is in hand its token and its message's envelope (no content) are in
  ``<state-dir>/worker/task.json`` (0600). A worker that dies mid-task leaves it behind; the worker
  ``fedpeft node`` starts in its place answers that message first (:func:`fail_abandoned_task`) with an
  error reply naming why, so the coordinator records the site as failed within seconds instead of after
  Flower's token expiry (about a minute).
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from flwr.app import Message

from client.worker.handling import Handler, answer, head, refusal, summary, timed
from fedpeft import __version__
from fedpeft.deploy.flower_compat import (
    MAX_RETRY_DELAY,
    SUPEREXEC_AUTH_METHODS,
    AcquireTaskRequest,
    HeartbeatSender,
    ObjectPullError,
    ProtoMessage,
    PullPendingTasksRequest,
    RetryInvoker,
    RunNotRunningException,
    RuntimeHttpClient,
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SendTaskHeartbeatRequest,
    SubStatus,
    SuperExecAuthHttpInterceptor,
    TaskType,
    eager_task_pulls,
    exponential,
    message_from_proto,
    message_to_proto,
    pull_task_input,
    push_message,
    push_task_output,
    remove_content_from_message,
    watch_object_pulls,
)
from fedpeft.runlog import atomic_write_bytes
from fedpeft.state_dir import worker_task_path
from fedpeft.wire import SECONDS_WAIT

logger = logging.getLogger(__name__)

# what Flower's own HTTP retries treat as passing (flwr/supercore/retry/http_retry.py)
PASSING_STATUS = frozenset({httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT})
PASSING_ERRORS: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ReadError, httpx.WriteError,
                                               httpx.RemoteProtocolError, httpx.TimeoutException)


def task_retry() -> RetryInvoker:
    """Flower's retries for one task's calls (as ``flwr-clientapp``'s: unbounded, backing off to 20 s), except
    for an answer that the task is no longer this worker's: 403 (its run stopped) or 401 (its token is void)
    end the *task*. Flower's own invoker raises a BaseException for the first and interrupts its own process
    for the second, which for ``flwr-clientapp`` ends a process that held one task, but would end this
    worker, which outlives its tasks."""

    def give_up(err: Exception) -> bool:
        if isinstance(err, httpx.HTTPStatusError):
            return err.response.status_code not in PASSING_STATUS
        return not isinstance(err, PASSING_ERRORS) or any(t in str(err).lower() for t in ("certificate", "ssl", "tls"))

    return RetryInvoker(lambda: exponential(max_delay=MAX_RETRY_DELAY), (httpx.TransportError, httpx.HTTPStatusError),
                        max_tries=None, max_time=None, should_giveup=give_up)


def heartbeat_fn(client: RuntimeHttpClient, lost: threading.Event) -> Callable[[], bool]:
    """A task's heartbeat, as Flower's (False: try again soon), except that a SuperNode that no longer holds
    the task sets ``lost`` where Flower's would interrupt the process."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in PASSING_STATUS:
                return False
            lost.set()
            return True
        if not res.success:
            lost.set()
        return True

    return beat


def _client(address: str, interceptors: list[Any], retry: RetryInvoker | None = None) -> RuntimeHttpClient:
    """A Runtime API client; without ``retry``, one try per call."""
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors, retry_invoker=retry)


def _task_client(address: str, token: str, retry: RetryInvoker | None = None) -> RuntimeHttpClient:
    """A client holding a task's token, as flwr-clientapp's."""
    return _client(address, [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                             RuntimeTokenHttpInterceptor(token)], retry)


def seconds_since(timestamp: str, now: float | None = None) -> float | None:
    """Seconds from an ISO timestamp (a task's ``pending_at``) to ``now``; None where it does not parse."""
    try:
        then = datetime.datetime.fromisoformat(timestamp)
    except (TypeError, ValueError):
        return None
    if then.tzinfo is None:
        then = then.replace(tzinfo=datetime.UTC)
    return max(0.0, (time.time() if now is None else now) - then.timestamp())


# How often an idle worker asks its SuperNode for a task. Each ask wakes the worker and the SuperNode, on the
# cores the site trains on (an idle federation's polling slowed bare training on 2 cores by 11%). A message
# waits at most this long at the site (the target is 1 s from the SuperNode to the first training step).
IDLE_POLL = 0.25
# Just after a task, the next round's message is due as soon as the coordinator has aggregated: for EAGER_SECONDS
# the worker asks every EAGER_POLL seconds (a local request; the SuperNode asks the SuperLink eagerly then too).
EAGER_POLL = 0.05
EAGER_SECONDS = 3.0
# While a task's objects are missing at the SuperNode, how often to look whether it made a newer task instead.
ABANDON_CHECK = 1.0


def watched_pulls(pull: Callable[[Any], Any], newer_task: Callable[[], bool],
                  every: float = ABANDON_CHECK) -> Callable[[Any], Any]:
    """``PullObject`` for a task's client that gives up on a message its SuperNode dropped.

    Flower 1.39's SuperNode makes the task before it pulls the message's objects from the SuperLink, and when
    the run stops meanwhile it drops the message and leaves the task (``_pull_and_store_message``). Flower's
    object pulls would then retry for two hours (500 tries, backing off to 10 s), and this worker, one task at
    a time, would answer nothing else: the next run's query waited out its 600 s start-up timeout. The
    SuperNode handles one message at a time (it asks the SuperLink again only once it has a reply, or has
    dropped the message), so a pending task while this one's objects are still missing means this one was
    dropped: the pull then fails with ``ObjectPullError`` and the task ends."""
    last = [float("-inf")]

    def pull_object(request: Any) -> Any:
        res = pull(request)
        if res.object_found and not res.object_available and time.monotonic() - last[0] >= every:
            last[0] = time.monotonic()
            if newer_task():
                raise ObjectPullError(request.object_id, "the SuperNode dropped this message (its run stopped) "
                                                         "and holds a newer one")
        return res

    return pull_object


class TaskLoop:
    """Acquire this node's ClientApp tasks from the SuperNode's Runtime API and run each with ``handler``."""

    def __init__(self, address: str, handler: Handler, state_dir: Path, *, secret: bytes | None = None,
                 poll: float = IDLE_POLL, version: str = __version__) -> None:
        self.address, self.handler, self.state_dir = address, handler, Path(state_dir)
        self.poll, self.version = poll, version
        self.done = 0
        self.finished = float("-inf")  # time.monotonic() when the last task ended
        self._node: RuntimeHttpClient | None = None  # run()'s client (the SuperExec's calls)
        self._retry: RetryInvoker | None = None  # the task in hand's
        interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=secret,
                                                             protected_methods=SUPEREXEC_AUTH_METHODS))
        self._interceptors = interceptors
        # the task exists before the SuperNode holds its message's objects: ask again soon, not after Flower's 1 s
        eager_task_pulls()

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Take and run tasks until ``should_stop()``; a SuperNode not up yet (or gone a while) is waited for."""
        # no retries: a refused connection is normal here (the SuperNode starts after the worker), and Flower's
        # retry invoker answers a refused secret by interrupting this process
        client = self._node = _client(self.address, self._interceptors)
        failing_since, said = 0.0, 0.0
        try:
            while not should_stop():
                try:
                    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                                agentapp_fab_hashes=[]))
                    failing_since = 0.0
                except httpx.HTTPError as err:
                    now = time.monotonic()
                    failing_since = failing_since or now
                    if now - failing_since > 10 and now - said > 60:  # a minute apart, after 10 s of failing
                        logger.warning("site worker: the SuperNode's Runtime API at %s does not answer: %s",
                                       self.address, _why(err))
                        said = now
                    time.sleep(max(self.poll, 0.2))
                    continue
                if res.HasField("task") and res.token:
                    try:
                        self.execute(res.token, res.task)
                    finally:
                        self.finished = time.monotonic()
                else:
                    time.sleep(self.idle_wait())
        finally:
            self._node = None
            client.close()

    def newer_task(self) -> bool:
        """Whether the SuperNode holds a task no one took yet (False where that cannot be asked)."""
        if self._node is None:
            return False
        try:
            return bool(self._node.PullPendingTasks(PullPendingTasksRequest()).tasks)
        except Exception as err:  # noqa: BLE001 — not knowing is not a reason to give the task up
            logger.debug("site worker: could not list the pending tasks: %s", err)
            return False

    def idle_wait(self) -> float:
        """How long to wait before asking again: :data:`EAGER_POLL` just after a task, else ``poll``."""
        eager = time.monotonic() - self.finished < EAGER_SECONDS
        return min(self.poll, EAGER_POLL) if eager else self.poll

    def execute(self, token: str, task: Any) -> None:
        """Run one task as ``flwr-clientapp`` does, in this process."""
        acquired = time.time()
        retry = self._retry = task_retry()
        client = _task_client(self.address, token, retry)
        watch_object_pulls(client, lambda pull: watched_pulls(pull, self.newer_task))
        lost = threading.Event()
        heartbeat = HeartbeatSender(heartbeat_fn(client, lost))
        heartbeat.start()
        context, status, details = None, SubStatus.FAILED, "the site worker failed before the message arrived"
        try:
            msg, context, run, _fab = pull_task_input(client)
            self._hold(token, msg)
            logger.info("site worker: %s received", head(msg))
            started = time.monotonic()
            if run.fab_version != self.version:
                reason = (f"fedpeft version mismatch: the run's app {run.fab_id} {run.fab_version}, this site's "
                          f"worker {self.version}; restart `fedpeft node` after upgrading")
                logger.warning("site worker: refused a message: %s", reason)
                reply = refusal(msg, reason)
            else:
                reply = answer(self.handler, msg, context)
            timed(reply, {SECONDS_WAIT: seconds_since(task.pending_at, acquired)})
            logger.info("site worker: %s", summary(msg, reply, time.monotonic() - started))
            push_message(client, reply, context)
            status, details = SubStatus.COMPLETED, ""
            self.done += 1
        except (Exception, RunNotRunningException) as err:  # noqa: BLE001 — the task ends as failed; the worker goes on
            if lost.is_set() or _gone(err):
                logger.warning("site worker: task %s is no longer this node's (its run stopped, or the SuperNode "
                               "restarted): its reply is dropped", task.task_id)
            else:
                logger.error("site worker: task %s failed: %s", task.task_id, err)
            details = f"site worker: {err or type(err).__name__}"
        finally:
            retry.max_tries = 1  # as flwr-clientapp on exit: a SuperNode that is gone must not hold the worker
            try:
                push_task_output(client=client, context=context, sub_status=status, details=details)
            except (Exception, RunNotRunningException) as err:  # noqa: BLE001 — nothing is left to tell it
                logger.debug("site worker: the task's status was not taken: %s", err)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
            worker_task_path(self.state_dir).unlink(missing_ok=True)

    def stopping(self) -> None:
        """The node is stopping (its SuperNode first): finish the task in hand, but try each push once."""
        if self._retry is not None:
            self._retry.max_tries = 1

    def _hold(self, token: str, msg: Message) -> None:
        """Note the task in hand, so that the message can be answered if this process dies with it."""
        envelope = message_to_proto(remove_content_from_message(msg)).SerializeToString()
        atomic_write_bytes(worker_task_path(self.state_dir), json.dumps({
            "token": token, "message": base64.b64encode(envelope).decode()}).encode(), mode=0o600)


def _gone(err: BaseException) -> bool:
    """Whether the SuperNode answered that the task is no longer ours (403: run stopped, 401: token void)."""
    if isinstance(err, httpx.HTTPStatusError):
        return err.response.status_code in (httpx.codes.FORBIDDEN, httpx.codes.UNAUTHORIZED)
    return isinstance(err, RunNotRunningException)


def _why(err: httpx.HTTPError) -> str:
    if isinstance(err, httpx.HTTPStatusError) and err.response.status_code == httpx.codes.UNAUTHORIZED:
        return "it refused this worker's SuperExec secret (was the SuperNode started by another fedpeft node?)"
    return str(err) or type(err).__name__


def fail_abandoned_task(state_dir: Path, address: str, reason: str) -> bool:
    """Answer the message a dead worker held (``task.json``) with an error reply; whether there was one."""
    path = worker_task_path(state_dir)
    try:
        held = json.loads(path.read_text())
        proto = ProtoMessage()
        proto.ParseFromString(base64.b64decode(held["message"]))
        msg, token = message_from_proto(proto), str(held["token"])
    except FileNotFoundError:
        return False
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("site worker: ignoring an unreadable %s: %s", path, err)
        path.unlink(missing_ok=True)
        return False
    client = _task_client(address, token)  # one try: a token of a SuperNode since restarted is just refused
    try:
        reply = refusal(msg, reason)
        try:
            push_message(client, reply, SimpleNamespace(node_id=msg.metadata.dst_node_id, run_id=msg.metadata.run_id))
            push_task_output(client=client, context=None, sub_status=SubStatus.FAILED, details=reason)
        except (Exception, RunNotRunningException) as err:  # noqa: BLE001 — Flower's token expiry answers it instead
            logger.warning("site worker: could not answer the abandoned message: %s", err)
    finally:
        client.close()
        path.unlink(missing_ok=True)
    return True

