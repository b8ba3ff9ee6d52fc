"""``fedpeft export RUN_DIR --merge --out DIR``: the run's adapter folded into its base model, saved as a
plain transformers model (weights, config with the label names, tokenizer) that loads without fedpeft
or peft: with ``AutoModelForSequenceClassification`` (``seq-cls``) or ``AutoModelForCausalLM``
(``causal-lm``). A mean-pooling classifier ships its modeling file beside the weights and loads with
``trust_remote_code=True``.

LoRA: peft's ``merge_and_unload`` (W + (α/r)·B·A). SSF: :meth:`SSFModel.merge_and_unload`
(W' = diag(γ)W, b' = γ⊙b + β). An SSF pool (FedIns) gives each input its own SSF and cannot fold: its
export is the instance-adaptive model
(:class:`fedpeft.heads.modeling_fedins.FedInsForSequenceClassification`, its code beside the weights, loaded
with ``trust_remote_code=True``). The directory is built beside ``DIR`` and renamed into place, so a
failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from fedpeft.adapters.ssf.model import SSFModel
from fedpeft.adapters.ssf_pool.config import CONFIG_NAME as POOL_CONFIG
from fedpeft.adapters.ssf_pool.model import SSFPoolModel
from fedpeft.errors import FedPeftError
from fedpeft.heads import is_fedins, model_pooling, save_fedins_code, save_remote_code
from fedpeft.models import load_model
from fedpeft.runlog import atomic_replace_dir


def adapter_meta(run_dir: Path) -> dict[str, Any]:
    """``adapter/fedpeft.json`` of a finished run (label names, base model, columns)."""
    path = run_dir / "adapter" / "fedpeft.json"
    if not path.exists():
        raise FedPeftError(f"{run_dir} has no saved adapter (adapter/fedpeft.json missing): is the run finished?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        labels = [str(x) for x in meta["label_names"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FedPeftError(f"{path} is unreadable ({err})") from None
    return {**meta, "label_names": labels}


def merged_model(run_dir: str | Path, *, base: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the run's adapter merged into the base model (``base`` overrides the path
    the run recorded, e.g. when the run was started from another directory)."""
    run_dir = Path(run_dir)
    meta = adapter_meta(run_dir)
    labels, task = meta["label_names"], str(meta.get("task", "seq-cls"))
    try:
        model, tokenizer = load_model(base or meta.get("base_model", ""), task=task, num_labels=len(labels),
                                      pooling=str(meta.get("pooling", "cls")))  # runs before pooling: native head
    except FedPeftError as err:
        if base:
            raise
        raise FedPeftError(f"{err}; pass --base with the base model's directory") from None
    if task == "seq-cls":
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    adapter = run_dir / "adapter"
    if (adapter / POOL_CONFIG).exists():  # FedIns: a pool cannot fold; the model routes each input itself
        return SSFPoolModel.from_pretrained(model, adapter).to_exported(), tokenizer
    if (adapter / "ssf_config.json").exists():
        wrapped = SSFModel.from_pretrained(model, adapter)
    else:
        # deferred: heavy (peft, transformers: ~5 s) on `fedpeft export`'s path: a bad RUN_DIR fails without them
        from peft import PeftModel

        try:
            wrapped = PeftModel.from_pretrained(model, str(adapter))
        except (OSError, ValueError, RuntimeError) as err:
            raise FedPeftError(f"cannot load the adapter in {adapter} onto {base or meta.get('base_model')}: "
                               f"{str(err).splitlines()[0]}") from None
    merged = wrapped.merge_and_unload().eval()
    if task == "causal-lm":
        merged.config.use_cache = True  # training turned the generation cache off; generation wants it
    return merged, tokenizer


def export_merged(run_dir: str | Path, out: str | Path, *, base: str | None = None, force: bool = False) -> Path:
    """Save the merged model and its tokenizer to ``out``; return ``out``.

    Raises
    ------
    FedPeftError
        ``out`` exists (without ``force``) or lies inside the run, or the run has no adapter.
    """
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise FedPeftError(f"run directory not found: {run_dir}")
    if out.exists() and not force:
        raise FedPeftError(f"{out} exists; choose another --out or pass --force to replace it")
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents and out.name == "adapter":
        raise FedPeftError(f"--out {out} would overwrite the run's own files")
    with warnings.catch_warnings():  # transformers' deprecation notes about its own attributes
        warnings.simplefilter("ignore", FutureWarning)
        model, tokenizer = merged_model(run_dir, base=base)
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.save_pretrained(str(build))
        tokenizer.save_pretrained(str(build))
        if is_fedins(model):
            save_fedins_code(build)  # the instance-adaptive model and the mean-pooling head it may hold
        elif model_pooling(model).mode == "mean":
            save_remote_code(build)  # AutoModelForSequenceClassification(..., trust_remote_code=True) loads it
        atomic_replace_dir(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return out
