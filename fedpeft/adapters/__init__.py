"""PEFT methods, registered by name, and the adapter state that travels between site and server.

A PEFT method is a function ``(model, cfg) -> peft_model`` that freezes the base model and leaves only
the adapter and the classification head trainable: ``lora`` (HF peft) and ``ssf`` (fedpeft's own,
shaped like a peft tuner) and ``ssf-pool``
(FedIns: a pool of SSF entries chosen per input). Both models offer ``save_pretrained`` (adapter only) and
``merge_and_unload`` (a plain transformers model).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedpeft.adapters.state import adapter_state, load_adapter_state
from fedpeft.registry import Registry

PEFT_METHODS: Registry[Callable[..., Any]] = Registry("PEFT method")

from fedpeft.adapters import lora, ssf, ssf_pool  # noqa: E402,F401  (register "lora", "ssf", "ssf-pool")


def apply_peft(model: Any, cfg: Any) -> Any:
    """Wrap ``model`` with the PEFT method ``cfg.peft``."""
    return PEFT_METHODS.get(cfg.peft)(model, cfg)


__all__ = ["PEFT_METHODS", "adapter_state", "apply_peft", "load_adapter_state"]
