"""Dynamic-rank LoRA that keeps DP: one rank per round, drawn by the coordinator (DP-DyLoRA).

DyLoRA (Valipour et al., EACL 2023, arXiv 2210.07558; code: huawei-noah/Efficient-NLP ``DyLoRA/``)
trains LoRA at a rank b drawn anew for every optimizer step, uniformly from {1..r}: the forward uses
the first b components (``A[:b]``, ``B[:, :b]``) at scale alpha/b, so the adapter works at every rank
up to r. DP-DyLoRA (Xu et al., arXiv 2405.06368) adapts it to differentially private federated
learning. Its abstract says the naive combination "would straightforwardly break differential privacy"
and that the fix keeps one rank for the whole server round; the paper body was not reachable from
here, so fedpeft states its own reading and argument:

- **Who draws the rank.** The coordinator, once per round, from the run seed and the round number
  alone (:func:`draw_rank`; b uniform on {``lora_rank_min``..r}). It travels in the round's request
  (:data:`fedpeft.protocol.ACTIVE_RANK`); no site's data can change it, so it is public and needs no
  budget. Every sampled site trains at the same b.
- **Why per-site ranks would break DP.** If each site drew its own ranks (or the support of the
  release followed who took part), the set of coordinates that moved would depend on the cohort, and
  the noise would be calibrated to a support that a neighbouring cohort does not share. With one
  public b per round every update, honest or not, lives on the same *active block*
  (:func:`active_masks`): rows 0..b-1 of every ``lora_A``, columns 0..b-1 of every ``lora_B``, and
  every tensor that is not a LoRA factor (the head).
- **What travels, and its sensitivity.** A site sends its whole adapter as usual, but its update is
  zero outside the active block (:func:`keep_active`, applied after local training: DP-SGD's noise on
  inactive rows, and anything else, is dropped). The coordinator projects every decoded update onto
  the block before clipping and the new global state onto it after the round (inactive components
  keep their previous values). Central DP clips the projected update to C, so the sensitivity of the
  noised sum is C (add/remove) or 2C (replace-one) exactly as at a fixed rank, over the b·(d_in +
  d_out) coordinates per layer (plus the head); noise on coordinates outside the block is discarded
  (post-processing). Under local DP each per-example gradient is clipped over the trainable tensors,
  whose gradient outside the block is exactly zero (:func:`train_at_rank` masks the components the
  forward does not use), so clipping is over the active rank.
- **Training at rank b** (:func:`train_at_rank`): a forward pre-hook on each ``lora_B`` multiplies its
  input by the mask [j < b], and the layer's scale becomes alpha/b (DyLoRA's equation 7). Components
  1..b all train: DyLoRA's non-frozen mode. Its frozen mode (only the b-th component trains) is not
  built: opacus computes the per-example gradient of a whole ``nn.Linear``, so freezing B's first b-1
  columns would need a grad sampler of its own.
- **Evaluation and export** use the full rank r at alpha/r, as DyLoRA evaluates its largest rank.

The aggregation rules that compose are the linear ones on LoRA (``fedit``, ``ffa-lora``); others
read whole factors (products, QR, SVD) and are refused with one line (:func:`fedpeft.config_checks.check_dynamic_rank`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedpeft.errors import FedPeftError

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
_TAG = 0x44594C6F  # "DyLo": keeps the rank stream apart from every other use of the run seed
DYNAMIC_RULES = ("fedit", "fedavg", "ffa-lora")


def draw_rank(seed: int, server_round: int, *, low: int, high: int) -> int:
    """Round ``server_round``'s active rank, uniform on {low..high}: a function of the run seed and the round
    only (never of data, never of which sites answered), so a resumed run draws the same ranks."""
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got {low}, {high}")
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(server_round), _TAG])
    return int(rng.integers(low, high + 1))


@dataclass(frozen=True)
class RankSchedule:
    """The run's ranks: round t trains at :func:`draw_rank` (seed, t) on {low..high}."""

    seed: int
    low: int
    high: int

    def rank(self, server_round: int) -> int:
        return draw_rank(self.seed, server_round, low=self.low, high=self.high)

    @classmethod
    def of(cls, cfg: Any) -> RankSchedule | None:
        """The schedule of run config ``cfg`` (its own seed, never the secret sampling seed), or None."""
        return cls(seed=cfg.seed, low=cfg.lora_rank_min, high=cfg.lora_r) if cfg.lora_dynamic_rank else None


def active_masks(shapes: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, np.ndarray]:
    """Per tensor, the boolean mask of the coordinates a round at ``rank`` may change: rows < rank of a
    ``lora_A`` (r × d_in), columns < rank of a ``lora_B`` (d_out × r), everything of another tensor."""
    masks = {}
    for key, shape in shapes.items():
        mask = np.ones(shape, dtype=bool)
        if key.endswith(A_SUFFIX):
            mask[rank:] = False
        elif key.endswith(B_SUFFIX):
            mask[:, rank:] = False
        masks[key] = mask
    return masks


def keep_active(state: Mapping[str, np.ndarray], previous: Mapping[str, np.ndarray], rank: int
                ) -> dict[str, np.ndarray]:
    """``state`` on the active block at ``rank``, ``previous`` outside it (tensors ``previous`` lacks are
    kept whole). With ``previous`` zeros this projects an update onto the block."""
    out = {}
    for key, value in state.items():
        if key in previous and (key.endswith(A_SUFFIX) or key.endswith(B_SUFFIX)):
            kept = np.array(previous[key], dtype=np.asarray(value).dtype, copy=True)
            if key.endswith(A_SUFFIX):
                kept[:rank] = value[:rank]
            else:
                kept[:, :rank] = value[:, :rank]
            out[key] = kept
        else:
            out[key] = value
    return out


def project_update(update: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """``update`` with every coordinate outside the active block at ``rank`` set to zero."""
    return keep_active(update, {k: np.zeros_like(v) for k, v in update.items()}, rank)


def split_active(values: Mapping[str, np.ndarray], rank: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``values`` (an error-feedback residual) as (its active part, the rest): their sum is ``values``."""
    active = project_update(values, rank)
    return active, {k: np.asarray(v) - active[k] for k, v in values.items()}


@contextmanager
def train_at_rank(model: Any, rank: int) -> Iterator[None]:
    """Train ``model``'s peft LoRA layers at ``rank`` for the block: the forward uses components < rank at scale
    alpha/rank, and every other component gets an exactly zero gradient (also per example, under opacus)."""
    import torch  # deferred: heavy (torch) on the CLI start-up path

    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")
              and isinstance(m.lora_A, torch.nn.ModuleDict)]
    if not layers:
        raise FedPeftError("lora_dynamic_rank needs a model with LoRA layers")
    handles, scalings = [], []
    try:
        for layer in layers:
            for name, a in layer.lora_A.items():
                r = a.out_features
                if not 1 <= rank <= r:
                    raise FedPeftError(f"active rank {rank} outside 1..{r} of the site's LoRA layers")
                mask = (torch.arange(r) < rank).to(a.weight.dtype)
                handles.append(layer.lora_B[name].register_forward_pre_hook(_masking(mask)))
                scalings.append((layer, name, layer.scaling[name]))
                alpha = layer.lora_alpha[name] if isinstance(layer.lora_alpha, dict) else layer.lora_alpha
                layer.scaling[name] = float(alpha) / rank
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, name, scaling in scalings:
            layer.scaling[name] = scaling


def _masking(mask: Any) -> Any:
    def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x * mask.to(device=x.device, dtype=x.dtype), *args[1:])

    return hook

