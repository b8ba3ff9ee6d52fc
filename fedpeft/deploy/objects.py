"""Flower's object pulls, retried sooner.

Flower 1.39 sends a message in two steps: the message with its object tree first, then each object. A
receiver that asks in between finds the message but not yet its objects. That happens to a SuperNode
pulling the next round's message, to a site worker taking the task the SuperNode made of it (the task
exists before the SuperNode has its objects), and to a deployed ServerApp pulling a site's reply. The
receiver then waits ``PULL_INITIAL_BACKOFF``, 1 s ±20%, before asking again, doubling up to 10 s
(``flwr/supercore/inflatable/inflatable_utils.py``). On loopback the objects follow within about 60 ms, so
one unlucky poll cost a whole second of a round (seen in a deployed round's logs: a 0.85 s gap in the
ServerApp's object pulls, a site starting 1.2 s after the other). :func:`eager_object_pulls` makes one
module's pulls (``pull_objects`` or ``pull_and_inflate_object_from_tree``, imported by name) retry first
after :data:`FIRST_RETRY` seconds, still doubling to Flower's cap; nothing else changes.
"""

from __future__ import annotations

import functools
import types

FIRST_RETRY = 0.05  # seconds before an object that is not there yet is asked for again (Flower: 1 s)
PULLS = ("pull_objects", "pull_and_inflate_object_from_tree")  # Flower's, each taking initial_backoff


def eager_object_pulls(module: types.ModuleType) -> bool:
    """Make the module's object pulls (Flower's :data:`PULLS`, imported by name) retry after
    :data:`FIRST_RETRY` seconds. Returns False, changing nothing, where the module holds none of them (or
    holds them patched already)."""
    from flwr.supercore.inflatable import inflatable_utils

    found = False
    for name in PULLS:
        pull = getattr(module, name, None)
        if pull is not None and pull is getattr(inflatable_utils, name, False):
            setattr(module, name, functools.partial(pull, initial_backoff=FIRST_RETRY))
            found = True
    return found
