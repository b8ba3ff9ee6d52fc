"""``seq-cls``: text classification with a fresh head (the base model's auto-class for sequence
classification); quality is accuracy on the held-out split."""

from __future__ import annotations

from typing import Any

from fedpeft.data import load_labelled_table
from fedpeft.tasks import TASKS, Task
from fedpeft.training import Encoded, encode, evaluate


def _read(path: Any, *, text_column: str, label_column: str, min_classes: int = 2) -> Any:
    return load_labelled_table(path, text_column=text_column, label_column=label_column, min_classes=min_classes)


def _encode(tokenizer: Any, table: Any, *, max_length: int) -> Encoded:
    return encode(tokenizer, table.texts, table.labels, max_length=max_length)


TASKS.register("seq-cls")(Task(
    read=_read,
    encode=_encode,
    auto_class="AutoModelForSequenceClassification",
    peft_task_type="SEQ_CLS",
    evaluate=evaluate,
    lora_targets=lambda model: None,  # peft's table (BERT: query, value; Llama: q_proj, v_proj; ...)
    quality="accuracy",
))
