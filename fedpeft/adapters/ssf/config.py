"""Configuration of an SSF adapter: which layers it follows and how γ, β start."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fedpeft.adapters.state import HEAD_MODULES

CONFIG_NAME = "ssf_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


@dataclass(frozen=True)
class SSFConfig:
    """What :class:`fedpeft.adapters.ssf.model.SSFModel` inserts.

    Parameters
    ----------
    target_modules : tuple[str, ...]
        Names of the layers SSF follows, matched like peft matches them: a module's full dotted name,
        or its name's last components (``"query"``, ``"attention.output.dense"``). Each match must be
        an ``nn.Linear`` or ``nn.LayerNorm``. Empty: every ``nn.Linear`` and ``nn.LayerNorm`` of the
        backbone (the paper's setting), i.e. all but the classification head.
    init_std : float
        0: γ = 1, β = 0 (the adapted model starts equal to the base model); > 0: γ ~ N(1, std²),
        β ~ N(0, std²) as in the SSF paper.
    head_modules : tuple[str, ...]
        Top-level modules that stay trainable and travel with the adapter (the classifier).
    base_model : str
        Name or path of the base model, recorded when saving (informational).
    """

    target_modules: tuple[str, ...] = ()
    init_std: float = 0.0
    head_modules: tuple[str, ...] = field(default=HEAD_MODULES)
    base_model: str = ""

    def __post_init__(self) -> None:
        for name in ("target_modules", "head_modules"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{name} must be a sequence of non-empty module names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not (math.isfinite(self.init_std) and self.init_std >= 0):
            raise ValueError(f"init_std must be a finite number >= 0, got {self.init_std}")

    def to_json(self) -> str:
        """The config as written to ``ssf_config.json``."""
        return json.dumps({"peft_type": "SSF", **asdict(self)}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SSFConfig:
        """Parse ``ssf_config.json``; raises ValueError for anything that is not an SSF config."""
        return parse_config(cls, text, name=CONFIG_NAME, peft_type="SSF", what="an SSF adapter")


def parse_config(cls: Any, text: str, *, name: str, peft_type: str, what: str) -> Any:
    """The dataclass ``cls`` from the JSON of its config file ``name`` (lists become tuples); a ValueError,
    in one line, for invalid JSON, another ``peft_type`` or a field ``cls`` does not have."""
    try:
        data: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.pop("peft_type", None) != peft_type:
        raise ValueError(f"{name} does not describe {what} (peft_type must be {peft_type!r})")
    unknown = sorted(set(data) - set(cls.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{name} has unknown fields {unknown}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
