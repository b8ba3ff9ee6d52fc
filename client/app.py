"""The ClientApp: receive the global adapter, train it on this site's data, reply with the adapter.

Steps (see the round diagram in the README): the base model is loaded once per process and frozen;
the adapter is set from the broadcast; local training runs on this site's partition; the reply carries
only the adapter state (peft's adapter state dict) and metrics with ``num-examples``.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpeft import site
from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.wire import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, config_from_record, from_array_record, to_array_record

app = ClientApp()


def site_identity(context: Context, fallback_partitions: int) -> tuple[int, int, str]:
    """``(partition_id, num_partitions, site_key)`` of this node."""
    pid = int(context.node_config.get("partition-id", 0))
    num = int(context.node_config.get("num-partitions", fallback_partitions))
    return pid, num, f"partition-{pid:05d}"


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which site this node is and how much data it holds.

    Also loads the model and tokenizes this site's data, so that the first round does not wait for it.
    """
    config = msg.content[CONFIG]
    cfg = config_from_record(config)
    pid, num, key = site_identity(context, cfg.clients)
    n = len(site.client_partition(cfg, pid, num))
    site.peft_model(cfg, num_labels=len(list(config["label-names"])))
    site.encoded_partition(cfg, pid, num)
    metrics = MetricRecord({"partition-id": pid, "num-partitions": num, NUM_EXAMPLES: n})
    return Message(RecordDict({METRICS: metrics, CONFIG: ConfigRecord({"site": key})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One client-round of local training on the broadcast adapter."""
    config = msg.content[CONFIG]
    cfg = config_from_record(config)
    server_round = int(config["server-round"])
    label_names: list[Any] = list(config["label-names"])
    pid, num, _ = site_identity(context, cfg.clients)
    torch.set_num_threads(cfg.client_cpus)

    model = site.peft_model(cfg, num_labels=len(label_names))
    load_adapter_state(model, from_array_record(msg.content[ARRAYS]))
    data = site.encoded_partition(cfg, pid, num)
    result = site.train_client_round(cfg, model, data, server_round=server_round, partition_id=pid)
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: len(data),
            "train-loss": result["train_loss"],
            "steps": result["steps"],
            "examples-seen": result["examples_seen"],
        }
    )
    return Message(RecordDict({ARRAYS: to_array_record(adapter_state(model)), METRICS: metrics}), reply_to=msg)
