"""Tasks, registered by name: what a run learns, and how its data, model and quality are handled.

A :class:`Task` bundles what differs between learning to classify texts (``seq-cls``) and learning to
write responses (``causal-lm``): how a data file is read, how a table is tokenized, which transformers
auto-class loads the base model, which peft task type wraps it, which modules LoRA targets by default,
and how the held-out split is evaluated. Everything else — adapters, strategies, codecs, DP — is the
same for both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedpeft.registry import Registry


@dataclass(frozen=True)
class Task:
    """One task's handlers.

    Attributes
    ----------
    read : (path, text_column, label_column, min_classes) -> table
        Read a data file (the columns name a classification file's text and label) into a table
        with ``frame``, ``labels``, ``label_names``, ``subset``, ``len``.
    encode : (tokenizer, table, max_length) -> Encoded
        Tokenize a table once (:class:`fedpeft.training.Encoded`).
    auto_class : str
        The transformers auto-class of the base model.
    peft_task_type : str
        peft's ``TaskType`` name (``SEQ_CLS`` trains and sends the head too).
    evaluate : (model, data, batch_size, runtime) -> dict
        Held-out metrics; always ``loss``, ``accuracy`` and ``num_examples``.
    lora_targets : (model) -> list[str] | None
        Default LoRA target modules (None: peft's own table).
    quality : str
        The metric the run's table and report lead with.
    """

    read: Callable[..., Any]
    encode: Callable[..., Any]
    auto_class: str
    peft_task_type: str
    evaluate: Callable[..., dict[str, float]]
    lora_targets: Callable[[Any], list[str] | None]
    quality: str


TASKS: Registry[Task] = Registry("task")

from fedpeft.tasks import causal_lm, seq_cls  # noqa: E402,F401  (register "seq-cls", "causal-lm")

__all__ = ["TASKS", "Task"]
