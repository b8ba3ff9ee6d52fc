"""The coordinator's side of privacy: admit signed entries to the ledger, follow ε, central DP rounds.

- **Local DP** (:class:`LedgerCheck`): every reply of a DP round must carry the site's signed entry;
  the check verifies it (signature, run, round, site, the site's entry count) and appends it to
  ``RUN_DIR/privacy_ledger.jsonl`` before the strategy may use the reply. A reply whose entry does not
  verify is rejected and never reaches the aggregate. Refused rounds are ledgered too.
- **Central DP** (:class:`CentralLedger`): the coordinator adds the noise, so it signs one entry per
  release with its own key; every release is accounted at the same multiplier, however many of the
  sampled sites answered (:mod:`privacy.central`).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.errors import FedPeftError
from fedpeft.wire import LEDGER_SEQ, read_privacy
from privacy.central import (
    CentralAccountant,
    calibrate_central_sigma,
    central_release,
    clip_update,
    noised_mean_of_sum,
)
from privacy.central import train_config as central_train_config
from privacy.ledger import (
    ENTRY_VERSION,
    Ledger,
    LedgerError,
    cut_torn_tail,
    load_or_create_key,
    public_key_b64,
    read_lines,
    sign_entry,
    verify_chain,
)
from privacy.randomness import secret_seed
from strategies.sampling import sample_count

LEDGER_FILE = "privacy_ledger.jsonl"
COORDINATOR = "coordinator"


class LedgerCheck:
    """A :data:`strategies.flower.ReplyCheck` that ledgers each reply's signed privacy entry.

    Parameters
    ----------
    ledger : Ledger
        The run's ledger.
    run_id : str
        Entries of other runs are rejected.
    """

    def __init__(self, ledger: Ledger, *, run_id: str) -> None:
        self.ledger = ledger
        self.run_id = run_id
        self.epsilon: dict[str, float] = {}  # site → ε spent so far, from its latest entry
        self.delta: float | None = None

    def __call__(self, site: str, server_round: int, content: Any) -> str | None:
        report = read_privacy(content)
        if report is None:
            return "reply of a DP run carries no privacy entry"
        entry = report["entry"]
        for name, want in (("run_id", self.run_id), ("round", server_round), ("site", site)):
            if entry.get(name) != want:
                return f"privacy entry names {name} {entry.get(name)!r}, expected {want!r}"
        if entry.get("status") != report["status"]:
            return "privacy entry status differs from the reply's"
        # Entries the site signed in rounds whose reply never arrived (a straggler past the round timeout,
        # a coordinator that crashed): admitted first, in the site's order, so no spend goes unledgered.
        known = self.ledger.site_seq.get(site, 0)
        backlog = sorted(report["backlog"], key=lambda b: int(b["entry"].get("site_seq", 0)))
        try:
            for earlier in backlog:
                old = earlier["entry"]
                if int(old.get("site_seq", 0)) <= known:
                    continue
                names = (old.get("run_id"), old.get("site"))
                if names != (self.run_id, site) or not 0 < old.get("round", 0) <= server_round:
                    return f"a resent privacy entry of {site} names another run, site or a later round"
                self.ledger.admit(old, str(earlier["signature"]), report["public_key"])
                self._note(site, old)
            self.ledger.admit(entry, report["signature"], report["public_key"])
        except (LedgerError, TypeError, ValueError) as err:
            return str(err)
        self._note(site, entry)
        return None

    def _note(self, site: str, entry: Any) -> None:
        self.epsilon[site] = float(entry["epsilon"])
        self.delta = float(entry["delta"])

    def max_epsilon(self) -> float:
        """The largest ε any site has reported so far (0 before any)."""
        return max(self.epsilon.values(), default=0.0)


class CentralLedger:
    """Ledger entries for central DP releases, signed by the coordinator's key."""

    def __init__(self, ledger: Ledger, *, run_id: str, key_dir: str | Path, clipping_norm: float) -> None:
        self.ledger = ledger
        self.run_id = run_id
        self.key = load_or_create_key(key_dir)
        self.clipping_norm = clipping_norm

    def record(self, accountant: CentralAccountant, *, server_round: int, replies: int) -> dict[str, Any]:
        """Ledger the release just composed into ``accountant``; return the entry.

        ``noise_multiplier`` is the accounted one (std over the sum's sensitivity under ``neighbours``),
        which is what the audit recomputes ε from; ``noise_std`` is σC on the sum, divided by
        ``sample_size`` whatever ``replies`` (the sampled sites whose update was used) is.
        """
        entry = {
            "version": ENTRY_VERSION,
            "mechanism": "central-gaussian",
            "run_id": self.run_id,
            "site": COORDINATOR,
            "round": server_round,
            "site_seq": self.ledger.site_seq.get(COORDINATOR, 0) + 1,
            "status": "released",
            "accountant": "rdp",
            "noise_multiplier": accountant.releases[-1],
            "noise_std": accountant.noise_multiplier * self.clipping_norm,
            "sample_size": accountant.sample_size,
            "population": accountant.population,
            "replies": replies,
            "sampling": accountant.sampling,
            "neighbours": accountant.neighbours,
            "max_grad_norm": self.clipping_norm,
            "delta": accountant.delta,
            "epsilon": accountant.epsilon(),
            "budget": None if math.isinf(accountant.budget) else accountant.budget,
        }
        self.ledger.admit(entry, sign_entry(self.key, entry), public_key_b64(self.key))
        return entry


class RunPrivacy:
    """Everything privacy adds to a run on the coordinator, behind four calls for the round loop.

    Build it for a run; then ``checks``, ``uniform_weights``, ``bound`` and ``release`` go to the
    strategy, ``train_config`` into every train message (central DP: the sites' clipping norm),
    :meth:`stop_reason` is asked before each round and :meth:`after_round` accounts a release and
    gives the round's privacy metrics.
    """

    def __init__(self, cfg: Any, run_dir: Path, *, num_sites: int, key_dir: Path, resume: Any = None) -> None:
        self.mode = cfg.dp
        if resume is not None and cfg.dp != "off":
            cut_torn_tail(run_dir / LEDGER_FILE)
        self.ledger = Ledger(run_dir / LEDGER_FILE) if cfg.dp != "off" else None
        self.local = LedgerCheck(self.ledger, run_id=cfg.run_id) if cfg.dp == "local" else None
        self.central: CentralAccountant | None = None
        self.central_ledger: CentralLedger | None = None
        self.clipping_norm = cfg.dp_max_grad_norm
        if cfg.dp == "central":
            # OS entropy: a seeded run must not make the noise predictable
            self._noise = np.random.default_rng(secret_seed(128, purpose=f"central-noise/{cfg.run_id}"))
            m = sample_count(num_sites, cfg.fraction)
            sigma = cfg.dp_noise_multiplier or calibrate_central_sigma(
                budget=cfg.dp_epsilon, delta=cfg.dp_delta, population=num_sites, sample_size=m, rounds=cfg.rounds
            )
            budget = cfg.dp_epsilon if cfg.dp_epsilon > 0 else math.inf
            self.central = CentralAccountant(
                population=num_sites, sample_size=m, delta=cfg.dp_delta, budget=budget, noise_multiplier=sigma
            )
            assert self.ledger is not None
            self.central_ledger = CentralLedger(
                self.ledger, run_id=cfg.run_id, key_dir=key_dir, clipping_norm=cfg.dp_max_grad_norm
            )

        if resume is not None and self.ledger is not None:
            self._restore(count=resume.ledger_count, head=resume.ledger_head)

    def _restore(self, *, count: int, head: str) -> None:
        """Continue a resumed run's accounting from its ledger: every entry counts, including those of a
        round that did not commit (the sites spent that budget; a central release happened)."""
        lines = read_lines(self.ledger.path) if self.ledger.path.exists() else []
        problems = verify_chain(lines)
        if problems:
            number, what = problems[0]
            raise FedPeftError(f"cannot resume: the privacy ledger does not verify (line {number}: {what}); "
                               "run fedpeft audit on the run")
        if len(lines) < count or (count and lines[count - 1]["hash"] != head):
            raise FedPeftError(f"cannot resume: the privacy ledger holds {len(lines)} lines and does not contain "
                               f"the head {head[:12]} recorded at the last checkpoint (line {count})")
        for line in lines:
            entry = line["entry"]
            if self.local is not None and entry.get("mechanism") == "dp-sgd":
                self.local._note(str(entry["site"]), entry)
            if self.central is not None and entry.get("mechanism") == "central-gaussian":
                self.central.compose()

    @property
    def site_config(self) -> Any:
        """Local DP: tell each sampled site how many of its entries the ledger holds, so that it sends again
        any it signed whose reply never arrived (see :meth:`LedgerCheck.__call__`)."""
        if self.local is None or self.ledger is None:
            return None
        ledger = self.ledger
        return lambda site: {LEDGER_SEQ: ledger.site_seq.get(site, 0)}

    @property
    def checks(self) -> list[Any]:
        return [self.local] if self.local is not None else []

    @property
    def uniform_weights(self) -> bool:
        return self.central is not None

    @property
    def bound(self) -> Any:
        """Central DP: clip every decoded update to C on the server (see :mod:`privacy.central`)."""
        if self.central is None:
            return None
        return partial(clip_update, clipping_norm=self.clipping_norm)

    @property
    def train_config(self) -> dict[str, Any]:
        """Central DP: the clipping norm every sampled site clips its update to; else nothing."""
        if self.central is None:
            return {}
        return central_train_config(clipping_norm=self.clipping_norm)

    @property
    def release(self) -> Any:
        """Central DP: the round's release, (Σ clipped updates + N(0, (σC)²)) / m, m the fixed cohort size."""
        if self.central is None:
            return None
        c = self.central
        return partial(central_release, clipping_norm=self.clipping_norm, noise_multiplier=c.noise_multiplier,
                       sample_size=c.sample_size, rng=self._noise)

    @property
    def release_sum(self) -> Any:
        """Central DP under secure aggregation: the release of the secure sum of the sites' own clipped updates,
        ``release_sum(total, contributions)``, noised by the coordinator after unmasking."""
        if self.central is None:
            return None
        c = self.central
        return partial(noised_mean_of_sum, clipping_norm=self.clipping_norm, noise_multiplier=c.noise_multiplier,
                       sample_size=c.sample_size, rng=self._noise)

    def stop_reason(self) -> str | None:
        """Why no further round may run (the central budget), or None."""
        if self.central is not None and self.central.would_exceed():
            return (
                f"central DP budget: another round would take epsilon past {self.central.budget:g} "
                f"(spent {self.central.epsilon():.3f} at delta {self.central.delta:g})"
            )
        return None

    def after_round(self, server_round: int, *, clients: int) -> dict[str, Any]:
        """Account a central release and return the round's privacy metrics for ``metrics.jsonl``."""
        if self.ledger is None:
            return {}
        if self.central is not None and self.central_ledger is not None:
            if clients > 0:  # a release happened: accounted at full σ, however many of the m sampled answered
                self.central.compose()
                self.central_ledger.record(self.central, server_round=server_round, replies=clients)
            eps, delta = self.central.epsilon(), self.central.delta
        else:
            assert self.local is not None
            eps, delta = self.local.max_epsilon(), self.local.delta
        return {"epsilon_max": eps, "delta": delta, "ledger_head": self.ledger.head}

    def spent(self) -> float | None:
        """The accountant's ε so far (central: the run's; local: the largest any site reported); None without DP."""
        if self.central is not None:
            return self.central.epsilon()
        if self.local is not None:
            return self.local.max_epsilon()
        return None

    def describe(self) -> str:
        """One line for the log: the mechanism and its parameters."""
        if self.central is not None:
            c = self.central
            return (
                f"central DP: clip {self.clipping_norm:g}, sigma {c.noise_multiplier:.3f} (noise std sigma*C on the "
                f"sum, divided by {c.sample_size} whoever answers), {c.sample_size} of {c.population} sites per "
                f"round (amplification: {c.sampling}; {c.neighbours} neighbours), budget epsilon {c.budget:g} "
                f"at delta {c.delta:g}"
            )
        return "local DP-SGD at every site; signed entries in " + LEDGER_FILE if self.local else "no DP"
