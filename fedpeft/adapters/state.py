"""The adapter state: the only tensors that ever leave a site.

``adapter_state`` is peft's adapter state dict (LoRA factors + trained head) as float32 numpy arrays;
``load_adapter_state`` is its strict inverse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpeft.errors import FedPeftError


def adapter_state(model: Any) -> dict[str, np.ndarray]:
    """A snapshot (copies, never views) of the trainable adapter tensors of ``model``, as float32."""
    from peft import get_peft_model_state_dict

    return {
        key: np.array(tensor.detach().to("cpu").float().numpy(), dtype=np.float32, order="C", copy=True)
        for key, tensor in get_peft_model_state_dict(model).items()
    }


def load_adapter_state(model: Any, state: Mapping[str, np.ndarray]) -> None:
    """Overwrite the adapter of ``model`` with ``state``; keys and shapes must match exactly."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise FedPeftError(f"adapter state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
    tensors = {}
    for key, array in state.items():
        if tuple(array.shape) != tuple(expected[key].shape):
            raise FedPeftError(f"adapter tensor {key} has shape {array.shape}, expected {tuple(expected[key].shape)}")
        tensors[key] = torch.as_tensor(np.asarray(array), dtype=expected[key].dtype)
    set_peft_model_state_dict(model, tensors)


def key_matches(key: str, components: tuple[str, ...] | list[str]) -> bool:
    """Whether a dotted tensor name has one of ``components`` as a path component (``"lora_A"``)."""
    parts = key.split(".")
    return any(c in parts for c in components)


def without_keys(state: Mapping[str, np.ndarray], components: tuple[str, ...] | list[str]) -> dict[str, np.ndarray]:
    """``state`` minus the tensors whose names have one of ``components`` as a path component."""
    return {k: v for k, v in state.items() if not key_matches(k, components)}
