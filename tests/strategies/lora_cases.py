"""Random LoRA aggregation problems and dense float64 references, shared by the strategy tests.

A problem is K clients' factors (A_k: r_k × n, B_k: d × r_k), their weights and the previous global
adapter. The references here form ΔW = Σ_k p_k B_k A_k as a dense d × n matrix and use plain numpy
linear algebra on it, which the product code never does (it works on the stacked factors only).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hypothesis import strategies as st

from strategies import AGGREGATORS, AggregationOptions

A_KEY = "encoder.layer.0.query.lora_A.weight"
B_KEY = "encoder.layer.0.query.lora_B.weight"
HEAD = "classifier.weight"


@dataclass
class Problem:
    """One LoRA layer plus a head, for K clients."""

    As: list[np.ndarray]
    Bs: list[np.ndarray]
    heads: list[np.ndarray]
    weights: list[float]
    prev_A: np.ndarray
    prev_B: np.ndarray
    prev_head: np.ndarray = field(default_factory=lambda: np.zeros(3))

    @property
    def p(self) -> np.ndarray:
        w = np.asarray(self.weights, dtype=np.float64)
        return w / w.sum()

    @property
    def r(self) -> int:
        return self.prev_A.shape[0]

    @property
    def d(self) -> int:
        return self.prev_B.shape[0]

    @property
    def n(self) -> int:
        return self.prev_A.shape[1]

    @property
    def dW(self) -> np.ndarray:
        return dense_update(self.As, self.Bs, self.p)

    def states(self, frozen: tuple[str, ...] = ()) -> list[dict[str, np.ndarray]]:
        """What the clients send: a factor left out when the rule freezes or holds it."""
        out = []
        for a, b, h in zip(self.As, self.Bs, self.heads, strict=True):
            state = {HEAD: h}
            if "lora_A" not in frozen:
                state[A_KEY] = a
            if "lora_B" not in frozen:
                state[B_KEY] = b
            out.append(state)
        return out

    def previous(self) -> dict[str, np.ndarray]:
        return {A_KEY: self.prev_A, B_KEY: self.prev_B, HEAD: self.prev_head}

    def run(self, name: str, *, server_round: int = 1, **options: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Aggregate with the rule ``name`` uses in ``server_round`` (RoLoRA alternates)."""
        agg = AGGREGATORS.get(name).for_round(server_round)
        options_ = AggregationOptions(**options)
        return agg(self.states(agg.fixed), self.weights, previous=self.previous(), options=options_)

    def astype(self, dtype: type) -> Problem:
        return Problem(
            [a.astype(dtype) for a in self.As],
            [b.astype(dtype) for b in self.Bs],
            [h.astype(dtype) for h in self.heads],
            list(self.weights),
            self.prev_A.astype(dtype),
            self.prev_B.astype(dtype),
            self.prev_head.astype(dtype),
        )

    def permuted(self, order: list[int]) -> Problem:
        return Problem(
            [self.As[i] for i in order],
            [self.Bs[i] for i in order],
            [self.heads[i] for i in order],
            [self.weights[i] for i in order],
            self.prev_A,
            self.prev_B,
            self.prev_head,
        )


def make_problem(
    seed: int,
    *,
    d: int,
    n: int,
    r: int,
    K: int,
    ranks: list[int] | None = None,
    weights: list[float] | None = None,
    frozen_A: bool = False,
) -> Problem:
    """Gaussian factors; B scales differ per client (as after local training of unequal length).

    With ``frozen_A`` every client's A is the previous global A (FFA-LoRA: clients never move it).
    """
    rng = np.random.default_rng(seed)
    ranks = list(ranks) if ranks is not None else [r] * K
    assert len(ranks) == K and all(1 <= rk <= r for rk in ranks)
    prev_A = rng.normal(size=(r, n))
    prev_B = 0.1 * rng.normal(size=(d, r))
    As = [prev_A.copy() if frozen_A else rng.normal(size=(rk, n)) for rk in ranks]
    Bs = [rng.normal(size=(d, rk)) * 10.0 ** rng.uniform(-0.5, 0.5) for rk in ranks]
    heads = [rng.normal(size=3) for _ in range(K)]
    if weights is None:
        weights = list(rng.uniform(0.2, 5.0, size=K))
    return Problem(As, Bs, heads, list(weights), prev_A, prev_B, rng.normal(size=3))


@st.composite
def problems(
    draw: st.DrawFn,
    *,
    heterogeneous: bool = False,
    min_clients: int = 1,
    max_clients: int = 5,
    frozen_A: bool = False,
    tall: bool = False,
) -> Problem:
    """d, n in 3..12, r in 1..4, 1–5 clients with distinct positive weights (ranks 1..r if heterogeneous).

    ``tall``: d, n > r, the LoRA regime (r ≪ d, n).
    """
    r = draw(st.integers(1, 4))
    low = r + 1 if tall else 3
    d, n = draw(st.integers(low, 12)), draw(st.integers(low, 12))
    K = draw(st.integers(min_clients, max_clients))
    ranks = draw(st.lists(st.integers(1, r), min_size=K, max_size=K)) if heterogeneous else None
    weights = draw(st.lists(st.floats(0.1, 10.0), min_size=K, max_size=K, unique=True))
    seed = draw(st.integers(0, 2**32 - 1))
    return make_problem(seed, d=d, n=n, r=r, K=K, ranks=ranks, weights=weights, frozen_A=frozen_A)


# --- dense references ------------------------------------------------------------------------------


def dense_update(As: list[np.ndarray], Bs: list[np.ndarray], p: np.ndarray) -> np.ndarray:
    """ΔW = Σ_k p_k B_k A_k, dense, in float64."""
    total = np.zeros((Bs[0].shape[0], As[0].shape[1]))
    for pk, a, b in zip(p, As, Bs, strict=True):
        total += pk * (b.astype(np.float64) @ a.astype(np.float64))
    return total


def dense_average(arrays: list[np.ndarray], p: np.ndarray) -> np.ndarray:
    return np.einsum("k,k...->...", p, np.stack([np.asarray(a, dtype=np.float64) for a in arrays]))


def relative_error(dW: np.ndarray, A: np.ndarray, B: np.ndarray) -> float:
    """‖ΔW − BA‖_F / ‖ΔW‖_F, dense."""
    return float(np.linalg.norm(dW - B.astype(np.float64) @ A.astype(np.float64)) / np.linalg.norm(dW))


def singular_values(dW: np.ndarray) -> np.ndarray:
    return np.linalg.svd(dW, compute_uv=False)


def best_rank(dW: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """(U_k S_k V_kᵀ, its relative error sqrt(Σ_{i>k} s_i²) / ‖ΔW‖)."""
    U, S, Vt = np.linalg.svd(dW, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vt[:k], float(np.sqrt(np.sum(S[k:] ** 2)) / np.sqrt(np.sum(S**2)))


def ridge_B(dW: np.ndarray, A: np.ndarray, B_bar: np.ndarray, lam_eff: float) -> np.ndarray:
    """argmin_B ‖ΔW − BA‖² + λ‖B − B̄‖², as an ordinary least-squares problem on the augmented system
    ‖[ΔW, √λ B̄] − B [A, √λ I]‖² (minimum-norm solution when λ = 0 and A is rank-deficient)."""
    r = A.shape[0]
    s = np.sqrt(lam_eff)
    design = np.concatenate([A, s * np.eye(r)], axis=1)  # r × (n + r)
    target = np.concatenate([dW, s * B_bar], axis=1)  # d × (n + r)
    return np.linalg.lstsq(design.T, target.T, rcond=None)[0].T


def ridge_A(dW: np.ndarray, B: np.ndarray, A_bar: np.ndarray, lam_eff: float) -> np.ndarray:
    """argmin_A ‖ΔW − BA‖² + λ‖A − Ā‖² (the transpose of :func:`ridge_B`)."""
    return ridge_B(dW.T, B.T, A_bar.T, lam_eff).T


def assert_close_to_scale(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    """Entrywise |got − want| ≤ rtol · max|want|: a relative tolerance on the array's scale."""
    want = np.asarray(want, dtype=np.float64)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=0, atol=rtol * max(scale, 1e-12))


def assert_states_close(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], rtol: float) -> None:
    assert list(got) == list(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert_close_to_scale(got[key], np.asarray(want[key], dtype=np.float64), rtol)
