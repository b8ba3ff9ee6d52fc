"""Server optimizers: a step on the round's aggregate delta, after any aggregation rule (Reddi et al.,
"Adaptive Federated Optimization", ICLR 2021, arXiv 2003.00295; FedAvgM: Hsu et al., 2019, arXiv 1909.06335).

The aggregation rule (or central DP's release) gives the new global adapter x̃; the server optimizer
treats Δ = x̃ − x as a pseudo-gradient and moves the broadcast x with its own rule instead of jumping
to x̃. Each optimizer lives in one file and registers a :class:`ServerOptimizer`: a pure function
``step(delta, moments, settings) → (move, moments)`` over one tensor. :func:`server_step` runs it on
every tensor the round trained; the moments are the optimizer's whole state, kept in the checkpoint
(:mod:`server.checkpoint`), so a resumed run moves exactly as the uninterrupted one. Central DP: Δ is
the noised release, so the step is post-processing and costs no privacy.
"""

from __future__ import annotations

from fedpeft.registry import Registry
from strategies.server_opt.base import ServerOptimizer, ServerOptSettings, server_step

SERVER_OPTIMIZERS: Registry[ServerOptimizer] = Registry("server optimizer")

from strategies.server_opt import adagrad, adam, avgm, none, yogi  # noqa: E402,F401  (register)

__all__ = ["SERVER_OPTIMIZERS", "ServerOptSettings", "ServerOptimizer", "server_step"]
