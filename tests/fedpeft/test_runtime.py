"""Device and precision: auto picks CUDA when torch sees it, a missing GPU or bf16 is an error, never a
silent fall-back; bf16 keeps the frozen weights in bf16 and the adapter in fp32."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft import site
from fedpeft.adapters import adapter_state
from fedpeft.client_round import train_client_round
from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.runtime import Runtime, resolve_runtime
from server.evaluation import Evaluator


def test_cpu_machine_resolves_to_cpu_fp32() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU resolution is checked by the monkeypatched cases")
    assert resolve_runtime("auto", "auto") == Runtime("cpu", "")
    assert resolve_runtime("cpu", "bf16") == Runtime("cpu", "bf16")  # CPU autocast, asked for explicitly
    with pytest.raises(FedPeftError, match="device cuda: torch sees no CUDA GPU"):
        resolve_runtime("cuda", "auto")


@pytest.mark.parametrize(("bf16", "device", "precision", "expected"), [
    (True, "auto", "auto", Runtime("cuda", "bf16")),
    (False, "auto", "auto", Runtime("cuda", "")),
    (True, "cuda", "fp32", Runtime("cuda", "")),
    (True, "cpu", "auto", Runtime("cpu", "")),
])
def test_gpu_resolution(monkeypatch: pytest.MonkeyPatch, bf16: bool, device: str, precision: str,
                        expected: Runtime) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_runtime(device, precision) == expected


def test_bf16_on_a_gpu_without_it_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(FedPeftError, match="Tesla V100 does not support bf16"):
        resolve_runtime("cuda", "bf16")


def test_autocast_context_and_batch_moves() -> None:
    with Runtime("cpu", "bf16").autocast_context():
        assert torch.is_autocast_enabled("cpu")
    with Runtime("cpu", "").autocast_context():
        assert not torch.is_autocast_enabled("cpu")
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long)}
    assert Runtime().to_device(batch) is batch
    assert Runtime().dtype == torch.float32 and Runtime("cpu", "bf16").dtype == torch.bfloat16


def lm_config(model: Path, data: Path, **kw) -> FedPeftConfig:
    return FedPeftConfig(task="causal-lm", model=str(model), data=str(data), max_length=48, device="cpu", **kw)


def test_bf16_model_holds_frozen_weights_in_bf16_and_the_same_initial_adapter(tiny_lm_dir: Path,
                                                                              instruction_data: Path) -> None:
    fp32 = lm_config(tiny_lm_dir, instruction_data)
    bf16 = dataclasses.replace(fp32, precision="bf16")
    held = site.Sites().site(bf16, {"partition-id": 0, "num-partitions": 2}, label_names=[])
    model = held.model.model
    dtypes = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.bfloat16} and trainable == {torch.float32}
    a, b = site.SiteModel(fp32, 0).initial, held.model.initial
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # drawn on the CPU in fp32
    result = train_client_round(bf16, model, held.data, server_round=1, partition_id=0)
    assert np.isfinite(result["train_loss"]) and result["steps"] > 0
    assert np.isfinite(Evaluator(bf16).evaluate(adapter_state(model))["loss"])


def test_gradient_checkpointing_gives_the_same_training(tiny_lm_dir: Path, instruction_data: Path) -> None:
    """Recomputing activations changes memory, not maths: the same adapter after a client-round."""
    plain = lm_config(tiny_lm_dir, instruction_data, max_local_steps=3, lr=1e-2)
    checkpointed = dataclasses.replace(plain, gradient_checkpointing=True)
    states = []
    models = []
    for cfg in (plain, checkpointed):
        held = site.Sites().site(cfg, {"partition-id": 0, "num-partitions": 2}, label_names=[])
        train_client_round(cfg, held.model.model, held.data, server_round=1, partition_id=0)
        states.append(adapter_state(held.model.model))
        models.append(held.model.model)
    assert models[1].base_model.model.is_gradient_checkpointing
    for key in states[0]:
        np.testing.assert_allclose(states[0][key], states[1][key], atol=1e-6)
