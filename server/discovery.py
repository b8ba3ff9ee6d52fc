"""Start-up: wait for the clients to connect, ask each which site it is, collect the answers.

The query also makes each client process load its model and tokenize its data; it is pushed before
the coordinator loads its own model, so the two start-ups overlap. A client that fails to start or
stays silent past ``startup_timeout`` is left out with a warning naming it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Message, MessageType, RecordDict

from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.protocol import CONFIG, LORA_R, METRICS, NUM_EXAMPLES, SITE, request_record

logger = logging.getLogger(__name__)


def wait_for_nodes(grid: Any, expected: int, *, timeout: float = 120.0) -> list[int]:
    """The connected node ids, once at least ``expected`` are there."""
    deadline = time.monotonic() + timeout
    nodes = list(grid.get_node_ids())
    while len(nodes) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = list(grid.get_node_ids())
    if len(nodes) < expected:
        raise FedPeftError(f"only {len(nodes)} of {expected} clients connected within {timeout:.0f} s")
    return sorted(nodes)


def start_discovery(grid: Any, cfg: FedPeftConfig, nodes: list[int], *, label_names: list[str]) -> list[str]:
    """Send each node a query; return the message ids to collect later.

    The query also makes each client process load its model and tokenize its data, so pushing it
    before the server loads its own model lets the two start-ups overlap.
    """
    content = RecordDict({CONFIG: request_record(cfg, label_names=label_names)})
    # a list, not a generator: Flower's HTTP grid (deployment) reads the messages twice
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=n, ttl=cfg.startup_timeout)
                for n in nodes]
    return list(grid.push_messages(messages))


def finish_discovery(
    grid: Any, message_ids: list[str], *, timeout: float, min_sites: int = 1, example_delta: float = 0.0
) -> tuple[dict[int, str], dict[str, int], dict[str, int]]:
    """Collect the query replies; return node id → site key, site key → the LoRA rank it trains, and site
    key → the training examples it reported.

    A client that fails to start (an error reply: say, a missing data file) or does not answer within
    ``timeout`` is left out of the run with a warning naming it; the run starts when at least
    ``min_sites`` clients did, and otherwise raises with the reasons. ``example_delta`` (local DP's δ,
    per example) must lie below 1/examples at every site, or the run does not start.
    """
    pending, replies = set(message_ids), []
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending:
            time.sleep(0.05)
    sites: dict[int, str] = {}
    ranks: dict[str, int] = {}
    counts: dict[str, int] = {}
    problems = []
    for reply in sorted(replies, key=lambda m: m.metadata.src_node_id):
        if reply.has_error():
            problems.append(f"client {reply.metadata.src_node_id} could not start: {reply.error.reason}")
            continue
        key = str(reply.content[CONFIG][SITE])
        examples = int(reply.content[METRICS].get(NUM_EXAMPLES, 0))
        if example_delta > 0 and example_delta * examples >= 1:
            raise FedPeftError(f"dp_delta {example_delta:g} is not below 1/examples at site {key} ({examples} "
                               f"examples): a mechanism may then reveal a whole example; set --dp-delta below "
                               f"{1 / examples:.2g}")
        sites[reply.metadata.src_node_id] = key
        counts[key] = examples
        if LORA_R in reply.content[METRICS]:
            ranks[key] = int(reply.content[METRICS][LORA_R])
    if pending:
        problems.append(f"{len(pending)} client(s) did not answer the start-up query within {timeout:.0f} s")
    if len(set(sites.values())) != len(sites):
        raise FedPeftError("two clients reported the same site; check partition ids / site names")
    if len(sites) < min_sites:
        raise FedPeftError(f"{len(sites)} of {len(message_ids)} clients started, fewer than min_clients={min_sites}: "
                           + "; ".join(problems))
    for problem in problems:
        logger.warning("%s; the run goes on without it", problem)
    return sites, ranks, counts
