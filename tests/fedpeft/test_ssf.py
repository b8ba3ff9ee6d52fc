"""SSF on tiny random BERT- and Llama-shaped models: insertion, what trains and travels, merge, save/load."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedpeft.adapters import PEFT_METHODS, adapter_state, apply_peft, load_adapter_state
from fedpeft.adapters.ssf.config import CONFIG_NAME, WEIGHTS_NAME, SSFConfig
from fedpeft.adapters.ssf.layer import SSFLayer
from fedpeft.adapters.ssf.model import SSFModel
from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError

SSF = FedPeftConfig(peft="ssf")


def tiny_bert() -> Any:
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)
    return AutoModelForSequenceClassification.from_config(config).eval()


def tiny_llama() -> Any:
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, pad_token_id=0, num_labels=3)
    return AutoModelForSequenceClassification.from_config(config).eval()


# builder, head, expected default targets per layer (+ outside the layers)
MODELS: dict[str, tuple[Callable[[], Any], str, int]] = {
    # per layer: query, key, value, attention.output.dense, its LayerNorm, intermediate.dense, output.dense,
    # its LayerNorm (8); plus embeddings.LayerNorm and pooler.dense
    "bert": (tiny_bert, "classifier", 2 * 8 + 2),
    # per layer: q, k, v, o, gate, up, down (RMSNorm is not an nn.LayerNorm)
    "llama": (tiny_llama, "score", 2 * 7),
}
IDS = torch.tensor([[1, 5, 7, 9, 11, 2], [1, 13, 17, 2, 0, 0]])
MASK = (IDS != 0).long()


@pytest.fixture(params=sorted(MODELS))
def arch(request: pytest.FixtureRequest) -> tuple[Callable[[], Any], str, int]:
    return MODELS[request.param]


def randomise(model: SSFModel, seed: int = 0, std: float = 0.3) -> None:
    """Move every γ, β (and the head) away from their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in model.adapter_state_dict().items():
            base = 1.0 if key.endswith(".scale") else 0.0
            value.copy_(base + std * torch.randn(value.shape, generator=g) if key.split(".")[-2] == "ssf"
                        else value + std * torch.randn(value.shape, generator=g))


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def test_ssf_is_registered() -> None:
    assert "ssf" in PEFT_METHODS


def test_insertion_follows_every_linear_and_layernorm_but_the_head(arch: tuple) -> None:
    build, head, count = arch
    model = apply_peft(build(), SSF)
    assert isinstance(model, SSFModel) and len(model.targets) == count
    modules = dict(model.base_model.named_modules())
    for name in model.targets:
        assert isinstance(modules[name], nn.Linear | nn.LayerNorm)
        assert isinstance(modules[f"{name}.ssf"], SSFLayer)
        assert not name.startswith(head)
    untouched = [n for n, m in modules.items() if isinstance(m, nn.Linear | nn.LayerNorm) and n not in model.targets]
    assert untouched == [head]


def test_only_ssf_and_head_train_and_travel(arch: tuple) -> None:
    build, head, count = arch
    model = apply_peft(build(), SSF)
    trainable = {n.removeprefix("base_model.") for n, p in model.named_parameters() if p.requires_grad}
    state = adapter_state(model)
    assert set(state) == trainable
    ssf_keys = [k for k in state if k.split(".")[-2] == "ssf"]
    assert len(ssf_keys) == 2 * count
    head_keys = {f"{head}.{p}" for p, _ in getattr(model, head).named_parameters()}
    assert {k for k in state if k not in ssf_keys} == head_keys
    modules = dict(model.base_model.named_modules())
    for key in ssf_keys:
        target = modules[key.rsplit(".", 2)[0]]
        features = target.out_features if isinstance(target, nn.Linear) else target.normalized_shape[0]
        assert state[key].shape == (features,) and state[key].dtype == np.float32
        assert (state[key] == (1.0 if key.endswith(".scale") else 0.0)).all()  # γ = 1, β = 0
    total = sum(p.numel() for p in model.parameters())
    assert sum(v.size for v in state.values()) < 0.1 * total


def test_fresh_ssf_is_the_identity(arch: tuple) -> None:
    build, _, _ = arch
    base = build()
    before = logits(base)
    model = apply_peft(base, SSF).eval()
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
    randomise(model)
    assert not torch.allclose(logits(model), before)


def test_init_std_draws_gamma_around_one_and_beta_around_zero() -> None:
    torch.manual_seed(1)
    model = SSFModel(tiny_bert(), SSFConfig(init_std=0.02))
    state = model.adapter_state_dict()
    scales = torch.cat([v for k, v in state.items() if k.endswith("ssf.scale")])
    shifts = torch.cat([v for k, v in state.items() if k.endswith("ssf.shift")])
    assert abs(float(scales.mean()) - 1) < 0.005 and 0.015 < float(scales.std()) < 0.025
    assert abs(float(shifts.mean())) < 0.005 and 0.015 < float(shifts.std()) < 0.025


def test_named_targets() -> None:
    model = apply_peft(tiny_bert(), FedPeftConfig(peft="ssf", ssf_target_modules="query, attention.output.LayerNorm"))
    assert model.targets == (
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.output.LayerNorm",
        "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.output.LayerNorm",
    )


@pytest.mark.parametrize(("targets", "message"), [
    ("nonexistent", "SSF target 'nonexistent' matches no module of BertForSequenceClassification"),
    ("dropout", "SSF target bert.embeddings.dropout is a Dropout; SSF follows nn.Linear or nn.LayerNorm"),
    ("classifier", "SSF target 'classifier' matches no module"),  # the head is trained whole, never a target
])
def test_bad_targets_are_refused(targets: str, message: str) -> None:
    with pytest.raises(FedPeftError, match=message):
        apply_peft(tiny_bert(), FedPeftConfig(peft="ssf", ssf_target_modules=targets))


def test_a_model_without_a_classification_head_is_refused() -> None:
    from transformers import BertConfig, BertModel

    with pytest.raises(FedPeftError, match="no classification head named classifier or score"):
        apply_peft(BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64)), SSF)


def test_state_round_trip_reaches_the_live_model(arch: tuple) -> None:
    build, _, _ = arch
    source, target = apply_peft(build(), SSF).eval(), apply_peft(build(), SSF).eval()
    randomise(source, seed=3)
    assert not torch.allclose(logits(source), logits(target))
    load_adapter_state(target, adapter_state(source))
    torch.testing.assert_close(logits(target), logits(source), rtol=0, atol=0)
    state = adapter_state(target)
    del state[sorted(state)[0]]
    with pytest.raises(FedPeftError, match="mismatch"):
        load_adapter_state(target, state)


def test_merge_equals_unmerged_and_removes_every_trace(arch: tuple) -> None:
    build, _, _ = arch
    model = apply_peft(build(), SSF).eval()
    randomise(model, seed=1)
    expected = logits(model)
    merged = model.merge_and_unload()
    assert type(merged).__name__.endswith("ForSequenceClassification")
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)
    assert not any(isinstance(m, SSFLayer) for m in merged.modules())
    assert sum(len(m._forward_hooks) for m in merged.modules()) == 0
    assert not any(".ssf." in k for k in merged.state_dict())
    with pytest.raises(RuntimeError, match="merged"):
        model(input_ids=IDS)


def test_merged_model_loads_with_plain_transformers(arch: tuple, tmp_path: Path) -> None:
    """Saved with save_pretrained, loaded in a fresh interpreter that never imports fedpeft."""
    build, _, _ = arch
    model = apply_peft(build(), SSF).eval()
    randomise(model, seed=2)
    expected = logits(model)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    script = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'merged')!r}).eval()\n"
        f"ids = torch.tensor({IDS.tolist()}); mask = (ids != 0).long()\n"
        "with torch.no_grad(): out = m(input_ids=ids, attention_mask=mask).logits\n"
        "assert not any(name.split('.')[0] in ('fedpeft', 'peft') for name in sys.modules), 'imported fedpeft'\n"
        "print(json.dumps(out.tolist()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(loaded, expected, rtol=0, atol=1e-5)


def test_llama_merge_switches_on_the_bias_config() -> None:
    model = apply_peft(tiny_llama(), SSF)
    randomise(model)
    merged = model.merge_and_unload()
    assert merged.config.attention_bias is True and merged.config.mlp_bias is True
    assert merged.model.layers[0].self_attn.q_proj.bias is not None


def test_only_the_needed_bias_switch_is_turned_on() -> None:
    model = apply_peft(tiny_llama(), FedPeftConfig(peft="ssf", ssf_target_modules="q_proj"))
    randomise(model)
    expected = logits(model.eval())
    merged = model.merge_and_unload()
    assert merged.config.attention_bias is True and merged.config.mlp_bias is False
    k_bias = merged.model.layers[0].self_attn.k_proj.bias  # the switch gives k too: zero, so nothing changes
    assert k_bias is not None and not k_bias.any()
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)


def test_a_shift_with_nowhere_to_go_is_refused() -> None:
    base = tiny_bert()
    for layer in base.bert.encoder.layer:
        layer.attention.self.query.bias = None  # no bias, and BertConfig has no switch for one
    model = apply_peft(base, FedPeftConfig(peft="ssf", ssf_target_modules="query"))
    randomise(model)
    with pytest.raises(FedPeftError, match="cannot merge the SSF shift of bert.encoder.layer.0.attention.self.query"):
        model.merge_and_unload()


def test_a_zero_shift_needs_no_bias() -> None:
    base = tiny_bert()
    for layer in base.bert.encoder.layer:
        layer.attention.self.query.bias = None
    model = apply_peft(base, FedPeftConfig(peft="ssf", ssf_target_modules="query")).eval()
    with torch.no_grad():
        for key, value in model.adapter_state_dict().items():
            if key.endswith("ssf.scale"):
                value.uniform_(0.5, 1.5)
    expected = logits(model)
    torch.testing.assert_close(logits(model.merge_and_unload()), expected, rtol=0, atol=1e-5)


def test_save_and_load_the_adapter_alone(arch: tuple, tmp_path: Path) -> None:
    build, _, count = arch
    model = apply_peft(build(), SSF).eval()
    randomise(model, seed=4)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [WEIGHTS_NAME, CONFIG_NAME]
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["peft_type"] == "SSF" and len(config["target_modules"]) == count
    weights = (tmp_path / "adapter" / WEIGHTS_NAME).stat().st_size
    assert weights < 4 * sum(v.numel() for v in model.adapter_state_dict().values()) + 16_384  # the adapter, no base
    loaded = SSFModel.from_pretrained(build(), tmp_path / "adapter").eval()
    assert loaded.targets == model.targets
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_saved_targets_are_the_resolved_ones(tmp_path: Path) -> None:
    """A named-target adapter reloads exactly those layers, whatever the loader's defaults."""
    model = apply_peft(tiny_bert(), FedPeftConfig(peft="ssf", ssf_target_modules="value"))
    model.save_pretrained(tmp_path)
    assert SSFModel.from_pretrained(tiny_bert(), tmp_path).targets == model.targets


@pytest.mark.parametrize(("damage", "message"), [
    ("no-config", "ssf_config.json is missing"),
    ("no-weights", "adapter_model.safetensors is missing"),
    ("lora-config", "does not describe an SSF adapter"),
    ("not-json", "is not valid JSON"),
    ("unknown-field", "unknown fields"),
])
def test_load_refuses_a_broken_adapter_directory(damage: str, message: str, tmp_path: Path) -> None:
    apply_peft(tiny_bert(), SSF).save_pretrained(tmp_path)
    config = tmp_path / CONFIG_NAME
    if damage == "no-config":
        config.unlink()
    elif damage == "no-weights":
        (tmp_path / WEIGHTS_NAME).unlink()
    elif damage == "lora-config":
        config.write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    elif damage == "not-json":
        config.write_text("{")
    else:
        config.write_text(json.dumps({**json.loads(config.read_text()), "rank": 3}))
    with pytest.raises(FedPeftError, match=message):
        SSFModel.from_pretrained(tiny_bert(), tmp_path)


def test_load_refuses_an_adapter_of_another_model_shape(tmp_path: Path) -> None:
    apply_peft(tiny_llama(), FedPeftConfig(peft="ssf", ssf_target_modules="q_proj")).save_pretrained(tmp_path)
    with pytest.raises(FedPeftError, match="matches no module"):
        SSFModel.from_pretrained(tiny_bert(), tmp_path)


@pytest.mark.parametrize("kwargs", [{"init_std": -1.0}, {"init_std": float("nan")}, {"target_modules": "query"},
                                    {"target_modules": ("",)}, {"head_modules": ("pooler_head",)}])
def test_config_validation(kwargs: dict) -> None:
    if "head_modules" in kwargs:
        with pytest.raises(FedPeftError, match="no classification head"):
            SSFModel(tiny_bert(), SSFConfig(**kwargs))
        return
    with pytest.raises(ValueError):
        SSFConfig(**kwargs)


def test_no_head_modules_trains_ssf_alone() -> None:
    """``head_modules=()`` (a causal LM's SSF): only γ and β train and travel, never an output layer."""
    wrapped = SSFModel(tiny_bert(), SSFConfig(head_modules=()))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(".ssf." in n for n in trainable)
    assert all(".ssf." in k for k in wrapped.adapter_state_dict())


def test_training_moves_only_ssf_and_head() -> None:
    from toy_models import tiny_ssf_bert, toy_task

    from fedpeft.training import evaluate, param_groups, train_local

    model = tiny_ssf_bert()
    groups = param_groups(model, lr=3e-2, head_lr=0.1)
    assert [g["lr"] for g in groups] == [3e-2, 0.1]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.base_model.classifier.parameters()}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = adapter_state(model)
    train, test = toy_task(256, seed=0), toy_task(128, seed=1)
    start = evaluate(model, test, batch_size=64)
    train_local(model, train, epochs=4, max_steps=0, batch_size=16, lr=3e-2, weight_decay=0.0, seed=0)
    end = evaluate(model, test, batch_size=64)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    after = adapter_state(model)
    assert all(not np.array_equal(after[k], before[k]) for k in before if k.endswith(("scale", "classifier.weight")))
    assert start["accuracy"] < 0.6 and end["accuracy"] > 0.85
    assert end["loss"] < 0.5 * start["loss"]
