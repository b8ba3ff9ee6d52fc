"""DP-SGD on a causal LM: the privacy unit is one conversation (its mean response-token loss), clipping
bounds what a step can do, hooks and ghost clipping agree, and σ = 0 with a huge clip is plain training
with that per-sequence loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import privacy.dpsgd as dpsgd
from fedpeft.adapters import adapter_state, apply_peft
from fedpeft.config import FedPeftConfig
from fedpeft.runtime import Runtime
from fedpeft.tasks import TASKS
from fedpeft.tasks.causal_lm import sequence_losses
from fedpeft.training import padded_batch
from privacy.dpsgd import DPSGD, dp_train_local


@pytest.fixture(scope="module")
def lm_data(tiny_lm_dir: Path, instruction_data: Path) -> Any:
    from transformers import AutoTokenizer

    task = TASKS.get("causal-lm")
    table = task.read(instruction_data).subset(np.arange(40))
    return task.encode(AutoTokenizer.from_pretrained(tiny_lm_dir), table, max_length=48)


def fresh(model_dir: Path, seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    return apply_peft(base, FedPeftConfig(task="causal-lm", model=str(model_dir), data="x.jsonl", lora_r=4,
                                          lora_alpha=8))


def flat(state: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([state[k].ravel() for k in sorted(state)]).astype(np.float64)


def run(model: Any, data: Any, *, sigma: float, clip: float, mode: str = "hooks", **kw: Any) -> dict:
    settings: dict[str, Any] = {"epochs": 2, "max_steps": 0, "batch_size": 8, "lr": 1.0, "weight_decay": 0.0,
                                "generator_seed": 7, "optimizer": "sgd"}
    settings.update(kw)
    metrics, history = dp_train_local(model, data, dp=DPSGD(sigma, clip, mode), **settings)
    assert history == [(sigma, 0.2, metrics["steps"])]
    return metrics


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_tiny_clip_bounds_the_update(tiny_lm_dir: Path, lm_data: Any, mode: str) -> None:
    """SGD at lr 1, no noise: each step moves the adapter by at most C·|batch|/(n·q) — per conversation."""
    model = fresh(tiny_lm_dir)
    before = flat(adapter_state(model))
    clip = 1e-3
    metrics = run(model, lm_data, sigma=0.0, clip=clip, mode=mode)
    moved = np.linalg.norm(flat(adapter_state(model)) - before)
    bound = clip * metrics["examples_seen"] / 8
    assert 0 < moved <= bound * (1 + 1e-4)
    unclipped = fresh(tiny_lm_dir)
    run(unclipped, lm_data, sigma=0.0, clip=1e6, mode=mode)
    assert np.linalg.norm(flat(adapter_state(unclipped)) - before) > 20 * bound  # clipping did the bounding


def test_hooks_and_ghost_clip_the_same_sequences(tiny_lm_dir: Path, lm_data: Any) -> None:
    """Ghost clipping (Opacus's criterion with ``shape=``) reduces token losses per sequence exactly as
    the hooks path's per-sequence mean does: the same clipped steps land on the same adapter."""
    results = {}
    for mode in ("hooks", "ghost"):
        model = fresh(tiny_lm_dir)
        run(model, lm_data, sigma=0.0, clip=0.05, mode=mode, lr=0.5)
        results[mode] = flat(adapter_state(model))
    np.testing.assert_allclose(results["ghost"], results["hooks"], atol=2e-5)


def test_no_noise_huge_clip_is_plain_training_on_the_sequence_loss(
    tiny_lm_dir: Path, lm_data: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[np.ndarray] = []

    def recording(d: Any, rows: np.ndarray) -> dict[str, torch.Tensor]:
        seen.append(np.array(rows))
        return padded_batch(d, rows)

    monkeypatch.setattr(dpsgd, "padded_batch", recording)
    private = fresh(tiny_lm_dir)
    run(private, lm_data, sigma=0.0, clip=1e6, lr=0.1, epochs=1)
    plain = fresh(tiny_lm_dir)
    opt = torch.optim.SGD([p for p in plain.parameters() if p.requires_grad], lr=0.1)
    plain.train()
    for rows in seen:
        batch = padded_batch(lm_data, rows)
        labels = batch.pop("labels")
        (sequence_losses(plain(**batch).logits, labels).sum() / 8).backward()  # n·q = 8
        opt.step()
        opt.zero_grad()
    np.testing.assert_allclose(flat(adapter_state(private)), flat(adapter_state(plain)), atol=2e-5)


def test_bf16_autocast_still_clips(tiny_lm_dir: Path, lm_data: Any) -> None:
    model = fresh(tiny_lm_dir)
    before = flat(adapter_state(model))
    metrics = run(model, lm_data, sigma=0.0, clip=1e-3, mode="hooks", runtime=Runtime("cpu", "bf16"))
    moved = np.linalg.norm(flat(adapter_state(model)) - before)
    assert 0 < moved <= 1e-3 * metrics["examples_seen"] / 8 * (1 + 1e-3)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
