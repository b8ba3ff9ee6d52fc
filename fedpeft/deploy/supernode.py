"""``python -m fedpeft.deploy.supernode --poll SECONDS FLOWER-SUPERNODE-ARGS``: Flower's SuperNode, polling sooner.

Flower 1.39's SuperNode (``flwr/supernode/start_client_internal.py``) sleeps a fixed 3 s whenever it
asks the SuperLink for a message and gets none, and 0.5 s between looks for the ClientApp's reply. After a
site replies, the next round's message is rarely there yet, so every round waits for the rest of those 3 s
(measured: most of a deployed round's non-training time, see ``bench/deployed.py``). This entry point runs
the very same ``flower-supernode`` with the sleeps of that one module capped: the idle wait at ``--poll``
seconds, and the waits for the ClientApp's reply (a look into the SuperNode's own memory, no network) at
0.05 s; nothing else changes. For :data:`EAGER_SECONDS` after it pushed a reply, when the next round's
message is due as soon as the coordinator has aggregated (about half a second after the last reply on
loopback), the node asks every :data:`EAGER_POLL` seconds instead. The cost is more requests to the
SuperLink: one per ``--poll`` seconds per idle site, and up to 30 more in the 3 s after each reply.

Its object pulls retry sooner too (:mod:`fedpeft.deploy.objects`): a message pulled before the
coordinator has uploaded its objects waits 0.05 s, not 1 s, before asking for them again.

The cap replaces that module's ``time`` by a copy whose ``sleep`` is capped; the replacing is
:func:`fedpeft.deploy.flower_compat.patch_supernode_loop`, which first checks that the loop still sleeps
through ``time``, pushes replies through ``_push_messages`` and pulls through ``pull_objects``, and refuses
in one line otherwise, so the node never runs unpatched silently.
"""

from __future__ import annotations

import sys
import time
import types

from fedpeft.deploy import flower_compat
from fedpeft.deploy.flower_compat import patch_supernode_loop
from fedpeft.errors import FedPeftError

FLOWER_IDLE_SECONDS = 3.0  # what the SuperNode sleeps when no message is waiting (flwr 1.39)
LOCAL_POLL = 0.05  # between looks for the reply in the SuperNode's own memory (Flower: 0.5 s; no network)
EAGER_POLL = 0.1  # the idle wait just after a reply went out: the next round's message is due soon
EAGER_SECONDS = 3.0  # how long after a reply the node asks that often (Flower's own idle wait)


class Pace:
    """When this SuperNode last pushed a reply (``time.monotonic()``)."""

    def __init__(self) -> None:
        self.pushed = float("-inf")

    def idle_wait(self, poll: float) -> float:
        eager = time.monotonic() - self.pushed < EAGER_SECONDS
        return min(poll, EAGER_POLL) if eager else poll


def capped_time(poll: float, pace: Pace | None = None) -> types.ModuleType:
    """A stand-in for the ``time`` module: the idle wait for the SuperLink (Flower's 3 s) is capped at ``poll``
    seconds (at :data:`EAGER_POLL` just after ``pace`` saw a reply go out), the shorter waits for a reply in
    the SuperNode's own memory at :data:`LOCAL_POLL`."""
    shim = types.ModuleType("time")
    shim.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    pace = pace or Pace()

    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, pace.idle_wait(poll) if seconds >= FLOWER_IDLE_SECONDS else LOCAL_POLL))

    shim.sleep = sleep  # type: ignore[attr-defined]
    return shim


def patch_supernode(poll: float) -> Pace:
    """Cap the SuperNode loop's sleeps at ``poll`` seconds, and note each reply it pushes. Raises
    :class:`~fedpeft.errors.FedPeftError` (one line) where that loop is not the one this patch knows."""
    pace = Pace()

    def pushed() -> None:
        pace.pushed = time.monotonic()

    patch_supernode_loop(capped_time(poll, pace), pushed)
    return pace


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 2 or args[0] != "--poll":
        print("usage: python -m fedpeft.deploy.supernode --poll SECONDS FLOWER-SUPERNODE-ARGS...", file=sys.stderr)
        return 2
    try:
        poll = float(args[1])
        if not 0 < poll:
            raise ValueError
    except ValueError:
        print(f"--poll must be a number of seconds > 0, got {args[1]!r}", file=sys.stderr)
        return 2
    try:
        patch_supernode(poll)
        run = flower_compat.flower_supernode
    except FedPeftError as err:
        print(f"fedpeft node: {err}; `fedpeft node --poll 3` runs Flower's own SuperNode", file=sys.stderr)
        return 2
    sys.argv = ["flower-supernode", *args[2:]]
    run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
