"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", ICML 2020, arXiv 1910.06378, Algorithm 1).

The coordinator keeps a control variate c and each site its own c_i, one tensor per trained adapter
tensor, all starting at zero. In a round:

1. the coordinator sends x (the broadcast) and c;
2. each local step at site i uses the corrected gradient g_i(y) − c_i + c (:class:`ControlTerm`);
3. the site sets c_i⁺ to its own gradient estimate (below), replies with Δy = y − x and Δc_i = c_i⁺ − c_i,
   and keeps c_i⁺ in its state directory (it survives a restart);
4. the coordinator aggregates Δy with the run's rule and sets c ← c + (1/N)·Σ_{i∈S} Δc_i, N the number of
   sites (:func:`strategies.scaffold.server_variate`); c lives in the coordinator's checkpoint.

**The choice of c_i⁺.** The paper's option II, c_i − c + (x − y)/(Kη), assumes plain SGD: under the
AdamW steps fedpeft's sites take, (x − y)/(Kη) is a normalised direction, not a gradient, and would
swamp the gradients it corrects. Its option I, the site's gradient at x, is in the right units but costs
another pass over the data. fedpeft takes option I measured along the round: c_i⁺ is the mean of the
round's raw minibatch gradients (before the correction), which costs nothing extra; its first step is
at x exactly. At a fixed point of the federation the two agree.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


class ControlTerm:
    """Adds c − c_i to each covered parameter's gradient and records the raw gradients' mean.

    Parameters
    ----------
    params : sequence of Parameter
        The parameters the variates cover (matched by identity when the training loop calls the term:
        any other parameter it passes is left alone).
    names : sequence of str
        The adapter-state name of each parameter (the keys of ``server`` and ``site``).
    server, site : mapping
        c and c_i by name; a name missing from either counts as zero.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], names: Sequence[str], *,
                 server: Mapping[str, np.ndarray], site: Mapping[str, np.ndarray]) -> None:
        self.names = {id(p): name for p, name in zip(params, names, strict=True)}
        self.shift, self.sums = {}, {}
        for p, name in zip(params, names, strict=True):
            c = np.asarray(server.get(name, 0.0), dtype=np.float32) - np.asarray(site.get(name, 0.0), dtype=np.float32)
            self.shift[id(p)] = torch.as_tensor(np.broadcast_to(c, tuple(p.shape)).copy(), device=p.device)
            self.sums[id(p)] = torch.zeros_like(p, dtype=torch.float32)
        self.steps = 0

    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.steps += 1
        for p in params:
            if id(p) not in self.shift:
                continue
            shift = self.shift[id(p)]
            if p.grad is not None:
                self.sums[id(p)] += p.grad.detach().float()
            p.grad = shift.to(p.dtype) if p.grad is None else p.grad + shift.to(p.grad.dtype)

    def site_variate(self) -> dict[str, np.ndarray]:
        """c_i⁺: the mean raw gradient of the round, by name (zeros if the round took no step)."""
        steps = max(self.steps, 1)
        return {self.names[key]: (total / steps).cpu().numpy().astype(np.float32) for key, total in self.sums.items()}
