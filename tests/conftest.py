"""Shared fixtures: a tiny random BERT saved as a model directory, and small data files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fedpeft.data import DEFAULT_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT with the real MiniLM tokenizer, saved like a hub model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    from fedpeft.models import resolve_model_path

    out = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(""))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_st_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT encoder saved in the sentence-transformers layout that declares
    mean pooling and normalisation (modules.json, 1_Pooling/config.json), like all-MiniLM-L6-v2."""
    import torch
    from transformers import AutoModel, AutoTokenizer, BertConfig

    from fedpeft.models import resolve_model_path

    out = tmp_path_factory.mktemp("tiny-st")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(""))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, initializer_range=0.2)
    AutoModel.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    return out


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random Llama with a small BPE tokenizer and a ChatML chat template."""
    from causal_lm import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random GPT-2 whose tokenizer has no chat template."""
    from causal_lm import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny-gpt2"), arch="gpt2", chat_template=False)


@pytest.fixture(scope="session")
def instruction_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 prompt/response rows of the tiny instruction task, with a site column (3 sites)."""
    from causal_lm import instruction_rows, write_jsonl

    rows = [row | {"site": f"site-{i % 3}"} for i, row in enumerate(instruction_rows(300, seed=1))]
    return write_jsonl(tmp_path_factory.mktemp("instructions") / "chat.jsonl", rows)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 400 rows of the bundled corpus as plain JSONL."""
    out = tmp_path_factory.mktemp("data") / "small.jsonl"
    with open(DEFAULT_DATA, encoding="utf-8") as fh:
        rows = [json.loads(next(fh)) for _ in range(400)]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture()
def one_class_data(tmp_path: Path) -> Path:
    out = tmp_path / "one_class.csv"
    out.write_text("text,label\n" + "".join(f"review {i},good\n" for i in range(20)))
    return out


@pytest.fixture(scope="session")
def copy_of_default_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("default") / DEFAULT_DATA.name
    shutil.copy(DEFAULT_DATA, out)
    return out


@pytest.fixture()
def server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps instruction messages with the running task's identity; a ServerApp sets it."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 77)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


WORDS = "river stone cloud table green window paper music garden letter yellow horse silver bottle forest orange"


@pytest.fixture(scope="session")
def ssf_setting(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random BERT initialised wider than BERT's default (std 0.1), so that its features vary with the
    input as a pretrained model's do (SSF rescales features; it cannot create them), and a task: is the word
    "excellent" among random words."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    from fedpeft.models import resolve_model_path

    root = tmp_path_factory.mktemp("ssf")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(""))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2, initializer_range=0.1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    words = WORDS.split()
    with open(root / "data.jsonl", "w", encoding="utf-8") as fh:
        for i in range(600):
            seq = [str(w) for w in rng.choice(words, rng.integers(3, 9))]
            if i % 2:
                seq[rng.integers(0, len(seq))] = "excellent"
            fh.write(json.dumps({"text": " ".join(seq), "label": ["absent", "present"][i % 2]}) + "\n")
    return root / "model", root / "data.jsonl"
