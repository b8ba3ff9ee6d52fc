"""A run's privacy mode — off, local or central — as one object that the coordinator and the sites ask.

Everything that depends on which differential privacy a run has is decided here; nothing outside
``privacy/`` branches on ``cfg.dp``. :func:`privacy_mode` gives the run's mode, registered by name:

- ``off`` (:class:`NoPrivacy`): sites train plainly and may report their training loss;
- ``local`` (:class:`LocalDP`): every site trains with DP-SGD within its own budget and signs what it
  spent (:mod:`privacy.local`); the coordinator ledgers the entries (:mod:`privacy.server`);
- ``central`` (:class:`CentralDP`): sites clip their update, the coordinator noises the sum
  (:mod:`privacy.central`) and samples sites with a secret draw.

Each mode says which settings it cannot run with (:meth:`PrivacyMode.check`, one line each), what
``--drift auto`` means under it, how a site trains a round (:meth:`PrivacyMode.site_round`) and what it
may report, and how the coordinator draws its sampling seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedpeft.drift import DriftSpec, parse_drift, resolve_drift
from fedpeft.errors import FedPeftError
from fedpeft.label_correction import parse_label_correction
from fedpeft.registry import Registry
from privacy.randomness import secret_seed
from strategies import AGGREGATORS


@dataclass(frozen=True)
class SiteRound:
    """What a site's round produced: whether it trained, its metrics, and (local DP) its signed report."""

    trained: bool
    metrics: dict[str, Any]
    report: Any = None  # privacy.local.PrivateRound under local DP


class PrivacyMode:
    """The mode of a run without differential privacy; the private modes override what differs."""

    name = "off"
    private = False  # whether the run claims an ε
    reports_training_loss = True  # a loss on private data is covered by no ε under DP
    bound_metric: str | None = None  # the metrics.jsonl count of updates the coordinator's bound clipped

    def check(self, cfg: Any) -> None:
        """Raise a one-line :class:`FedPeftError` for a setting this mode cannot run with."""
        fields = dataclasses.fields(cfg)
        changed = [f.name for f in fields if f.name.startswith("dp_") and getattr(cfg, f.name) != f.default]
        if changed:
            raise FedPeftError(f"{changed[0]} is set but dp is off; add --dp local or --dp central")

    def describe(self, cfg: Any) -> str:
        """One line naming the guarantee the run is set up for."""
        return "no differential privacy"

    def drift(self, cfg: Any) -> DriftSpec:
        """The drift correction the run uses (``auto`` resolved)."""
        return resolve_drift(cfg)

    def sampling_seed(self, cfg: Any) -> int:
        """The seed of the coordinator's draw of sites."""
        return cfg.seed

    def example_delta(self, cfg: Any) -> float:
        """δ that a site's example count is checked against at discovery (0: none)."""
        return 0.0

    def audit_delta(self, cfg: Any) -> float:
        """δ of the empirical audit's lower bound."""
        return 1e-5

    def site_round(self, cfg: Any, model: Any, data: Any, *, node_config: Mapping[str, Any], site: str,
                   server_round: int, partition_id: int, frozen: tuple[str, ...], control: Any,
                   ledger_seq: int | None, features: Any = None) -> SiteRound:
        """Train one client-round at a site as this mode does it (``features``: the site's head-input
        cache between probe rounds)."""
        from fedpeft.client_round import train_client_round  # deferred: heavy (torch) on the CLI start-up path

        metrics = train_client_round(cfg, model, data, server_round=server_round, partition_id=partition_id,
                                     frozen=frozen, control=control, drift=self.drift(cfg), features=features)
        return SiteRound(trained=True, metrics=metrics)


class NoPrivacy(PrivacyMode):
    """``--dp off``."""


def _common_dp_checks(cfg: Any) -> None:
    if not 0 < cfg.dp_delta < 1:
        what = "dp_epsilon needs dp_delta" if cfg.dp_epsilon > 0 else "dp needs dp_delta"
        raise FedPeftError(f"{what} in (0, 1), got {cfg.dp_delta:g}; add --dp-delta (e.g. 1e-5, below 1/examples)")
    if cfg.dp_epsilon == 0 and cfg.dp_noise_multiplier == 0:
        raise FedPeftError("dp needs a budget or a noise level: add --dp-epsilon (e.g. 8) or --dp-noise-multiplier")


def _budget(cfg: Any) -> str:
    return f"epsilon {cfg.dp_epsilon:g}" if cfg.dp_epsilon > 0 else "no epsilon budget"


def _sigma(cfg: Any) -> str:
    return f"sigma {cfg.dp_noise_multiplier:g}" if cfg.dp_noise_multiplier > 0 else "sigma calibrated to the budget"


class LocalDP(PrivacyMode):
    """``--dp local``: DP-SGD at every site (sample-level)."""

    name = "local"
    private = True
    reports_training_loss = False

    def check(self, cfg: Any) -> None:
        _common_dp_checks(cfg)
        if cfg.short_round == "retry":
            raise FedPeftError("short_round=retry would have sites train, and spend privacy budget, twice in one round "
                               "under local DP; use skip or stop")
        if cfg.gradient_checkpointing:
            raise FedPeftError("gradient_checkpointing under local DP: Opacus's per-sample hooks would see every "
                               "recomputed layer twice; turn one off")
        if cfg.peft == "ssf-pool" and cfg.dp_clipping == "ghost":
            raise FedPeftError("dp_clipping ghost with peft ssf-pool: ghost clipping clips only the criterion's loss, "
                               "not the pool's matching loss; use --dp-clipping hooks")
        method, _ = parse_label_correction(cfg.label_correction)
        if method != "none":
            raise FedPeftError(f"label_correction {cfg.label_correction} under local DP: it reads the site's label "
                               "counts, which DP-SGD does not protect; use --label-correction none")
        if self.drift(cfg).method != "none":
            raise FedPeftError(f"drift {cfg.drift} under local DP: its gradient term would bypass DP-SGD's per-example "
                               "clipping (and SCAFFOLD's variate would be an unprotected second upload); use --drift "
                               "none")

    def describe(self, cfg: Any) -> str:
        probes = cfg.probes
        probe = "" if not probes else (
            ", every round a linear probe of the head" if probes == cfg.rounds
            else f", the first {probes} round(s) a linear probe of the head")
        return (f"local DP-SGD at every site: {_budget(cfg)} at delta {cfg.dp_delta:g} per site, clip "
                f"{cfg.dp_max_grad_norm:g} per example, {_sigma(cfg)}, {cfg.dp_clipping} clipping, "
                f"{cfg.dp_accountant} accounting{probe}")

    def drift(self, cfg: Any) -> DriftSpec:
        return DriftSpec() if cfg.drift.strip() == "auto" else parse_drift(cfg.drift)

    def example_delta(self, cfg: Any) -> float:
        return cfg.dp_delta

    def audit_delta(self, cfg: Any) -> float:
        return cfg.dp_delta

    def site_round(self, cfg: Any, model: Any, data: Any, *, node_config: Mapping[str, Any], site: str,
                   server_round: int, partition_id: int, frozen: tuple[str, ...], control: Any,
                   ledger_seq: int | None, features: Any = None) -> SiteRound:
        # deferred: heavy (torch, opacus) on the CLI start-up path
        from fedpeft.client_round import frozen_parameters
        from privacy.local import configured_private_round

        with frozen_parameters(model, frozen):
            report = configured_private_round(cfg, model, data, node_config=node_config, site=site,
                                              server_round=server_round, ledger_seq=ledger_seq, features=features)
        return SiteRound(trained=report.trained, metrics=report.metrics, report=report)


class CentralDP(PrivacyMode):
    """``--dp central``: clipped updates, noise on their sum at the coordinator (user-level)."""

    name = "central"
    private = True
    reports_training_loss = False
    bound_metric = "reclipped"

    def check(self, cfg: Any) -> None:
        from privacy.central import check_composes  # deferred: heavy (flwr) on the CLI start-up path

        _common_dp_checks(cfg)
        if cfg.strategy == "rolora":  # not yet run through privacy/central.py's release
            raise FedPeftError("strategy rolora under dp central: its alternating held factor is not yet verified with "
                               "the central release; use ffa-lora (A frozen) or --dp local")
        check_composes(AGGREGATORS.get(cfg.strategy))
        if cfg.clip_update_norm > 0:
            raise FedPeftError("clip_update_norm under central DP: the server already clips every update to "
                               "dp_max_grad_norm; set that instead")
        if cfg.max_norm_ratio > 0:
            raise FedPeftError("max_norm_ratio compares sites with each other, so under central DP one site's data "
                               "could decide whether another's update counts; use max_update_norm (central DP clips "
                               "every update to C anyway)")
        if cfg.robust != "none":
            raise FedPeftError("robust aggregation under central DP: the noise is calibrated to a sum of clipped "
                               "updates, not to a median or trimmed mean; use --max-update-norm instead")
        if self.drift(cfg).method == "scaffold":
            raise FedPeftError("drift scaffold under central DP: each site's control-variate update is a second upload "
                               "that the noised sum does not cover; use --drift fedprox:<mu> or none")
        if cfg.secure_aggregation and cfg.secagg_clip != type(cfg).__dataclass_fields__["secagg_clip"].default:
            raise FedPeftError("secure aggregation: under central DP the sites clip their update to "
                               "--dp-max-grad-norm; drop --secagg-clip")

    def describe(self, cfg: Any) -> str:
        return (f"central DP: {_budget(cfg)} at delta {cfg.dp_delta:g} per client (user level), clip "
                f"{cfg.dp_max_grad_norm:g} per client update, {_sigma(cfg)}")

    def drift(self, cfg: Any) -> DriftSpec:
        return DriftSpec() if cfg.drift.strip() == "auto" else parse_drift(cfg.drift)

    def sampling_seed(self, cfg: Any) -> int:
        # amplification by sampling holds only while the sampled set is secret: never the run seed
        return secret_seed(32, purpose="central-sampling") if cfg.fraction < 1 else cfg.seed

    def audit_delta(self, cfg: Any) -> float:
        return cfg.dp_delta


MODES: Registry[PrivacyMode] = Registry("privacy mode")
for _mode in (NoPrivacy(), LocalDP(), CentralDP()):
    MODES.register(_mode.name)(_mode)


def privacy_mode(cfg: Any) -> PrivacyMode:
    """The privacy mode of the run ``cfg`` configures."""
    return MODES.get(cfg.dp)
