"""One check of a run's configuration, before any model loads or process starts.

:func:`check_config` is what ``fedpeft simulate`` and the ServerApp under ``flwr run`` call: the
settings each field takes alone are checked when the config is built (:mod:`fedpeft.config`); this
checks how they combine with each other, with the aggregation rule (:mod:`strategies.checks`) and with
the run's privacy mode (:meth:`privacy.modes.PrivacyMode.check`). Each check is written once.
"""

from __future__ import annotations

from fedpeft.config import FedPeftConfig, parse_ranks
from fedpeft.errors import FedPeftError
from privacy.modes import privacy_mode
from strategies import AGGREGATORS
from strategies.checks import check_adapter_kind, check_ranks, check_robust
from strategies.sampling import sample_count


def check_config(cfg: FedPeftConfig) -> None:
    """Raise a one-line :class:`FedPeftError` for settings that cannot run together."""
    aggregator = AGGREGATORS.get(cfg.strategy)
    sampled = sample_count(cfg.clients, cfg.fraction)
    if cfg.min_clients > sampled:
        raise FedPeftError(
            f"min_clients {cfg.min_clients} exceeds the {sampled} clients sampled per round "
            f"({cfg.clients} x fraction {cfg.fraction:g}): every round would be short; lower it or raise --fraction"
        )
    check_adapter_kind(aggregator, cfg.peft)
    check_robust(aggregator, cfg.robust)
    if cfg.peft == "lora":
        ranks = parse_ranks(cfg.client_ranks)
        check_ranks(aggregator, {f"client {i} (client_ranks {cfg.client_ranks})": r for i, r in enumerate(ranks)},
                    global_rank=cfg.lora_r)
    mode = privacy_mode(cfg)
    mode.check(cfg)
    drift = mode.drift(cfg)
    if cfg.peft == "lora" and drift.method == "scaffold" and not drift.scope and set(ranks) - {cfg.lora_r}:
        raise FedPeftError(f"drift {cfg.drift} keeps a control variate per LoRA factor, whose shape differs across "
                           f"client_ranks {cfg.client_ranks!r}; use --drift scaffold:head")
    if cfg.secure_aggregation:
        check_secure(cfg, aggregator, sampled, drift.method)


# what secure aggregation leaves the coordinator unable to do, by setting: (is it set?, why it cannot run)
def check_secure(cfg: FedPeftConfig, aggregator: object, sampled: int, drift: str) -> None:
    """Secure aggregation gives the coordinator the sum of the sampled sites' updates and nothing else."""
    if not aggregator.linear:  # type: ignore[attr-defined]
        linear = sorted({AGGREGATORS.get(n).name for n in AGGREGATORS
                         if AGGREGATORS.get(n).linear and AGGREGATORS.get(n).adapter == aggregator.adapter})  # type: ignore[attr-defined]
        raise FedPeftError(f"secure aggregation: strategy {cfg.strategy} needs each site's factors, and the "
                           f"coordinator would see only their sum; use one of: {', '.join(linear)}")
    refusals = [
        (cfg.codec != "none" and cfg.codec.split(":")[0].strip() != "shared",
         f"codec {cfg.codec} encodes each site's update its own way (indices, scales), which a masked sum cannot "
         "add; use --codec none (the masked sum is its own encoding) or shared:<density> (the round's positions)"),
        (cfg.robust != "none", f"robust {cfg.robust} reads each site's update, which secure aggregation hides"),
        (cfg.max_update_norm > 0 or cfg.max_norm_ratio > 0 or cfg.clip_update_norm > 0,
         "the coordinator cannot check or clip one site's masked update; the sites clip their own to --secagg-clip "
         "(drop --max-update-norm, --max-norm-ratio and --clip-update-norm)"),
        (drift == "scaffold", "drift scaffold sends each site's change of its control variate, a second upload the "
                              "masked sum does not cover; use --drift fedprox:<mu> or none"),
        (bool(cfg.client_ranks), "sites of different LoRA ranks send vectors of different sizes, which a masked sum "
                                 "cannot add; drop --client-ranks"),
        (sampled < 2, f"it sums at least 2 sites a round; {sampled} is sampled (raise --fraction or "
                      "--clients)"),
        (cfg.secagg_threshold > sampled, f"secagg_threshold {cfg.secagg_threshold} exceeds the {sampled} sites "
                                         "sampled a round"),
    ]
    for refused, why in refusals:
        if refused:
            raise FedPeftError(f"secure aggregation: {why}")
