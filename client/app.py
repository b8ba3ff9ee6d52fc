"""The ClientApp: receive the global adapter, train it on this site's data, reply with the adapter.

Steps (see the round diagram in the README): the base model is loaded once per process and frozen;
the adapter is set from the broadcast (tensors the strategy freezes, named in the config's ``frozen``,
are not broadcast and come from the seeded initial adapter); local training runs on this site's
partition; the reply carries only the trained, non-frozen adapter tensors (peft's adapter state dict)
and metrics with ``num-examples``. A client may train a lower LoRA rank than the global adapter
(node config ``lora-r``, or ``client-ranks``); the server then sends it the truncated factors.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft import site
from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.adapters.state import without_keys
from fedpeft.config import FedPeftConfig
from fedpeft.wire import (
    ARRAYS,
    CONFIG,
    METRICS,
    NUM_EXAMPLES,
    PRIVACY,
    REFUSED,
    TRAINED,
    config_from_record,
    from_array_record,
    privacy_record,
    to_array_record,
)
from privacy.central import clipping_mod
from privacy.local import configured_private_round

app = ClientApp()


def site_identity(context: Context, fallback_partitions: int) -> tuple[int, int, str]:
    """``(partition_id, num_partitions, site_key)`` of this node."""
    pid = int(context.node_config.get("partition-id", 0))
    num = int(context.node_config.get("num-partitions", fallback_partitions))
    return pid, num, f"partition-{pid:05d}"


def site_config(cfg: FedPeftConfig, context: Context, partition_id: int) -> FedPeftConfig:
    """The run config as this site trains it (its own LoRA rank)."""
    node_rank = context.node_config.get("lora-r")
    return site.at_rank(cfg, site.client_rank(cfg, partition_id, None if node_rank is None else int(node_rank)))


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which site this node is and how much data it holds.

    Also loads the model and tokenizes this site's data, so that the first round does not wait for it.
    """
    config = msg.content[CONFIG]
    cfg = config_from_record(config)
    pid, num, key = site_identity(context, cfg.clients)
    n = len(site.client_partition(cfg, pid, num))
    local = site_config(cfg, context, pid)
    site.peft_model(local, num_labels=len(list(config["label-names"])))
    site.encoded_partition(cfg, pid, num)
    metrics = MetricRecord({"partition-id": pid, "num-partitions": num, NUM_EXAMPLES: n, "lora-r": local.lora_r})
    return Message(RecordDict({METRICS: metrics, CONFIG: ConfigRecord({"site": key})}), reply_to=msg)


@app.train(mods=[clipping_mod])  # clips the update only when the server asks (central DP)
def train(msg: Message, context: Context) -> Message:
    """One client-round of local training on the broadcast adapter (with DP-SGD under local DP)."""
    config = msg.content[CONFIG]
    cfg = config_from_record(config)
    server_round = int(config["server-round"])
    label_names: list[Any] = list(config["label-names"])
    frozen = tuple(c for c in str(config.get("frozen", "")).split(",") if c)
    pid, num, key = site_identity(context, cfg.clients)
    torch.set_num_threads(cfg.client_cpus)

    local = site_config(cfg, context, pid)
    model = site.peft_model(local, num_labels=len(label_names))
    broadcast = from_array_record(msg.content[ARRAYS])
    load_adapter_state(model, {**site.initial_adapter(local, num_labels=len(label_names)), **broadcast})
    data = site.encoded_partition(cfg, pid, num)
    content = RecordDict()
    if cfg.dp == "local":
        with site.frozen_parameters(model, frozen):
            report = configured_private_round(local, model, data, node_config=context.node_config, site=key,
                                              server_round=server_round)
        status = TRAINED if report.trained else REFUSED
        content[PRIVACY] = privacy_record(
            status=status, entry=report.entry, signature=report.signature, public_key=report.public_key,
            reason=report.reason,
        )
        result = report.metrics
    else:
        result = site.train_client_round(local, model, data, server_round=server_round, partition_id=pid, frozen=frozen)
    trained = cfg.dp != "local" or report.trained
    metrics = {
        NUM_EXAMPLES: len(data) if trained else 0,
        "steps": result.get("steps", 0),
        **{k: v for k, v in result.items() if k.startswith("dp-")},
    }
    if cfg.dp == "off":  # a loss on private data, and the examples seen, are not covered by any epsilon
        metrics |= {"train-loss": result["train_loss"], "examples-seen": result["examples_seen"]}
    update = without_keys(adapter_state(model), frozen) if trained else {}
    content[ARRAYS] = to_array_record(update)
    content[METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)
