"""Per-sample gradients of an SSF layer and of FedIns' SSF pool and keys, registered with Opacus (SSF:
arXiv 2210.08823; FedIns: arXiv 2308.06051).

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
from fedpeft.heads.modeling_fedins import PoolKeys, SSFPool


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


@register_grad_sampler(SSFPool)
def ssf_pool_grad_sample(
    layer: SSFPool, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample gradients ``{scale: (n, M, d), shift: (n, M, d)}`` of an SSF pool (FedIns).

    Example n's SSF is γ(n) = Σ_i w_ni γ_i (w: the routing weights, the layer's second input), so
    ∂L_n/∂γ_i = w_ni · (what plain SSF's rule gives for γ), and likewise for β.
    """
    x, weights = activations[0], activations[1]
    n, d = backprops.shape[0], backprops.shape[-1]
    g = backprops.reshape(n, -1, d)
    w = weights.to(g.dtype)
    out = {}
    if layer.scale.requires_grad:
        gx = torch.einsum("nld,nld->nd", g, x.reshape(n, -1, d).to(g.dtype))
        out[layer.scale] = torch.einsum("nm,nd->nmd", w, gx)
    if layer.shift.requires_grad:
        out[layer.shift] = torch.einsum("nm,nd->nmd", w, g.sum(dim=1))
    return out


@register_grad_sampler(PoolKeys)
def pool_keys_grad_sample(
    layer: PoolKeys, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Per-sample gradients ``{keys: (n, M, width)}`` of the cosines c_ni = q̂_n · k_i / ‖k_i‖ (FedIns' keys).

    ∂c_ni/∂k_i = (q̂_n − c_ni k̂_i) / ‖k_i‖, so example n's gradient of key i is g_ni times that, with
    g the backprop of the cosines (n × M).
    """
    if not layer.keys.requires_grad:
        return {}
    q = torch.nn.functional.normalize(activations[0].to(layer.keys.dtype), dim=-1)  # n × D
    norms = layer.keys.detach().norm(dim=-1).clamp(min=1e-12)  # M
    k_hat = layer.keys.detach() / norms[:, None]
    cosine = q @ k_hat.T  # n × M
    g = backprops.to(q.dtype)
    grads = (q[:, None, :] - cosine[:, :, None] * k_hat[None, :, :]) / norms[None, :, None]
    return {layer.keys: g[:, :, None] * grads}
