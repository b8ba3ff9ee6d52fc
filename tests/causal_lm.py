"""Tiny random decoder LMs and instruction data for causal-lm tests (offline: nothing is downloaded).

``make_tiny_lm`` trains a byte-level BPE tokenizer on the instruction data's words (a few hundred
tokens), gives it a ChatML chat template (or none), and saves a randomly initialised Llama- or
GPT-2-shaped model with that vocabulary: a directory ``--model`` accepts like any checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
# Wider than the default 0.02, as a trained model's weights are: at 0.02 a 32-wide model's logits cannot
# leave a near-uniform distribution (|logit| < 1), whatever its adapter learns.
INIT = 0.2
THINGS = ["apple", "leaf", "sky", "sun", "coal", "snow", "carrot", "plum"]


def instruction_rows(n: int, *, seed: int = 0, site: str | None = None) -> list[dict]:
    """``n`` prompt/response rows of a small learnable task: the colour of a thing, or a word repeated."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        i = int(rng.integers(len(THINGS)))
        if rng.random() < 0.5:
            row = {"prompt": f"What colour is the {THINGS[i]}?", "response": f"The {THINGS[i]} is {COLOURS[i]}."}
        else:
            words = " ".join(rng.choice(THINGS, size=3))
            row = {"prompt": f"Repeat after me: {words}", "response": words}
        if site is not None:
            row["site"] = site
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_tiny_lm(directory: Path, *, arch: str = "llama", chat_template: bool = True, seed: int = 0) -> Path:
    """Save a random ``arch`` (llama | gpt2) causal LM and its tokenizer under ``directory``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [" ".join(r.values()) for r in instruction_rows(200, seed=123)] + ["user assistant system"]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHATML
    torch.manual_seed(seed)
    vocab = len(fast)
    if arch == "llama":
        net = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, eos_token_id=fast.eos_token_id,
            tie_word_embeddings=False, initializer_range=INIT))
    elif arch == "gpt2":
        net = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                         eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id,
                                         initializer_range=INIT))
    else:
        raise ValueError(arch)
    directory.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(str(directory))
    fast.save_pretrained(str(directory))
    return directory
