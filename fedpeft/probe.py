"""Linear probing before fine-tuning (LP-FT: Kumar et al., ICLR 2022, arXiv 2202.10054; under DP:
Mehta et al. 2022, arXiv 2205.02973, and Ke et al. 2024, arXiv 2402.18905).

In a probe round a site trains only its classification head, on the features the head reads (the
encoder's pooled sentence embedding), with the encoder and adapter frozen:

1. **features** — one forward pass over the site's examples in eval mode, capturing the head's input
   (:func:`head_inputs`); kept in the caller's :class:`FeatureCache` (a site's, the coordinator's
   evaluator's) while the data and the adapter stay the same, so the later probe rounds of a run cost
   no encoder pass at all;
2. **head steps** — ``probe_steps`` steps of ``probe_batch_size`` examples (0: the whole site, i.e.
   full-batch gradient descent) at ``probe_lr`` on the head alone (:class:`HeadProbe`); under local
   DP the same steps run through DP-SGD, each example's head gradient clipped and noised
   (:mod:`privacy.local`).

Many cheap, large-batch steps are what DP-SGD wants: the noise on the averaged gradient is σC/B.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from fedpeft.adapters.state import is_head_parameter
from fedpeft.errors import FedPeftError
from fedpeft.runtime import CPU, Runtime
from fedpeft.training import Encoded, HeadInputs, padded_batch


class FeatureCache:
    """Head inputs already computed, by data, valid while the adapter they were computed under is unchanged.

    Owned by whoever evaluates or trains the head (a :class:`fedpeft.site.Site`, the coordinator's
    evaluator); holds at most ``max_bytes`` of features, dropping the oldest first.
    """

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        self.max_bytes = max_bytes
        self._entries: dict[str, tuple[str, HeadInputs]] = {}  # data digest → (adapter digest, inputs)

    def get(self, data_key: str, adapter_key: str) -> HeadInputs | None:
        hit = self._entries.get(data_key)
        return hit[1] if hit is not None and hit[0] == adapter_key else None

    def put(self, data_key: str, adapter_key: str, inputs: HeadInputs) -> None:
        self._entries.pop(data_key, None)
        self._entries[data_key] = (adapter_key, inputs)
        while len(self._entries) > 1 and self.nbytes() > self.max_bytes:
            self._entries.pop(next(iter(self._entries)))  # the oldest

    def nbytes(self) -> int:
        return sum(e[1].features.nelement() * e[1].features.element_size() for e in self._entries.values())


class HeadProbe(torch.nn.Module):
    """The classification head alone, taking pooled features (its parameters are the model's own)."""

    def __init__(self, head: torch.nn.Linear) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        logits = self.head(features)
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def head_module(model: torch.nn.Module) -> torch.nn.Linear:
    """The trainable linear classification head of a PEFT-wrapped classifier.

    Raises
    ------
    FedPeftError
        The model has no single trainable linear head (a causal LM, an unusual head).
    """
    heads = []
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if (isinstance(module, torch.nn.Linear) and own and all(p.requires_grad for _, p in own)
                and all(is_head_parameter(f"{name}.{p}") for p, _ in own)):
            heads.append(module)
    if len(heads) != 1:
        raise FedPeftError(f"probe rounds need one trainable linear classification head, found {len(heads)}")
    return heads[0]


def head_inputs(model: torch.nn.Module, data: Encoded, *, batch_size: int, runtime: Runtime = CPU,
                cache: FeatureCache | None = None) -> HeadInputs:
    """The head's inputs for every example of ``data`` (eval mode, no gradients), in ``data``'s order.

    With a ``cache``, kept there by a digest of the data and of the non-head trainable parameters: the
    same data under the same adapter is encoded once.
    """
    if data.per_token:
        raise FedPeftError("probe rounds train a classification head: seq-cls only")
    head = head_module(model)
    data_key, adapter_key = (_data_digest(data), _adapter_digest(model)) if cache is not None else ("", "")
    if cache is not None and (hit := cache.get(data_key, adapter_key)) is not None:
        return hit
    captured: list[torch.Tensor] = []

    def grab(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0].detach().float().cpu())

    handle = head.register_forward_pre_hook(grab)
    order = np.argsort([len(ids) for ids in data.input_ids], kind="stable")  # little padding per batch
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = runtime.to_device(padded_batch(data, order[start : start + batch_size]))
                batch.pop("labels")
                with runtime.autocast_context():
                    model(**batch)
    finally:
        handle.remove()
        model.train(was_training)
    features = torch.cat(captured)
    if features.dim() != 2 or len(features) != len(data):
        raise FedPeftError(f"probe rounds need a head that reads one vector per example; its input has shape "
                           f"{tuple(features.shape)} (use --pooling mean)")
    inputs = HeadInputs(features=features[torch.from_numpy(np.argsort(order))].to(runtime.device),
                        labels=np.asarray(data.labels))
    if cache is not None:
        cache.put(data_key, adapter_key, inputs)
    return inputs


@torch.no_grad()
def evaluate_probed(model: torch.nn.Module, data: Encoded, *, batch_size: int, runtime: Runtime = CPU,
                    cache: FeatureCache | None = None) -> dict[str, float]:
    """:func:`fedpeft.training.evaluate` through the head inputs in ``cache``: the same accuracy and loss,
    and no encoder pass while the adapter stays as it was (every probe round)."""
    inputs = head_inputs(model, data, batch_size=batch_size, runtime=runtime, cache=cache)
    logits = HeadProbe(head_module(model))(inputs.features).logits.float()
    labels = torch.from_numpy(inputs.labels).to(logits.device)
    n = len(inputs)
    return {"accuracy": int((logits.argmax(-1) == labels).sum()) / n,
            "loss": float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum")) / n,
            "num_examples": n}


def probe_plan(num_examples: int, *, batch_size: int, steps: int) -> dict[str, int]:
    """The training keywords of one probe round: ``steps`` steps of ``batch_size`` examples (0: all)."""
    batch = batch_size if 0 < batch_size < num_examples else num_examples
    return {"epochs": steps * math.ceil(num_examples / batch), "max_steps": steps, "batch_size": batch}


def _data_digest(data: Encoded) -> str:
    digest = hashlib.sha1(np.asarray(data.labels, dtype=np.int64).tobytes())
    for ids in data.input_ids:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _adapter_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha1()
    for name, p in model.named_parameters():
        if p.requires_grad and not is_head_parameter(name):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
