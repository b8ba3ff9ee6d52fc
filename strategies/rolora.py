"""RoLoRA: federated LoRA by alternating optimisation of the factors (arXiv 2502.01755).

The two factors take turns, so every round's aggregate is exact. Steps, for round t = 1, 2, …:

1. Odd t: the server broadcasts A and B; clients train only B (A held as broadcast) and send B alone.
   The server sets B' = Σ_k p_k B_k and keeps A' = A, bit for bit: Σ_k p_k B_k A = B'A, exact.
2. Even t: the same with the roles swapped: clients train and send only A;
   A' = Σ_k p_k A_k, B' = B: Σ_k p_k B A_k = BA', exact.

Unlike FFA-LoRA (``ffa-lora``: A frozen at the seeded init forever, never sent either way), the held
factor changes every other round, so it is broadcast; only the upload is halved (about half the LoRA
bytes a round). The aggregate is a weighted average of what clients send, so robust statistics apply;
central DP is refused in the config checks (:mod:`fedpeft.config_checks`): the server's noise would
also land on the held factor, which the DP wrapper keeps only for ``frozen`` components.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies import AGGREGATORS
from strategies.aggregator import AggregationOptions, Aggregator, weighted_sum
from strategies.ffa_lora import ffa_lora_pair
from strategies.residual import LayerGrams

SUMMARY = "odd rounds train and send only B, even rounds only A (the other held); exact average (RoLoRA)"


def rolora_a_pair(
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    p: np.ndarray,
    *,
    prev_A: np.ndarray,
    prev_B: np.ndarray,
    options: AggregationOptions,
    grams: LayerGrams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(Σ_k p_k A_k, B)`` with B the held broadcast factor (an even round)."""
    return weighted_sum(As, p), prev_B


B_ROUND = Aggregator(name="rolora", pair=ffa_lora_pair, held=("lora_A",), linear=True, summary=SUMMARY)
A_ROUND = Aggregator(name="rolora", pair=rolora_a_pair, held=("lora_B",), linear=True, summary=SUMMARY)

AGGREGATORS.register("rolora")(
    Aggregator(name="rolora", pair=None, alternates=(B_ROUND, A_ROUND), linear=True, summary=SUMMARY)
)
