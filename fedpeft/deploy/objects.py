"""Flower's object pulls, retried sooner: how soon, and why.

Flower 1.39 sends a message in two steps: the message with its object tree first, then each object. A
receiver that asks in between finds the message but not yet its objects. That happens to a SuperNode
pulling the next round's message, to a site worker taking the task the SuperNode made of it (the task
exists before the SuperNode has its objects), and to a deployed ServerApp pulling a site's reply. The
receiver then waits ``PULL_INITIAL_BACKOFF``, 1 s ±20%, before asking again, doubling up to 10 s
(``flwr/supercore/inflatable/inflatable_utils.py``). On loopback the objects follow within about 60 ms, so
one unlucky poll cost a whole second of a round (seen in a deployed round's logs: a 0.85 s gap in the
ServerApp's object pulls, a site starting 1.2 s after the other). Those three receivers' pulls retry first
after :data:`FIRST_RETRY` seconds instead, still doubling to Flower's cap; nothing else changes. The change
itself is Flower-internal and lives with the others in :mod:`fedpeft.deploy.flower_compat`
(:func:`~fedpeft.deploy.flower_compat.eager_object_pulls`).
"""

from __future__ import annotations

FIRST_RETRY = 0.05  # seconds before an object that is not there yet is asked for again (Flower: 1 s)
