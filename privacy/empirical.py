"""The empirical privacy audit of a run (``--canaries M``): draw canaries, hand each site its members, and
after the run score every canary by the final model's loss and turn the guesses into an ε lower bound
(:mod:`privacy.one_run_audit`), reported next to the accountant's ε.

Files, in the run directory: ``canaries.jsonl`` (the canaries and the secret assignment, 0600) and
``empirical_audit.json`` (the bound, its confidence, the guesses, the accountant's ε, and whether the
bound exceeds it: a *violation* — the implementation leaks more than it claims).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.runlog import atomic_write_text
from fedpeft.runtime import CPU, Runtime
from privacy.canaries import Canary, load_canaries, make_canaries, save_canaries, site_canaries
from privacy.one_run_audit import audit_scores

CANARY_FILE = "canaries.jsonl"
RESULT_FILE = "empirical_audit.json"
CONFIDENCE = 0.95


def run_canaries(run_dir: Path, m: int, *, label_names: Sequence[str], sites: Sequence[str]) -> list[Canary]:
    """The run's canaries: drawn (secretly) and saved on the first call, read back on a resume."""
    path = run_dir / CANARY_FILE
    if path.exists():
        return load_canaries(path)
    canaries = make_canaries(m, label_names=label_names, sites=sorted(sites))
    save_canaries(path, canaries)
    return canaries


def site_rows(canaries: Sequence[Canary], site: str) -> str:
    """The train-config value for ``site``: JSON ``[[text, label], ...]`` of its member canaries."""
    return json.dumps([[c.text, c.label] for c in site_canaries(canaries, site)])


def audit_run_canaries(
    model: Any, tokenizer: Any, canaries: Sequence[Canary], *, label_names: Sequence[str], max_length: int,
    delta: float, accountant_epsilon: float | None, batch_size: int = 64, runtime: Runtime = CPU,
) -> dict[str, Any]:
    """Score the canaries on the final ``model`` (loss: low ⇒ guessed trained on) and bound ε."""
    # deferred: heavy (torch) on `fedpeft report`'s path (server.report imports this module)
    from fedpeft.training import encode, example_losses

    names = list(label_names)
    data = encode(tokenizer, [c.text for c in canaries], np.array([names.index(c.label) for c in canaries]),
                  max_length=max_length)
    scores = example_losses(model, data, batch_size=batch_size, runtime=runtime)
    members = [c.member for c in canaries]
    result = audit_scores(scores, members, delta=delta, confidence=CONFIDENCE)
    claimed = None if accountant_epsilon is None or math.isinf(accountant_epsilon) else float(accountant_epsilon)
    return {
        **asdict(result),
        "accountant_epsilon": claimed,
        "violation": claimed is not None and result.epsilon > claimed,
        "scores": [float(x) for x in scores],
        "members": members,
    }


def save_result(run_dir: Path, result: dict[str, Any]) -> Path:
    path = run_dir / RESULT_FILE
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return path
