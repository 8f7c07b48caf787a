"""Training runs for the spike benchmark: recorded traces (open loop) and guarded runs (closed).

A recorded run trains one task cleanly for ``steps`` steps and records every minibatch loss and
global gradient norm. At each planned fault step it forks the run (a deep copy of the model and
optimizer), injects the fault, and records the forked losses and gradient norms from the fault
step to ``post`` steps after the step that shows it. Detectors are then evaluated offline on
these traces (``evaluate.py``): the clean trace gives false alarms, the forks give catches.

A guarded run trains with faults injected and a :class:`~steadystep.CatastropheGuard` (or none)
that really rolls back and cuts the learning rate; its final loss on a fixed evaluation set is
compared with the unperturbed run's.
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import asdict, dataclass, field

import torch

from spikes.faults import FaultSpec, corrupt
from spikes.tasks import SEQ, VOCAB, Task
from steadystep.detectors import global_grad_norm

__all__ = ["FaultTrace", "RunTrace", "eval_loss", "guarded_run", "record_run", "train_step"]

JUMP_FACTOR = 3.0  # a fault counts when the loss it shows exceeds 3x ...
JUMP_WINDOW = 20  # ... the median of the last 20 clean losses before it


@dataclass
class FaultTrace:
    kind: str
    step: int
    magnitude: float
    show: int
    early: int
    losses: list[float]
    grad_norms: list[float]
    reference: float  # median of the JUMP_WINDOW clean losses before ``step``

    @property
    def counted(self) -> bool:
        """The jump rule: a non-finite loss, or one above JUMP_FACTOR x the reference."""
        shown = self.losses[self.show]
        return not math.isfinite(shown) or shown > JUMP_FACTOR * self.reference


@dataclass
class RunTrace:
    task: str
    optimizer: str
    lr: float
    batch_size: int
    n_examples: int
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    faults: list[FaultTrace] = field(default_factory=list)
    eval_loss: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunTrace:
        faults = [FaultTrace(**f) for f in data["faults"]]
        return cls(**{**data, "faults": faults})


def train_step(
    task: Task,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    fault: FaultSpec | None = None,
    *,
    guarded: bool = False,
) -> tuple[float, float]:
    """One training step (``fault`` applied when it is due at ``step``); ``(loss, grad norm)``.

    ``guarded``: ``opt`` is a CatastropheGuard and gets the loss through ``step(loss=...)``.
    """
    x, y = task.batch(step)
    due = fault is not None and fault.step == step
    if due and fault.kind == "corrupt_batch":
        x, y = corrupt(
            x, y, fault.magnitude, language_model=task.y is None, vocab=len(VOCAB), seed=step
        )
    loss = task.loss(model, x, y)
    if due and fault.kind == "nan_loss":
        loss = loss * math.nan
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    if due and fault.kind == "grad_explosion":
        for p in params:
            p.grad.mul_(fault.magnitude)
    norm = float(global_grad_norm([p.grad for p in params]))
    scale = fault.magnitude if due and fault.kind == "bad_update" else 1.0
    for group in opt.param_groups:
        group["lr"] *= scale
    if guarded:
        opt.step(loss=loss.detach())
    else:
        opt.step()
    for group in opt.param_groups:
        group["lr"] /= scale
    return float(loss.detach()), norm


def record_run(
    task: Task, steps: int, plan: list[FaultSpec], post: int, eval_at: int | None = None
) -> RunTrace:
    """A clean run of ``steps`` steps, forked at each planned fault (see the module docstring).

    ``eval_at``: also record the evaluation loss before that step (``trace.eval_loss``): the
    unperturbed run's final loss for guarded runs of ``eval_at`` steps.
    """
    model = task.model()
    opt = task.make_optimizer(model.parameters())
    trace = RunTrace(task.name, task.optimizer, task.lr, task.batch_size, task.n_examples)
    by_step = {f.step: f for f in plan}
    for step in range(steps):
        if step == eval_at:
            trace.eval_loss = eval_loss(task, model)
        fault = by_step.get(step)
        if fault is not None:
            fork_model, fork_opt = copy.deepcopy((model, opt))
            losses, norms = [], []
            length = 1 if fault.kind == "nan_loss" else fault.show + 1 + post
            for t in range(step, step + length):
                loss, norm = train_step(task, fork_model, fork_opt, t, fault)
                losses.append(loss)
                norms.append(norm)
            reference = statistics.median(trace.losses[-JUMP_WINDOW:])
            trace.faults.append(
                FaultTrace(
                    fault.kind,
                    step,
                    fault.magnitude,
                    fault.show,
                    fault.early,
                    losses,
                    norms,
                    reference,
                )
            )
        loss, norm = train_step(task, model, opt, step)
        trace.losses.append(loss)
        trace.grad_norms.append(norm)
    return trace


def eval_loss(task: Task, model: torch.nn.Module, n: int = 1024) -> float:
    """Mean loss on a fixed evaluation set (the first ``n`` training examples or windows)."""
    with torch.no_grad():
        if task.y is None:
            starts = torch.arange(0, 64) * (task.n_examples // 64)
            window = task.x[starts.unsqueeze(1) + torch.arange(SEQ + 1)]
            return float(task.loss(model, window[:, :-1], window[:, 1:]))
        return float(task.loss(model, task.x[:n], task.y[:n]))


def guarded_run(task: Task, steps: int, plan: list[FaultSpec], make_guard=None) -> dict:
    """Train ``steps`` steps with the planned faults; ``make_guard(optimizer)`` wraps the
    optimizer (None: unprotected). Returns the final evaluation loss and the guard's counts."""
    model = task.model()
    opt = task.make_optimizer(model.parameters())
    guard = None if make_guard is None else make_guard(opt)
    by_step = {f.step: f for f in plan}
    for step in range(steps):
        train_step(task, model, guard or opt, step, by_step.get(step), guarded=guard is not None)
    out = {"final_loss": eval_loss(task, model)}
    if guard is not None:
        out["alarms"] = int(guard.stats()["alarms"])
        out["lr_scale"] = float(guard.stats()["lr_scale"])
    return out
