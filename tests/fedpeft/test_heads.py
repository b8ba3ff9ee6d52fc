"""Pooling: what a model directory declares, how a run resolves it, and the mean-pooling classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpeft.errors import FedPeftError
from fedpeft.heads import Pooling, declared_pooling, model_pooling, resolve_pooling
from fedpeft.models import load_model, resolve_model_path


def test_the_bundled_minilm_declares_normalised_mean_pooling() -> None:
    assert declared_pooling(resolve_model_path("")) == Pooling("mean", True)


def test_resolution(tiny_model_dir: Path, tiny_st_model_dir: Path, tmp_path: Path) -> None:
    assert declared_pooling(tiny_model_dir) is None  # no sentence-transformers layout
    assert resolve_pooling("auto", tiny_model_dir) == Pooling("cls")
    assert resolve_pooling("auto", tiny_st_model_dir) == Pooling("mean", True)
    assert resolve_pooling("mean", tiny_model_dir) == Pooling("mean", False)  # normalised only if declared
    assert resolve_pooling("cls", tiny_st_model_dir) == Pooling("cls")
    (tmp_path / "modules.json").write_text("not json")
    assert declared_pooling(tmp_path) is None  # unreadable: nothing declared, never a crash
    (tmp_path / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Pooling",
                                                        "path": "1_Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert declared_pooling(tmp_path) == Pooling("cls")
    with pytest.raises(FedPeftError, match="pooling must be one of auto, cls, mean"):
        resolve_pooling("max", tmp_path)


def test_auto_loads_the_declared_head(tiny_model_dir: Path, tiny_st_model_dir: Path) -> None:
    mean, _ = load_model(str(tiny_st_model_dir), num_labels=3)
    assert type(mean).__name__ == "MeanPoolingForSequenceClassification"
    assert model_pooling(mean) == Pooling("mean", True) and mean.classifier.out_features == 3
    native, _ = load_model(str(tiny_model_dir), num_labels=3)
    assert type(native).__name__ == "BertForSequenceClassification" and model_pooling(native) == Pooling("cls")
    forced, _ = load_model(str(tiny_st_model_dir), num_labels=3, pooling="cls")
    assert type(forced).__name__ == "BertForSequenceClassification"


def test_mean_pooling_reads_only_real_tokens_and_normalises(tiny_st_model_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_st_model_dir), num_labels=2)
    model.eval()
    texts = ["short", "a considerably longer sentence than the first one"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        pooled = model.pooled(**batch)
        hidden = model.model(**batch).last_hidden_state
        alone = model.pooled(**tokenizer(texts[:1], return_tensors="pt"))
        logits = model(**batch).logits
    n = int(batch["attention_mask"][0].sum())
    want = hidden[0, :n].mean(0)
    torch.testing.assert_close(pooled[0], want / want.norm())  # the mean over the unpadded tokens, unit length
    torch.testing.assert_close(alone[0], pooled[0], atol=1e-5, rtol=1e-5)  # padding changes nothing
    torch.testing.assert_close(logits, model.classifier(pooled))


def test_per_sample_gradients_of_a_mean_pooling_lora_model_match_brute_force(tiny_st_model_dir: Path) -> None:
    """What DP-SGD clips: Opacus's per-example gradients (hooks) of the adapter and the mean-pooling head,
    in one padded batch, equal each example's own gradient computed alone (no padding)."""
    from opacus import GradSampleModule

    from fedpeft.config import FedPeftConfig
    from fedpeft.site import SiteModel

    cfg = FedPeftConfig(model=str(tiny_st_model_dir), lora_r=2, lora_alpha=4)
    held = SiteModel(cfg, 2)
    model = held.model
    with torch.no_grad():  # B = 0 would give A no gradient at all
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    for module in model.modules():  # deterministic: no dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    tokenizer = held.tokenizer
    texts, labels = ["short", "a much longer review of the film", "fine acting"], torch.tensor([0, 1, 1])
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    want = []
    for text, label in zip(texts, labels, strict=True):
        model.zero_grad()
        logits = model(**tokenizer([text], return_tensors="pt")).logits
        torch.nn.functional.cross_entropy(logits, label.view(1)).backward()
        want.append([p.grad.detach().clone() for _, p in trainable])
    model.zero_grad()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    logits = wrapped(**batch).logits
    torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
    for j, (name, p) in enumerate(trainable):
        for i in range(len(texts)):
            torch.testing.assert_close(p.grad_sample[i], want[i][j], atol=1e-5, rtol=1e-4, msg=name)
    wrapped._close()
