"""Local training and evaluation on a tiny random BERT with LoRA and a learnable toy task."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from toy_models import tiny_lora_bert, toy_task

from fedpeft.adapters import adapter_state
from fedpeft.training import Encoded, batches, encode, evaluate, param_groups, train_local


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded, and do not suffer when other processes load the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(model: Any, data: Encoded, **overrides: Any) -> dict[str, float]:
    kwargs: dict[str, Any] = {"epochs": 1, "max_steps": 0, "batch_size": 16, "lr": 1e-2, "weight_decay": 0.0,
                              "seed": 0}
    kwargs.update(overrides)
    return train_local(model, data, **kwargs)


def test_training_learns_the_toy_task() -> None:
    model = tiny_lora_bert()
    train, test = toy_task(256, seed=0), toy_task(128, seed=1)
    before = evaluate(model, test, batch_size=64)
    metrics = _train(model, train, epochs=6)
    after = evaluate(model, test, batch_size=64)
    assert metrics["steps"] == 6 * 16
    assert after["loss"] < 0.5 * before["loss"]
    assert before["accuracy"] < 0.7
    assert after["accuracy"] >= 0.9


def test_train_loss_falls_across_rounds() -> None:
    model = tiny_lora_bert()
    data = toy_task(128, seed=2)
    first = _train(model, data, epochs=2)["train_loss"]
    _train(model, data, epochs=3, seed=1)
    last = _train(model, data, epochs=2, seed=2)["train_loss"]
    assert last < first


# 40 rows at batch size 16: each epoch is three steps of 16, 16 and 8 rows.
@pytest.mark.parametrize(("max_steps", "epochs", "steps", "seen"), [
    (2, 1, 2, 32),  # cap inside the first epoch
    (3, 2, 3, 40),  # cap exactly at the end of the first epoch
    (4, 3, 4, 56),  # cap one step into the second epoch
    (7, 5, 7, 96),  # cap one step into the third epoch
    (0, 2, 6, 80),  # no cap: every step of every epoch
    (100, 2, 6, 80),  # cap above what the epochs give
])
def test_max_steps_caps_exactly(max_steps: int, epochs: int, steps: int, seen: int) -> None:
    model = tiny_lora_bert()
    metrics = _train(model, toy_task(40, seed=3), epochs=epochs, max_steps=max_steps)
    assert metrics["steps"] == steps
    assert metrics["examples_seen"] == seen
    assert np.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0


def test_same_seed_same_adapter() -> None:
    data = toy_task(64, seed=4)
    states = []
    for train_seed in (3, 3, 4):
        model = tiny_lora_bert(seed=0, lora_dropout=0.1)
        _train(model, data, epochs=2, seed=train_seed)
        states.append(adapter_state(model))
    for key in states[0]:
        np.testing.assert_array_equal(states[0][key], states[1][key])
    assert any(not np.array_equal(states[0][k], states[2][k]) for k in states[0])


def test_training_changes_adapter_but_not_frozen_base() -> None:
    model = tiny_lora_bert()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    adapter_before = {k: v.copy() for k, v in adapter_state(model).items()}
    _train(model, toy_task(64, seed=5), epochs=1, weight_decay=0.1)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            torch.testing.assert_close(param, frozen[name], rtol=0, atol=0, msg=name)
    for name, buf in model.named_buffers():
        torch.testing.assert_close(buf, buffers[name], rtol=0, atol=0)
    adapter_after = adapter_state(model)
    changed = [k for k in adapter_before if not np.array_equal(adapter_before[k], adapter_after[k])]
    assert set(changed) == set(adapter_before)  # every LoRA factor and the head moved


def test_train_leaves_model_in_eval_mode() -> None:
    model = tiny_lora_bert()
    _train(model, toy_task(20, seed=6), max_steps=1)
    assert not model.training


def test_evaluate_reports_accuracy_loss_and_count() -> None:
    model = tiny_lora_bert()
    data = toy_task(37, seed=7)
    result = evaluate(model, data, batch_size=8)
    assert result["num_examples"] == 37
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["loss"] > 0
    # brute force: one example at a time, no padding at all
    correct, loss = 0, 0.0
    with torch.no_grad():
        for ids, label in zip(data.input_ids, data.labels, strict=True):
            logits = model(input_ids=torch.tensor([ids])).logits
            loss += float(torch.nn.functional.cross_entropy(logits, torch.tensor([label])))
            correct += int(logits.argmax(-1).item() == label)
    assert result["accuracy"] == pytest.approx(correct / 37)
    assert result["loss"] == pytest.approx(loss / 37, rel=1e-4)


def test_evaluate_independent_of_batch_size() -> None:
    model = tiny_lora_bert()
    _train(model, toy_task(64, seed=8), epochs=2)
    data = toy_task(50, seed=9)
    results = [evaluate(model, data, batch_size=b) for b in (1, 7, 64)]
    assert results[0]["accuracy"] == results[1]["accuracy"] == results[2]["accuracy"]
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-4)
    assert results[0]["loss"] == pytest.approx(results[2]["loss"], rel=1e-4)


def test_batches_pad_and_mask() -> None:
    data = Encoded(input_ids=[[1, 2, 3], [4], [5, 6]], labels=np.array([0, 1, 0]), pad_id=9)
    out = list(batches(data, np.array([2, 0, 1]), batch_size=2))
    assert len(out) == 2
    assert out[0]["input_ids"].tolist() == [[5, 6, 9], [1, 2, 3]]
    assert out[0]["attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert out[0]["labels"].tolist() == [0, 0]
    assert out[1]["input_ids"].tolist() == [[4]]
    assert out[1]["labels"].tolist() == [1]


class _FakeTokenizer:
    """Whitespace 'tokenizer' with the call signature encode() uses."""

    def __init__(self, pad_token_id: int | None) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, texts: list[str], *, truncation: bool, max_length: int) -> dict[str, list[list[int]]]:
        assert truncation
        return {"input_ids": [[len(w) for w in t.split()][:max_length] for t in texts]}


@pytest.mark.parametrize(("pad", "expected_pad"), [(3, 3), (None, 0)])
def test_encode(pad: int | None, expected_pad: int) -> None:
    enc = encode(_FakeTokenizer(pad), ("a bb ccc dddd", "ee"), [1, 0], max_length=3)
    assert enc.input_ids == [[1, 2, 3], [2]]
    assert enc.labels.dtype == np.int64 and enc.labels.tolist() == [1, 0]
    assert enc.pad_id == expected_pad
    assert len(enc) == 2


def test_param_groups_split_head_from_adapter() -> None:
    model = tiny_lora_bert()
    groups = param_groups(model, lr=1e-3, head_lr=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    adapter, head = ({names[id(p)] for p in g["params"]} for g in groups)
    assert [g["lr"] for g in groups] == [1e-3, 0.5]
    assert adapter and all("lora_" in n for n in adapter)
    assert head and all("modules_to_save" in n for n in head)
    assert adapter | head == {n for n, p in model.named_parameters() if p.requires_grad}
    assert [g["lr"] for g in param_groups(model, lr=1e-3)] == [1e-3, 1e-3]  # head_lr 0: the same as lr


def test_head_lr_moves_the_head_alone_when_the_adapter_lr_is_negligible() -> None:
    def moved(head_lr: float) -> tuple[float, float]:
        model = tiny_lora_bert()
        before = adapter_state(model)
        _train(model, toy_task(32, seed=2), lr=1e-9, head_lr=head_lr, max_steps=2)
        after = adapter_state(model)
        delta = {k: float(np.abs(after[k] - before[k]).max()) for k in before}
        return (max(v for k, v in delta.items() if "lora_" in k), max(v for k, v in delta.items() if "lora_" not in k))

    adapter, head = moved(0.05)
    assert adapter < 1e-6 and head > 1e-2
    adapter, head = moved(0.0)  # everything at lr 1e-9
    assert adapter < 1e-6 and head < 1e-6
