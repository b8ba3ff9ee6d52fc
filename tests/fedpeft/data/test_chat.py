"""Chat encoding: loss on the assistant's tokens only, with and without a chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.data.chat import encode_conversations, segments
from fedpeft.training import IGNORE

TWO_TURNS = (("system", "Be brief."), ("user", "What colour is the sky?"), ("assistant", "The sky is blue."),
             ("user", "And the sun?"), ("assistant", "The sun is yellow."))


def learned_text(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The labelled stretches of a sequence, decoded."""
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            assert label == token  # a learned token is labelled with itself
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_lm_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_gpt2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_gpt2_dir)


def test_template_labels_every_assistant_turn_and_its_end_token(chat_tokenizer) -> None:
    ids, labels, dropped = encode_conversations(chat_tokenizer, [TWO_TURNS], max_length=512)
    assert dropped == 0
    assert learned_text(chat_tokenizer, ids[0], labels[0]) == ["The sky is blue.<|im_end|>\n",
                                                               "The sun is yellow.<|im_end|>\n"]
    # the ids are the template's whole rendering: nothing lost or added between segments
    rendered = chat_tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in TWO_TURNS], tokenize=False)
    assert chat_tokenizer.decode(ids[0]) == rendered


def test_no_template_labels_responses_and_eos(plain_tokenizer) -> None:
    ids, labels, _ = encode_conversations(plain_tokenizer, [TWO_TURNS], max_length=512)
    assert learned_text(plain_tokenizer, ids[0], labels[0]) == ["The sky is blue.<|endoftext|>",
                                                                "The sun is yellow.<|endoftext|>"]
    assert plain_tokenizer.decode(ids[0]).startswith("Be brief.\nWhat colour is the sky?\nThe sky")


def test_truncation_cuts_the_right_and_drops_what_teaches_nothing(chat_tokenizer) -> None:
    long_prompt = (("user", "apple " * 200), ("assistant", "red"))
    short = (("user", "hi"), ("assistant", "The leaf is green."))
    ids, labels, dropped = encode_conversations(chat_tokenizer, [long_prompt, short], max_length=24)
    assert dropped == 1 and len(ids) == 1
    assert all(len(seq) <= 24 for seq in ids) and len(ids[0]) == len(labels[0])


def test_a_template_that_rewrites_earlier_turns_trains_the_last_turn_only(chat_tokenizer) -> None:
    """Like templates that drop earlier reasoning: renderings are not prefixes of each other."""
    import copy

    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
        "(earlier answer)<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    cut = segments(tok, TWO_TURNS)
    assert [text for text, learned in cut if learned] == ["The sun is yellow.<|im_end|>\n"]
    assert "(earlier answer)" in "".join(text for text, _ in cut)
