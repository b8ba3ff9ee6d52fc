"""The coordinator's round loop and run directory.

For each round: sample sites and broadcast the global adapter, aggregate the replies with the
configured strategy, evaluate the new global adapter on the held-out split, append one line to
``metrics.jsonl``. At the end the adapter is saved with ``save_pretrained`` (loadable by plain peft).

``RUN_DIR`` holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one line per round),
``traffic.jsonl`` (one line per site per round: bytes each way, compression ratio, accepted /
rejected with the reason) and ``adapter/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpeft.adapters import load_adapter_state
from fedpeft.adapters.lora.dynamic import RankSchedule, keep_active
from fedpeft.config import FedPeftConfig
from fedpeft.data.sources import load_split
from fedpeft.downlink import Change
from fedpeft.errors import FedPeftError
from fedpeft.heads import model_pooling, save_remote_code
from fedpeft.protocol import CANARIES, NUM_EXAMPLES, TRAIN_LOSS, request_record
from fedpeft.runlog import append_jsonl, atomic_replace_dir, atomic_write_text
from fedpeft.state_dir import state_dir
from fedpeft.wire import from_array_record
from privacy.canaries import site_canaries
from privacy.empirical import audit_run_canaries, run_canaries, save_result, site_rows
from privacy.modes import privacy_mode
from privacy.server import RunPrivacy
from server.checkpoint import Checkpoint, load_checkpoint, log_sizes, resumed_config, rewind_logs, save_checkpoint
from server.discovery import finish_discovery, start_discovery, wait_for_nodes
from server.evaluation import Evaluator
from server.report import write_report
from server.rounds import play_round
from server.secure import SecureSettings
from strategies import AGGREGATORS, AggregationOptions
from strategies.aggregator import round_rule
from strategies.flower import Broadcasts, FedPeftStrategy, RoundOutcome
from strategies.norm_bound import clip_to_norm
from strategies.replies import RoundTraffic
from strategies.server_opt import SERVER_OPTIMIZERS, ServerOptSettings, server_step
from strategies.validation import ReplyLimits

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)

RoundCallback = Callable[[Mapping[str, Any], float], None]
def norm_bound(max_norm: float) -> Any:
    """The update bound of ``clip_update_norm`` (norm bounding), or None when it is off."""
    if max_norm <= 0:
        return None
    return partial(clip_to_norm, max_norm=max_norm)


def adapter_nbytes(state: Mapping[str, np.ndarray]) -> int:
    """Raw tensor bytes of an adapter state (what the wire carries before framing)."""
    return int(sum(v.nbytes for v in state.values()))


def open_run(
    grid: Any, cfg: FedPeftConfig, *, clients_from_federation: bool
) -> tuple[FedPeftConfig, list[int], Checkpoint | None]:
    """Wait for the clients; resolve the run's config (a resumed run's own, a run id, the federation's
    client count); create the run directory with its ``config.json`` or load the checkpoint to resume."""
    nodes = wait_for_nodes(grid, 1 if clients_from_federation else cfg.clients)
    checkpoint: Checkpoint | None = None
    if cfg.resume:
        cfg = resumed_config(cfg)
        checkpoint = load_checkpoint(Path(cfg.out))
        if checkpoint.run_id != cfg.run_id:
            raise FedPeftError(f"cannot resume {cfg.out}: its checkpoint belongs to run {checkpoint.run_id}")
    elif clients_from_federation:
        cfg = dataclasses.replace(cfg, clients=len(nodes))
    if not cfg.run_id:
        cfg = dataclasses.replace(cfg, run_id=uuid.uuid4().hex[:16])
    run_dir = Path(cfg.out)
    if checkpoint is None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise FedPeftError(f"cannot create the run directory {run_dir}: {err.strerror}") from None
        if (run_dir / "metrics.jsonl").exists():
            raise FedPeftError(f"{run_dir} already holds a run; choose another --out, or continue it with --resume")
        atomic_write_text(run_dir / "config.json", cfg.to_json())
    return cfg, nodes, checkpoint


Arrays = dict[str, np.ndarray]


class Coordinator:
    """What the coordinator owns across rounds: the global adapter (``state``), the server optimizer's
    moments, SCAFFOLD's variate c (None without SCAFFOLD), the delta broadcast's last broadcast and who
    holds it (``broadcasts``, None without it) and the sampling seed; it records each round's evaluation
    and commits each round's checkpoint."""

    def __init__(self, cfg: FedPeftConfig, evaluator: Evaluator, *, seed: int, state: Arrays,
                 control: Arrays | None, on_round: RoundCallback | None) -> None:
        self.cfg, self.evaluator, self.on_round = cfg, evaluator, on_round
        self.run_dir = Path(cfg.out)
        self.seed, self.state, self.control = seed, state, control
        self.moments: Arrays = {}
        # the delta broadcast's state: before round 1 every site holds the seeded initial adapter
        self.broadcasts = Broadcasts(base=dict(state)) if cfg.downlink_delta else None
        self.ranks = RankSchedule.of(cfg)  # DP-DyLoRA's drawn ranks, or None

    def resume(self, checkpoint: Checkpoint) -> dict[str, Any]:
        """Take the owned state from ``checkpoint``; the last round's record."""
        record, self.state, self.seed = resume_from(checkpoint, self.run_dir, self.evaluator)
        self.moments = dict(checkpoint.optimizer)
        if self.control is not None:
            self.control = dict(checkpoint.control or {})
        if self.broadcasts is not None and checkpoint.broadcast is not None:
            changes = tuple(Change(base=c["base"], digest=c["digest"], header=dict(c["header"]),
                                   payload=checkpoint.broadcast_payloads[str(i)])
                            for i, c in enumerate(checkpoint.broadcast_changes))
            self.broadcasts = Broadcasts(base=dict(checkpoint.broadcast), held=dict(checkpoint.broadcast_held),
                                         origin=checkpoint.broadcast_origin, changes=changes)
        return record

    def take(self, rnd: int, outcome: RoundOutcome) -> dict[str, float]:
        """Round ``rnd``'s outcome: the next global adapter (the aggregate, or the server optimizer's step
        along it) and c; the server step's metrics."""
        self.control = outcome.control
        self.broadcasts = outcome.broadcasts
        if outcome.arrays is None:
            return {}
        aggregated = {**self.state, **from_array_record(outcome.arrays)}
        state, self.moments, metrics = server_move(self.cfg, rnd, self.state, aggregated, self.moments)
        if self.ranks is not None:  # DP-DyLoRA: whatever path made the step, components above the rank stay
            state = keep_active(state, self.state, self.ranks.rank(rnd))
        self.state = state
        return metrics

    def record(self, rnd: int, extra: Mapping[str, Any], started: float) -> dict[str, Any]:
        """Evaluate the global adapter, append round ``rnd``'s record to metrics.jsonl, report it."""
        ev = self.evaluator.evaluate(self.state)
        record = {
            "round": rnd,
            "accuracy": ev["accuracy"],
            "loss": ev["loss"],
            **({"perplexity": ev["perplexity"]} if "perplexity" in ev else {}),
            "adapter_bytes": adapter_nbytes(self.state),
            **extra,
        }
        append_jsonl(self.run_dir / "metrics.jsonl", record)
        if self.on_round is not None:
            self.on_round(record, time.monotonic() - started)
        return record

    def commit(self, rnd: int, population: int, ledger: Any) -> None:
        """The round's commit point: everything after the last checkpoint is redone on resume."""
        count, head = (ledger.count, ledger.head) if ledger is not None else (0, "")
        save_checkpoint(self.run_dir, Checkpoint(
            run_id=self.cfg.run_id, round=rnd, seed=self.seed, population=population, ledger_count=count,
            ledger_head=head, logs=log_sizes(self.run_dir), state=self.state, optimizer=self.moments,
            control=self.control, **broadcast_fields(self.broadcasts),
        ))


def run_federation(
    grid: Any, cfg: FedPeftConfig, *, on_round: RoundCallback | None = None, clients_from_federation: bool = False
) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds against the clients behind ``grid``; return the final record.

    With ``clients_from_federation`` (``flwr run``), the clients are the nodes the federation has
    connected (its ``num-supernodes``), and ``cfg.clients`` is set to their number.
    """
    cfg, nodes, checkpoint = open_run(grid, cfg, clients_from_federation=clients_from_federation)
    run_dir = Path(cfg.out)

    split = load_split(cfg)
    label_names = list(split[0].label_names)
    # Clients start up (imports, model, data) while the server loads its own copy and evaluates round 0.
    queries = start_discovery(grid, cfg, nodes, label_names=label_names)
    evaluator = Evaluator(cfg, split=split)
    state = evaluator.initial_state()  # the seeded initial adapter every client starts from
    # Central DP amplified by sampling needs a draw the run seed does not reveal (kept in the checkpoint).
    mode = privacy_mode(cfg)
    seed = mode.sampling_seed(cfg)

    drift = mode.drift(cfg)
    owned = Coordinator(cfg, evaluator, seed=seed, state=state, on_round=on_round,
                        control={} if drift.method == "scaffold" else None)
    if checkpoint is None:
        record = owned.record(0, {"clients": 0, "bytes_up": 0, "bytes_down": 0}, time.monotonic())
        owned.commit(0, 0, None)
    else:
        record = owned.resume(checkpoint)
    sites, ranks, examples = finish_discovery(grid, queries, timeout=cfg.startup_timeout, min_sites=cfg.min_clients,
                                    example_delta=mode.example_delta(cfg))
    population = checkpoint.population if checkpoint is not None and checkpoint.population else len(sites)
    privacy = RunPrivacy(cfg, run_dir, num_sites=population, key_dir=state_dir() / "coordinator",
                         resume=checkpoint)
    base_config = request_record(cfg, label_names=label_names, **privacy.train_config)
    canaries = run_canaries(run_dir, cfg.canaries, label_names=label_names, sites=list(sites.values())) \
        if cfg.canaries else []

    strategy = build_strategy(cfg, sites=sites, ranks=ranks, seed=owned.seed, privacy=privacy, canaries=canaries,
                              control=owned.control, control_scope=drift.scope, broadcasts=owned.broadcasts,
                              examples=examples)
    strategy.summary()
    logger.info("privacy: %s", privacy.describe())

    arrivals: list[float] = []  # seconds from a round's push to each of its replies: the next round's pace
    for rnd in range(record["round"] + 1, cfg.rounds + 1):
        stop = privacy.stop_reason()
        if stop is not None:
            logger.warning("stopping before round %d: %s", rnd, stop)
            break
        started = time.monotonic()
        outcome = play_round(rnd, owned.state, cfg=cfg, strategy=strategy, base_config=base_config, grid=grid,
                             arrivals=arrivals)
        step_metrics = owned.take(rnd, outcome)
        clients = int(outcome.metrics["clients"]) if outcome.metrics is not None else 0
        dp_metrics = privacy.after_round(rnd, clients=clients)
        if dp_metrics:
            logger.info("round %d: max epsilon %.4f at delta %g across sites; ledger head %s", rnd,
                        dp_metrics["epsilon_max"], dp_metrics["delta"], dp_metrics["ledger_head"][:12])
        for row in outcome.traffic.per_site():
            append_jsonl(run_dir / "traffic.jsonl", {"round": rnd, **row})
        extra = round_metrics(cfg, outcome.traffic, outcome.metrics, skipped=outcome.arrays is None, clients=clients)
        if owned.ranks is not None:  # DP-DyLoRA: the rank this round trained
            extra["active_rank"] = owned.ranks.rank(rnd)
        record = owned.record(rnd, {**extra, **step_metrics, **dp_metrics}, started)
        owned.commit(rnd, population, privacy.ledger)

    finish_run(cfg, evaluator, owned.state, canaries=canaries, privacy=privacy)
    return record


def build_strategy(cfg: FedPeftConfig, *, sites: Mapping[int, str], ranks: Mapping[str, int], seed: int,
                   privacy: RunPrivacy, canaries: list[Any], control: dict[str, np.ndarray] | None,
                   control_scope: tuple[str, ...], broadcasts: Broadcasts | None = None,
                   examples: Mapping[str, int] | None = None) -> FedPeftStrategy:
    """The run's strategy over the discovered ``sites``: its rule, sampling, reply checks and bounds from
    ``cfg``, the privacy mode's parts from ``privacy``, each site's own train config (its ledger position,
    the audit's canaries), SCAFFOLD's variate ``control`` when the run corrects drift with it."""

    def site_config(key: str) -> dict[str, Any]:
        extra = dict(privacy.site_config(key)) if privacy.site_config is not None else {}
        if canaries:
            extra[CANARIES] = site_rows(canaries, key)
        return extra

    return FedPeftStrategy(
        aggregator=cfg.strategy,
        sites=sites,
        fraction=cfg.fraction,
        seed=seed,
        options=AggregationOptions(lam=cfg.fair_lambda, ab_iterations=cfg.fair_iterations, seed=cfg.seed,
                                   robust=cfg.robust),
        ranks=ranks,
        checks=privacy.checks,
        site_config=site_config if privacy.site_config is not None or canaries else None,
        uniform_weights=privacy.uniform_weights,
        downlink=cfg.downlink_codec,
        broadcasts=broadcasts,
        bound=privacy.bound or norm_bound(cfg.clip_update_norm),
        limits=ReplyLimits(max_norm=cfg.max_update_norm, ratio=cfg.max_norm_ratio),
        min_replies=cfg.min_clients,
        message_ttl=cfg.round_timeout,
        release=None if cfg.secure_aggregation else privacy.release,
        control=control,
        control_scope=control_scope,
        head_frozen_after=head_frozen_after(cfg),
        secure=SecureSettings(
            clip=cfg.dp_max_grad_norm if privacy.release_sum else cfg.secagg_clip, bits=cfg.secagg_bits,
            threshold=cfg.secagg_threshold, run_id=cfg.run_id, uniform=privacy.uniform_weights,
            release=privacy.release_sum,
            weight_cap=secure_weight_cap(privacy.uniform_weights, examples, canaries, sites.values()),
        ) if cfg.secure_aggregation else None,
        ranks_drawn=RankSchedule.of(cfg),
        secure_codec=cfg.codec,
    )


def broadcast_fields(broadcasts: Broadcasts | None) -> dict[str, Any]:
    """The checkpoint's fields of the delta broadcast's state (none without it)."""
    if broadcasts is None:
        return {}
    return {"broadcast": broadcasts.base, "broadcast_held": dict(sorted(broadcasts.held.items())),
            "broadcast_origin": broadcasts.origin,
            "broadcast_changes": [{"base": c.base, "digest": c.digest, "header": c.header} for c in broadcasts.changes],
            "broadcast_payloads": {str(i): c.payload for i, c in enumerate(broadcasts.changes)}}


def secure_weight_cap(uniform: bool, examples: Mapping[str, int] | None, canaries: list[Any],
                      sites: Iterable[str]) -> int:
    """The most one site may weigh in a secure sum, which sizes the round's ring: 1 under central DP, else
    the most examples a site reported at start-up plus the most canaries one trains on (0: unknown)."""
    if uniform:
        return 1
    if not examples:
        return 0
    extra = max((len(site_canaries(canaries, key)) for key in sites), default=0) if canaries else 0
    return max(examples.values()) + extra


def head_frozen_after(cfg: FedPeftConfig) -> int | None:
    """The round after which the head is held (``head_after_probe=freeze``: the last probe round), or None."""
    return cfg.probes if cfg.head_after_probe == "freeze" else None




def server_move(cfg: FedPeftConfig, rnd: int, state: Arrays, aggregated: Arrays,
                moments: Arrays) -> tuple[Arrays, Arrays, dict[str, float]]:
    """The next broadcast from round ``rnd``'s aggregate: the aggregate itself, or the server optimizer's
    step along it (tensors the round's rule keeps fixed stay), with the optimizer's new moments."""
    if cfg.server_opt == "none":
        return aggregated, moments, {}
    settings = ServerOptSettings(lr=cfg.server_lr, momentum=cfg.server_momentum, beta2=cfg.server_beta2,
                                 tau=cfg.server_tau)
    fixed = round_rule(AGGREGATORS.get(cfg.strategy), rnd, head_frozen_after=head_frozen_after(cfg)).fixed
    return server_step(SERVER_OPTIMIZERS.get(cfg.server_opt), state, aggregated, moments, settings=settings,
                       fixed=fixed)


def round_metrics(cfg: FedPeftConfig, traffic: RoundTraffic, agg: Mapping[str, Any] | None, *, skipped: bool,
                  clients: int) -> dict[str, Any]:
    """A round's ``metrics.jsonl`` fields from what the strategy saw of it (evaluation aside)."""
    up, down = list(traffic.received.values()), list(traffic.sent.values())
    return {
        "clients": clients,
        "failures": len(traffic.failures),
        "no_reply": len(set(traffic.sent) - set(traffic.failures) - set(traffic.refused) - set(traffic.received)),
        "rejected": len(traffic.rejected()),
        **({"skipped": True} if skipped else {}),
        "refused": len(traffic.refused),
        **({"train_loss": float(agg[TRAIN_LOSS])} if agg is not None and TRAIN_LOSS in agg else {}),
        "num_examples": int(sum(m.get(NUM_EXAMPLES, 0) for m in traffic.client_metrics.values())),
        "bytes_up": int(sum(up)),
        "bytes_down": int(sum(down)),
        "bytes_up_per_client": int(np.mean(up)) if up else 0,
        "bytes_down_per_client": int(np.mean(down)) if down else 0,
        **traffic.compression(),
        **({bound: len(traffic.reclipped)} if (bound := privacy_mode(cfg).bound_metric) else {}),
        **({"clipped": len(traffic.reclipped)} if cfg.clip_update_norm > 0 else {}),
        **{key: float(value) for key, value in (agg or {}).items() if key.startswith(("agg_", "secagg_"))},
        **({"dp_noise_std": float(agg["dp_noise_std"])} if agg is not None and "dp_noise_std" in agg else {}),
    }


def finish_run(cfg: FedPeftConfig, evaluator: Evaluator, state: Mapping[str, np.ndarray], *,
               canaries: list[Any], privacy: RunPrivacy) -> None:
    """Save the final adapter, score the empirical audit's canaries (if any), write the report."""
    run_dir = Path(cfg.out)
    model, label_names = evaluator.loaded(state), evaluator.label_names
    save_adapter(model, state, run_dir / "adapter", cfg=cfg, label_names=label_names)
    if canaries:
        audit = audit_run_canaries(model, evaluator.tokenizer, canaries, label_names=label_names,
                                   max_length=cfg.max_length, delta=privacy_mode(cfg).audit_delta(cfg),
                                   accountant_epsilon=privacy.spent(), runtime=evaluator.runtime)
        save_result(run_dir, audit)
        claim = audit["accountant_epsilon"]
        claimed = "no DP" if claim is None else f"the accountant's {claim:.3f}"
        (logger.error if audit["violation"] else logger.info)(
            "empirical audit: epsilon >= %.3f at %.0f%% confidence from %d canaries (%d of %d guesses right), "
            "against %s%s", audit["epsilon"], 100 * audit["confidence"], audit["canaries"], audit["correct"],
            audit["guesses"], claimed, " — VIOLATION: the run leaks more than it claims" if audit["violation"] else "")
    try:
        write_report(run_dir)
    except Exception as err:  # the run's results are saved; a figure that fails must not lose them
        logger.warning("the run finished, but its report could not be written (%s); try: fedpeft report %s",
                       err, run_dir)


def resume_from(checkpoint: Checkpoint, run_dir: Path, evaluator: Evaluator
                ) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Rewind the run logs to ``checkpoint``; return its last metrics record, global adapter and seed."""
    if not evaluator.shapes_fit(checkpoint.state):
        raise FedPeftError(f"cannot resume {run_dir}: the checkpoint's adapter does not fit the model of its config")
    cut = rewind_logs(run_dir, checkpoint.logs)
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[-1])
    if record.get("round") != checkpoint.round:
        raise FedPeftError(f"cannot resume {run_dir}: metrics.jsonl ends at round {record.get('round')}, "
                           f"the checkpoint at round {checkpoint.round}")
    dropped = f"; dropped the log lines of the round that did not complete ({cut})" if cut else ""
    logger.warning("resuming %s after round %d%s", run_dir, checkpoint.round, dropped)
    return record, dict(checkpoint.state), checkpoint.seed


def save_adapter(
    model: Any, state: Mapping[str, np.ndarray], out: Path, *, cfg: FedPeftConfig, label_names: list[str]
) -> None:
    """Save the global adapter with ``save_pretrained`` plus ``fedpeft.json`` (labels, columns), atomically."""
    load_adapter_state(model, state)
    build = Path(tempfile.mkdtemp(dir=out.parent, prefix=".adapter."))
    model.save_pretrained(str(build))
    meta = {
        "task": cfg.task,
        "label_names": label_names,
        "text_column": cfg.text_column,
        "label_column": cfg.label_column,
        "max_length": cfg.max_length,
        "base_model": cfg.model or "all-MiniLM-L6-v2",
    }
    if cfg.task == "seq-cls":  # the head a reload or an export must rebuild
        pooling = model_pooling(model)
        meta |= {"pooling": pooling.mode, "pooling_normalize": pooling.normalize}
        if pooling.mode == "mean":
            save_remote_code(build)
    (build / "fedpeft.json").write_text(json.dumps(meta, indent=2) + "\n")
    atomic_replace_dir(build, out)
