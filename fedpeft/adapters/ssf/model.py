"""SSF model surgery (Lian et al., NeurIPS 2022, arXiv 2210.08823, "Scaling & Shifting Your Features").

:class:`SSFModel` wraps any transformers model the way peft's ``PeftModel`` does:

1. find the targets: the configured layers, or every ``nn.Linear`` / ``nn.LayerNorm`` outside the
   classification head;
2. freeze the whole base model;
3. attach an :class:`~fedpeft.adapters.ssf.layer.SSFLayer` after each target (γ = 1, β = 0 unless
   ``init_std`` > 0);
4. leave the head (``classifier`` / ``score``) trainable.

The adapter state (what travels, what ``save_pretrained`` writes) is every γ, β and the head, keyed by
parameter names relative to the base model. :meth:`SSFModel.merge_and_unload` folds SSF into the
base weights and returns a plain transformers model with no inference cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fedpeft.adapters.ssf.config import CONFIG_NAME, WEIGHTS_NAME, SSFConfig
from fedpeft.adapters.ssf.layer import SSF_CHILD, SUPPORTED, attach, fold, has_bias
from fedpeft.adapters.ssf.merge import add_bias_slots
from fedpeft.errors import FedPeftError

OUTPUT_LAYERS = ("lm_head",)


class WrappedAdapter(nn.Module):
    """What fedpeft's own adapters (SSF, FedIns' pool) share: the wrapped base model's attributes, loading
    an adapter state strictly, and reading and writing an adapter directory.

    A subclass names itself (``kind``), its config (``config_class``, ``config_name``) and says which
    parameters are its adapter (:meth:`adapter_parameters`)."""

    kind = "adapter"
    config_class: Any = None
    config_name = ""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)  # config, device, ... of the wrapped model

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """State name → parameter of everything the adapter holds."""
        raise NotImplementedError

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors, detached, by state name."""
        return {n: p.detach() for n, p in self.adapter_parameters().items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the adapter with ``tensors``; keys and shapes must match exactly."""
        params = self.adapter_parameters()
        if set(tensors) != set(params):
            missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
            raise FedPeftError(f"{self.kind} state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(params[key].shape):
                raise FedPeftError(f"{self.kind} tensor {key} has shape {tuple(value.shape)}, "
                                   f"expected {tuple(params[key].shape)}")
        for key, value in tensors.items():
            params[key].copy_(value.to(dtype=params[key].dtype, device=params[key].device))

    def _save(self, directory: str | Path, config: Any) -> None:
        """Write the adapter's tensors and ``config`` (its ``to_json``) to ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.to("cpu").contiguous() for k, v in self.adapter_state_dict().items()}
        save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
        (out / self.config_name).write_text(config.to_json())

    def _base_name(self) -> str:
        return str(getattr(getattr(self.base_model, "config", None), "name_or_path", "") or "")

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> Any:
        """``model`` with the adapter saved in ``directory`` by ``save_pretrained``."""
        path = Path(directory)
        for name in (cls.config_name, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FedPeftError(f"{path} is not an {cls.kind} adapter directory: {name} is missing")
        try:
            config = cls.config_class.from_json((path / cls.config_name).read_text())
        except ValueError as err:
            raise FedPeftError(f"{path / cls.config_name}: {err}") from None
        wrapped = cls(model, config)
        wrapped.load_adapter_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return wrapped


class SSFModel(WrappedAdapter):
    """A transformers model with SSF layers after its targets; only SSF and the head train.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The base model (modified in place: frozen, SSF children and hooks attached).
    config : SSFConfig
        Targets, initialisation and head.
    """

    kind = "SSF"
    config_class = SSFConfig
    config_name = CONFIG_NAME

    def __init__(self, model: nn.Module, config: SSFConfig) -> None:
        super().__init__()
        self.base_model = model
        self.ssf_config = config
        self.head_names = tuple(name for name, _ in model.named_children() if name in config.head_modules)
        if config.head_modules and not self.head_names:
            raise FedPeftError(
                f"{type(model).__name__} has no classification head named {' or '.join(config.head_modules)}"
            )
        # a causal LM's output layer (no head trains there) maps to the vocabulary: SSF never follows it
        targets = find_targets(model, config.target_modules, exclude=(*self.head_names, *OUTPUT_LAYERS))
        for p in model.parameters():
            p.requires_grad_(False)
        self._hooks = {name: attach(module, init_std=config.init_std) for name, module in targets.items()}
        for name in self.head_names:
            for p in getattr(model, name).parameters():
                p.requires_grad_(True)

    @property
    def targets(self) -> tuple[str, ...]:
        """Full names of the layers SSF follows."""
        return tuple(self._hooks)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._hooks:
            raise RuntimeError("this SSFModel was merged; use the model merge_and_unload returned")
        return self.base_model(*args, **kwargs)

    # --- adapter state ----------------------------------------------------------------------------
    def _is_adapter(self, name: str) -> bool:
        parts = name.split(".")
        return parts[0] in self.head_names or (len(parts) >= 2 and parts[-2] == SSF_CHILD)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Every γ (``<target>.ssf.scale``), β (``<target>.ssf.shift``) and head tensor."""
        return {n: p for n, p in self.base_model.named_parameters() if self._is_adapter(n)}

    # --- save ---------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write the adapter alone: ``adapter_model.safetensors`` and ``ssf_config.json`` (with the
        resolved target names, so loading attaches exactly these layers)."""
        self._save(directory, SSFConfig(
            target_modules=self.targets,
            init_std=self.ssf_config.init_std,
            head_modules=self.ssf_config.head_modules,
            base_model=self.ssf_config.base_model or self._base_name(),
        ))

    # --- merge ------------------------------------------------------------------------------------
    def merge_and_unload(self) -> nn.Module:
        """Fold every SSF layer into the layer before it and return the plain base model.

        A shift after a layer without a bias needs one: the model's config is switched so that
        transformers builds that bias (Llama's ``attention_bias`` / ``mlp_bias``); where no switch
        exists and β ≠ 0, this raises. This wrapper cannot be used afterwards.
        """
        modules = dict(self.base_model.named_modules())
        need = {
            name: modules[name]
            for name in self._hooks
            if not has_bias(modules[name]) and bool((getattr(modules[name], SSF_CHILD).shift != 0).any())
        }
        if need:
            add_bias_slots(self.base_model, need)
        for name, handle in self._hooks.items():
            fold(modules[name])
            handle.remove()
            delattr(modules[name], SSF_CHILD)
        self._hooks = {}
        for p in self.base_model.parameters():
            p.requires_grad_(True)
        return self.base_model


def find_targets(model: nn.Module, names: tuple[str, ...], *, exclude: tuple[str, ...]) -> dict[str, nn.Module]:
    """Full name → module of every layer SSF follows (see :class:`SSFConfig`), in model order."""
    candidates = [(n, m) for n, m in model.named_modules() if n and n.split(".")[0] not in exclude]
    if not names:
        found = {n: m for n, m in candidates if isinstance(m, SUPPORTED)}
    else:
        found = {n: m for n, m in candidates if any(n == t or n.endswith("." + t) for t in names)}
        for target in names:
            if not any(n == target or n.endswith("." + target) for n in found):
                raise FedPeftError(f"SSF target {target!r} matches no module of {type(model).__name__}")
        for name, module in found.items():
            if not isinstance(module, SUPPORTED):
                raise FedPeftError(
                    f"SSF target {name} is a {type(module).__name__}; SSF follows nn.Linear or nn.LayerNorm"
                )
    if not found:
        raise FedPeftError(f"{type(model).__name__} has no nn.Linear or nn.LayerNorm for SSF to follow")
    return found
