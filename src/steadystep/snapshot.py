"""What a rollback restores: the parameters, the optimizer's state and the model's buffers.

Note [full rollback]
    A rollback that restores only the parameters leaves the bad step in the optimizer's state:
    the gradient that threw the weights away is in SGD's momentum and Adam's moments, and the
    next steps replay it (SGD momentum 0.9 with one gradient x1e3: a parameters-only rollback
    keeps alarming and ends far above the clean run). So the guard's snapshot holds, from before
    the last update, every tensor of ``optimizer.state`` (moments, step counts, CProp's
    statistics) and, when the guard is given the model, its buffers (BatchNorm's running
    statistics), beside the parameters; ``rollback="params"`` keeps only the parameters (the
    cost measured in docs/performance.md). The optimizer's state is created lazily by its first
    step, so its snapshot starts with the second step.

Every tensor goes through one masked copy (``steadystep._kernels.rollback_``: where
``restore``, live <- snapshot; else, unless ``hold``, snapshot <- live), bitwise for every dtype,
on the device, without a host read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from steadystep import _kernels as kernels
from steadystep._kernels.rollback import CopyPlan
from steadystep._tensors import shards

__all__ = ["ROLLBACKS", "Snapshot", "state_tensors"]

ROLLBACKS = ("full", "params")


def state_tensors(
    optimizer: Optimizer, params: list[Tensor]
) -> tuple[list[Tensor], list[tuple[int, str]]]:
    """Every tensor of ``optimizer.state``, parameter by parameter, key by key (sorted), and
    whose it is: ``(index of the parameter, key)``."""
    tensors, owners = [], []
    for i, p in enumerate(params):
        state = optimizer.state.get(p) or {}
        for key in sorted(state, key=str):
            if isinstance(state[key], Tensor):
                tensors.append(state[key])
                owners.append((i, str(key)))
    return tensors, owners


class Snapshot:
    """The tensors a rollback restores and their copies from before the last update.

    Args:
        device: where the copies live (None: beside each tensor; ``"cpu"``: host memory, pinned
            for CUDA tensors).
        full: keep the optimizer's state and the buffers too (Note [full rollback]).
        buffers: the model's buffers (floating-point and integer: BatchNorm's running mean,
            variance and batch count), or empty.
    """

    def __init__(
        self, *, device: torch.device | None, full: bool, buffers: Iterable[Tensor] = ()
    ) -> None:
        self.device = device
        self.full = full
        self.model_buffers = list(buffers)  # the escalation's ring keeps them either way
        self.buffers = self.model_buffers if full else []
        self.params: list[Tensor] = []  # the live parameters, in the optimizer's order
        self.param_copies: list[Tensor] = []
        self.state: list[Tensor] = []  # the live state tensors
        self.state_copies: list[Tensor] = []
        self.state_owners: list[tuple[int, str]] = []  # (parameter index, key) of each
        self.buffer_copies = [self._copy(b) for b in self.buffers]
        self._state_size = -1  # len(optimizer.state) when self.state was gathered
        self._plan = CopyPlan()  # the refresh's checked C arguments (Note [copy plans])

    def _copy(self, t: Tensor) -> Tensor:
        device = t.device if self.device is None else self.device
        pin = device.type == "cpu" and t.is_cuda
        # empty_like keeps t's kind and layout: a DTensor (FSDP2) gets a DTensor copy sharded
        # alike, a channels_last parameter a channels_last one.
        return torch.empty_like(t, device=device, pin_memory=pin).copy_(t)

    # -- tracking -----------------------------------------------------------------------------
    def track(self, params: list[Tensor], optimizer: Optimizer) -> None:
        """Copies for parameters seen for the first time (groups added later), and for the
        optimizer's state when it has grown (its first step, a parameter's first gradient)."""
        for p in params[len(self.param_copies) :]:
            self.param_copies.append(self._copy(p))
        self.params = params
        if self.full and len(optimizer.state) != self._state_size:
            self.state, self.state_owners = state_tensors(optimizer, params)
            self.state_copies = [self._copy(t) for t in self.state]
            self._state_size = len(optimizer.state)

    def forget_state(self) -> None:
        """The optimizer's state was replaced (a load): gather it again at the next step."""
        self.state, self.state_copies, self.state_owners = [], [], []
        self._state_size = -1

    def _pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        live = [*self.params, *self.state, *self.buffers]
        copies = [*self.param_copies, *self.state_copies, *self.buffer_copies]
        return shards(live), shards(copies)

    def nbytes(self) -> int:
        """Bytes held by the copies (this rank's shards)."""
        return sum(t.nbytes for t in self._pairs()[1])

    # -- restoring ------------------------------------------------------------------------------
    def apply_(self, restore: Tensor, hold: Tensor) -> None:
        """Where ``restore``: live <- copy; else, unless ``hold``: copy <- live (0-d bools, on
        the device, no host read)."""
        live, copies = self._pairs()
        if kernels.rollback_(live, copies, restore, hold=hold, plan=self._plan):
            return
        for t, c in zip(live, copies, strict=True):
            # A copy where restore, bitwise even when t holds inf/NaN (lerp-style arithmetic
            # would not be), sync-free on CUDA, and on CPU faster than torch.where.
            t.masked_scatter_(restore.to(t.device), c.to(t.device))
        refresh = ~(hold | restore)
        for c, t in zip(copies, live, strict=True):
            c.masked_scatter_(refresh.to(c.device), t.to(c.device))

    def copy_(self, *, restore: bool) -> None:
        """The host path's copy, decided on the host: live <- copy (``restore``) or
        copy <- live; one kernel call where the kernels take the tensors."""
        live, copies = self._pairs()
        if not live:
            return
        device = live[0].device
        flag = torch.full((), restore, dtype=torch.bool, device=device)
        if all(c.device == device for c in copies) and kernels.rollback_(live, copies, flag):
            return
        for t, c in zip(live, copies, strict=True):
            if restore:
                t.copy_(c, non_blocking=True)
            else:
                c.copy_(t, non_blocking=True)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Clones of the copies (a state_dict kept in memory does not change with later steps):
        ``params`` (one per parameter), ``state`` (per parameter, ``{key: copy}`` of its
        optimizer state) and ``buffers``."""
        state: list[dict[str, Tensor]] = [{} for _ in self.param_copies]
        for (i, key), c in zip(self.state_owners, self.state_copies, strict=True):
            state[i][key] = c.clone()
        return {
            "params": [c.clone() for c in self.param_copies],
            "state": state,
            "buffers": [c.clone() for c in self.buffer_copies],
        }

    def load_state(self, saved: list[dict[str, Tensor]], optimizer: Optimizer) -> None:
        """The optimizer state's copies from :meth:`state_dict`'s ``state`` (after the optimizer
        itself has loaded): kept where every live tensor has a saved copy of its shape, else
        gathered afresh at the next step."""
        self.forget_state()
        if not self.full or not any(saved):
            return
        self.track(self.params or [], optimizer)
        copies = []
        for (i, key), live in zip(self.state_owners, self.state, strict=True):
            c = saved[i].get(key) if i < len(saved) else None
            if not isinstance(c, Tensor) or c.shape != live.shape:
                self.forget_state()
                return
            copies.append(c.to(device=self.state_copies[len(copies)].device, dtype=live.dtype))
        self.state_copies = [c.clone() for c in copies]
