"""The site's handlers: receive the global adapter, train it on this site's data, reply with the adapter.

This is the ClientApp that trains. It runs in-process (simulation, or a deployed site without a worker:
:mod:`client.app` calls it) or inside the long-lived site worker (:mod:`client.worker`). Either way the
process keeps its sites in :data:`client.sites.SITES`, so a site's model and data stay loaded between
rounds.

Steps (see the round diagram in the README): the base model is loaded once per process and frozen;
the adapter is set from the broadcast (tensors the strategy freezes, named in the request's ``frozen``,
are not broadcast and come from the seeded initial adapter; the request is :mod:`fedpeft.protocol`'s
:class:`~fedpeft.protocol.TrainRequest`, parsed once per message); local training runs on this site's
data; the reply carries only the trained, non-frozen adapter tensors (the adapter state dict) and
metrics with ``num-examples``. A simulated node trains its partition of the run's data; a deployed
site (node config ``data-path``, optionally ``site``) trains on its own file, never on a partition.
A client may train a lower LoRA rank than the global adapter (node config ``lora-r``, or
``client-ranks``); the server then sends it the truncated factors.
Adapters travel encoded (:mod:`client.encoding`): the broadcast is decoded before the handler runs,
and the reply carries the update encoded with the site's codec (node config ``codec``, else the
run's) and error feedback.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import secure
from client.encoding import codec_mod
from client.sites import site_for
from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.adapters.lora.dynamic import keep_active, train_at_rank
from fedpeft.client_round import Control
from fedpeft.errors import FedPeftError
from fedpeft.feedback_state import control_path, load_control, save_control
from fedpeft.protocol import (
    ARRAYS,
    CONFIG,
    CONTROL,
    EXAMPLES_SEEN,
    LORA_R,
    METRICS,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    PRIVACY,
    REFUSED,
    SECONDS_LOAD,
    SECONDS_TRAIN,
    SITE,
    STEPS,
    TRAIN_LOSS,
    TRAINED,
    QueryRequest,
    train_request,
)
from fedpeft.wire import from_array_record, privacy_record, to_array_record
from privacy.central import clipping_mod
from privacy.modes import privacy_mode

app = ClientApp()


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Tell the server which site this node is and how much data it holds.

    Also loads the model and tokenizes this site's data, so that the first round does not wait for it.
    """
    request = QueryRequest.from_record(msg.content[CONFIG])
    site, local = site_for(request.settings, context, list(request.label_names))
    metrics = MetricRecord({PARTITION_ID: site.partition_id, NUM_PARTITIONS: site.num_partitions,
                            NUM_EXAMPLES: len(site.data)})
    if local.peft == "lora":
        metrics[LORA_R] = local.lora_r
    return Message(RecordDict({METRICS: metrics, CONFIG: ConfigRecord({SITE: site.key})}), reply_to=msg)


# codec_mod outermost: it encodes what the clipping mod (central DP, only when asked) has clipped
@app.train(mods=[codec_mod, clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """One client-round of local training on the broadcast adapter (with DP-SGD under local DP)."""
    request = train_request(msg.content)
    cfg, server_round = request.settings, request.server_round
    label_names: list[Any] = list(request.label_names)
    torch.set_num_threads(cfg.client_cpus)

    started = time.monotonic()
    site, local = site_for(cfg, context, label_names)
    model = site.model.model
    broadcast = from_array_record(msg.content[ARRAYS])
    load_adapter_state(model, {**site.model.initial, **broadcast})
    data = site.data
    if request.canaries is not None:  # an empirical privacy audit: the canaries the coordinator drew for this site
        data = site.with_extra_examples(list(request.canaries), label_names=label_names, max_length=cfg.max_length)
    loaded = time.monotonic()
    content = RecordDict()
    mode = privacy_mode(cfg)
    control = None
    if mode.drift(cfg).method == "scaffold" and CONTROL not in msg.content:
        raise FedPeftError("this run corrects drift with SCAFFOLD, but the train message carries no control variate")
    if CONTROL in msg.content:  # SCAFFOLD: the coordinator's c, and this site's own c_i from its state dir
        variate_file = control_path(site.state_dir, site.key, cfg.run_id)
        control = Control(server=from_array_record(msg.content[CONTROL]), site=load_control(variate_file, server_round))
    rank = request.active_rank  # DP-DyLoRA: the round's rank; components above it neither train nor travel changed
    with train_at_rank(model, rank) if rank is not None else nullcontext():
        outcome = mode.site_round(local, model, data, node_config=context.node_config, site=site.key,
                                  server_round=server_round, partition_id=site.partition_id, frozen=request.untrained,
                                  control=control, ledger_seq=request.ledger_seq, features=site.features)
    if outcome.report is not None:  # local DP: the signed entry travels with the reply
        report = outcome.report
        content[PRIVACY] = privacy_record(
            status=TRAINED if report.trained else REFUSED, entry=report.entry, signature=report.signature,
            public_key=report.public_key, reason=report.reason, backlog=report.backlog,
        )
    if control is not None:  # kept before the reply leaves: a restarted site goes on from it
        change = {k: v - control.site.get(k, 0.0) for k, v in control.updated.items()}
        save_control(variate_file, server_round, control.site, {**control.site, **control.updated})
        content[CONTROL] = to_array_record(change)
    result, trained = outcome.metrics, outcome.trained
    metrics = {
        NUM_EXAMPLES: len(data) if trained else 0,
        STEPS: result.get("steps", 0),
        SECONDS_LOAD: loaded - started,  # the model, the broadcast and the data: ~0 once a process is warm
        SECONDS_TRAIN: time.monotonic() - loaded,
        **{k: v for k, v in result.items() if k.startswith("dp-")},
    }
    if mode.reports_training_loss:  # under DP a loss on private data, and the examples seen, are covered by no ε
        metrics |= {TRAIN_LOSS: result["train_loss"], EXAMPLES_SEEN: result["examples_seen"]}
    state = adapter_state(model)  # sent back: the broadcast's tensors (never the frozen ones), in its order
    if rank is not None:  # what DP-SGD's noise or weight decay did to inactive components is dropped
        state = keep_active(state, broadcast, rank)
    content[ARRAYS] = to_array_record({k: state[k] for k in broadcast} if trained else {})
    content[METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


# secure aggregation's later stages (client/secure.py): the round's secrets are in the node's context
app.query("secagg_shares")(secure.shares)
app.query("secagg_masked")(secure.masked)
app.query("secagg_unmask")(secure.unmask)
