"""The guard's decision of a step and the state it leaves: Note [the ladder] applied to the
guard's phase, counts, learning-rate scale and alarm history.

:func:`decide_step` is one C call on the CPU (Note [the ladder kernel] in
``_kernels/kernels_ladder.c``); :func:`reference_step` is the same in torch operations on 0-d
tensors, no host read, and the path on CUDA, under ``torch.compile``, with an escalation rung
(:meth:`~steadystep.Escalation.amend` sits between the ladder and the scale) and with
``STEADYSTEP_FUSED=0``. Tests compare the two bitwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from steadystep._kernels.decision import LadderSettings, ladder_step, settings
from steadystep.ladder import NORMAL, Decision, decide, rescale

# ``guard`` below is a CatastropheGuard, typed Any: guard.py imports this module (no circle)
Guard = Any

__all__ = ["HISTORY", "decide_step", "reference_step"]

HISTORY = 64  # alarms remembered for TrainingDiverged (a ring buffer on the device)


def _state(guard: Guard) -> tuple[Tensor, ...]:
    return (
        guard.phase,
        guard.waited,
        guard.lr_scale,
        guard.episode_scale,
        guard.calm,
        guard.alarms,
        guard.rollbacks,
        guard.skips,
        guard.level_shifts,
        guard.steps,
        guard.history_step,
        guard.history_loss,
    )


def decide_step(
    guard: Guard, alarm: Tensor, observed: Tensor | float, bad_grads: Tensor
) -> tuple[Decision, Tensor, Tensor]:
    """``(decision, factor, revert)``: what the guard does this step, what multiplies its
    learning-rate scale (already applied to ``guard.lr_scale``) and where the detector takes
    its observation back (an alarm not accepted as a new level); the guard's phase, counts and
    history are written. ``observed``: the loss the detector tested."""
    loss = guard.detector.last_loss
    if guard.escalation is None and isinstance(observed, Tensor):
        out = guard.__dict__.get("_decision_out")
        if out is None or out[0].device != alarm.device:
            flags = [torch.zeros((), dtype=torch.bool, device=alarm.device) for _ in range(4)]
            out = (*flags, torch.ones((), dtype=torch.float64, device=alarm.device))
            guard._decision_out = out
        recover = -1 if guard.recover_every is None else guard.recover_every
        rollback_only = guard.response == "rollback"
        history = guard.history_step.numel()  # the ring the kernel indexes
        hp = (guard.lr_factor, guard.accept_after, recover, history, rollback_only, guard.backtrack)
        hyper = settings(LadderSettings, *hp)
        if ladder_step((alarm, bad_grads), (observed, loss), _state(guard), hyper, out):
            update, rollback, accept, revert, factor = out
            phase, waited = guard.phase, guard.waited
            decision = Decision(update, rollback, rollback, accept, phase, waited)
            return decision, factor, revert
    return reference_step(guard, alarm, observed, bad_grads, loss)


def reference_step(
    guard: Guard,
    alarm: Tensor,
    observed: Tensor | float,
    bad_grads: Tensor,
    loss: Tensor,
) -> tuple[Decision, Tensor, Tensor]:
    """:func:`decide_step` in torch operations (the reference)."""
    finite = torch.isfinite(torch.as_tensor(observed)).to(alarm.device)
    decision = decide(
        alarm,
        finite,
        guard.phase,
        guard.waited,
        response=guard.response,
        accept_after=guard.accept_after,
    )
    if guard.escalation is not None:  # Note [escalation]
        decision = guard.escalation.amend(decision, alarm, guard.phase, guard.steps, loss)
    factor, episode_scale, calm = rescale(
        decision,
        starts=alarm & (guard.phase == NORMAL),
        lr_scale=guard.lr_scale,
        episode_scale=guard.episode_scale,
        calm=guard.calm,
        lr_factor=guard.lr_factor,
        recover_every=guard.recover_every,
    )
    # A step the detector did not observe (non-finite gradients) is no evidence: the episode,
    # the calm count and the scale stay as they were.
    unseen = bad_grads & ~alarm
    factor = torch.where(unseen, torch.ones_like(factor), factor)
    guard.lr_scale.mul_(factor)
    guard.phase.copy_(torch.where(unseen, guard.phase, decision.phase))
    guard.waited.copy_(torch.where(unseen, guard.waited, decision.waited))
    guard.episode_scale.copy_(episode_scale)
    guard.calm.copy_(torch.where(unseen, guard.calm, calm))
    _record(guard, alarm, loss, decision)
    return decision, factor, alarm & ~decision.accept


def _record(guard: Guard, alarm: Tensor, loss: Tensor, decision: Decision) -> None:
    """Counters and the alarm ring buffer, written with masks (no host sync)."""
    index = (guard.alarms % HISTORY).view(1)
    old_step = guard.history_step.gather(0, index)
    old_loss = guard.history_loss.gather(0, index)
    loss = loss.to(device=old_loss.device, dtype=old_loss.dtype).reshape(1)
    guard.history_step.scatter_(0, index, torch.where(alarm, guard.steps, old_step))
    guard.history_loss.scatter_(0, index, torch.where(alarm, loss, old_loss))
    guard.alarms.add_(alarm.long())
    if guard.backtrack:
        guard.rollbacks.add_(decision.rollback.long())
    guard.skips.add_((alarm & ~decision.rollback & ~decision.accept).long())
    guard.level_shifts.add_(decision.accept.long())
    guard.steps.add_(1)
