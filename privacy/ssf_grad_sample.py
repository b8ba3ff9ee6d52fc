"""Per-sample gradients of an SSF layer, registered with Opacus (SSF: arXiv 2210.08823).

For y = γ ⊙ x + β over the last dimension, with g = ∂L_n/∂y the backprop of example n:

    ∂L_n/∂γ = Σ over every non-batch, non-feature position of g ⊙ x
    ∂L_n/∂β = Σ over the same positions of g

(x: the layer's input activations, batch first). Opacus calls this in ``hooks`` mode and, in
``ghost`` mode, turns it into per-sample norms (SSF has no ghost-norm shortcut; its gradients are
vectors, so materialising them is cheap). Importing this module registers the rule.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler

from fedpeft.adapters.ssf.layer import SSFLayer


@register_grad_sampler(SSFLayer)
def ssf_grad_sample(
    layer: SSFLayer, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample gradients ``{γ: (n, d), β: (n, d)}`` of the trainable ones among γ and β."""
    x = activations[0]
    n, d = backprops.shape[0], backprops.shape[-1]
    g = backprops.reshape(n, -1, d)
    out = {}
    if layer.scale.requires_grad:
        out[layer.scale] = torch.einsum("nld,nld->nd", g, x.reshape(n, -1, d).to(g.dtype))
    if layer.shift.requires_grad:
        out[layer.shift] = g.sum(dim=1)
    return out
