"""The sites this process serves, and what a message says about the site it is for.

:data:`SITES` is the process's one :class:`fedpeft.site.Sites`: in simulation an actor serves many
partitions with it, in deployment the site worker serves its own site. The ClientApp's handlers and its
codec mod ask it for the site a message is for (:func:`site_for`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flwr.app import Context

from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.site import Site, Sites, at_rank, client_rank, node_identity

SITES = Sites()


def site_for(cfg: FedPeftConfig, context: Context, label_names: list[Any]) -> tuple[Site, FedPeftConfig]:
    """The site this node is, and the run's config as this site trains it (:func:`site_config`)."""
    pid, _, _ = site_identity(context, cfg.clients)
    local = site_config(cfg, context, pid)
    return SITES.site(cfg, context.node_config, label_names=label_names, model_cfg=local), local


def site_identity(context: Context, fallback_partitions: int) -> tuple[int, int, str]:
    """``(partition_id, num_partitions, site_key)`` of this node (:func:`fedpeft.site.node_identity`)."""
    return node_identity(context.node_config, fallback_partitions)


def site_config(cfg: FedPeftConfig, context: Context, partition_id: int) -> FedPeftConfig:
    """The run config as this site trains it: its own LoRA rank, and its own ``device`` / ``precision``
    when its node config sets them (``fedpeft node --device/--precision``; a site knows its hardware)."""
    node = context.node_config
    own = {key: str(node[key]) for key in ("device", "precision") if key in node}
    if own:
        try:
            cfg = dataclasses.replace(cfg, **own)  # validates, as any config does
        except FedPeftError as err:
            raise FedPeftError(f"this site's node config: {err}") from None
    node_rank = node.get("lora-r")
    return at_rank(cfg, client_rank(cfg, partition_id, None if node_rank is None else int(node_rank)))
