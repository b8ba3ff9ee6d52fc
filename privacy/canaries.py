"""Canaries for the one-run audit (:mod:`privacy.one_run_audit`): random texts with random labels.

Each canary is a string of random letter-groups (so it tokenizes into pieces no real example shares)
with a label drawn uniformly from the run's labels, assigned to one of the chosen sites, and included in
that site's training data with probability 1/2 — independently, from a secret generator. The auditor
keeps the assignment (``member``) in a 0600 file and reveals it only to score the final model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fedpeft.runlog import atomic_write_bytes
from privacy.randomness import secret_seed

LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


@dataclass(frozen=True)
class Canary:
    """One canary: its text and label, the site that may train on it, and whether it does (secret)."""

    index: int
    text: str
    label: str
    site: str
    member: bool


def make_canaries(
    m: int, *, label_names: Sequence[str], sites: Sequence[str], seed: int | None = None, words: int = 8
) -> list[Canary]:
    """``m`` canaries spread round-robin over ``sites``; ``seed`` None draws a secret one."""
    if m < 2 or not label_names or not sites:
        raise ValueError("need at least 2 canaries, one label and one site")
    rng = np.random.default_rng(secret_seed(128, purpose="canaries") if seed is None else seed)
    out = []
    for i in range(m):
        text = " ".join("".join(rng.choice(LETTERS, size=int(rng.integers(4, 9)))) for _ in range(words))
        out.append(Canary(i, text, str(label_names[int(rng.integers(len(label_names)))]), str(sites[i % len(sites)]),
                          bool(rng.random() < 0.5)))
    return out


def site_canaries(canaries: Sequence[Canary], site: str) -> list[Canary]:
    """The canaries ``site`` trains on (members assigned to it)."""
    return [c for c in canaries if c.site == site and c.member]


def save_canaries(path: str | Path, canaries: Sequence[Canary]) -> None:
    """Write the canaries and their secret assignment as JSON lines, atomically, owner-only."""
    text = "".join(json.dumps(asdict(c), sort_keys=True) + "\n" for c in canaries)
    atomic_write_bytes(path, text.encode("utf-8"), mode=0o600)


def load_canaries(path: str | Path) -> list[Canary]:
    """The canaries of :func:`save_canaries`.

    Raises
    ------
    ValueError
        A line that is not a canary.
    """
    out = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            out.append(Canary(**json.loads(line)))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path} line {number} is not a canary ({err})") from None
    return out
