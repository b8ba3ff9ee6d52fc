"""Room for a folded SSF shift in layers that have no bias.

Merging γ ⊙ (W x) + β into a bias-free layer needs a bias, and the merged model must still load with
plain transformers. Many decoder configs have switches that make transformers build those biases
(Llama: ``attention_bias`` for q/k/v/o, ``mlp_bias`` for gate/up/down). Which switch governs which
layer is read off the architecture itself: build the model on the ``meta`` device (no memory, no
weights) with each ``*_bias`` switch turned on and see which bias tensors appear.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedpeft.adapters.ssf.layer import output_features
from fedpeft.errors import FedPeftError


def skeleton_keys(model: nn.Module, config: Any) -> set[str]:
    """The state-dict keys of ``type(model)`` built from ``config`` (on the meta device)."""
    with torch.device("meta"):
        fresh = type(model)(config)
    return set(fresh.state_dict())


def add_bias_slots(model: nn.Module, modules: Mapping[str, nn.Module]) -> list[str]:
    """Give each of ``modules`` (name → bias-free layer) a zero bias and switch on the config flags
    that make transformers build it; return the flags turned on.

    Every other layer the same flag governs gets a zero bias too (the flag gives them one on load).

    Raises
    ------
    FedPeftError
        When some layer has no config switch for a bias (its shift cannot be stored in a plain model).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise FedPeftError(f"cannot merge an SSF shift into {sorted(modules)[0]}: the model has no transformers config")
    base = skeleton_keys(model, config)
    flags, slots = [], set()
    for flag, value in config.to_dict().items():
        if not flag.endswith("_bias") or value is not False:
            continue
        trial = copy.deepcopy(config)
        setattr(trial, flag, True)
        gained = {key[: -len(".bias")] for key in skeleton_keys(model, trial) - base if key.endswith(".bias")}
        if gained & set(modules):
            flags.append(flag)
            slots |= gained
    missing = sorted(set(modules) - slots)
    if missing:
        raise FedPeftError(
            f"cannot merge the SSF shift of {missing[0]} ({len(missing)} layer(s)): it has no bias and "
            f"{type(model).__name__}'s config has no switch for one; keep the adapter unmerged, or target layers "
            "that have a bias"
        )
    for flag in flags:
        setattr(config, flag, True)
    named = dict(model.named_modules())
    for name in sorted(slots):
        layer = named[name]
        if getattr(layer, "bias", None) is None:
            layer.bias = nn.Parameter(
                torch.zeros(output_features(layer), dtype=layer.weight.dtype, device=layer.weight.device),
                requires_grad=False,
            )
    return flags
