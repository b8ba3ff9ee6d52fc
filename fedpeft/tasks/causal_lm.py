"""``causal-lm``: instruction tuning of a decoder LM (Llama, Qwen, Mistral, GPT-2, ... families).

Data is conversations (:mod:`fedpeft.data.conversations`), tokenized with the tokenizer's chat
template and labelled on the assistant's tokens only (:mod:`fedpeft.data.chat`). The loss is the
next-token cross-entropy over those tokens; held-out quality is that loss over every labelled token
of the split, its perplexity exp(loss), and next-token accuracy (share of labelled tokens the model
ranks first). LoRA targets the attention and MLP projections of the architecture by default.

Under DP-SGD the privacy unit is one conversation: :func:`sequence_losses` gives one loss per
sequence (its mean over its labelled tokens), which is what per-sample clipping bounds.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from fedpeft.data.chat import encode_conversations
from fedpeft.data.conversations import load_conversations
from fedpeft.errors import FedPeftError
from fedpeft.runtime import CPU, Runtime
from fedpeft.tasks import TASKS, Task
from fedpeft.training import IGNORE, Encoded, batches

logger = logging.getLogger(__name__)

# The attention (q, k, v, o) and MLP projections of each architecture, by transformers model_type.
_LLAMA_LIKE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NEOX_LIKE = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
PROJECTIONS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere", "starcoder2"), _LLAMA_LIKE),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "gpt_neox": _NEOX_LIKE,
    "falcon": _NEOX_LIKE,
    "bloom": _NEOX_LIKE,
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
ALL_LINEAR = "all-linear"  # peft: every linear layer but the output head
LOGIT_BUDGET = 2**27  # logits evaluated per forward pass (512 MiB in fp32), whatever eval_batch_size says


def lora_targets(model: Any) -> list[str] | str:
    """The projections of ``model``'s architecture that it has; unknown ones: every linear layer."""
    present = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"}
    wanted = PROJECTIONS.get(getattr(model.config, "model_type", ""), ())
    chosen = [name for name in wanted if name in present]
    return chosen or ALL_LINEAR


def _read(path: Any, **_columns: Any) -> Any:  # a conversation file names its own columns
    return load_conversations(path)


def _encode(tokenizer: Any, table: Any, *, max_length: int) -> Encoded:
    ids, labels, dropped = encode_conversations(tokenizer, table.conversations, max_length=max_length)
    if not ids:
        raise FedPeftError(f"no conversation keeps a response token within max_length={max_length}; raise it")
    if dropped:
        logger.warning("%d of %d conversations dropped: no response token within max_length=%d",
                       dropped, len(table), max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return Encoded(input_ids=ids, labels=labels, pad_id=int(pad))


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy at every position, and which positions count: ``(loss, mask)``, both
    ``(B, T-1)``; position t scores the prediction of token t+1 from the tokens up to t."""
    shifted = labels[:, 1:]
    flat = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1), ignore_index=IGNORE,
        reduction="none")
    return flat.view(shifted.shape), shifted != IGNORE


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One loss per sequence: the mean over its labelled tokens (the DP privacy unit), shape ``(B,)``."""
    loss, mask = token_losses(logits, labels)
    return (loss * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Encoded, *, batch_size: int, runtime: Runtime = CPU) -> dict[str, float]:
    """Held-out loss over every labelled token, its perplexity, next-token accuracy."""
    model.eval()
    order = np.argsort([len(x) for x in data.input_ids], kind="stable")  # less padding
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    loss_sum, correct, tokens = 0.0, 0, 0
    for whole in batches(data, order, batch_size):
        # a 150k-token vocabulary makes logits of 64 x 512 positions 20 GB: pass fewer rows at a time
        rows = max(1, LOGIT_BUDGET // (whole["input_ids"].shape[1] * vocab))
        for start in range(0, len(whole["input_ids"]), rows):
            batch = {k: v[start:start + rows] for k, v in whole.items()}
            labels = batch.pop("labels").to(runtime.device)
            with runtime.autocast_context():
                logits = model(**runtime.to_device(batch)).logits
            loss, mask = token_losses(logits, labels)
            loss_sum += float((loss * mask).sum())
            correct += int(((logits[:, :-1].argmax(-1) == labels[:, 1:]) & mask).sum())
            tokens += int(mask.sum())
    mean = loss_sum / max(tokens, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "accuracy": correct / max(tokens, 1),
            "num_examples": len(data), "tokens": tokens}


TASKS.register("causal-lm")(Task(
    read=_read,
    encode=_encode,
    auto_class="AutoModelForCausalLM",
    peft_task_type="CAUSAL_LM",
    evaluate=evaluate,
    lora_targets=lora_targets,
    quality="perplexity",
))
