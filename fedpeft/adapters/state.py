"""The adapter state: the only tensors that ever leave a site.

``adapter_state`` is the adapter state dict (LoRA factors or SSF scales and shifts, + the trained
head) as float32 numpy arrays; ``load_adapter_state`` is its strict inverse. LoRA's state is peft's
(``get_peft_model_state_dict``); SSF's is :meth:`fedpeft.adapters.ssf.model.SSFModel.adapter_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpeft.errors import FedPeftError

HEAD_MODULES = ("classifier", "score")  # sequence-classification heads (BERT-like, decoder-like)
SSF_COMPONENT = "ssf"  # key component of SSF tensors: ``<target>.ssf.scale``, ``<target>.ssf.shift``
SSF_POOL_COMPONENT = "ssf_pool"  # FedIns: ``<target>.ssf_pool.scale`` / ``.shift`` (M x d) and ``ssf_pool.keys``
LORA_COMPONENTS = ("lora_A", "lora_B")


def _state_dict(model: Any) -> dict[str, Any]:
    if hasattr(model, "adapter_state_dict"):  # fedpeft's own methods (SSF) keep their state themselves
        return model.adapter_state_dict()
    from peft import get_peft_model_state_dict  # deferred: heavy (peft) on the CLI start-up path

    return get_peft_model_state_dict(model)


def adapter_state(model: Any) -> dict[str, np.ndarray]:
    """A snapshot (copies, never views) of the trainable adapter tensors of ``model``, as float32."""
    return {
        key: np.array(tensor.detach().to("cpu").float().numpy(), dtype=np.float32, order="C", copy=True)
        for key, tensor in _state_dict(model).items()
    }


def load_adapter_state(model: Any, state: Mapping[str, np.ndarray]) -> None:
    """Overwrite the adapter of ``model`` with ``state``; keys and shapes must match exactly."""
    import torch  # deferred: heavy (torch) on the CLI start-up path

    expected = _state_dict(model)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise FedPeftError(f"adapter state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    tensors = {}
    for key, array in state.items():
        if tuple(array.shape) != tuple(expected[key].shape):
            raise FedPeftError(f"adapter tensor {key} has shape {array.shape}, expected {tuple(expected[key].shape)}")
        tensors[key] = torch.as_tensor(np.asarray(array), dtype=expected[key].dtype)
    if hasattr(model, "load_adapter_state_dict"):
        model.load_adapter_state_dict(tensors)
    else:
        from peft import set_peft_model_state_dict  # deferred: heavy (peft) on the CLI start-up path

        set_peft_model_state_dict(model, tensors)


def key_matches(key: str, components: tuple[str, ...] | list[str]) -> bool:
    """Whether a dotted tensor name has one of ``components`` as a path component (``"lora_A"``)."""
    parts = key.split(".")
    return any(c in parts for c in components)


def is_head_key(key: str) -> bool:
    """Whether an adapter-state key names a tensor of the classification head (``…classifier.weight``,
    ``…score.weight``): a component in :data:`HEAD_MODULES`, and no adapter component."""
    parts = key.split(".")
    return any(p in HEAD_MODULES for p in parts) and not key_matches(
        key, (*LORA_COMPONENTS, SSF_COMPONENT, SSF_POOL_COMPONENT))


def without_keys(state: Mapping[str, np.ndarray], components: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """``state`` minus the tensors whose names have one of ``components`` as a path component."""
    return {k: v for k, v in state.items() if not key_matches(k, components)}


def adapter_kind(keys: Any) -> str | None:
    """``"lora"``, ``"ssf"`` or ``"ssf-pool"`` from an adapter state's tensor names; None when it holds
    only a head."""
    keys = list(keys)
    if any(key_matches(k, LORA_COMPONENTS) for k in keys):
        return "lora"
    if any(key_matches(k, (SSF_POOL_COMPONENT,)) for k in keys):
        return "ssf-pool"
    if any(key_matches(k, (SSF_COMPONENT,)) for k in keys):
        return "ssf"
    return None


def is_head_parameter(name: str) -> bool:
    """Whether a parameter name of a PEFT-wrapped model belongs to the classification head (peft's
    ``modules_to_save`` copy; SSF's ``base_model.<head>``)."""
    parts = name.split(".")
    return "modules_to_save" in parts or (len(parts) > 1 and parts[0] == "base_model" and parts[1] in HEAD_MODULES)


def state_names(model: Any, params: Any) -> list[str]:
    """The adapter-state name (:func:`adapter_state`'s key) of each of ``params``, parameters of ``model``.

    The state dict's tensors share storage with the parameters they name, which is how they are matched.

    Raises
    ------
    FedPeftError
        A parameter that is not part of the adapter state.
    """
    by_storage = {tensor.data_ptr(): key for key, tensor in _state_dict(model).items()}
    names = []
    for p in params:
        if p.data_ptr() not in by_storage:
            raise FedPeftError(f"a trained parameter of shape {tuple(p.shape)} is not part of the adapter state")
        names.append(by_storage[p.data_ptr()])
    return names
