"""The site worker and its relay: a deployed site that loads its model once, not once per message (issue 23).

Flower 1.39 starts a fresh ``flwr-clientapp`` process for every message a SuperNode receives, so nothing in
memory survives a round there. A site worker is one long-lived process beside the SuperNode that owns the
site: it runs the ClientApp's handlers itself (the same code that trains in-process in simulation), so the
base model, the tokenized data and every other per-process cache stay warm between rounds. The per-message
ClientApp becomes a relay: :func:`relay` hands the message and its context to the worker and returns the
worker's reply. Under ``fedpeft node`` no such process is started at all: the worker also takes the
SuperNode's tasks itself (:mod:`client.executor`, ``--runtime-api``); the socket below remains for a
ClientApp process that Flower starts anyway, and as the sign that the worker is up.

The link is a Unix domain socket in the site's state directory, ``<state-dir>/worker/worker.sock``: the
directory is mode 0700 and the socket 0600, both owned by the site's user, so only that user can open it;
never a TCP port. :func:`relay` checks that before it connects. A socket file nobody answers on (a worker
that died) is detected and replaced by the next worker, never trusted.

Wire format, one exchange per connection: frames of an 8-byte big-endian length then that many bytes.
The relay sends a JSON header (``protocol``, ``version``: fedpeft's), the message and the context as Flower
protobufs; the worker answers with a JSON header (``ok``; else ``reason``) and, when ok, the reply message.
A worker refuses a relay of another fedpeft version (the header says why). One training at a time: the
worker serves one connection after another, and shares one lock with its task loop.

This module imports nothing heavy (no torch, transformers or opacus): the relay runs in the short-lived
process Flower starts per message, where an import of torch alone would cost about 2 s.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from client.handling import ERROR_CODE, Handler, answer, head, summary, timed
from fedpeft import __version__
from fedpeft.deploy.supervise import answers
from fedpeft.state_dir import state_dir
from fedpeft.state_dir import worker_socket_path as socket_path
from fedpeft.wire import SECONDS_RELAY, SECONDS_WAIT

logger = logging.getLogger(__name__)

PROTOCOL = 1
_HEADER = struct.Struct(">Q")
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with its terminating NUL (Linux)
MAX_FRAME = 1 << 34  # 16 GiB: a bound against a corrupt length, far above any adapter

class WorkerError(RuntimeError):
    """The site worker could not be reached, refused the message, or broke the exchange."""


WORKER_KEY = "worker"  # node config: true when a site worker serves this node (``fedpeft node`` sets it)


def worker_socket(node_config: Mapping[str, Any]) -> Path | None:
    """The socket of this node's worker when its node config turns the worker on, else None."""
    flag = node_config.get(WORKER_KEY, False)
    if isinstance(flag, str):
        flag = flag.strip().lower() not in ("", "0", "false", "no", "off")
    return socket_path(state_dir(node_config)) if flag else None


# --- framing ----------------------------------------------------------------------------------------


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))
    if size > MAX_FRAME:
        raise WorkerError(f"frame of {size} bytes exceeds the {MAX_FRAME} byte bound")
    return _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise WorkerError("the connection closed mid-exchange")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


# --- the relay (runs in Flower's per-message process) -------------------------------------------------


def check_private(path: Path) -> None:
    """Raise :class:`WorkerError` unless ``path`` is a socket only this user can open (0600 in a 0700 dir)."""
    uid = os.getuid()
    try:
        parent, own = path.parent.lstat(), path.lstat()
    except FileNotFoundError:
        raise WorkerError(f"no site worker listens at {path} (is `fedpeft node` running?)") from None
    if not stat.S_ISDIR(parent.st_mode) or parent.st_uid != uid or stat.S_IMODE(parent.st_mode) & 0o077:
        raise WorkerError(f"{path.parent} must be a directory of this user with mode 0700; refusing to connect")
    if not stat.S_ISSOCK(own.st_mode) or own.st_uid != uid or stat.S_IMODE(own.st_mode) & 0o077:
        raise WorkerError(f"{path} must be a socket of this user with mode 0600; refusing to connect")


def exchange(path: Path, msg: Message, context: Context, *, timeout: float | None = None) -> Message:
    """Send ``msg`` and ``context`` to the worker at ``path``; its reply. Raises :class:`WorkerError`."""
    check_private(path)
    # when the relay sent (wall clock: the worker is another process on this machine) and how long this
    # process had run by then (Flower's start of the per-message process, its imports, the relay's own)
    header = json.dumps({"protocol": PROTOCOL, "version": __version__, "sent": time.time(),
                         "process-age": process_age()}).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError) as err:
            raise WorkerError(f"no site worker answers at {path} ({err.strerror or err}); is `fedpeft node` "
                              "running?") from None
        try:
            for frame in (header, message_to_proto(msg).SerializeToString(),
                          context_to_proto(context).SerializeToString()):
                send_frame(sock, frame)
            answer = json.loads(recv_frame(sock))
            if not isinstance(answer, dict):
                raise ValueError(f"a header that is not an object: {answer!r:.80}")
            proto = ProtoMessage()
            if answer.get("ok"):
                proto.ParseFromString(recv_frame(sock))
        except (OSError, ValueError, WorkerError) as err:  # a worker that died mid-round, or garbage
            raise WorkerError(f"the site worker at {path} broke off the exchange: {err}") from None
    if not answer.get("ok"):
        raise WorkerError(f"the site worker refused the message: {answer.get('reason', 'no reason')}")
    return message_from_proto(proto)


def relay(msg: Message, context: Context, path: Path, *, timeout: float | None = None) -> Message:
    """The worker's reply to ``msg``, or an error reply naming why the worker could not give one.

    A failure is one line in the site's log and the reply's reason; the coordinator records the site as
    failed for this round, as it would any failed client."""
    try:
        reply = exchange(path, msg, context, timeout=timeout)
    except WorkerError as err:
        logger.error("site worker: %s", err)
        return Message(Error(code=ERROR_CODE, reason=f"site worker: {err}"), reply_to=msg)
    # the worker built its reply from its own copy of the message: re-address it to this one
    if reply.has_error():
        return Message(reply.error, reply_to=msg)
    return Message(reply.content, reply_to=msg)


# --- the worker (a long-lived process owning the site) ---------------------------------------------------


class SiteWorker:
    """Serves ``handler`` (the in-process ClientApp) on a private Unix socket, one message at a time."""

    def __init__(self, path: Path, handler: Handler, *, lock: threading.Lock | None = None) -> None:
        self.path, self.handler = Path(path), handler
        self.lock = lock or threading.Lock()  # one training at a time, whoever asks (relay or task loop)
        self.version = __version__
        self.served = 0
        self._sock: socket.socket | None = None

    def bind(self) -> None:
        """Create the 0700 directory and the 0600 socket; replace a stale socket, never a live worker's."""
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise WorkerError(f"socket path {self.path} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket "
                              "allows; choose a shorter state directory (node config state-dir)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(self.path.lstat().st_mode):
                raise WorkerError(f"{self.path} exists and is not a socket; remove it by hand")
            if answers(self.path):
                raise WorkerError(f"another site worker already serves {self.path}")
            logger.warning("site worker: replacing the stale socket %s (no worker answered on it)", self.path)
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window in which others could connect
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(8)
        self._sock = sock

    def serve(self, *, should_stop: Callable[[], bool] = lambda: False, poll: float = 0.5) -> None:
        """Answer connections until ``should_stop()``; then close and remove the socket."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        self._sock.settimeout(poll)
        try:
            while not should_stop():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                with conn:
                    conn.settimeout(None)
                    self._answer(conn)
        finally:
            self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _answer(self, conn: socket.socket) -> None:
        try:
            first = recv_frame(conn)
        except (OSError, WorkerError):  # a connection that sent nothing: another worker checking we are alive
            return
        try:
            header = json.loads(first)
            msg_proto, ctx_proto = ProtoMessage(), ProtoContext()
            msg_proto.ParseFromString(recv_frame(conn))
            ctx_proto.ParseFromString(recv_frame(conn))
        except (OSError, ValueError, WorkerError) as err:
            logger.warning("site worker: dropped a malformed request: %s", err)
            return
        refusal = self._refusal(header)
        if refusal is not None:
            logger.warning("site worker: refused a message: %s", refusal)
            _send_json(conn, {"ok": False, "reason": refusal})
            return
        msg, context = message_from_proto(msg_proto), context_from_proto(ctx_proto)
        logger.info("site worker: %s received", head(msg))
        waited = max(0.0, time.time() - float(header.get("sent", time.time())))
        started = time.monotonic()
        with self.lock:
            reply = answer(self.handler, msg, context)
        self.served += 1
        timed(reply, {SECONDS_WAIT: waited, SECONDS_RELAY: header.get("process-age")})
        logger.info("site worker: %s", summary(msg, reply, time.monotonic() - started))
        try:
            _send_json(conn, {"ok": True})
            send_frame(conn, message_to_proto(reply).SerializeToString())
        except OSError as err:  # the relay gave up (its process was stopped): nothing to answer to
            logger.warning("site worker: the relay left before the reply: %s", err)

    def _refusal(self, header: Any) -> str | None:
        if not isinstance(header, dict) or header.get("protocol") != PROTOCOL:
            return f"relay speaks protocol {header.get('protocol') if isinstance(header, dict) else '?'}, " \
                   f"the worker {PROTOCOL}"
        if header.get("version") != self.version:
            return (f"fedpeft version mismatch: relay {header.get('version')}, worker {self.version}; "
                    "restart `fedpeft node` after upgrading")
        return None


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:  # field 22, after the parenthesised command name
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _send_json(conn: socket.socket, payload: dict[str, Any]) -> None:
    send_frame(conn, json.dumps(payload).encode())


def main(argv: list[str] | None = None) -> int:
    """``python -m client.worker --state-dir DIR [--runtime-api HOST:PORT]``: serve this site until SIGTERM/SIGINT.

    ``fedpeft node`` runs it. With ``--runtime-api`` the worker also takes the SuperNode's ClientApp tasks
    itself (:mod:`client.executor`): the SuperNode then runs with ``--isolation process`` and no message
    starts a process."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(prog="python -m client.worker", description=main.__doc__)
    parser.add_argument("--state-dir", required=True, help="the site's state directory (node config state-dir)")
    parser.add_argument("--runtime-api", default=None, metavar="HOST:PORT",
                        help="the SuperNode's Runtime API: take its ClientApp tasks in this process")
    parser.add_argument("--secret-file", default=None, metavar="FILE",
                        help="the SuperExec secret the SuperNode was given (--superexec-auth-secret-file)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per Runtime API request
    stop = threading.Event()
    on_stop: list[Callable[[], None]] = []

    def request_stop(signum: int, frame: Any) -> None:  # finish the message in hand, then leave
        stop.set()
        for hook in on_stop:
            hook()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    from client.local import app as local  # the heavy imports, once, before the socket says "ready"

    state = Path(args.state_dir).expanduser()
    worker = SiteWorker(socket_path(state), local)
    try:
        worker.bind()
        secret = Path(args.secret_file).read_bytes() if args.secret_file else None
    except (WorkerError, OSError) as err:
        print(f"fedpeft worker: {err}", file=sys.stderr)
        return 2
    logger.info("site worker: pid %d serving %s (fedpeft %s)", os.getpid(), worker.path, worker.version)
    if args.runtime_api is None:
        worker.serve(should_stop=stop.is_set)
        logger.info("site worker: stopped after %d message(s)", worker.served)
        return 0
    from client.executor import TaskLoop, fail_abandoned_task

    if fail_abandoned_task(state, args.runtime_api, "the worker that held this message died before it answered; "
                           "`fedpeft node` started a new one"):
        logger.warning("site worker: answered the message the previous worker died with as failed")
    relays = threading.Thread(target=worker.serve, kwargs={"should_stop": stop.is_set}, daemon=True)
    relays.start()
    tasks = TaskLoop(args.runtime_api, local, state, secret=secret, lock=worker.lock)
    on_stop.append(tasks.stopping)
    logger.info("site worker: taking ClientApp tasks from the SuperNode at %s", args.runtime_api)
    tasks.run(should_stop=stop.is_set)
    relays.join(timeout=5)
    logger.info("site worker: stopped after %d task(s) and %d relayed message(s)", tasks.done, worker.served)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
