"""A learning-rate scheduler that does not advance on a step the guard skipped.

Plain PyTorch, no optional framework: the Hugging Face ``SteadystepTrainer`` wraps its schedule
in it (:mod:`steadystep.integrations.transformers`, which also exports it, its home before),
and a hand-written loop or another framework can wrap theirs::

    opt = ss.stabilize(torch.optim.AdamW(model.parameters(), lr=1e-3))
    sched = SkipAwareScheduler(torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1000), opt)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from steadystep.compose.order import layers
from steadystep.compose.protocol import MaskableOptimizer
from steadystep.guard import CatastropheGuard
from steadystep.integrations import unwrap_optimizer

__all__ = ["SkipAwareScheduler"]


class SkipAwareScheduler:
    """An LR scheduler that does not advance on a step the guard skipped.

    ``step()`` reads the guard's ``alarms`` counter (one host read per step: the schedule itself
    lives on the host) and, when it grew since the last call, does not step the wrapped
    scheduler. If the guard cut ``group["lr"]`` itself (a base optimizer that is not a
    :class:`~steadystep.compose.protocol.MaskableOptimizer`, e.g. torch's AdamW), the
    wrapped scheduler's ``base_lrs`` are multiplied by the same factor so that a schedule which
    recomputes ``lr = base_lr * f(step)`` (LambdaLR, the Trainer's linear and cosine schedules)
    keeps the cut. Everything else is delegated to the wrapped scheduler.

    Args:
        scheduler: the scheduler to wrap.
        optimizer: the optimizer it drives (framework wrappers are looked through); without an
            ``alarms`` counter the wrapper only delegates.

    Examples:
        >>> import torch, steadystep as ss
        >>> from steadystep.integrations.scheduler import SkipAwareScheduler
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> opt = ss.CatastropheGuard(torch.optim.SGD([p], lr=1.0))
        >>> sched = SkipAwareScheduler(torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9), opt)
        >>> _ = opt.step(loss=torch.tensor(1.0))
        >>> sched.step()
        >>> sched.last_epoch
        1
    """

    def __init__(self, scheduler: Any, optimizer: Any) -> None:
        self.scheduler = scheduler
        inner = unwrap_optimizer(optimizer)
        # the guard, also inside a Stabilized; else the optimizer (it may count alarms itself)
        self.guard = next((x for x in layers(inner) if isinstance(x, CatastropheGuard)), inner)
        alarms = getattr(self.guard, "alarms", None)
        self._alarms_seen = int(alarms) if isinstance(alarms, Tensor) else 0
        self.skipped_steps = 0

    def step(self, *args: Any, **kwargs: Any) -> None:
        alarms = getattr(self.guard, "alarms", None)
        if isinstance(alarms, Tensor):
            now = int(alarms)  # the one host read per step (see class docstring)
            new = now - self._alarms_seen
            self._alarms_seen = now
            if new > 0:
                self.skipped_steps += 1
                # A MaskableOptimizer takes the cut in its own multipliers; any other base
                # optimizer had group["lr"] cut, which the schedule must keep.
                base = getattr(self.guard, "optimizer", None)
                cut_group_lr = base is not None and not isinstance(base, MaskableOptimizer)
                if cut_group_lr and hasattr(self.scheduler, "base_lrs"):
                    factor = float(self.guard.lr_factor) ** new
                    self.scheduler.base_lrs = [b * factor for b in self.scheduler.base_lrs]
                return
        self.scheduler.step(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.state_dict(),
            "alarms_seen": self._alarms_seen,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "scheduler" not in state_dict:  # a checkpoint of the bare scheduler
            self.scheduler.load_state_dict(state_dict)
            return
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self._alarms_seen = int(state_dict["alarms_seen"])
        self.skipped_steps = int(state_dict["skipped_steps"])

    def __getattr__(self, name: str) -> Any:
        if name == "scheduler":  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.scheduler, name)
