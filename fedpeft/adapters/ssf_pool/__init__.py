"""FedIns: a pool of SSF entries with keys, chosen per input (Feng et al., ICCV 2023, arXiv 2308.06051).

Registered as PEFT method ``ssf-pool``. ``config.py`` (targets, M, N, λ), ``model.py`` (the surgery, the
adapter state, save/load, the exported model). The pool's arithmetic (selection, combination, the
matching loss) lives in :mod:`fedpeft.heads.modeling_fedins`, the self-contained file that an exported
model carries, so that training and the exported model compute the same thing. Aggregation:
:mod:`strategies.fedins`; per-example gradients under DP: :mod:`privacy.ssf_grad_sample`.
"""

from __future__ import annotations

from typing import Any

from fedpeft.adapters import PEFT_METHODS
from fedpeft.adapters.ssf_pool.config import SSFPoolConfig
from fedpeft.adapters.state import HEAD_MODULES
from fedpeft.errors import FedPeftError


@PEFT_METHODS.register("ssf-pool")
def apply_ssf_pool(model: Any, cfg: Any) -> Any:
    """Freeze ``model`` and add an SSF pool after the layers ``cfg.ssf_target_modules`` names (empty: all)."""
    from fedpeft.adapters.ssf_pool.model import SSFPoolModel  # deferred: heavy (torch) on the CLI start-up path

    if cfg.task != "seq-cls":
        raise FedPeftError("peft ssf-pool (FedIns) routes each input by its pooled feature: task seq-cls only")
    targets = tuple(t.strip() for t in cfg.ssf_target_modules.split(",") if t.strip())
    try:
        config = SSFPoolConfig(target_modules=targets, pool_size=cfg.ssf_pool_size, pool_select=cfg.ssf_pool_select,
                               match_weight=cfg.ssf_pool_match, base_model=cfg.model, head_modules=HEAD_MODULES)
    except ValueError as err:
        raise FedPeftError(str(err)) from None
    return SSFPoolModel(model, config)
