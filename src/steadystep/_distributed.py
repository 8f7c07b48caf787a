"""The one place steadystep talks to torch.distributed.

Deciding scalars (ALRC's batch moments, the loss a detector sees, global gradient norms) are
averaged across ranks with a single all-reduce of a small tensor, so every rank takes the same
decision. Outside a process group these are no-ops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_ranks", "all_reduce_mean", "all_reduce_sum", "is_distributed", "world_size"]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks (out of place; returns ``tensor`` itself when not distributed)."""
    if not is_distributed():
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (out of place)."""
    if not is_distributed():
        return tensor
    return all_reduce_sum(tensor) / dist.get_world_size()


def all_ranks(flag: torch.Tensor) -> torch.Tensor:
    """True where ``flag`` (0-d bool) is True on every rank: one all-reduce of a 0-d tensor, no
    host read (``flag`` itself when not distributed). Every rank must call it, in the same
    order, as every collective."""
    if not is_distributed():
        return flag
    return all_reduce_sum((~flag).to(torch.float32)) == 0


def mean_over_ranks(
    loss: torch.Tensor | float, grad_norm: torch.Tensor, found_finite: torch.Tensor
) -> tuple[torch.Tensor | float, torch.Tensor, torch.Tensor]:
    """A guard's deciding scalars averaged over ranks in one all-reduce (Note [collective
    decisions] of :mod:`steadystep.guard`): the loss, the gradient norm, and "every rank's
    gradients are finite"; unchanged in a single process."""
    if not is_distributed():
        return loss, grad_norm, found_finite
    device = grad_norm.device
    loss_t = torch.as_tensor(loss).detach().reshape(()).to(device=device, dtype=torch.float64)
    flag = (~found_finite).to(device, torch.float64)
    mean = all_reduce_mean(torch.stack([loss_t, grad_norm.to(torch.float64), flag]))
    return mean[0], mean[1], mean[2] == 0
