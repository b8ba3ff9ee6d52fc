"""FFA-LoRA: federated LoRA with A frozen (Sun et al., ICLR 2024, arXiv 2403.12313).

Every process builds the same seeded initial adapter, so A is identical everywhere from the start.
Steps:

1. Clients freeze every ``lora_A`` factor, train only B (and the head), and send B without A; the
   server does not broadcast A either (half the LoRA bytes each way).
2. The server sets B' = Σ_k p_k B_k and keeps A' = A (the shared init).
3. Aggregation is exact: Σ_k p_k B_k A = B'A, so the residual is zero. The price is expressiveness
   (ΔW only ever lies in A's fixed row space); the paper also finds it better behaved under DP noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies import AGGREGATORS
from strategies.aggregator import AggregationOptions, Aggregator, weighted_sum
from strategies.residual import LayerGrams


def ffa_lora_pair(
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    p: np.ndarray,
    *,
    prev_A: np.ndarray,
    prev_B: np.ndarray,
    options: AggregationOptions,
    grams: LayerGrams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(A, Σ_k p_k B_k)`` with A the frozen shared factor."""
    return prev_A, weighted_sum(Bs, p)


AGGREGATORS.register("ffa-lora")(
    Aggregator(
        name="ffa-lora",
        pair=ffa_lora_pair,
        frozen=("lora_A",),
        linear=True,
        summary="A frozen at the shared init, only B trained and sent; exact average (FFA-LoRA)",
    )
)
