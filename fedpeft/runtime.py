"""Where a process trains and evaluates: the device and the precision, resolved from the config.

``device``: ``auto`` takes CUDA when torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error,
never a silent fall-back. ``precision``: ``auto`` is bf16 on a GPU that supports it, fp32 elsewhere;
under bf16 the frozen base weights are held in bf16 (cast after the adapter is drawn in fp32, so
every process starts from the same adapter), the trainable adapter (and head) in fp32, and forward
passes run under ``torch.autocast(bf16)``. Updates leave the site as fp32 numpy arrays
(numpy has no bf16; :func:`fedpeft.adapters.state.adapter_state`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from fedpeft.errors import FedPeftError


@dataclass(frozen=True)
class Runtime:
    """A resolved device (``"cpu"``, ``"cuda"``) and autocast dtype name (``"bf16"``, or ``""``: fp32)."""

    device: str = "cpu"
    autocast: str = ""

    @property
    def dtype(self) -> Any:
        """The torch dtype the frozen weights are loaded in."""
        import torch  # deferred: heavy (torch) on `fedpeft report`'s path (server.report -> privacy.empirical -> here)

        return torch.bfloat16 if self.autocast == "bf16" else torch.float32

    def autocast_context(self) -> AbstractContextManager[Any]:
        """``torch.autocast`` for forward passes (a no-op in fp32)."""
        if not self.autocast:
            return nullcontext()
        import torch  # deferred: heavy (torch) on `fedpeft report`'s path (server.report -> privacy.empirical -> here)

        return torch.autocast(self.device, dtype=torch.bfloat16)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with every tensor on this device."""
        if self.device == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}


CPU = Runtime()


def resolve_runtime(device: str, precision: str) -> Runtime:
    """The :class:`Runtime` for the config's ``device`` and ``precision`` on this machine.

    Raises
    ------
    FedPeftError
        ``cuda`` asked for where torch sees no GPU; ``bf16`` on a GPU that lacks it.
    """
    import torch  # deferred: heavy (torch) on `fedpeft report`'s path (server.report -> privacy.empirical -> here)

    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise FedPeftError("device cuda: torch sees no CUDA GPU on this machine (a CPU build of torch, no driver, "
                           "or CUDA_VISIBLE_DEVICES empty); use --device cpu or auto")
    chosen = "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"
    bf16_ok = chosen == "cpu" or torch.cuda.is_bf16_supported()
    if precision == "bf16" and not bf16_ok:
        raise FedPeftError(f"precision bf16: {torch.cuda.get_device_name()} does not support bf16; use fp32")
    use_bf16 = precision == "bf16" or (precision == "auto" and chosen == "cuda" and bf16_ok)
    return Runtime(device=chosen, autocast="bf16" if use_bf16 else "")
