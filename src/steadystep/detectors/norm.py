"""The global gradient norm a detector watches, computed once per step on the device."""

from __future__ import annotations

import torch

from steadystep._distributed import all_reduce_sum
from steadystep.optim.alera import _is_sharded, local_tensor

__all__ = ["global_grad_norm"]


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``sqrt(sum_i ||g_i||^2)`` over every gradient, as a 0-d float64 tensor (no host sync).

    Accumulated in float64, so finite gradients up to float32's largest value do not overflow
    the norm. FSDP2 (DTensor) gradients contribute the squares of this rank's shards, summed over
    ranks in one all-reduce; other gradients (DDP's are already averaged) count as they are. A
    NaN or inf anywhere makes the norm non-finite. An empty list gives 0.

    Example:
        >>> import torch
        >>> from steadystep.detectors import global_grad_norm
        >>> float(global_grad_norm([torch.tensor([3.0]), torch.tensor([[4.0]])]))
        5.0
    """
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    shards = [local_tensor(g) for g in grads]
    sharded = [_is_sharded(g) for g in grads]
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(shards):
        by_device.setdefault(g.device, []).append(i)
    squares: list[torch.Tensor] = [torch.empty(0)] * len(shards)
    for index in by_device.values():
        norms = torch._foreach_norm([shards[i] for i in index], 2, dtype=torch.float64)
        for i, n in zip(index, norms, strict=True):
            squares[i] = n.square()
    device = shards[0].device
    whole = [s.to(device) for s, sh in zip(squares, sharded, strict=True) if not sh]
    parts = [s.to(device) for s, sh in zip(squares, sharded, strict=True) if sh]
    total = (
        torch.stack(whole).sum() if whole else torch.zeros((), dtype=torch.float64, device=device)
    )
    if parts:  # one all-reduce for every shard's share
        total = total + all_reduce_sum(torch.stack(parts).sum())
    return total.sqrt()
