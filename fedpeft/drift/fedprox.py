"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020, arXiv 1812.06127).

A site minimises its loss plus μ/2·‖w − w_t‖² over the trained parameters w, where w_t is where the
round started (the broadcast). Steps, each local step:

1. the loss's gradient g (backward pass);
2. g ← g + μ·(w − w_t): the proximal term's gradient, pulling the site back towards the broadcast.

At μ = 0 no term is built at all, so training is plain local training bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class ProximalTerm:
    """μ·(w − w_t) added to each trained parameter's gradient; w_t is copied when the term is built (each
    parameter is matched by identity, whatever order the training loop passes them in)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], *, mu: float) -> None:
        if not mu > 0:
            raise ValueError(f"mu must be > 0 (at 0, build no term), got {mu}")
        self.mu = float(mu)
        self.anchor = {id(p): p.detach().clone() for p in params}

    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None:
        for p in params:
            w0 = self.anchor.get(id(p))
            if w0 is None:
                continue
            pull = self.mu * (p.detach() - w0)
            p.grad = pull if p.grad is None else p.grad + pull
