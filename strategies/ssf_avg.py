"""SSF averaging: FedAvg over scale-and-shift vectors (SSF: Lian et al., NeurIPS 2022, arXiv 2210.08823).

An SSF adapter is a set of per-feature vectors γ, β (and the head); the model is linear in each of
them separately, and clients send the vectors themselves, so

1. the server sets every tensor to Σ_k p_k x_k (p_k = n_k / Σ n) — the driver's weighted average of
   non-LoRA tensors; there are no factor pairs, so no bias: the aggregate is exactly the average of
   what clients trained (unlike FedIT's B̄Ā ≠ Σ p_k B_k A_k);
2. it is linear, so central DP composes with it.

LoRA states are refused (and LoRA strategies refuse SSF states) with a message naming the fix.
Federated SSF with per-client pools is FedIns (Feng et al., 2023); this is its shared-adapter core.
"""

from __future__ import annotations

from strategies import AGGREGATORS
from strategies.aggregator import Aggregator

SSF_AVG = Aggregator(
    name="ssf-avg",
    pair=None,
    linear=True,
    adapter="ssf",
    summary="weighted average of SSF scales and shifts (exact: no factor pairs)",
)
AGGREGATORS.register("ssf-avg")(SSF_AVG)
