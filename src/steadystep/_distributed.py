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
