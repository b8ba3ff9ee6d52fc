"""The causal-lm task: per-architecture LoRA targets, token and sequence losses against brute force,
held-out perplexity, and the task registry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.tasks import TASKS
from fedpeft.tasks.causal_lm import ALL_LINEAR, evaluate, lora_targets, sequence_losses, token_losses
from fedpeft.training import IGNORE, Encoded


def test_registry_names_both_tasks() -> None:
    assert set(TASKS.names()) == {"seq-cls", "causal-lm"}
    assert TASKS.get("causal-lm").auto_class == "AutoModelForCausalLM"


def test_lora_targets_are_the_attention_and_mlp_projections(tiny_lm_dir: Path, tiny_gpt2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    assert lora_targets(llama) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora_targets(AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)) == ["c_attn", "c_proj", "c_fc"]
    opt = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16))
    assert lora_targets(opt) == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    opt.config.model_type = "something-new"
    assert lora_targets(opt) == ALL_LINEAR


def brute_sequence_losses(logits: np.ndarray, labels: np.ndarray) -> list[float]:
    out = []
    for b in range(logits.shape[0]):
        terms = []
        for t in range(logits.shape[1] - 1):
            target = labels[b, t + 1]
            if target == IGNORE:
                continue
            row = logits[b, t].astype(np.float64)
            terms.append(math.log(np.exp(row - row.max()).sum()) + row.max() - row[target])
        out.append(float(np.mean(terms)) if terms else 0.0)
    return out


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(2, 7), st.integers(2, 6), st.integers(0, 2**31 - 1))
def test_sequence_losses_match_brute_force(batch: int, length: int, vocab: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, size=(batch, length))
    labels[rng.random((batch, length)) < 0.4] = IGNORE
    got = sequence_losses(torch.from_numpy(logits), torch.from_numpy(labels)).numpy()
    np.testing.assert_allclose(got, brute_sequence_losses(logits, labels), rtol=1e-5, atol=1e-6)
    loss, mask = token_losses(torch.from_numpy(logits), torch.from_numpy(labels))
    assert loss.shape == mask.shape == (batch, length - 1)
    assert not bool(loss[~mask].any())  # ignored positions contribute nothing


def test_evaluate_is_token_weighted_and_perplexity_is_exp_loss(tiny_lm_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    data = Encoded(input_ids=[[5, 6, 7, 8], [9, 10, 11]], labels=[[IGNORE, IGNORE, 7, 8], [IGNORE, 10, 11]], pad_id=0)
    got = evaluate(model, data, batch_size=1)
    total, tokens, right = 0.0, 0, 0
    for ids, labels in zip(data.input_ids, data.labels, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        for t in range(len(ids) - 1):
            if labels[t + 1] != IGNORE:
                total += float(torch.nn.functional.cross_entropy(logits[t:t + 1], torch.tensor([labels[t + 1]])))
                right += int(logits[t].argmax() == labels[t + 1])
                tokens += 1
    assert got["tokens"] == tokens == 4 and got["num_examples"] == 2
    assert got["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert got["accuracy"] == right / tokens
    # padding a batch together changes nothing
    assert evaluate(model, data, batch_size=2)["loss"] == pytest.approx(got["loss"], rel=1e-5)


def test_a_large_vocabulary_evaluates_fewer_rows_at_a_time(tiny_lm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits are rows x positions x vocabulary: over the budget, a batch passes in slices, same result."""
    from transformers import AutoModelForCausalLM

    import fedpeft.tasks.causal_lm as causal_lm

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 200, size=int(n)).tolist() for n in rng.integers(4, 12, size=9)]
    data = Encoded(input_ids=ids, labels=[[IGNORE] * 2 + x[2:] for x in ids], pad_id=0)
    whole = evaluate(model, data, batch_size=9)
    calls = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: calls.append(len(kw["input_ids"])) or forward(**kw))
    monkeypatch.setattr(causal_lm, "LOGIT_BUDGET", 2 * 11 * model.config.vocab_size)  # two rows of 11 tokens
    sliced = evaluate(model, data, batch_size=9)
    assert calls == [2, 2, 2, 2, 1]
    assert sliced["loss"] == pytest.approx(whole["loss"], rel=1e-5) and sliced["tokens"] == whole["tokens"]
    assert sliced["accuracy"] == whole["accuracy"]
