"""Local (sample-level) differential privacy at a site: budget check → DP-SGD → account → sign.

One client-round, as the ClientApp runs it:

1. **open the account** for this run from the site's own disk (:mod:`privacy.state`); on the site's
   first round, σ is fixed once for the *whole planned run*: calibrated so that the planned rounds
   spend at most the budget, composed — ``probe_rounds`` probe rounds (the head alone on pooled
   features, :mod:`fedpeft.probe`) at their (q, steps), then the other rounds at the adapter's — the
   site plans for being sampled every round, because it cannot know that it will not be;
2. **plan** the round's (q, steps) (:func:`privacy.dpsgd.poisson_plan`) and compute the ε the site
   would have spent after it;
3. **refuse** if that exceeds the budget: no training, nothing spent, a signed ``refused`` entry;
4. otherwise **train** with DP-SGD (:mod:`privacy.dpsgd`) and **persist** the account atomically
   *before* anything leaves the site;
5. **sign** the ledger entry (:mod:`privacy.ledger`) that travels with the reply.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.client_round import probe_settings, train_settings
from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.probe import HeadProbe, head_inputs, head_module
from fedpeft.state_dir import state_dir
from fedpeft.training import Encoded
from privacy.accounting import epsilon, noise_for_budget
from privacy.dpsgd import DPSGD, dp_train_local, poisson_plan
from privacy.ledger import ENTRY_VERSION, load_or_create_key, public_key_b64, sign_entry
from privacy.randomness import secret_seed
from privacy.state import RoundSpend, SiteAccount, account_path, load_account, save_account

# Budgets are compared with this slack: calibration lands within 0.01 below, never above.
BUDGET_SLACK = 1e-9


@dataclass(frozen=True)
class LocalPolicy:
    """What a site promises about its data in one run.

    Parameters
    ----------
    budget : float
        ε the site never exceeds (``inf``: no limit, only accounted).
    delta : float
        δ of every ε the site reports.
    noise_multiplier : float
        σ; 0 means: calibrate σ to ``budget`` over ``planned_rounds`` rounds.
    max_grad_norm : float
        Per-example clipping norm C.
    clipping : str
        Opacus clipping mode (``hooks`` or ``ghost``).
    accountant : str
        ``rdp`` or ``prv``.
    planned_rounds : int
        Rounds of the run (the site assumes it takes part in all of them).
    probe_rounds : int
        How many of the first rounds are probe rounds (DP-SGD on the head alone).
    """

    budget: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    clipping: str
    accountant: str
    planned_rounds: int
    probe_rounds: int = 0

    @classmethod
    def from_config(cls, cfg: FedPeftConfig, *, site_budget: float | None = None) -> LocalPolicy:
        """The policy of ``cfg`` (its ``dp_*`` fields); a site's own budget overrides the run's."""
        budget = cfg.dp_epsilon if site_budget is None else float(site_budget)
        return cls(
            budget=budget if budget > 0 else math.inf,
            delta=cfg.dp_delta,
            noise_multiplier=cfg.dp_noise_multiplier,
            max_grad_norm=cfg.dp_max_grad_norm,
            clipping=cfg.dp_clipping,
            accountant=cfg.dp_accountant,
            planned_rounds=cfg.rounds,
            probe_rounds=cfg.probes,
        )


@dataclass(frozen=True)
class PrivateRound:
    """What a site reports after a round: whether it trained, its metrics, and its signed entry."""

    trained: bool
    metrics: dict[str, float]
    entry: dict[str, Any]
    signature: str
    public_key: str
    reason: str = ""
    backlog: tuple[dict[str, Any], ...] = ()  # earlier signed entries the coordinator's ledger lacks


def configured_private_round(
    cfg: FedPeftConfig,
    model: Any,
    data: Encoded,
    *,
    node_config: Mapping[str, Any],
    site: str,
    server_round: int,
    ledger_seq: int | None = None,
    features: Any = None,
) -> PrivateRound:
    """:func:`private_round` as a site runs it from the run config and its own node config: the site's
    budget (``dp-epsilon``) overrides the run's, and its ``state-dir`` holds its accounts and key."""
    budget = node_config.get("dp-epsilon")
    policy = LocalPolicy.from_config(cfg, site_budget=None if budget is None else float(budget))
    return private_round(
        policy,
        model,
        data,
        train=train_settings(cfg),
        probe=probe_settings(cfg, len(data)) if cfg.probes else None,
        site=site,
        run_id=cfg.run_id,
        server_round=server_round,
        state_dir=state_dir(node_config),
        ledger_seq=ledger_seq,
        generator_seed=secret_seed(63, purpose=f"dpsgd/{cfg.run_id}/{site}/{server_round}"),
        features=features,
    )


def run_plan(
    policy: LocalPolicy, *, adapter: tuple[float, int], probe: tuple[float, int] | None = None
) -> list[tuple[float, int]]:
    """``[(q, steps), ...]`` of the whole planned run: the probe rounds at ``probe``'s (q, steps per
    round), the others at ``adapter``'s."""
    probe_rounds = policy.probe_rounds if probe is not None else 0
    runs = [(probe[0], probe[1] * probe_rounds)] if probe is not None and probe_rounds else []
    rest = policy.planned_rounds - probe_rounds
    return [*runs, (adapter[0], adapter[1] * rest)] if rest > 0 else runs


def open_account(policy: LocalPolicy, *, site: str, run_id: str, plan: list[tuple[float, int]]) -> SiteAccount:
    """A new account: σ as given, or calibrated to the budget over the planned run (:func:`run_plan`)."""
    sigma = policy.noise_multiplier
    if sigma <= 0:
        sigma = noise_for_budget(
            epsilon_budget=policy.budget, delta=policy.delta, plan=plan, accountant=policy.accountant
        )
    return SiteAccount(
        run_id=run_id,
        site=site,
        accountant=policy.accountant,
        delta=policy.delta,
        budget=policy.budget,
        noise_multiplier=sigma,
        max_grad_norm=policy.max_grad_norm,
    )


def private_round(
    policy: LocalPolicy,
    model: Any,
    data: Encoded,
    *,
    train: Mapping[str, Any],
    site: str,
    run_id: str,
    server_round: int,
    state_dir: str | Path,
    probe: Mapping[str, Any] | None = None,
    generator_seed: int | None = None,
    ledger_seq: int | None = None,
    features: Any = None,
) -> PrivateRound:
    """Run one client-round under ``policy`` (see the module docstring).

    ``ledger_seq`` is how many of this site's entries the coordinator's ledger holds (sent with the
    round); the site's signed entries after those travel again with this one (``backlog``).

    ``train`` holds :func:`privacy.dpsgd.dp_train_local`'s training settings (``epochs``,
    ``max_steps``, ``batch_size``, ``lr``, ``head_lr``, ``weight_decay``); ``probe`` those of a probe
    round (:func:`fedpeft.client_round.probe_settings`), needed when ``policy.probe_rounds`` > 0;
    ``features`` where the site keeps its head inputs between probe rounds (a
    :class:`fedpeft.probe.FeatureCache`).
    """
    if policy.probe_rounds and probe is None:
        raise ValueError("a policy with probe rounds needs the probe's training settings")
    if policy.delta * len(data) >= 1:  # the coordinator checks this at start-up too; a site never trusts it
        raise FedPeftError(f"site {site}: delta {policy.delta:g} is not below 1/examples (1/{len(data)}); "
                           "refusing to train")
    path = account_path(state_dir, site, run_id)
    adapter_plan = _poisson(len(data), train)
    probe_plan = _poisson(len(data), probe) if probe is not None else None
    in_probe = probe_plan is not None and server_round <= policy.probe_rounds
    q, steps = probe_plan if in_probe else adapter_plan
    account = load_account(path) or open_account(
        policy, site=site, run_id=run_id, plan=run_plan(policy, adapter=adapter_plan, probe=probe_plan)
    )
    account = dataclasses.replace(account, budget=policy.budget)  # the site's current budget applies
    planned = RoundSpend(server_round, account.noise_multiplier, q, steps)
    after = epsilon(account.spend(planned).history, delta=account.delta, accountant=account.accountant)

    if after > account.budget + BUDGET_SLACK:
        spent = epsilon(account.history, delta=account.delta, accountant=account.accountant)
        reason = (
            f"budget: this round would spend epsilon to {after:.3f} > budget {account.budget:g} "
            f"(delta {account.delta:g}); {spent:.3f} spent so far"
        )
        account = account.counted()
        entry = _entry(
            account, server_round, "refused", RoundSpend(server_round, account.noise_multiplier, q, 0), spent
        )
        return _signed(path, account, entry, ledger_seq, trained=False, metrics={"dp-epsilon": spent}, reason=reason)

    mechanism = DPSGD(account.noise_multiplier, account.max_grad_norm, policy.clipping, account.accountant)
    if in_probe:  # the head alone, on the encoder's pooled features (computed without privacy cost: no release)
        settings = {k: v for k, v in probe.items() if k != "feature_batch_size"}
        inputs = head_inputs(model, data, batch_size=probe["feature_batch_size"], runtime=settings["runtime"],
                             cache=features)
        metrics, history = dp_train_local(HeadProbe(head_module(model)), inputs, dp=mechanism,
                                          generator_seed=generator_seed, **settings)
    else:
        metrics, history = dp_train_local(model, data, dp=mechanism, generator_seed=generator_seed, **train)
    taken = sum(n for _, _, n in history)
    if taken != steps or any(abs(r - q) > 1e-12 for _, r, _ in history):
        raise RuntimeError(f"accountant recorded {history}, planned {steps} steps at q={q}")  # never silently
    account = account.spend(planned).counted()
    entry = _entry(account, server_round, "trained", planned, after)
    dp_metrics = {
        "dp-epsilon": after,
        "dp-delta": account.delta,
        "dp-noise-multiplier": account.noise_multiplier,
        "dp-sample-rate": q,
        "dp-steps": float(steps),
        "dp-empty-steps": float(metrics["empty_steps"]),
    }
    return _signed(path, account, entry, ledger_seq, trained=True, metrics={**metrics, **dp_metrics})


def _poisson(num_examples: int, train: Mapping[str, Any]) -> tuple[float, int]:
    return poisson_plan(num_examples, batch_size=train["batch_size"], epochs=train["epochs"],
                        max_steps=train["max_steps"])


def _entry(account: SiteAccount, server_round: int, status: str, spent: RoundSpend, eps: float) -> dict[str, Any]:
    return {
        "version": ENTRY_VERSION,
        "mechanism": "dp-sgd",
        "run_id": account.run_id,
        "site": account.site,
        "round": server_round,
        "site_seq": account.entries,
        "status": status,
        "accountant": account.accountant,
        "noise_multiplier": spent.noise_multiplier,
        "sample_rate": spent.sample_rate,
        "steps": spent.steps,
        "max_grad_norm": account.max_grad_norm,
        "delta": account.delta,
        "epsilon": eps,
        "budget": None if math.isinf(account.budget) else account.budget,
    }


def _signed(
    path: Path,
    account: SiteAccount,
    entry: dict[str, Any],
    ledger_seq: int | None,
    *,
    trained: bool,
    metrics: dict[str, float],
    reason: str = "",
) -> PrivateRound:
    """Sign ``entry``, keep it in the account and save the account (before the reply leaves the site)."""
    key = load_or_create_key(path.parent)
    signature = sign_entry(key, entry)
    backlog = account.unledgered(ledger_seq)
    save_account(path, account.with_signed(entry, signature))
    return PrivateRound(
        trained=trained,
        metrics=metrics,
        entry=entry,
        signature=signature,
        public_key=public_key_b64(key),
        reason=reason,
        backlog=tuple(backlog),
    )
