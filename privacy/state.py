"""A site's privacy account: what it has spent in a run, kept on the site's own disk.

One JSON file per (site, run) under the site's state directory, rewritten atomically (temporary
file, fsync, rename) after every round, *before* the reply leaves the site. A restarted client
reloads it and goes on counting from where it was; a crash between training and writing can only
lose an update, never under-count (the round is retrained and counted again).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedpeft.runlog import atomic_write_text, safe_name

STATE_VERSION = 1


@dataclass(frozen=True)
class RoundSpend:
    """One round's DP-SGD steps: σ, Poisson rate q, number of steps."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


@dataclass(frozen=True)
class SiteAccount:
    """The site's accountant state for one run.

    ``noise_multiplier`` is fixed at the site's first round (calibrated once for the whole planned
    run) and reused afterwards; ``rounds`` is the accountant history; ``entries`` counts the ledger
    entries the site has signed in this run (trained and refused rounds alike).
    """

    run_id: str
    site: str
    accountant: str
    delta: float
    budget: float  # ε the site will not exceed; inf: none
    noise_multiplier: float
    max_grad_norm: float
    rounds: tuple[RoundSpend, ...] = field(default_factory=tuple)
    entries: int = 0
    signed: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """Opacus's accountant history: ``[(σ, q, steps), ...]``."""
        return [(r.noise_multiplier, r.sample_rate, r.steps) for r in self.rounds]

    def spend(self, spent: RoundSpend) -> SiteAccount:
        return replace(self, rounds=(*self.rounds, spent))

    def counted(self) -> SiteAccount:
        """This account with one more ledger entry (to be signed)."""
        return replace(self, entries=self.entries + 1)

    def with_signed(self, entry: dict[str, Any], signature: str) -> SiteAccount:
        """This account keeping the signed entry it is about to send."""
        return replace(self, signed=(*self.signed, {"entry": entry, "signature": signature}))

    def unledgered(self, ledger_seq: int | None) -> list[dict[str, Any]]:
        """The signed entries after the first ``ledger_seq`` (the coordinator's count); none if unknown."""
        if ledger_seq is None:
            return []
        return [s for s in self.signed if int(s["entry"]["site_seq"]) > ledger_seq]

    def to_json(self) -> str:
        data = asdict(self)
        data["version"] = STATE_VERSION
        data["budget"] = None if self.budget == float("inf") else self.budget
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SiteAccount:
        data: dict[str, Any] = json.loads(text)
        if data.pop("version", None) != STATE_VERSION:
            raise ValueError("privacy account written by another fedpeft version")
        data["budget"] = float("inf") if data["budget"] is None else float(data["budget"])
        data["rounds"] = tuple(RoundSpend(**r) for r in data["rounds"])
        data["signed"] = tuple(data.get("signed", ()))
        return cls(**data)


def account_path(state_dir: str | Path, site: str, run_id: str) -> Path:
    """``<state_dir>/<site>/privacy-<run_id>.json`` (names reduced to safe characters)."""
    return Path(state_dir) / safe_name(site) / f"privacy-{safe_name(run_id)}.json"


def load_account(path: str | Path) -> SiteAccount | None:
    """The saved account, or None if this site has not trained in this run yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return SiteAccount.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError) as err:
        # Never start from zero over an unreadable account: that would under-count.
        raise ValueError(f"privacy account {path} is unreadable ({err}); refusing to train") from None


def save_account(path: str | Path, account: SiteAccount) -> None:
    """Write the account atomically."""
    atomic_write_text(path, account.to_json())
