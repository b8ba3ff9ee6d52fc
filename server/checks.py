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
