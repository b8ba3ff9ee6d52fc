"""FedIns aggregation: the SSF pools averaged entry by entry (Feng et al., "Towards Instance-adaptive
Inference for Federated Learning", ICCV 2023, arXiv 2308.06051).

Each site trains the whole pool (M entries of γ, β per target layer, M keys) and sends it; the server
sets every tensor to Σ_k p_k x_k, entry by entry, keys and head included, and broadcasts the global
pool. This is the official code's ``communication``: every entry is averaged, chosen by a site's
inputs this round or not, keys too. Its weights are uniform over its five or six clients, which all
take part every round; here p_k = n_k / Σ n, FedAvg's weights, which are uniform when sites are of
equal size. Weighting an entry by how often each site chose it would need the usage counts from the
sites (an unprotected upload under DP, and weights computed from the data, so no longer a fixed linear
map); the paper does not do it, and neither does this rule.

The result is the weighted average of what the sites sent and nothing else, so it is linear: central
DP, secure aggregation, robust statistics and the codecs compose with it as with ``ssf-avg``.
"""

from __future__ import annotations

from strategies import AGGREGATORS
from strategies.aggregator import Aggregator

FEDINS = Aggregator(
    name="fedins",
    pair=None,
    linear=True,
    adapter="ssf-pool",
    summary="FedIns: SSF pools and their keys averaged entry by entry (exact: no factor pairs)",
)
AGGREGATORS.register("fedins")(FEDINS)
