"""Turn conversations into token ids and token labels, with the loss on the assistant's turns only.

With a chat template (the tokenizer's ``chat_template``), the text is the template's rendering. The
conversation is cut into segments at its assistant turns: for assistant turn k, the rendering of the
turns before it with the generation prompt (``<|im_start|>assistant\\n``, ``[/INST]``, ...) ends a
prompt segment, and the rendering up to and including turn k ends the response segment (its
end-of-turn token included, so the model learns to stop). Each segment is tokenized on its own and
the ids are concatenated; tokens of response segments are labelled with themselves, every other
token with :data:`~fedpeft.training.IGNORE`. A template whose renderings are not prefixes of each
other (one that rewrites earlier turns) is used for the last assistant turn only.

Without a template: the tokenizer's special prefix (BOS), then each turn's text on its own line;
assistant turns end with the EOS token.

Sequences are cut at ``max_length`` tokens from the right; a conversation left with no labelled
token teaches nothing and is dropped (the count is returned).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedpeft.data.conversations import Turn
from fedpeft.errors import FedPeftError
from fedpeft.training import IGNORE

Segment = tuple[str, bool]  # (text, learned)


def segments(tokenizer: Any, turns: Sequence[Turn]) -> list[Segment]:
    """The conversation's text cut into prompt and response segments (see the module doc)."""
    if getattr(tokenizer, "chat_template", None):
        cut = _template_segments(tokenizer, turns, every_turn=True)
        return cut if cut is not None else _template_segments(tokenizer, turns, every_turn=False) or []
    out: list[Segment] = []
    for role, content in turns:
        if role == "assistant":
            out.append((content + (tokenizer.eos_token or ""), True))
            out.append(("\n", False))
        else:
            out.append((content + "\n", False))
    return out


def _render(tokenizer: Any, turns: Sequence[Turn], *, prompt: bool) -> str:
    messages = [{"role": role, "content": content} for role, content in turns]
    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt))
    except Exception as err:  # jinja raises its own types (e.g. a template that rejects a system turn)
        raise FedPeftError(f"the tokenizer's chat template rejects a conversation: {err}") from None


def _template_segments(tokenizer: Any, turns: Sequence[Turn], *, every_turn: bool) -> list[Segment] | None:
    """Segments from the template's renderings; None when they are not prefixes of each other."""
    learned = [k for k, (role, _) in enumerate(turns) if role == "assistant"]
    if not every_turn:
        learned = learned[-1:]
        turns = turns[: learned[0] + 1]
    out: list[Segment] = []
    done = ""
    for k in learned:
        before = _render(tokenizer, turns[:k], prompt=True)
        through = _render(tokenizer, turns[: k + 1], prompt=False)
        if not (before.startswith(done) and through.startswith(before)):
            return None
        out += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    return [(text, learned_) for text, learned_ in out if text]


def encode_conversations(
    tokenizer: Any, conversations: Sequence[Sequence[Turn]], *, max_length: int
) -> tuple[list[list[int]], list[list[int]], int]:
    """``(input_ids, token labels, dropped)`` of ``conversations`` (see the module doc)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    ids_out: list[list[int]] = []
    labels_out: list[list[int]] = []
    dropped = 0
    for turns in conversations:
        ids: list[int] = []
        labels: list[int] = []
        for i, (text, learned) in enumerate(segments(tokenizer, turns)):
            # a template writes its own BOS; without one, the first segment gets the tokenizer's prefix
            piece = tokenizer(text, add_special_tokens=not templated and i == 0)["input_ids"]
            ids += piece
            labels += piece if learned else [IGNORE] * len(piece)
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE for label in labels[1:]):  # the first token is never predicted
            dropped += 1
            continue
        ids_out.append(ids)
        labels_out.append(labels)
    return ids_out, labels_out, dropped
