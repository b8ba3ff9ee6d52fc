"""SSF's per-sample gradient rule against brute-force autograd, alone and inside Opacus on a tiny BERT,
and DP-SGD rounds on an SSF model (clipping bounds the update; hooks and ghost clipping agree)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from toy_models import tiny_ssf_bert, toy_task

from fedpeft.adapters import adapter_state
from fedpeft.adapters.ssf.layer import SSFLayer
from fedpeft.training import padded_batch
from privacy.dpsgd import DPSGD, dp_train_local
from privacy.ssf_grad_sample import ssf_grad_sample


def brute_force(layer: SSFLayer, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients of Σ g_n ⊙ layer(x_n), one autograd call per example."""
    scales, shifts = [], []
    for n in range(x.shape[0]):
        layer.zero_grad()
        (layer(x[n : n + 1]) * g[n : n + 1]).sum().backward()
        scales.append(layer.scale.grad.clone())
        shifts.append(layer.shift.grad.clone())
    return torch.stack(scales), torch.stack(shifts)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 4),
    middle=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    d=st.integers(1, 7),
    seed=st.integers(0, 2**16),
)
def test_rule_matches_per_sample_autograd(n: int, middle: list[int], d: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    layer = SSFLayer(d)
    with torch.no_grad():
        layer.scale.copy_(torch.randn(d, generator=g))
        layer.shift.copy_(torch.randn(d, generator=g))
    shape = (n, *middle, d)
    x, backprops = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g)
    x = x.float()
    got = ssf_grad_sample(layer, [x], backprops)
    want_scale, want_shift = brute_force(layer, x, backprops)
    torch.testing.assert_close(got[layer.scale], want_scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[layer.shift], want_shift, rtol=1e-5, atol=1e-5)


def test_rule_skips_frozen_parameters() -> None:
    layer = SSFLayer(3)
    layer.shift.requires_grad_(False)
    got = ssf_grad_sample(layer, [torch.ones(2, 5, 3)], torch.ones(2, 5, 3))
    assert set(got) == {layer.scale}


def no_dropout_ssf_bert() -> Any:
    from transformers import AutoModelForSequenceClassification, BertConfig

    from fedpeft.adapters import apply_peft
    from fedpeft.config import FedPeftConfig

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.1))
    model = apply_peft(base, FedPeftConfig(peft="ssf"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # frozen embeddings: no input needs a gradient
def test_opacus_per_sample_gradients_equal_autograd_on_a_model() -> None:
    """Opacus's hooks with the registered rule give each example's exact gradient of every SSF tensor."""
    from opacus.grad_sample import GradSampleModule

    import privacy.ssf_grad_sample  # noqa: F401

    data = toy_task(6, seed=0)
    batch = padded_batch(data, np.arange(6))
    labels = batch.pop("labels")
    model = no_dropout_ssf_bert().train()
    ssf_params = {n: p for n, p in model.named_parameters() if p.requires_grad and ".ssf." in n}
    assert len(ssf_params) == 36

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    loss = torch.nn.functional.cross_entropy(gsm(**batch).logits, labels, reduction="sum")
    loss.backward()
    per_sample = {n: p.grad_sample.detach().clone() for n, p in ssf_params.items()}
    gsm._close()

    for i in range(6):
        model.zero_grad()
        row = {k: v[i : i + 1] for k, v in batch.items()}
        torch.nn.functional.cross_entropy(model(**row).logits, labels[i : i + 1], reduction="sum").backward()
        for name, p in ssf_params.items():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def flat(state: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([state[k].ravel() for k in sorted(state)]).astype(np.float64)


def private_round(model: Any, *, clip: float, mode: str = "hooks", sigma: float = 0.0, **kw: Any) -> dict:
    settings_ = {"epochs": 2, "max_steps": 0, "batch_size": 8, "lr": 1.0, "weight_decay": 0.0,
                 "optimizer": "sgd", "generator_seed": 7, **kw}
    metrics, _ = dp_train_local(model, toy_task(40, seed=2), dp=DPSGD(sigma, clip, mode), **settings_)
    return metrics


def test_clipping_bounds_an_ssf_update() -> None:
    model = tiny_ssf_bert()
    before = flat(adapter_state(model))
    clip = 1e-3
    metrics = private_round(model, clip=clip)
    moved = np.linalg.norm(flat(adapter_state(model)) - before)
    bound = clip * metrics["examples_seen"] / 8
    assert 0 < moved <= bound * (1 + 1e-4)
    unclipped = tiny_ssf_bert()
    private_round(unclipped, clip=1e6)
    assert np.linalg.norm(flat(adapter_state(unclipped)) - before) > 20 * bound


def test_hooks_and_ghost_clipping_agree_on_ssf() -> None:
    results = {}
    for mode in ("hooks", "ghost"):
        model = tiny_ssf_bert()
        private_round(model, clip=0.05, mode=mode)
        results[mode] = flat(adapter_state(model))
    np.testing.assert_allclose(results["ghost"], results["hooks"], atol=1e-5)


def test_a_private_round_leaves_the_ssf_hooks_and_nothing_else() -> None:
    model = tiny_ssf_bert()
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert hooks == len(model.targets)
    ids = padded_batch(toy_task(4, seed=9), np.arange(4))
    ids.pop("labels")
    private_round(model, clip=1.0, sigma=1.0)
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == hooks
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    with torch.no_grad():  # the SSF hooks still act: randomising γ changes the output
        before = model(**ids).logits.clone()
        for name, p in model.named_parameters():
            if name.endswith("ssf.scale"):
                p.mul_(2.0)
        assert not torch.allclose(model(**ids).logits, before)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_reaches_every_ssf_coordinate(mode: str) -> None:
    model = tiny_ssf_bert()
    before = adapter_state(model)
    private_round(model, clip=1.0, sigma=50.0, mode=mode, max_steps=1, epochs=1)
    after = adapter_state(model)
    moved = np.concatenate([(after[k] - before[k]).ravel() for k in before if ".ssf." in k])
    assert (moved != 0).all()
    assert np.std(moved) == pytest.approx(50.0 / 8, rel=0.1)
