"""The SSF module: a per-feature scale γ and shift β applied to a layer's output, y = γ ⊙ x + β.

:class:`SSFLayer` is a leaf module holding only γ and β, so Opacus sees it as one layer with one
per-sample gradient rule (:mod:`privacy.ssf_grad_sample`). It is attached to a target module as its
child ``ssf`` and applied to the target's output by a forward hook, so the target keeps its type,
its attributes and its state-dict keys, and merging is a fold plus removing the hook:

- after ``nn.Linear`` (y = W x + b):  W' = diag(γ) W,  b' = γ ⊙ b + β;
- after ``nn.LayerNorm`` (weight w, bias b):  w' = γ ⊙ w,  b' = γ ⊙ b + β.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedpeft.adapters.state import SSF_COMPONENT

SSF_CHILD = SSF_COMPONENT  # the attribute (and key component) under which a target holds its SSF layer
SUPPORTED = (nn.Linear, nn.LayerNorm)


class SSFLayer(nn.Module):
    """y = γ ⊙ x + β over the last dimension of ``x``.

    Parameters
    ----------
    features : int
        Size of the last dimension (the target's output features).
    init_std : float
        0: γ = 1, β = 0 (the layer starts as the identity); > 0: γ ~ N(1, std²), β ~ N(0, std²), as
        in the SSF paper.
    """

    def __init__(self, features: int, *, init_std: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))
        self.shift = nn.Parameter(torch.zeros(features))
        if init_std > 0:
            with torch.no_grad():
                self.scale.normal_(1.0, init_std)
                self.shift.normal_(0.0, init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def extra_repr(self) -> str:
        return f"features={self.scale.numel()}"


def output_features(module: nn.Module) -> int:
    """The size of ``module``'s output feature dimension (a supported target type)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1:
            raise ValueError(f"SSF after LayerNorm needs a 1-D normalized shape, got {module.normalized_shape}")
        return module.normalized_shape[0]
    raise TypeError(f"SSF follows nn.Linear or nn.LayerNorm, not {type(module).__name__}")


def _apply_ssf(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, SSF_CHILD)(output)


def attach(module: nn.Module, *, init_std: float = 0.0) -> torch.utils.hooks.RemovableHandle:
    """Give ``module`` an SSF child (matching its dtype and device) applied to its output."""
    ref = next(module.parameters(), None)
    layer = SSFLayer(output_features(module), init_std=init_std)
    if ref is not None:
        layer.to(device=ref.device, dtype=ref.dtype)
    module.add_module(SSF_CHILD, layer)
    return module.register_forward_hook(_apply_ssf)


@torch.no_grad()
def fold(module: nn.Module) -> None:
    """Fold ``module.ssf`` into ``module``'s own weight and bias (the bias must exist, or β be zero).

    Computed in float64 and cast back, so the merged layer matches the unmerged one to rounding.
    """
    layer: SSFLayer = getattr(module, SSF_CHILD)
    gamma, beta = layer.scale.double(), layer.shift.double()
    weight = module.weight
    if weight is None:
        raise ValueError("the target has no weight to hold the SSF scale (LayerNorm without elementwise affine)")
    if isinstance(module, nn.Linear):
        weight.copy_((gamma[:, None] * weight.double()).to(weight.dtype))
    else:
        weight.copy_((gamma * weight.double()).to(weight.dtype))
    if module.bias is not None:
        module.bias.copy_((gamma * module.bias.double() + beta).to(module.bias.dtype))
    elif bool((beta != 0).any()):
        raise ValueError("the target has no bias to hold the SSF shift")


def has_bias(module: nn.Module) -> bool:
    """Whether ``module`` has a bias that can hold a folded SSF shift."""
    return getattr(module, "bias", None) is not None
