"""Tiny models and a learnable toy task shared by the training and privacy tests."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedpeft.adapters import apply_peft
from fedpeft.config import FedPeftConfig
from fedpeft.training import Encoded

CLS, SEP, MARK = 1, 2, 5


def toy_task(n: int, seed: int) -> Encoded:
    """Label 1 iff token MARK occurs; random lengths so batches need padding."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for i in range(n):
        seq = [int(t) for t in rng.integers(10, 100, rng.integers(3, 9))]
        label = i % 2
        if label:
            seq[rng.integers(0, len(seq))] = MARK
        ids.append([CLS, *seq, SEP])
        labels.append(label)
    return Encoded(input_ids=ids, labels=np.array(labels, dtype=np.int64), pad_id=0)


def tiny_lora_bert(seed: int = 0, **cfg: Any) -> Any:
    """A 2-layer, 32-wide random BERT with LoRA r=4 (query, value) and a trained head."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_config(
        BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    return apply_peft(base, FedPeftConfig(lora_r=4, lora_alpha=8, **cfg))


def tiny_ssf_bert(seed: int = 0, **cfg: Any) -> Any:
    """A 2-layer, 32-wide random BERT with SSF after every Linear / LayerNorm and a trained head.

    Initialised wider than BERT's default (std 0.1, not 0.02) so that its features vary with the input
    as a pretrained model's do: SSF rescales and shifts features, it cannot create them (at std 0.02 the
    [CLS] state hardly depends on the tokens, and SSF does not learn the toy task at all)."""
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_config(
        BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                   initializer_range=0.1)
    )
    return apply_peft(base, FedPeftConfig(peft="ssf", **cfg))
