"""``python -m fedpeft.deploy.supernode --poll SECONDS FLOWER-SUPERNODE-ARGS``: Flower's SuperNode, polling sooner.

Flower 1.39's SuperNode (``flwr/supernode/start_client_internal.py``) sleeps a fixed 3 s whenever it
asks the SuperLink for a message and gets none, and 0.5 s between looks for the ClientApp's reply. After a
site replies, the next round's message is rarely there yet, so every round waits for the rest of those 3 s
(measured: most of a deployed round's non-training time, see ``bench/deployed.py``). This entry point runs
the very same ``flower-supernode`` with the sleeps of that one module capped: the idle wait at ``--poll``
seconds, and the waits for the ClientApp's reply (a look into the SuperNode's own memory, no network) at
0.05 s; nothing else changes. The cost is more requests to the SuperLink: one per ``--poll`` seconds per
idle site.

The cap replaces that module's ``time`` by a copy whose ``sleep`` is capped; if a Flower release no longer
sleeps there this way, the node refuses to start rather than run unpatched silently.
"""

from __future__ import annotations

import sys
import time
import types

FLOWER_IDLE_SECONDS = 3.0  # what the SuperNode sleeps when no message is waiting (flwr 1.39)
LOCAL_POLL = 0.05  # between looks for the reply in the SuperNode's own memory (Flower: 0.5 s; no network)


def capped_time(poll: float) -> types.ModuleType:
    """A stand-in for the ``time`` module: the idle wait for the SuperLink (Flower's 3 s) is capped at ``poll``
    seconds, the shorter waits for a reply in the SuperNode's own memory at :data:`LOCAL_POLL`."""
    shim = types.ModuleType("time")
    shim.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})

    def sleep(seconds: float) -> None:
        time.sleep(min(seconds, poll if seconds >= FLOWER_IDLE_SECONDS else LOCAL_POLL))

    shim.sleep = sleep  # type: ignore[attr-defined]
    return shim


def patch_supernode(poll: float) -> None:
    """Cap the SuperNode loop's sleeps at ``poll`` seconds. Raises RuntimeError where that loop is not found."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        raise RuntimeError("this Flower release's SuperNode loop does not sleep through the time module; "
                           "run `fedpeft node --poll 3` (Flower's own polling)")
    loop.time = capped_time(poll)  # type: ignore[attr-defined]


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
    except RuntimeError as err:
        print(f"fedpeft node: {err}", file=sys.stderr)
        return 2
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args[2:]]
    flower_supernode()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
