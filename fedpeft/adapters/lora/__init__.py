"""LoRA (Hu et al., 2021, arXiv 2106.09685) through HF peft: W x + (alpha/r) B A x.

Target modules default to the task's choice: for ``seq-cls`` peft's per-architecture table (BERT:
query, value; ...), whose classification head is trained and sent in full (peft ``modules_to_save``);
for ``causal-lm`` the attention and MLP projections of the architecture
(:func:`fedpeft.tasks.causal_lm.lora_targets`), and no head.
"""

from __future__ import annotations

from typing import Any

from fedpeft.adapters import PEFT_METHODS
from fedpeft.errors import FedPeftError


@PEFT_METHODS.register("lora")
def apply_lora(model: Any, cfg: Any) -> Any:
    """Freeze ``model`` and add LoRA adapters as configured by ``cfg.lora_*``."""
    # deferred: heavy (peft; torch via fedpeft.tasks) on the CLI start-up path
    from peft import LoraConfig, TaskType, get_peft_model

    from fedpeft.tasks import TASKS

    task = TASKS.get(cfg.task)
    targets = [m.strip() for m in cfg.lora_target_modules.split(",") if m.strip()] or task.lora_targets(model)
    config = LoraConfig(
        task_type=getattr(TaskType, task.peft_task_type),
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # unknown architecture or target names not found
        raise FedPeftError(f"cannot add LoRA to {type(model).__name__}: {str(err).splitlines()[0]}") from None
