"""What :class:`~steadystep.CatastropheGuard` needs from an optimizer to stay on the device.

Around any ``torch.optim.Optimizer`` the guard reads its alarm on the host once per step, to
decide whether to call ``optimizer.step()`` and whether to cut ``group["lr"]``. An optimizer
that implements :class:`MaskableOptimizer` lets it take every decision as a 0-d tensor instead:
roll back with a masked copy, cut the rate by a device factor and run a step that is a no-op
where the alarm is set. steadystep's :class:`~steadystep.ALeRA`, :class:`~steadystep.AgAdam`,
:class:`~steadystep.CPropSGD`, :class:`~steadystep.CPropAdam` and
:class:`~steadystep.CPropAdamW` implement it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["MaskableOptimizer"]


@runtime_checkable
class MaskableOptimizer(Protocol):
    """An optimizer whose step and learning rate can be driven by 0-d device tensors.

    The contract, every call free of host reads:

    * ``scale_lr_(factor)``: multiply every effective learning rate by ``factor``, a 0-d tensor
      (on any device; ``factor == 1`` changes nothing, bitwise). The cut lives in the
      optimizer's state (e.g. ``group["lr_multiplier"]``), so it is checkpointed and an LR
      scheduler that rewrites ``group["lr"]`` keeps it.
    * ``masked_step(skip)``: the optimizer's step, an exact no-op (parameters and every piece of
      state bitwise unchanged, step counts included) where ``skip``, a 0-d bool tensor, is True.
      It also skips, the same way, a step whose gradient holds a NaN or inf (decided on the
      device); counting such steps is the optimizer's business (ALeRA and AgAdam:
      ``stats()["skipped_steps"]``), and a step masked by ``skip`` is never counted as one.
      ``step()`` is ``masked_step`` with nothing masked. ``masked_step(skip, found_finite)``
      passes the caller's own check of the same gradients (the guard has one), which an
      optimizer may use instead of a pass of its own.
    * ``max_lr()``: the largest effective learning rate over all parameters, a 0-d tensor (the
      guard reads it on the host now and then, to raise ``TrainingDiverged``).

    ``isinstance(opt, MaskableOptimizer)`` checks that the three methods exist.

    Examples:
        >>> from steadystep.compose.protocol import MaskableOptimizer
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> isinstance(ss.CPropAdamW([p]), MaskableOptimizer)
        True
        >>> isinstance(torch.optim.AdamW([p]), MaskableOptimizer)
        False
    """

    def scale_lr_(self, factor: Tensor) -> None: ...

    def masked_step(self, skip: Tensor, found_finite: Tensor | None = None) -> None: ...

    def max_lr(self) -> Tensor: ...
