"""The guard's learning-rate scale on top of whatever rate a schedule sets.

Note [the learning-rate scale]
    A cut is a guard-owned scale on top of whatever rate the schedule sets: the rate a step
    applies is ``scheduled lr * lr_scale``, for every base optimizer and every scheduler
    (LambdaLR, OneCycleLR, warm restarts rewrite ``group["lr"]`` each step and cannot erase it).
    steadystep's own optimizers hold it in their ``lr_multiplier`` (``scale_lr_``); around any
    other optimizer the guard sets ``group["lr"]`` to the applied rate for the duration of the
    step and gives the scheduled one back after, so ``param_groups`` always show the schedule.
    ``stats()["lr_scale"]`` is applied / scheduled and ``stats()["lr"]`` the largest applied
    rate. Calm steps give the cuts back (Note [recovering the rate] in :mod:`steadystep.ladder`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["applied_lr", "applied_max_lr", "scaled_lr"]


def scaled_lr(lr: Any, scale: Tensor | float) -> Any:
    """``lr * scale`` in the form torch's step takes: a float stays a float when ``scale`` is
    one (the host path); on the device path a 0-d tensor beside ``scale`` (float32 on CUDA,
    the dtype torch's fused CUDA kernels take)."""
    if isinstance(scale, float):
        return lr * scale
    if isinstance(lr, Tensor):
        return (lr.to(scale.device, torch.float64) * scale).to(lr.dtype)
    dtype = torch.float32 if scale.device.type == "cuda" else torch.float64
    return (scale * float(lr)).to(dtype)


@contextlib.contextmanager
def applied_lr(optimizer: Optimizer, scale: Tensor | float) -> Iterator[None]:
    """``group["lr"]`` is the applied rate (scheduled * ``scale``) for the duration of the
    block, the scheduled one (the same object) again after, even when the block raises.

    Examples:
        >>> p = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([p], lr=0.1)
        >>> with applied_lr(opt, 0.5):
        ...     opt.param_groups[0]["lr"]
        0.05
        >>> opt.param_groups[0]["lr"]
        0.1
    """
    groups = optimizer.param_groups
    scheduled = [g["lr"] for g in groups]
    if isinstance(scale, float) and scale == 1.0:
        yield
        return
    try:
        for group, lr in zip(groups, scheduled, strict=True):
            group["lr"] = scaled_lr(lr, scale)
        yield
    finally:
        for group, lr in zip(groups, scheduled, strict=True):
            group["lr"] = lr


def applied_max_lr(optimizer: Optimizer, scale: Tensor) -> Tensor:
    """The largest applied rate, ``max(scheduled lr) * scale`` (0-d, beside ``scale``; no host
    read: float rates are maxed on the host, tensor rates on the device)."""
    lrs = [g["lr"] for g in optimizer.param_groups]
    if not any(isinstance(x, Tensor) for x in lrs):
        return scale * max(lrs)
    return scale * torch.stack([torch.as_tensor(x).to(scale) for x in lrs]).max()
