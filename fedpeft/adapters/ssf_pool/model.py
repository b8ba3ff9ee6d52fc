"""SSF-pool model surgery (FedIns): a transformers classifier with an SSF pool after its targets.

:class:`SSFPoolModel` wraps the classifier the way :class:`~fedpeft.adapters.ssf.model.SSFModel` does:
the targets are found the same way, the base model is frozen, each target gets an
:class:`~fedpeft.heads.modeling_fedins.SSFPool` child (M entries of γ, β), the wrapper holds the pool's
keys (``ssf_pool.keys``, M × hidden size) and the head stays trainable. A forward routes each input
(:func:`~fedpeft.heads.modeling_fedins.routed_forward`: the query pass with the pool off, top-N by
cosine, the mean of the chosen entries) and keeps the batch's matching loss for :meth:`objective`.

Choices where the paper leaves room (see :mod:`fedpeft.heads.modeling_fedins` for the method):

- **one head**, shared by every input (the official code also pools the classifier; here the pool
  adapts the features and the head stays the one SSF trains, so the upload grows by the pool alone);
- **the query model is the base model itself** with the pool switched off: the backbone is frozen, so
  it is the paper's frozen pretrained model without a second copy in memory;
- **defaults M = 4, N = 1** (the official code: 25 and 3 on ViT-B with 5-6 clients); each entry is a
  full SSF over the targets, so the upload is about M × SSF's: ``--ssf-target-modules`` narrows
  the layers a pool follows (the LayerNorms alone: a fifth of SSF's size per entry).

A pool cannot be folded into the weights (each input gets its own SSF): the exported model is
:class:`~fedpeft.heads.modeling_fedins.FedInsForSequenceClassification` (:meth:`to_exported`).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedpeft.adapters.ssf.model import OUTPUT_LAYERS, WrappedAdapter, find_targets
from fedpeft.adapters.ssf_pool.config import CONFIG_NAME, SSFPoolConfig
from fedpeft.errors import FedPeftError
from fedpeft.heads.modeling_fedins import (
    AUTO_MAP,
    POOL_CHILD,
    FedInsForSequenceClassification,
    PoolKeys,
    attach_pools,
    pools_of,
    routed_forward,
)


class SSFPoolModel(WrappedAdapter):
    """A transformers classifier with SSF pools after its targets; only the pools, keys and head train.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The base classifier (modified in place: frozen, pools and hooks attached).
    config : SSFPoolConfig
        Targets, M, N, λ, initialisation and head.
    """

    kind = "SSF pool"
    config_class = SSFPoolConfig
    config_name = CONFIG_NAME

    def __init__(self, model: nn.Module, config: SSFPoolConfig) -> None:
        super().__init__()
        self.base_model = model
        self.pool_config = config
        self.head_names = tuple(name for name, _ in model.named_children() if name in config.head_modules)
        if not self.head_names:
            raise FedPeftError(f"{type(model).__name__} has no classification head named "
                               f"{' or '.join(config.head_modules)}")
        width = getattr(getattr(model, "config", None), "hidden_size", None)
        if not isinstance(width, int):
            raise FedPeftError(f"{type(model).__name__}: an SSF pool's keys need a model config with hidden_size")
        targets = find_targets(model, config.target_modules, exclude=(*self.head_names, *OUTPUT_LAYERS))
        for p in model.parameters():
            p.requires_grad_(False)
        self._hooks = attach_pools(model, targets, size=config.pool_size, init_std=config.init_std)
        self._pools = pools_of(model)  # found once: every forward switches them on and off
        for name in self.head_names:
            for p in getattr(model, name).parameters():
                p.requires_grad_(True)
        ref = next(iter(self.head_parameters()))
        self.ssf_pool = PoolKeys(config.pool_size, width).to(device=ref.device, dtype=ref.dtype)
        self._match: torch.Tensor | None = None

    def head_parameters(self) -> Any:
        for name in self.head_names:
            yield from getattr(self.base_model, name).parameters()

    @property
    def targets(self) -> tuple[str, ...]:
        """Full names of the layers a pool follows."""
        return tuple(self._hooks)

    def forward(self, *args: Any, **batch: Any) -> Any:
        if args:
            raise TypeError("SSFPoolModel takes keyword inputs (input_ids=..., attention_mask=...)")
        output, self._match = routed_forward(self.base_model, self._pools, self.ssf_pool,
                                             self.pool_config.pool_select, batch)
        return output

    def objective(self, task_loss: torch.Tensor) -> torch.Tensor:
        """The training objective of the last forward: (1 − λ)·``task_loss`` + λ·matching loss."""
        if self._match is None:
            raise RuntimeError("objective() needs a forward pass first")
        lam = self.pool_config.match_weight
        return (1.0 - lam) * task_loss + lam * self._match.to(task_loss.dtype)

    # --- adapter state ----------------------------------------------------------------------------
    def _is_adapter(self, name: str) -> bool:
        parts = name.split(".")
        return parts[0] in self.head_names or (len(parts) >= 2 and parts[-2] == POOL_CHILD)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Every pool (``<target>.ssf_pool.scale`` / ``.shift``, M × d), the keys (``ssf_pool.keys``) and
        the head."""
        params = {n: p for n, p in self.base_model.named_parameters() if self._is_adapter(n)}
        params[f"{POOL_CHILD}.keys"] = self.ssf_pool.keys
        return params

    # --- save ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the adapter alone: ``adapter_model.safetensors`` and ``ssf_pool_config.json``."""
        self._save(directory, dataclasses.replace(self.pool_config, target_modules=self.targets,
                                                  base_model=self.pool_config.base_model or self._base_name()))

    # --- export -----------------------------------------------------------------------------------
    @torch.no_grad()
    def to_exported(self) -> FedInsForSequenceClassification:
        """A :class:`FedInsForSequenceClassification` with this model's weights, pools and keys: what
        ``fedpeft export`` saves (it loads in plain transformers with ``trust_remote_code``)."""
        config = copy.deepcopy(self.base_model.config)
        config.fedins = {
            "targets": list(self.targets), "pool_size": self.pool_config.pool_size,
            "pool_select": self.pool_config.pool_select, "inner": type(self.base_model).__name__,
        }
        config.auto_map = dict(AUTO_MAP)
        config.architectures = ["FedInsForSequenceClassification"]
        exported = FedInsForSequenceClassification(config)
        exported.inner.load_state_dict(self.base_model.state_dict(), strict=True)  # weights, head and pools
        exported.ssf_pool.keys.copy_(self.ssf_pool.keys)
        return exported.to(dtype=torch.float32).eval()

    def merge_and_unload(self) -> nn.Module:
        raise FedPeftError("an SSF pool gives every input its own SSF and cannot be folded into the weights; "
                           "export it with fedpeft export (the instance-adaptive model, trust_remote_code)")
