"""The guard's protocol for torch's own fused optimizers (Adam, AdamW, SGD, Adagrad with
``fused=True``): their step can be masked on the device through ``found_inf``, the flag torch's
``GradScaler`` hands them, so a :class:`~steadystep.CatastropheGuard` around them needs no host
read per step either (Note [host syncs] in :mod:`steadystep.guard`).

Note [tensor learning rates]
    To cut a rate on the device the rate must be a tensor: :meth:`TorchFusedMaskable.scale_lr_`
    turns each group's ``lr`` into a 0-d tensor beside the parameters (float64 on the CPU;
    float32 on CUDA, the dtype torch's fused CUDA kernels take). The guard does not use it: it
    hands the step the applied rate, ``scheduled lr * lr_scale`` as a 0-d tensor, for the
    duration of the step (Note [the learning-rate scale] in :mod:`steadystep.guard`), so a
    scheduler never sees, or erases, a cut.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from steadystep._tensors import grads_finite, scale_all_

__all__ = ["TorchFusedMaskable", "torch_fused_maskable"]


class TorchFusedMaskable:
    """:class:`~steadystep.compose.protocol.MaskableOptimizer` over a torch optimizer whose
    step takes ``found_inf`` (``_step_supports_amp_scaling``, e.g. ``torch.optim.AdamW(...,
    fused=True)``): ``masked_step(skip)`` runs its step with ``found_inf = skip or a gradient
    element is non-finite or above the limit``, a no-op for params, state and step counts."""

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer

    @staticmethod
    def _tensor_lr(group: dict[str, Any]) -> Tensor:
        """Note [tensor learning rates]: the group's ``lr`` as a 0-d float64 tensor."""
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            dtype = torch.float32 if device.type == "cuda" else torch.float64
            lr = torch.tensor(float(lr), dtype=dtype, device=device)
            group["lr"] = lr
        return lr

    @torch.no_grad()
    def scale_lr_(self, factor: Tensor) -> None:
        scale_all_([self._tensor_lr(group) for group in self.optimizer.param_groups], factor)

    @torch.no_grad()
    def max_lr(self) -> Tensor:
        lrs = [self._tensor_lr(g) for g in self.optimizer.param_groups]
        device = lrs[0].device
        return torch.stack([lr.to(device=device, dtype=torch.float64) for lr in lrs]).max()

    @torch.no_grad()
    def masked_step(self, skip: Tensor | None, found_finite: Tensor | None = None) -> None:
        """The wrapped step, a no-op where ``skip`` or where a gradient is not acceptable
        (``found_finite``: the guard's check of this step, computed here when None)."""
        if found_finite is None:
            grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
            found_finite = grads_finite([g for g in grads if g is not None])
        masked = ~found_finite if skip is None else ~found_finite | skip.to(found_finite.device)
        self.optimizer.found_inf = masked.to(torch.float32)  # type: ignore[attr-defined]
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]


def torch_fused_maskable(optimizer: Optimizer) -> TorchFusedMaskable | None:
    """The adapter for ``optimizer`` when its step takes ``found_inf``, else None."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return None
    if getattr(optimizer, "grad_scale", None) is not None or hasattr(optimizer, "found_inf"):
        return None  # a GradScaler drives it already
    return TorchFusedMaskable(optimizer)
