"""Server optimizers against two rounds computed by hand from each paper's update rule.

One tensor x (two coordinates) starts at x0 = [1, -2]; the aggregate deltas of rounds 1 and 2 are
Δ1 = [0.5, -0.1] and Δ2 = [-0.2, 0.3]. Settings: η = 0.1, β1 = 0.9, β2 = 0.99, τ = 1e-3 (FedAvgM: η = 1,
β = 0.9). Every expected value below is written out from the update rule, not computed by the code.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedpeft.config_checks import SERVER_OPTS
from strategies.server_opt import SERVER_OPTIMIZERS, ServerOptSettings, server_step

X0 = np.array([1.0, -2.0])
D1 = np.array([0.5, -0.1])
D2 = np.array([-0.2, 0.3])
ADAPTIVE = ServerOptSettings(lr=0.1, momentum=0.9, beta2=0.99, tau=1e-3)
KEY = "layer.lora_B.weight"


def _two_rounds(name: str, settings: ServerOptSettings) -> tuple[np.ndarray, np.ndarray, dict]:
    opt = SERVER_OPTIMIZERS.get(name)
    x = {KEY: X0.astype(np.float32)}
    state: dict = {}
    out = []
    for delta in (D1, D2):
        x, state, _ = server_step(opt, x, {KEY: (x[KEY] + delta).astype(np.float32)}, state, settings=settings)
        out.append(x[KEY].astype(np.float64))
    return out[0], out[1], state


def _adaptive_by_hand(v1: np.ndarray, v2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m1 = 0.1 * D1  # (1 - β1) Δ1, m0 = 0
    x1 = X0 + 0.1 * m1 / (np.sqrt(v1) + 1e-3)
    m2 = 0.9 * m1 + 0.1 * D2
    x2 = x1 + 0.1 * m2 / (np.sqrt(v2) + 1e-3)
    return x1, x2


def test_fedavgm_by_hand() -> None:
    x1, x2, state = _two_rounds("avgm", ServerOptSettings(lr=1.0, momentum=0.9))
    # m1 = Δ1, x1 = x0 + m1; m2 = 0.9 m1 + Δ2, x2 = x1 + m2
    np.testing.assert_allclose(x1, [1.5, -2.1], rtol=1e-6)
    np.testing.assert_allclose(x2, [1.5 + 0.45 - 0.2, -2.1 - 0.09 + 0.3], rtol=1e-6)
    np.testing.assert_allclose(state[f"m/{KEY}"], [0.25, 0.21], rtol=1e-6)


def test_fedavgm_without_momentum_at_unit_rate_is_fedavg() -> None:
    x1, x2, _ = _two_rounds("avgm", ServerOptSettings(lr=1.0, momentum=0.0))
    np.testing.assert_allclose(x1, X0 + D1, rtol=1e-6)
    np.testing.assert_allclose(x2, X0 + D1 + D2, rtol=1e-6)


def test_fedadam_by_hand() -> None:
    v1 = 0.99 * 1e-6 + 0.01 * D1**2  # v starts at τ²
    v2 = 0.99 * v1 + 0.01 * D2**2
    x1, x2 = _adaptive_by_hand(v1, v2)
    got1, got2, _ = _two_rounds("adam", ADAPTIVE)
    np.testing.assert_allclose(got1, x1, rtol=1e-5)
    np.testing.assert_allclose(got2, x2, rtol=1e-5)


def test_fedadagrad_by_hand() -> None:
    v1 = 1e-6 + D1**2
    v2 = v1 + D2**2
    x1, x2 = _adaptive_by_hand(v1, v2)
    got1, got2, _ = _two_rounds("adagrad", ADAPTIVE)
    np.testing.assert_allclose(got1, x1, rtol=1e-5)
    np.testing.assert_allclose(got2, x2, rtol=1e-5)


def test_fedyogi_by_hand() -> None:
    # v1 = τ² − 0.01 Δ1² sign(τ² − Δ1²): τ² < Δ1², so v grows by 0.01 Δ1²
    v1 = 1e-6 + 0.01 * D1**2
    # round 2, per coordinate: v1 = [0.002501, 0.000101] against Δ2² = [0.04, 0.09]: both below, v grows
    v2 = v1 + 0.01 * D2**2
    x1, x2 = _adaptive_by_hand(v1, v2)
    got1, got2, state = _two_rounds("yogi", ADAPTIVE)
    np.testing.assert_allclose(got1, x1, rtol=1e-5)
    np.testing.assert_allclose(got2, x2, rtol=1e-5)
    np.testing.assert_allclose(state[f"v/{KEY}"], v2, rtol=1e-5)


def test_yogi_shrinks_v_slowly_when_the_delta_falls() -> None:
    opt = SERVER_OPTIMIZERS.get("yogi")
    state = {f"v/{KEY}": np.array([1.0, 1.0], np.float32), f"m/{KEY}": np.zeros(2, np.float32)}
    x = {KEY: np.zeros(2, np.float32)}
    _, state, _ = server_step(opt, x, {KEY: np.array([0.5, 2.0], np.float32)}, state, settings=ADAPTIVE)
    # v > Δ²: v − 0.01 Δ² (Adam would move it to 0.99 + 0.01 Δ²); v < Δ²: v + 0.01 Δ²
    np.testing.assert_allclose(state[f"v/{KEY}"], [1 - 0.01 * 0.25, 1 + 0.01 * 4.0], rtol=1e-6)


@pytest.mark.parametrize("name", ["avgm", "adagrad", "adam", "yogi"])
def test_fixed_tensors_keep_their_value_and_moments(name: str) -> None:
    opt = SERVER_OPTIMIZERS.get(name)
    prev = {"l.lora_A.weight": np.ones((2, 3), np.float32), "l.lora_B.weight": np.zeros((3, 2), np.float32)}
    new = {k: v + 1 for k, v in prev.items()}
    x, state, metrics = server_step(opt, prev, new, {}, settings=ADAPTIVE, fixed=("lora_A",))
    np.testing.assert_array_equal(x["l.lora_A.weight"], prev["l.lora_A.weight"])
    assert not any("lora_A" in k for k in state)
    assert metrics["server_step_norm"] > 0
    assert not np.array_equal(x["l.lora_B.weight"], prev["l.lora_B.weight"])


def test_the_registry_is_what_the_config_accepts() -> None:
    assert sorted(SERVER_OPTIMIZERS.names()) == sorted(SERVER_OPTS)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lr": 0.0}, "server_lr"), ({"momentum": 1.0}, "server_momentum"), ({"beta2": -0.1}, "server_beta2"),
    ({"tau": 0.0}, "server_tau"),
])
def test_bad_settings_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerOptSettings(**kwargs)
