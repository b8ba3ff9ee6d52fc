"""Configuration of an SSF pool (FedIns): which layers the pool follows, its size, and how inputs choose."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fedpeft.adapters.ssf.config import parse_config
from fedpeft.adapters.state import HEAD_MODULES

CONFIG_NAME = "ssf_pool_config.json"


@dataclass(frozen=True)
class SSFPoolConfig:
    """What :class:`fedpeft.adapters.ssf_pool.model.SSFPoolModel` inserts.

    Parameters
    ----------
    target_modules : tuple[str, ...]
        The layers a pool follows, matched as SSF matches them (empty: every ``nn.Linear`` and
        ``nn.LayerNorm`` of the backbone, the paper's setting).
    pool_size : int
        M, the entries of the pool (each a full SSF over the targets, with one key).
    pool_select : int
        N, the entries each input combines (1 <= N <= M).
    match_weight : float
        λ of the objective (1 − λ)·CE + λ·(1 − Σ cos(q, k_chosen)), in [0, 1).
    init_std : float
        0: every entry starts at γ = 1, β = 0; > 0: γ ~ N(1, std²), β ~ N(0, std²) (the official code: 0.02).
    head_modules, base_model
        As :class:`fedpeft.adapters.ssf.config.SSFConfig`.
    """

    target_modules: tuple[str, ...] = ()
    pool_size: int = 4
    pool_select: int = 1
    match_weight: float = 0.1
    init_std: float = 0.0
    head_modules: tuple[str, ...] = field(default=HEAD_MODULES)
    base_model: str = ""

    def __post_init__(self) -> None:
        for name in ("target_modules", "head_modules"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name} must be a sequence of non-empty module names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        check_pool(self.pool_size, self.pool_select, self.match_weight)
        if not (math.isfinite(self.init_std) and self.init_std >= 0):
            raise ValueError(f"init_std must be a finite number >= 0, got {self.init_std}")

    def to_json(self) -> str:
        return json.dumps({"peft_type": "SSF_POOL", **asdict(self)}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SSFPoolConfig:
        """Parse ``ssf_pool_config.json``; raises ValueError for anything that is not an SSF pool config."""
        return parse_config(cls, text, name=CONFIG_NAME, peft_type="SSF_POOL", what="an SSF pool")


def check_pool(size: Any, select: Any, match_weight: Any) -> None:
    """Raise a ValueError, in one line, unless 1 <= N <= M and 0 <= λ < 1."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"ssf_pool_size (M) must be an integer >= 1, got {size!r}")
    if not isinstance(select, int) or isinstance(select, bool) or not 1 <= select <= size:
        raise ValueError(f"ssf_pool_select (N) must be an integer in 1..ssf_pool_size={size}, got {select!r}")
    if not (isinstance(match_weight, (int, float)) and math.isfinite(match_weight) and 0 <= match_weight < 1):
        raise ValueError(f"ssf_pool_match (lambda) must lie in [0, 1), got {match_weight!r}")
