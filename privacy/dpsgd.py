"""DP-SGD for one client-round, through Opacus (Abadi et al., CCS 2016, arXiv 1607.00133).

Each local step:

1. **sample** — Poisson: every example of the site joins the batch independently with probability
   q = 1 / ⌈n / B⌉ (Opacus ``DPDataLoader``), so batch sizes vary around B;
2. **clip** — each example's gradient of the trainable tensors (adapter + head) to L2 norm C:
   ``hooks`` computes per-sample gradients with module hooks, ``ghost`` uses Opacus's fast gradient
   clipping, which clips *only* through the criterion it returns (a second backward pass);
3. **noise** — add N(0, σ²C²) to the sum of clipped gradients and divide by the expected batch qn;
4. **account** — the optimizer's step hook records (σ, q) in the round's accountant.

An empty Poisson batch still takes a step: the clipped sum is zero, noise is added and the step is
accounted (skipping it would drop the noise *and* under-count the privacy cost; running BERT on an
empty batch crashes, so the step is taken without a forward pass).

For a causal LM the privacy unit is one conversation: each example's loss is the mean next-token
loss over its response tokens (:func:`fedpeft.tasks.causal_lm.sequence_losses`); ``ghost`` gets the
token losses flattened with ``shape=`` so that Opacus's criterion reduces them per sequence the same
way.

Randomness: the batch sampling and the noise come from a generator seeded from the operating
system's entropy pool (:func:`privacy.randomness.secret_seed`), never from the run seed that the
coordinator knows (a server that could replay the noise could subtract it). Tests pass an explicit
``generator_seed``. On a GPU the noise is drawn by a generator on the GPU, seeded from the same draw.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine

import privacy.ssf_grad_sample  # noqa: F401  (registers SSF's per-sample gradient rule)
from fedpeft.runtime import CPU, Runtime
from fedpeft.tasks.causal_lm import sequence_losses
from fedpeft.training import Encoded, HeadInputs, padded_batch, param_groups, training_objective
from privacy.randomness import secret_seed

CLIPPING_MODES = ("hooks", "ghost")


@dataclass(frozen=True)
class DPSGD:
    """The DP-SGD mechanism of one client-round.

    Parameters
    ----------
    noise_multiplier : float
        σ: noise standard deviation over the clipping norm (0 clips without noise: no privacy).
    max_grad_norm : float
        C: per-sample gradient L2 bound.
    clipping : str
        ``hooks`` (per-sample gradients via hooks) or ``ghost`` (fast gradient clipping).
    accountant : str
        Opacus accountant counting this round's steps (``rdp``, ``prv``).
    """

    noise_multiplier: float
    max_grad_norm: float
    clipping: str = "hooks"
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier must be finite and >= 0, got {self.noise_multiplier}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be finite and > 0, got {self.max_grad_norm}")
        if self.clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping must be one of {', '.join(CLIPPING_MODES)}, got {self.clipping!r}")


def poisson_plan(num_examples: int, *, batch_size: int, epochs: int, max_steps: int) -> tuple[float, int]:
    """``(q, steps)`` of one client-round: the sampling rate and the number of DP-SGD steps.

    An epoch is ⌈n / B⌉ Poisson steps at rate q = 1 / ⌈n / B⌉ (expected batch n·q ≈ B); the round
    takes ``epochs`` of them, capped at ``max_steps`` when that is > 0. The count is fixed before
    training, so the budget check and the accountant agree on it exactly.
    """
    if num_examples < 1:
        raise ValueError("a site needs at least one example for DP-SGD")
    per_epoch = math.ceil(num_examples / batch_size)
    steps = epochs * per_epoch
    if max_steps > 0:
        steps = min(steps, max_steps)
    return 1.0 / per_epoch, steps


class _Rows(torch.utils.data.Dataset):
    """Row positions 0..n-1; batches are built from them by :func:`fedpeft.training.padded_batch`."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (torch.tensor(i, dtype=torch.long),)  # Opacus reads the sample structure from item 0


def _rows_tensor(rows: list[tuple[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([r[0] for r in rows])


def _as_rows(batch: Any) -> torch.Tensor:
    """Row positions of a batch; an empty first batch arrives as Opacus's list of empty tensors."""
    return batch[0] if isinstance(batch, list | tuple) else batch


def dp_train_local(
    model: torch.nn.Module,
    data: Encoded | HeadInputs,
    *,
    dp: DPSGD,
    epochs: int,
    max_steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    head_lr: float = 0.0,
    optimizer: str = "adamw",
    generator_seed: int | None = None,
    runtime: Runtime = CPU,
) -> tuple[dict[str, float], list[tuple[float, float, int]]]:
    """Train the trainable parameters of ``model`` on ``data`` with DP-SGD for one client-round.

    Returns
    -------
    metrics : dict
        ``train_loss`` (mean over non-empty steps), ``steps``, ``empty_steps``, ``examples_seen``.
    history : list of (σ, q, steps)
        What this round's accountant recorded, in Opacus's history format.
    """
    q, planned = poisson_plan(len(data), batch_size=batch_size, epochs=epochs, max_steps=max_steps)
    seed = secret_seed(63, purpose="dpsgd") if generator_seed is None else int(generator_seed)
    generator = torch.Generator().manual_seed(seed)
    noise_generator = generator if runtime.device == "cpu" else \
        torch.Generator(device=runtime.device).manual_seed(seed ^ 0x5DEECE66D)
    groups = param_groups(model, lr=lr, head_lr=head_lr)  # raises if nothing is trainable
    params = [p for group in groups for p in group["params"]]
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be adamw or sgd, got {optimizer!r}")
    loader = torch.utils.data.DataLoader(
        _Rows(len(data)), batch_size=math.ceil(len(data) * q), collate_fn=_rows_tensor, generator=generator
    )
    model.train()  # Opacus needs train mode for its hooks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # secure-RNG advice; our choice of generator is documented above
        engine = PrivacyEngine(accountant=dp.accountant)
        made = engine.make_private(
            module=model,
            optimizer=opt,
            criterion=torch.nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=dp.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_generator,
            grad_sample_mode=dp.clipping,
            wrap_model=False,
        )
    if dp.clipping == "ghost":
        hooks, dp_opt, criterion, dp_loader = made
    else:
        (hooks, dp_opt, dp_loader), criterion = made, torch.nn.CrossEntropyLoss()
    if abs(dp_opt.expected_batch_size - len(data) * q) > 1 and dp_opt.expected_batch_size != int(len(data) * q):
        raise RuntimeError("Opacus sample rate differs from the planned one")  # pragma: no cover
    try:
        with warnings.catch_warnings():
            # Frozen embeddings: no input needs a gradient, and Opacus's full backward hooks say so each step.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses, steps, empty, seen = _steps(model, data, dp_loader, dp_opt, criterion, params, planned,
                                                dp.clipping, runtime)
        history = [tuple(h) for h in engine.accountant.history]
    finally:
        hooks.cleanup()
        for p in params:
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
        model.eval()
    metrics = {
        "train_loss": float(torch.stack(losses).float().mean()) if losses else 0.0,  # one host sync a round
        "steps": steps,
        "empty_steps": empty,
        "examples_seen": seen,
    }
    return metrics, [(float(s), float(r), int(n)) for s, r, n in history]


def _steps(
    model: Any, data: Encoded | HeadInputs, loader: Any, optimizer: Any, criterion: Any, params: list, planned: int,
    clipping: str, runtime: Runtime,
) -> tuple[list[torch.Tensor], int, int, int]:
    """Take ``planned`` DP-SGD steps; return (losses of non-empty steps, steps, empty steps, examples)."""
    losses: list[torch.Tensor] = []
    steps = empty = seen = 0
    while steps < planned:
        for sampled in loader:
            rows = _as_rows(sampled)
            if len(rows) == 0:
                _noise_only_step(optimizer, params, ghost=clipping == "ghost")
                empty += 1
            else:
                batch = runtime.to_device(padded_batch(data, rows.numpy()))
                labels = batch.pop("labels")
                with runtime.autocast_context():
                    logits = model(**batch).logits
                loss = _loss(criterion, logits, labels, ghost=clipping == "ghost")
                training_objective(model, loss).backward()  # FedIns' matching term is per example too: hooks clip it
                optimizer.step()
                losses.append(loss.detach())
                seen += len(rows)
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            if steps >= planned:
                break
    return losses, steps, empty, seen


def _loss(criterion: Any, logits: torch.Tensor, labels: torch.Tensor, *, ghost: bool) -> Any:
    """The batch loss whose per-example parts are clipped: one class label per example, or token
    labels (a causal LM: one mean response-token loss per sequence)."""
    if labels.dim() == 1:
        return criterion(logits.float(), labels)
    if ghost:  # Opacus's criterion reduces the flattened token losses per sequence, skipping ignored ones
        flat = logits[:, :-1].float()
        return criterion(flat.reshape(-1, flat.shape[-1]), labels[:, 1:].reshape(-1), shape=flat.shape)
    return sequence_losses(logits, labels).mean()


def _noise_only_step(optimizer: Any, params: list[torch.nn.Parameter], *, ghost: bool) -> None:
    """A step on an empty Poisson batch: zero clipped sum + noise, accounted like any other step."""
    for p in params:
        if ghost:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
