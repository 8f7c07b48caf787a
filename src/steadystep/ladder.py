"""The guard's answer to an alarm: cause before cure, decided on the device.

Note [the ladder]
    An alarm at step ``t`` says the loss ``L_t`` (at the weights ``theta_t``, on batch ``t``) or
    this step's gradient norm left the detector's band. Three causes need three cures, and the
    guard tells them apart by what the *next* steps show, one rung at a time:

    * **a bad batch**: the spike is in batch ``t`` alone. Rung 1 answers every first alarm by
      *skipping* the step (batch ``t``'s gradient never reaches the weights), with no rollback
      and no LR cut. When the next loss is back in the band, that was all: the weights were
      never touched and the rate never cut.
    * **a bad update**: the weights themselves are bad (the update that made ``theta_t``, from
      a gradient explosion or too high a rate), so the next batch alarms too, at the same
      weights. Rung 2 rolls back to the snapshot from before that update (parameters, the
      optimizer's state and, when given the model, its buffers) and cuts the rate by
      ``lr_factor``. When the loss at the restored weights is back in the band, the cure held.
    * **a change of level**: the loss stays at its new level even at the restored weights (a
      new task, a curriculum step, more input noise): nothing is broken, the data changed.
      Rung 3 waits for ``accept_after`` alarms in a row at the restored weights (skipping those
      batches: a run of a few corrupted batches ends before that), then *accepts* it: the
      detector restarts from the new level, the cuts this episode made are undone, and the step
      is taken. ``level_shifts`` counts it. A loss that is not finite is never a level: it rolls
      back and cuts again, until ``min_lr`` ends the run.

    ``response="rollback"`` is SALeRA's published response instead: every alarm rolls back one
    step and cuts (no skip rung, no acceptance).

Note [recovering the rate]
    A cut answers a bad update; it is not a verdict on the rest of the run. After
    ``recover_every`` consecutive steps without an alarm, one cut is undone (the scale is
    divided by ``lr_factor``, never above 1), and so on every ``recover_every`` calm steps,
    until the scale is back at 1. ``recover_every=None`` keeps every cut (SALeRA's paper).

Every input and output is a 0-d tensor, so the guard decides without a host read;
:class:`PlainLadder` restates the same rules in plain Python for the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "NORMAL",
    "RESPONSES",
    "ROLLED_BACK",
    "SUSPECT",
    "Decision",
    "PlainLadder",
    "decide",
    "rescale",
]

RESPONSES = ("ladder", "rollback")

# The phases of an episode (an int64 0-d tensor in the guard's state)
NORMAL = 0  # no alarm pending
SUSPECT = 1  # the last step was skipped on an alarm (a bad batch?)
ROLLED_BACK = 2  # the last step rolled back and cut (a bad update?)


class Decision(NamedTuple):
    """What the guard does this step (0-d bool tensors) and the phase after it (0-d int64)."""

    update: Tensor  # take the optimizer's step
    rollback: Tensor  # restore the snapshot (parameters, optimizer state, buffers)
    cut: Tensor  # multiply the learning-rate scale by lr_factor
    accept: Tensor  # a change of level: restart the detector, undo the episode's cuts
    phase: Tensor  # the phase after this step
    waited: Tensor  # alarms in a row at the restored weights, after this step


def decide(
    alarm: Tensor,
    finite: Tensor,
    phase: Tensor,
    waited: Tensor,
    *,
    response: str = "ladder",
    accept_after: int = 4,
) -> Decision:
    """Note [the ladder] as tensors: ``alarm`` (the detector's verdict), ``finite`` (the loss it
    tested is finite), ``phase`` (:data:`NORMAL`, :data:`SUSPECT` or :data:`ROLLED_BACK`) and
    ``waited`` (alarms in a row at the restored weights so far)."""
    if response == "rollback":
        return Decision(
            update=~alarm,
            rollback=alarm,
            cut=alarm,
            accept=torch.zeros_like(alarm),
            phase=torch.zeros_like(phase),
            waited=torch.zeros_like(waited),
        )
    suspect = phase == SUSPECT
    rolled_back = phase == ROLLED_BACK
    confirmed = waited + 1 >= accept_after
    accept = alarm & rolled_back & finite & confirmed
    rollback = alarm & (suspect | (rolled_back & ~finite))
    skip = alarm & ~rollback & ~accept
    next_phase = torch.where(
        rollback | (skip & rolled_back),
        torch.full_like(phase, ROLLED_BACK),
        torch.where(skip, torch.full_like(phase, SUSPECT), torch.zeros_like(phase)),
    )
    waited = torch.where(skip & rolled_back, waited + 1, torch.zeros_like(waited))
    return Decision(
        update=~alarm | accept,
        rollback=rollback,
        cut=rollback,
        accept=accept,
        phase=next_phase,
        waited=waited,
    )


def rescale(
    decision: Decision,
    *,
    starts: Tensor,
    lr_scale: Tensor,
    episode_scale: Tensor,
    calm: Tensor,
    lr_factor: float,
    recover_every: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(factor, episode_scale, calm)``: what multiplies the learning-rate scale this step, the
    scale from before the current episode, and the count of consecutive calm steps after it
    (Note [recovering the rate]). ``starts``: this step's alarm opens an episode.

    A cut gives ``lr_factor``; an accepted change of level gives ``episode_scale / lr_scale``
    (the scale returns to what it was before the episode); after ``recover_every`` calm steps,
    ``min(1 / lr_factor, 1 / lr_scale)`` (one cut undone, never above 1); else 1.
    """
    episode_scale = torch.where(starts, lr_scale, episode_scale)
    one = torch.ones_like(lr_scale)
    factor = torch.where(decision.cut, torch.full_like(lr_scale, lr_factor), one)
    factor = torch.where(decision.accept, episode_scale / lr_scale, factor)
    quiet = decision.update & ~decision.accept & (decision.phase == NORMAL)
    calm = torch.where(quiet, calm + 1, torch.zeros_like(calm))
    if recover_every is not None:
        due = quiet & (calm >= recover_every) & (lr_scale < 1.0)
        up = torch.minimum(torch.full_like(lr_scale, 1.0 / lr_factor), lr_scale.reciprocal())
        factor = torch.where(due, up, factor)
        calm = torch.where(due, torch.zeros_like(calm), calm)
    return factor, episode_scale, calm


class PlainLadder:
    """The same rules in plain Python, one step at a time (the tests' reference)."""

    def __init__(
        self,
        *,
        lr_factor: float = 0.5,
        recover_every: int | None = 100,
        response: str = "ladder",
        accept_after: int = 4,
    ) -> None:
        self.lr_factor, self.recover_every, self.response = lr_factor, recover_every, response
        self.accept_after = accept_after
        self.phase, self.calm, self.scale, self.episode_scale = NORMAL, 0, 1.0, 1.0
        self.waited = 0

    def step(self, alarm: bool, finite: bool = True) -> dict[str, bool]:
        """One step's actions: ``update``, ``rollback``, ``cut``, ``accept``."""
        if alarm and self.phase == NORMAL:
            self.episode_scale = self.scale
        if self.response == "rollback":
            act = {"update": not alarm, "rollback": alarm, "cut": alarm, "accept": False}
            self.phase = NORMAL
        elif not alarm:
            act = {"update": True, "rollback": False, "cut": False, "accept": False}
            self.phase = NORMAL
        elif self.phase == NORMAL:  # rung 1: a bad batch? skip it
            act = {"update": False, "rollback": False, "cut": False, "accept": False}
            self.phase = SUSPECT
        elif self.phase == SUSPECT or not finite:  # rung 2: a bad update? roll back and cut
            act = {"update": False, "rollback": True, "cut": True, "accept": False}
            self.phase = ROLLED_BACK
        elif self.waited + 1 < self.accept_after:  # rung 3: does the new level stay?
            act = {"update": False, "rollback": False, "cut": False, "accept": False}
            self.waited += 1
        else:  # it stayed at the restored weights: a change of level
            act = {"update": True, "rollback": False, "cut": False, "accept": True}
            self.phase = NORMAL
        if not (alarm and self.phase == ROLLED_BACK and not act["rollback"]):
            self.waited = 0
        factor = self.lr_factor if act["cut"] else 1.0
        if act["accept"]:
            factor = self.episode_scale / self.scale
        quiet = act["update"] and not act["accept"] and self.phase == NORMAL
        self.calm = self.calm + 1 if quiet else 0
        if (
            self.recover_every is not None
            and quiet
            and self.calm >= self.recover_every
            and self.scale < 1.0
        ):
            factor = min(1.0 / self.lr_factor, 1.0 / self.scale)
            self.calm = 0
        self.scale *= factor
        return act
