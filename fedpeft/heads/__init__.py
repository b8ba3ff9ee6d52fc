"""Which classification head a sequence classifier gets: the architecture's own (``cls``: BERT's
pooler → linear) or a linear classifier on mean-pooled token states (``mean``), which is what a
sentence-transformers encoder such as all-MiniLM-L6-v2 was trained to produce.

``auto`` reads the model directory's sentence-transformers layout (``modules.json`` naming a
``Pooling`` module, its ``1_Pooling/config.json``, and an optional ``Normalize`` module) and uses the
pooling declared there; a directory that declares none gets the architecture's native head.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedpeft.errors import FedPeftError

POOLING_MODES = ("auto", "cls", "mean")
MODELING_FILE = Path(__file__).with_name("modeling_mean_pooling.py")
FEDINS_FILE = Path(__file__).with_name("modeling_fedins.py")


@dataclass(frozen=True)
class Pooling:
    """A resolved pooling: ``cls`` (the architecture's native head) or ``mean`` (optionally L2-normalised)."""

    mode: str
    normalize: bool = False


def declared_pooling(model_dir: str | Path) -> Pooling | None:
    """The pooling a sentence-transformers model directory declares, or None when it declares none
    (or declares a pooling other than mean / CLS token)."""
    root = Path(model_dir)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return None
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        types = [str(m.get("type", "")) for m in modules]
        pooling = next(m for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        config = json.loads((root / str(pooling.get("path", "1_Pooling")) / "config.json").read_text(encoding="utf-8"))
    except (StopIteration, OSError, ValueError, AttributeError, TypeError):
        return None
    normalize = any(t.endswith(".Normalize") for t in types)
    if config.get("pooling_mode_mean_tokens"):
        return Pooling("mean", normalize)
    if config.get("pooling_mode_cls_token"):
        return Pooling("cls")
    return None


def resolve_pooling(requested: str, model_dir: str | Path | None) -> Pooling:
    """``auto`` → the declared pooling or ``cls``; ``mean`` → mean, normalised when the model says so;
    ``cls`` → the native head."""
    if requested not in POOLING_MODES:
        raise FedPeftError(f"pooling must be one of {', '.join(POOLING_MODES)}, got {requested!r}")
    if requested == "cls":
        return Pooling("cls")
    declared = declared_pooling(model_dir) if model_dir is not None else None
    if requested == "mean":
        return Pooling("mean", bool(declared and declared.mode == "mean" and declared.normalize))
    return declared or Pooling("cls")


def mean_pooling_classifier(path: str, *, num_labels: int, normalize: bool, dtype):
    """The encoder at ``path`` under a mean-pooling linear classifier (a fresh, seeded-by-caller head)."""
    # deferred: heavy (transformers, torch) on the CLI start-up path
    import transformers

    from fedpeft.heads.modeling_mean_pooling import AUTO_MAP, MeanPoolingForSequenceClassification

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, num_labels=num_labels)
    if not hasattr(config, "hidden_size"):
        raise FedPeftError(f"{path}: mean pooling needs a model config with hidden_size")
    config.pooling_normalize = bool(normalize)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["MeanPoolingForSequenceClassification"]
    return MeanPoolingForSequenceClassification.from_pretrained(path, config=config, local_files_only=True,
                                                                dtype=dtype)


def model_pooling(model) -> Pooling:
    """The pooling a loaded (possibly peft-wrapped) classifier uses."""
    config = getattr(model, "config", None)
    if config is not None and "MeanPoolingForSequenceClassification" in (getattr(config, "architectures", None) or ()):
        return Pooling("mean", bool(getattr(config, "pooling_normalize", False)))
    return Pooling("cls")


def is_fedins(model) -> bool:
    """Whether ``model`` is an exported FedIns classifier (an SSF pool that routes each input)."""
    return "FedInsForSequenceClassification" in (getattr(getattr(model, "config", None), "architectures", None) or ())


def save_fedins_code(directory: str | Path) -> None:
    """Copy the FedIns model's code, and the mean-pooling head's it imports, next to a saved model."""
    save_remote_code(directory)
    target = Path(directory) / FEDINS_FILE.name
    target.write_text(FEDINS_FILE.read_text(encoding="utf-8"), encoding="utf-8")


def save_remote_code(directory: str | Path) -> None:
    """Copy the mean-pooling model's code next to a saved model (``trust_remote_code`` loads it)."""
    target = Path(directory) / MODELING_FILE.name
    target.write_text(MODELING_FILE.read_text(encoding="utf-8"), encoding="utf-8")
