"""SSF: scale-and-shift features (Lian et al., NeurIPS 2022, arXiv 2210.08823).

y = γ ⊙ x + β after chosen layers; γ, β per feature. Registered as PEFT method ``ssf``; peft has no
SSF, so fedpeft provides it in peft's shape: ``config.py`` (what to insert), ``layer.py`` (the leaf
module and its fold), ``model.py`` (the surgery, state, save/load, merge), ``merge.py`` (bias room
for a folded shift). Torch loads only when the method is used.
"""

from __future__ import annotations

from typing import Any

from fedpeft.adapters import PEFT_METHODS
from fedpeft.adapters.ssf.config import SSFConfig
from fedpeft.adapters.state import HEAD_MODULES


@PEFT_METHODS.register("ssf")
def apply_ssf(model: Any, cfg: Any) -> Any:
    """Freeze ``model`` and add SSF after the layers ``cfg.ssf_target_modules`` names (empty: all)."""
    from fedpeft.adapters.ssf.model import SSFModel  # deferred: heavy (torch) on the CLI start-up path

    targets = tuple(t.strip() for t in cfg.ssf_target_modules.split(",") if t.strip())
    heads = () if cfg.task == "causal-lm" else HEAD_MODULES  # an LM trains no head
    return SSFModel(model, SSFConfig(target_modules=targets, base_model=cfg.model, head_modules=heads))
