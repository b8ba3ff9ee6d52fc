"""FedIT: federated instruction tuning with LoRA by plain averaging (Zhang et al., 2023, arXiv 2305.05644).

FedAvg (McMahan et al., 2017) applied to the LoRA factors: A' = Σ_k p_k A_k and B' = Σ_k p_k B_k,
separately. Cheap and the common baseline, but biased: B'A' ≠ Σ_k p_k B_k A_k whenever the clients'
factors differ, and the bias is reported as ``agg_residual_*``. Exact for tensors that are not LoRA
factors (the head). Registered as ``fedit`` and, for people arriving from Flower, ``fedavg``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies import AGGREGATORS
from strategies.aggregator import AggregationOptions, Aggregator, weighted_sum
from strategies.residual import LayerGrams


def fedit_pair(
    As: Sequence[np.ndarray],
    Bs: Sequence[np.ndarray],
    p: np.ndarray,
    *,
    prev_A: np.ndarray,
    prev_B: np.ndarray,
    options: AggregationOptions,
    grams: LayerGrams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(Ā, B̄)``: the weighted averages of the factors."""
    return weighted_sum(As, p), weighted_sum(Bs, p)


FEDIT = Aggregator(
    name="fedit", pair=fedit_pair, linear=True, summary="average A and B separately (FedIT; biased baseline)"
)
AGGREGATORS.register("fedit")(FEDIT)
AGGREGATORS.register("fedavg")(FEDIT)
