"""The site worker: one long-lived process that holds a site's model and data and answers its node's messages.

Flower 1.39 starts a fresh ``flwr-clientapp`` process for every message a SuperNode receives, so a plain site
imports torch, loads the model and reads its data again every round. ``fedpeft node`` instead starts this
worker (``python -m client.worker --state-dir DIR --runtime-api HOST:PORT --secret-file FILE``) and then its
SuperNode with ``--isolation process``: the worker takes the node's ClientApp tasks from the SuperNode's
Runtime API itself (:mod:`client.worker.tasks`) and answers each with the in-process ClientApp
(:mod:`client.local`), whose caches keep the model, tokenizer and tokenized data between rounds
(:mod:`client.worker.handling` times and logs each message). :func:`main` is the one way in.

Start-up: the worker imports the training stack, reads the secret, then writes ``<state-dir>/worker/ready.json``
(pid and fedpeft version; :func:`fedpeft.deploy.supervise.write_ready`), on which ``fedpeft node`` waits
before it starts the SuperNode. The model and data load with the run's first message (the coordinator's
query), which names them. SIGTERM or SIGINT lets the message in hand finish, then the worker leaves.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.worker.tasks import TaskLoop, fail_abandoned_task
from fedpeft import __version__
from fedpeft.deploy.supervise import read_ready, write_ready
from fedpeft.state_dir import worker_dir, worker_ready_path

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """``python -m client.worker --state-dir DIR --runtime-api HOST:PORT [--secret-file FILE]``: take the
    SuperNode's ClientApp tasks and answer them in this process until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=main.__doc__)
    parser.add_argument("--state-dir", required=True, help="the site's state directory (node config state-dir)")
    parser.add_argument("--runtime-api", required=True, metavar="HOST:PORT",
                        help="the SuperNode's Runtime API (it runs with --isolation process)")
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
    # deferred: heavy (torch, transformers) on the `python -m client.worker` start-up path (a bad flag fails
    # above without them); imported here once, before the worker says it is ready
    from client.local import app as local

    state = Path(args.state_dir).expanduser()
    ready = worker_ready_path(state)
    try:
        worker_dir(state).mkdir(parents=True, exist_ok=True)
        os.chmod(worker_dir(state), 0o700)
        secret = Path(args.secret_file).read_bytes() if args.secret_file else None
        write_ready(ready)
    except OSError as err:
        print(f"fedpeft worker: {err}", file=sys.stderr)
        return 2
    logger.info("site worker: pid %d ready (fedpeft %s)", os.getpid(), __version__)
    try:
        if fail_abandoned_task(state, args.runtime_api, "the worker that held this message died before it "
                               "answered; `fedpeft node` started a new one"):
            logger.warning("site worker: answered the message the previous worker died with as failed")
        tasks = TaskLoop(args.runtime_api, local, state, secret=secret)
        on_stop.append(tasks.stopping)
        logger.info("site worker: taking ClientApp tasks from the SuperNode at %s", args.runtime_api)
        tasks.run(should_stop=stop.is_set)
    finally:
        if (read_ready(ready) or {}).get("pid") == os.getpid():  # a successor's file is not this worker's to remove
            ready.unlink(missing_ok=True)
    logger.info("site worker: stopped after %d task(s)", tasks.done)
    return 0
