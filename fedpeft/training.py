"""Local training and evaluation on tokenized examples.

Pure PyTorch loops with dynamic padding. ``train_local`` is one client-round: ``epochs`` passes over
the client's data in a seeded order, stopped after ``max_steps`` optimizer steps when that is > 0.
Examples carry a class label (``seq-cls``) or a label per token (``causal-lm``: the token itself where
the model learns to write it, :data:`IGNORE` elsewhere); the model computes its own loss from
``labels=`` in both cases. Batches go to the :class:`~fedpeft.runtime.Runtime`'s device and forward
passes run under its autocast.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fedpeft.adapters.state import is_head_parameter
from fedpeft.runtime import CPU, Runtime

IGNORE = -100  # a token label that no loss counts (HF and torch's cross-entropy default)


@dataclass(frozen=True)
class Encoded:
    """Tokenized examples: token ids per example (unpadded) and their labels.

    ``labels`` is an int64 array of class ids (one per example), or, for a causal LM, one list of
    token labels per example, as long as its ``input_ids`` (:data:`IGNORE` where no loss is taken).
    """

    input_ids: list[list[int]]
    labels: np.ndarray | list[list[int]]
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def per_token(self) -> bool:
        """Whether the labels are per token (a causal LM) rather than per example."""
        return not isinstance(self.labels, np.ndarray)


@dataclass(frozen=True)
class HeadInputs:
    """Examples as the classification head sees them: one pooled feature vector per example (a linear
    probe's inputs, :mod:`fedpeft.probe`) and its class label."""

    features: torch.Tensor  # [examples, width]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def encode(tokenizer: Any, texts: Sequence[str], labels: np.ndarray, *, max_length: int) -> Encoded:
    """Tokenize ``texts`` (truncated to ``max_length`` tokens) once, without padding."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Encoded(input_ids=ids, labels=np.asarray(labels, dtype=np.int64), pad_id=pad)


def padded_batch(data: Encoded | HeadInputs, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """The examples at ``rows`` padded (on the right) to the longest one: ``input_ids``,
    ``attention_mask``, ``labels`` (token labels padded with :data:`IGNORE`); head inputs:
    ``features`` and ``labels``."""
    if isinstance(data, HeadInputs):
        return {"features": data.features[torch.as_tensor(rows, dtype=torch.long)],
                "labels": torch.from_numpy(data.labels[rows])}
    width = max(len(data.input_ids[i]) for i in rows)
    ids = torch.full((len(rows), width), data.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, i in enumerate(rows):
        seq = data.input_ids[i]
        ids[j, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[j, : len(seq)] = 1
    if not data.per_token:
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.from_numpy(data.labels[rows])}
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for j, i in enumerate(rows):
        labels[j, : len(data.labels[i])] = torch.tensor(data.labels[i], dtype=torch.long)
    # A causal LM needs no padding mask on the right: no real token attends to a later position, and the
    # padded positions carry no label. Without one, attention takes its plain causal kernel.
    return {"input_ids": ids, "labels": labels}


def batches(data: Encoded | HeadInputs, order: np.ndarray, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of the rows in ``order``."""
    for start in range(0, len(order), batch_size):
        yield padded_batch(data, order[start : start + batch_size])


def param_groups(model: torch.nn.Module, *, lr: float, head_lr: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters: the adapter at ``lr``, the classification head
    (:func:`fedpeft.adapters.state.is_head_parameter`) at ``head_lr`` (0: ``lr``)."""
    adapter, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if is_head_parameter(name) else adapter).append(p)
    if not adapter and not head:
        raise ValueError("the model has no trainable parameters")
    return [{"params": ps, "lr": rate} for ps, rate in ((adapter, lr), (head, head_lr or lr)) if ps]


class GradientTerm(Protocol):
    """A change to the local objective that acts on the gradient: called after every backward pass and
    before the optimizer step with the trained parameters (in :func:`param_groups` order), it adds its
    term to their ``.grad`` (FedProx's proximal pull, SCAFFOLD's drift correction: :mod:`fedpeft.drift`)."""

    def __call__(self, params: Sequence[torch.nn.Parameter]) -> None: ...


def train_local(
    model: torch.nn.Module,
    data: Encoded | HeadInputs,
    *,
    epochs: int,
    max_steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    head_lr: float = 0.0,
    runtime: Runtime = CPU,
    logit_offset: np.ndarray | None = None,
    gradient_terms: Sequence[GradientTerm] = (),
) -> dict[str, float]:
    """Train the trainable parameters of ``model`` on ``data``; return metrics.

    ``logit_offset`` (one value per class, -inf for a class left out) is added to the logits in the
    training loss only (:mod:`fedpeft.label_correction`); ``gradient_terms`` change each step's gradient.

    Returns
    -------
    dict
        ``train_loss`` (mean over steps, of the uncorrected loss), ``steps`` and ``examples_seen``.
    """
    torch.manual_seed(seed)  # dropout
    rng = np.random.default_rng(seed)
    groups = param_groups(model, lr=lr, head_lr=head_lr)
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    offset = None if logit_offset is None else torch.as_tensor(logit_offset, dtype=torch.float32,
                                                                  device=runtime.device)
    model.train()
    losses: list[torch.Tensor] = []  # read once at the end: a GPU need not wait for the host every step
    seen = 0
    for _ in range(epochs):
        for batch in batches(data, rng.permutation(len(data)), batch_size):
            with runtime.autocast_context():
                loss, plain = _batch_loss(model, runtime.to_device(batch), offset)
            loss.backward()
            for term in gradient_terms:
                term(params)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(plain.detach())
            seen += len(batch["labels"])
            if max_steps and len(losses) >= max_steps:
                break
        if max_steps and len(losses) >= max_steps:
            break
    model.eval()
    mean = float(torch.stack(losses).float().mean()) if losses else 0.0
    return {"train_loss": mean, "steps": len(losses), "examples_seen": seen}


def _batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], offset: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss to train on, loss to report)``: the model's own loss twice, or, with a logit offset, the
    cross-entropy of the offset logits and of the plain ones (the reported loss means the same with or
    without a label correction, and reveals nothing of the offsets). A model with an ``objective`` (an
    SSF pool's matching term) trains on that objective of the loss; the reported loss stays the task's."""
    if offset is None:
        loss = model(**batch).loss
        return training_objective(model, loss), loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    labels = batch["labels"]
    return (training_objective(model, torch.nn.functional.cross_entropy(logits + offset, labels)),
            torch.nn.functional.cross_entropy(logits, labels))


def training_objective(model: torch.nn.Module, task_loss: torch.Tensor) -> torch.Tensor:
    """What a step minimises: the task loss, or the model's own objective of it (FedIns adds the
    matching loss of its pool's keys: :meth:`fedpeft.adapters.ssf_pool.model.SSFPoolModel.objective`)."""
    objective = getattr(model, "objective", None)
    return task_loss if objective is None else objective(task_loss)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Encoded, *, batch_size: int, runtime: Runtime = CPU) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the classifier ``model`` on ``data``."""
    model.eval()
    order = np.argsort([len(x) for x in data.input_ids], kind="stable")  # less padding
    correct, loss_sum = 0, 0.0
    for batch in batches(data, order, batch_size):
        labels = batch.pop("labels").to(runtime.device)
        with runtime.autocast_context():
            logits = model(**runtime.to_device(batch)).logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
    n = len(data)
    return {"accuracy": correct / n, "loss": loss_sum / n, "num_examples": n}


@torch.no_grad()
def example_losses(model: torch.nn.Module, data: Encoded, *, batch_size: int, runtime: Runtime = CPU) -> np.ndarray:
    """Cross-entropy of the classifier ``model`` on each example of ``data``, in ``data``'s order (float64)."""
    model.eval()
    order = np.argsort([len(x) for x in data.input_ids], kind="stable")
    out = np.empty(len(data), dtype=np.float64)
    for start, batch in zip(range(0, len(order), batch_size), batches(data, order, batch_size), strict=True):
        labels = batch.pop("labels").to(runtime.device)
        with runtime.autocast_context():
            logits = model(**runtime.to_device(batch)).logits.float()
        out[order[start : start + batch_size]] = torch.nn.functional.cross_entropy(
            logits, labels, reduction="none").double().cpu().numpy()
    return out
