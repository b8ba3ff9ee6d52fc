"""DP-SGD applied for real: clipping bounds what a step can do, noise has its calibrated scale, σ = 0 with
a huge clip is plain training, ghost clipping clips through Opacus's criterion, empty batches are steps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from toy_models import tiny_lora_bert, toy_task

import privacy.dpsgd as dpsgd
from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.training import padded_batch
from privacy.dpsgd import DPSGD, dp_train_local, poisson_plan


def flat(state: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([state[k].ravel() for k in sorted(state)]).astype(np.float64)


def run(model: Any, data: Any, *, sigma: float, clip: float, mode: str = "hooks", **kw: Any) -> tuple[dict, list]:
    settings: dict[str, Any] = {
        "epochs": 1,
        "max_steps": 0,
        "batch_size": 8,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "generator_seed": 7,
    }
    settings.update(kw)
    return dp_train_local(model, data, dp=DPSGD(sigma, clip, mode), **settings)


def test_poisson_plan() -> None:
    assert poisson_plan(40, batch_size=8, epochs=1, max_steps=0) == (0.2, 5)
    assert poisson_plan(41, batch_size=8, epochs=3, max_steps=0) == (1 / 6, 18)
    assert poisson_plan(41, batch_size=8, epochs=3, max_steps=4) == (1 / 6, 4)
    with pytest.raises(ValueError):
        poisson_plan(0, batch_size=8, epochs=1, max_steps=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": -1, "max_grad_norm": 1},
        {"noise_multiplier": 1, "max_grad_norm": 0},
        {"noise_multiplier": 1, "max_grad_norm": 1, "clipping": "flat"},
    ],
)
def test_mechanism_rejects_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        DPSGD(**kwargs)


def test_accountant_records_every_planned_step() -> None:
    model, data = tiny_lora_bert(), toy_task(40, seed=0)
    metrics, history = run(model, data, sigma=1.0, clip=1.0, epochs=2)
    assert metrics["steps"] == 10
    assert history == [(1.0, 0.2, 10)]


def test_sigma_zero_and_huge_clip_is_plain_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same Poisson batches through a plain AdamW loop (mean over the *expected* batch) land on the
    same adapter: DP-SGD with no noise and no effective clipping changes nothing else."""
    data = toy_task(40, seed=1)
    seen: list[np.ndarray] = []

    def recording(d: Any, rows: np.ndarray) -> dict[str, torch.Tensor]:
        seen.append(np.array(rows))
        return padded_batch(d, rows)

    monkeypatch.setattr(dpsgd, "padded_batch", recording)
    private = tiny_lora_bert()
    metrics, _ = run(private, data, sigma=0.0, clip=1e6, epochs=2)
    assert metrics["empty_steps"] == 0 and len(seen) == 10

    plain = tiny_lora_bert()
    params = [p for p in plain.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    plain.train()
    for rows in seen:
        batch = padded_batch(data, rows)
        labels = batch.pop("labels")
        loss = torch.nn.functional.cross_entropy(plain(**batch).logits, labels, reduction="sum") / 8  # n·q = 8
        loss.backward()
        opt.step()
        opt.zero_grad()
    plain.eval()
    np.testing.assert_allclose(flat(adapter_state(private)), flat(adapter_state(plain)), atol=2e-5)


def test_tiny_clip_bounds_the_update() -> None:
    """With SGD (lr 1) and no noise, each step moves the adapter by at most C·|batch|/(n·q)."""
    data = toy_task(40, seed=2)
    model = tiny_lora_bert()
    before = flat(adapter_state(model))
    clip = 1e-3
    metrics, _ = run(model, data, sigma=0.0, clip=clip, optimizer="sgd", lr=1.0, epochs=2)
    moved = np.linalg.norm(flat(adapter_state(model)) - before)
    bound = clip * metrics["examples_seen"] / 8
    assert 0 < moved <= bound * (1 + 1e-4)

    unclipped = tiny_lora_bert()
    run(unclipped, data, sigma=0.0, clip=1e6, optimizer="sgd", lr=1.0, epochs=2)
    assert np.linalg.norm(flat(adapter_state(unclipped)) - before) > 20 * bound  # clipping did the bounding


def test_noise_has_the_calibrated_scale() -> None:
    """One SGD step (lr 1) whose noise dwarfs the gradient: each coordinate moves by ≈ N(0, (σC/(n·q))²)."""
    data = toy_task(40, seed=3)
    model = tiny_lora_bert()
    before = flat(adapter_state(model))
    sigma, clip = 200.0, 1.0
    run(model, data, sigma=sigma, clip=clip, optimizer="sgd", lr=1.0, max_steps=1)
    moved = flat(adapter_state(model)) - before
    assert moved.size > 1000
    assert np.std(moved) == pytest.approx(sigma * clip / 8, rel=0.06)
    assert abs(np.mean(moved)) < 0.1 * sigma * clip / 8


def test_empty_batches_are_noise_only_steps() -> None:
    """At q = 1/50 about a third of the batches are empty: each still takes a noised, accounted step."""
    data = toy_task(50, seed=4)
    for mode in ("hooks", "ghost"):
        model = tiny_lora_bert()
        before = flat(adapter_state(model))
        metrics, history = run(
            model, data, sigma=1.0, clip=1.0, mode=mode, batch_size=1, max_steps=12, optimizer="sgd", generator_seed=3
        )
        assert metrics["steps"] == 12 and history == [(1.0, 1 / 50, 12)]
        assert metrics["empty_steps"] >= 1, metrics
        assert not np.allclose(flat(adapter_state(model)), before)


def test_empty_batch_alone_moves_the_adapter_by_noise() -> None:
    data = toy_task(50, seed=4)
    model = tiny_lora_bert()
    state = adapter_state(model)
    # find a seed whose first batch is empty, then take exactly that one step
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        if not (torch.rand(50, generator=g) < 1 / 50).any():
            break
    load_adapter_state(model, state)
    metrics, _ = run(
        model, data, sigma=1.0, clip=1.0, batch_size=1, max_steps=1, optimizer="sgd", lr=1.0, generator_seed=seed
    )
    assert metrics["empty_steps"] == 1
    moved = flat(adapter_state(model)) - flat(state)
    assert np.std(moved) == pytest.approx(1.0, rel=0.1)  # σC / (n·q) = 1 / 1


def test_ghost_clipping_clips_through_the_criterion() -> None:
    """Ghost clipping (Opacus's criterion, two backward passes) clips exactly like per-sample hooks, and
    a small clip really changes the result."""
    data = toy_task(40, seed=5)
    results = {}
    for mode, clip in (("hooks", 0.05), ("ghost", 0.05), ("ghost", 1e6)):
        model = tiny_lora_bert()
        run(model, data, sigma=0.0, clip=clip, mode=mode, optimizer="sgd", lr=1.0, epochs=2)
        results[(mode, clip)] = flat(adapter_state(model))
    np.testing.assert_allclose(results[("ghost", 0.05)], results[("hooks", 0.05)], atol=1e-5)
    assert np.linalg.norm(results[("ghost", 1e6)] - results[("ghost", 0.05)]) > 0.1


def test_model_is_clean_after_a_private_round() -> None:
    """No hooks or per-sample buffers stay behind: the cached model serves later non-private rounds."""
    from fedpeft.training import train_local

    model = tiny_lora_bert()
    run(model, toy_task(40, seed=6), sigma=1.0, clip=1.0)
    assert not model.training
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad")
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert hooks == 0
    train_local(model, toy_task(16, seed=7), epochs=1, max_steps=0, batch_size=8, lr=1e-3, weight_decay=0.0, seed=0)


def test_head_lr_applies_under_dp() -> None:
    """The head's own learning rate reaches the DP optimizer: at adapter lr ~0 only the head moves."""
    model = tiny_lora_bert()
    before = adapter_state(model)
    run(model, toy_task(40, seed=3), sigma=1.0, clip=1.0, lr=1e-9, head_lr=0.05, max_steps=2)
    after = adapter_state(model)
    lora = max(float(np.abs(after[k] - before[k]).max()) for k in before if "lora_" in k)
    head = max(float(np.abs(after[k] - before[k]).max()) for k in before if "lora_" not in k)
    assert lora < 1e-6 and head > 1e-2
