"""LoRA adapters on tiny random models: what is trainable, what travels, and strict state loading."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from fedpeft.adapters import PEFT_METHODS, adapter_state, apply_peft, load_adapter_state
from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError

CFG = FedPeftConfig(lora_r=4, lora_alpha=8)


def tiny_bert(num_labels: int = 2) -> Any:
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=num_labels)
    return AutoModelForSequenceClassification.from_config(config)


def tiny_llama(num_labels: int = 2) -> Any:
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0, num_labels=num_labels)
    return AutoModelForSequenceClassification.from_config(config)


# (builder, default LoRA targets, head module name)
MODELS = {
    "bert": (tiny_bert, {"query", "value"}, "classifier"),
    "llama": (tiny_llama, {"q_proj", "v_proj"}, "score"),
}
BASE_KEY_MARKERS = ("embeddings", "embed_tokens", "base_layer", "query.weight", "value.weight", "key.weight",
                    "q_proj.weight", "v_proj.weight", "dense", "LayerNorm", "norm", "mlp", "pooler")


@pytest.fixture(params=sorted(MODELS))
def arch(request: pytest.FixtureRequest) -> tuple[Callable[..., Any], set[str], str]:
    return MODELS[request.param]


def _lora_target(key: str) -> str:
    """The module a LoRA factor key belongs to: '...self.query.lora_A.weight' -> 'query'."""
    parts = key.split(".")
    return parts[[i for i, p in enumerate(parts) if p in ("lora_A", "lora_B")][0] - 1]


def test_lora_is_registered() -> None:
    assert "lora" in PEFT_METHODS


def test_state_holds_only_lora_factors_and_head(arch: tuple[Callable[..., Any], set[str], str]) -> None:
    build, targets, head = arch
    state = adapter_state(apply_peft(build(), CFG))
    lora = [k for k in state if ".lora_A." in k or ".lora_B." in k]
    heads = [k for k in state if k not in lora]
    assert lora and heads
    assert all(k.split(".")[-2] == head for k in heads), heads
    for key in state:
        assert not any(marker in key for marker in BASE_KEY_MARKERS), key
    assert {_lora_target(k) for k in lora} == targets
    # every targeted module in both layers has an A and a B factor
    assert len(lora) == 2 * 2 * len(targets)
    for key in lora:
        value = state[key]
        assert value.dtype == np.float32 and value.flags["C_CONTIGUOUS"]
        if ".lora_A." in key:
            assert value.shape == (CFG.lora_r, 32)
        else:
            assert value.shape == (32, CFG.lora_r)


def test_adapter_is_far_smaller_than_model(arch: tuple[Callable[..., Any], set[str], str]) -> None:
    build, _, _ = arch
    model = build()
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    state = adapter_state(apply_peft(model, CFG))
    adapter_bytes = sum(v.nbytes for v in state.values())
    assert 0 < adapter_bytes < 0.1 * full_bytes


def test_only_adapter_and_head_require_grad(arch: tuple[Callable[..., Any], set[str], str]) -> None:
    build, _, head = arch
    model = apply_peft(build(), CFG)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and frozen
    for name in trainable:
        assert "lora_A" in name or "lora_B" in name or f"{head}.modules_to_save" in name, name
    trainable_count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable_count == sum(v.size for v in adapter_state(model).values())


def test_lora_rank_follows_config(arch: tuple[Callable[..., Any], set[str], str]) -> None:
    build, _, _ = arch
    state = adapter_state(apply_peft(build(), dataclasses.replace(CFG, lora_r=2, lora_alpha=4)))
    shapes = {v.shape for k, v in state.items() if ".lora_A." in k}
    assert shapes == {(2, 32)}


def test_fresh_lora_b_is_zero_so_model_output_unchanged() -> None:
    base = tiny_bert()
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        before = base.eval()(input_ids=ids).logits.clone()
    model = apply_peft(base, CFG).eval()
    state = adapter_state(model)
    assert all(not v.any() for k, v in state.items() if ".lora_B." in k)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_adapter_state_is_a_snapshot() -> None:
    """The returned arrays are a copy: later changes to the model do not reach them, and vice versa."""
    model = apply_peft(tiny_bert(), CFG)
    state = adapter_state(model)
    frozen_copy = {k: v.copy() for k, v in state.items()}
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(1.0)
    for key in state:
        np.testing.assert_array_equal(state[key], frozen_copy[key], err_msg=f"{key} follows the live model")
    live = adapter_state(model)
    for value in live.values():
        value[...] = 0.0
    assert all(v.any() for k, v in adapter_state(model).items() if ".lora_A." in k)


def _random_state(state: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in state.items()}


def test_load_round_trip(arch: tuple[Callable[..., Any], set[str], str]) -> None:
    build, _, _ = arch
    model = apply_peft(build(), CFG)
    new = _random_state(adapter_state(model), seed=1)
    load_adapter_state(model, new)
    back = adapter_state(model)
    assert list(back) == list(new)
    for key in new:
        np.testing.assert_array_equal(back[key], new[key])


def test_loaded_values_reach_the_live_parameters() -> None:
    model = apply_peft(tiny_bert(), CFG).eval()
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    new = _random_state(adapter_state(model), seed=2)
    load_adapter_state(model, new)
    params = dict(model.named_parameters())
    key = next(k for k in new if ".query.lora_B." in k)
    live = params[key.replace("lora_B.weight", "lora_B.default.weight")]
    np.testing.assert_array_equal(live.detach().numpy(), new[key])
    head_key = next(k for k in new if k.endswith("classifier.weight"))
    live_head = params[head_key.replace("classifier.weight", "classifier.modules_to_save.default.weight")]
    np.testing.assert_array_equal(live_head.detach().numpy(), new[head_key])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, before)


def test_load_into_second_model_gives_same_outputs() -> None:
    source = apply_peft(tiny_bert(), CFG).eval()
    load_adapter_state(source, _random_state(adapter_state(source), seed=3))
    target = apply_peft(tiny_bert(), CFG).eval()  # same base seed, different adapter
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    with torch.no_grad():
        assert not torch.allclose(source(input_ids=ids).logits, target(input_ids=ids).logits)
        load_adapter_state(target, adapter_state(source))
        torch.testing.assert_close(source(input_ids=ids).logits, target(input_ids=ids).logits)


def test_load_accepts_float64_and_casts() -> None:
    model = apply_peft(tiny_bert(), CFG)
    new = {k: v.astype(np.float64) for k, v in _random_state(adapter_state(model), seed=4).items()}
    load_adapter_state(model, new)
    back = adapter_state(model)
    for key in new:
        np.testing.assert_allclose(back[key], new[key], rtol=1e-6)


def test_load_rejects_missing_key(arch: tuple[Callable[..., Any], set[str], str]) -> None:
    build, _, _ = arch
    model = apply_peft(build(), CFG)
    state = adapter_state(model)
    dropped = sorted(state)[0]
    del state[dropped]
    with pytest.raises(FedPeftError, match="adapter state mismatch") as info:
        load_adapter_state(model, state)
    assert dropped in str(info.value)


def test_load_rejects_extra_key(arch: tuple[Callable[..., Any], set[str], str]) -> None:
    build, _, _ = arch
    model = apply_peft(build(), CFG)
    state = adapter_state(model)
    state["base_model.model.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(FedPeftError, match="unexpected.*extra.weight"):
        load_adapter_state(model, state)


def test_load_rejects_wrong_shape(arch: tuple[Callable[..., Any], set[str], str]) -> None:
    build, _, _ = arch
    model = apply_peft(build(), CFG)
    state = adapter_state(model)
    key = next(k for k in state if ".lora_A." in k)
    state[key] = np.zeros((CFG.lora_r + 1, 32), np.float32)
    with pytest.raises(FedPeftError, match="shape"):
        load_adapter_state(model, state)


def test_rejected_load_leaves_model_unchanged() -> None:
    model = apply_peft(tiny_bert(), CFG)
    before = {k: v.copy() for k, v in adapter_state(model).items()}
    bad = _random_state(before, seed=5)
    key = next(k for k in bad if ".lora_B." in k)
    bad[key] = bad[key].T.copy()
    with pytest.raises(FedPeftError):
        load_adapter_state(model, bad)
    after = adapter_state(model)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def test_state_from_model_with_other_rank_rejected() -> None:
    small = adapter_state(apply_peft(tiny_bert(), dataclasses.replace(CFG, lora_r=2)))
    with pytest.raises(FedPeftError, match="shape"):
        load_adapter_state(apply_peft(tiny_bert(), CFG), small)


def test_state_from_model_with_other_head_rejected() -> None:
    three = adapter_state(apply_peft(tiny_bert(num_labels=3), CFG))
    with pytest.raises(FedPeftError, match="classifier"):
        load_adapter_state(apply_peft(tiny_bert(num_labels=2), CFG), three)


@pytest.mark.parametrize(
    ("build", "targets", "expected"),
    [
        (tiny_bert, "key", {"key"}),
        (tiny_bert, " query , key ", {"query", "key"}),
        (tiny_llama, "k_proj,o_proj", {"k_proj", "o_proj"}),
    ],
)
def test_custom_target_modules(build: Callable[..., Any], targets: str, expected: set[str]) -> None:
    cfg = dataclasses.replace(CFG, lora_target_modules=targets)
    state = adapter_state(apply_peft(build(), cfg))
    lora = [k for k in state if ".lora_A." in k or ".lora_B." in k]
    assert {_lora_target(k) for k in lora} == expected
    assert len(lora) == 2 * 2 * len(expected)


def test_unknown_target_module_raises() -> None:
    cfg = dataclasses.replace(CFG, lora_target_modules="no_such_module")
    with pytest.raises(FedPeftError, match="cannot add LoRA to BertForSequenceClassification"):
        apply_peft(tiny_bert(), cfg)


def test_unknown_peft_method_raises() -> None:
    with pytest.raises(FedPeftError, match="unknown PEFT method 'ia3'.*lora"):
        apply_peft(tiny_bert(), dataclasses.replace(CFG, peft="ia3"))
