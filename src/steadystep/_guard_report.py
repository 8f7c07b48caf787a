"""The guard's events in the log, read only where the guard reads the host anyway.

Note [the guard's report]
    Rollbacks, skipped batches, accepted level shifts and the learning-rate scale reach the
    ``"steadystep"`` logger without a :class:`~steadystep.Monitor`. The guard decides on the
    device, so its counters are read where it reads the host already: every ``check_every``
    steps (on the sync-free path, beside the ``min_lr`` check; on the host path, which reads
    its decision every step, one small read more per ``check_every`` steps) and, on the host
    path, at an LR cut, which the host saw (and checks against ``min_lr``), unless a report
    came less than ``check_every`` steps before. One line covers the steps since the last
    report and is written only when something changed::

        steadystep: steps 1200-1299: guard rolled back 1, skipped 2 batches, accepted 0 level
        shifts, lr_scale 0.5

    at WARNING when the guard acted, at INFO when the scale alone moved (calm steps gave a cut
    back). The last reported values live in this process only: a run resumed from a
    checkpoint reports its first window from step 0 (the counters are restored; the log of
    the interrupted run is not).
"""

from __future__ import annotations

import logging
import math
import weakref
from typing import Any

import torch

from steadystep.escalation import TrainingDiverged

__all__ = ["check_min_lr", "report"]

logger = logging.getLogger("steadystep")

_COUNTERS = ("steps", "rollbacks", "skips", "level_shifts", "nonfinite_grads")


class _Reported:
    """What the last report said: the counters (host floats) and when (the guard's calls)."""

    def __init__(self) -> None:
        self.values = [0.0] * len(_COUNTERS) + [1.0]  # ... and lr_scale
        self.calls: int | None = None


_reported: weakref.WeakKeyDictionary[Any, _Reported] = weakref.WeakKeyDictionary()


def report(guard: Any, *, cut: bool) -> None:
    """Log what changed since the last report (Note [the guard's report]); called by the
    guard's host bookkeeping after each step, it reads the device only when a report is due."""
    state = _reported.setdefault(guard, _Reported())
    due = guard._calls % guard.check_every == 0
    recent = state.calls is not None and guard._calls - state.calls < guard.check_every
    if not (due or (cut and not recent)) or not logger.isEnabledFor(logging.WARNING):
        return
    tensors = [getattr(guard, name) for name in _COUNTERS] + [guard.lr_scale]
    now = torch.stack([t.to(torch.float64) for t in tensors]).tolist()  # the one host read
    last, state.values, state.calls = state.values, now, guard._calls
    rolled, skipped, shifts, nonfinite = (
        int(a - b) for a, b in zip(now[1:5], last[1:5], strict=True)
    )
    if not (rolled or skipped or shifts or nonfinite) and now[5] == last[5]:
        return
    text = (
        f"rolled back {rolled}, skipped {skipped} batch{'es' if skipped != 1 else ''}, "
        f"accepted {shifts} level shift{'s' if shifts != 1 else ''}"
    )
    if nonfinite:
        text += f", skipped {nonfinite} non-finite gradient{'s' if nonfinite != 1 else ''}"
    level = logging.WARNING if (rolled or skipped or shifts or nonfinite) else logging.INFO
    logger.log(
        level,
        "steadystep: steps %d-%d: guard %s, lr_scale %g",
        int(last[0]),
        int(now[0]) - 1,
        text,
        now[5],
    )


def check_min_lr(guard: Any) -> None:
    """Raise TrainingDiverged when cuts left every applied learning rate below ``min_lr``."""
    if not bool(guard.alarms > 0):
        return
    max_lr = float(guard._applied_max_lr())
    if not max_lr >= guard.min_lr:  # NaN-aware: a NaN learning rate has diverged too
        history = guard.history()
        nonfinite = sum(1 for h in history[-5:] if not math.isfinite(h["loss"]))
        cause = (
            f"{nonfinite} of the last {min(5, len(history))} alarms were a non-finite "
            "loss: look for NaN/inf in the data, the labels or the model's output (a "
            "lower rate will not fix that)"
            if nonfinite
            else "Lower the initial lr, or make the detector less sensitive if the alarms "
            "come from a noisy plateau (a larger sigma for SpikeDetector, ph_lambda for "
            "PageHinkleyPaper)"
        )
        raise TrainingDiverged(
            f"{type(guard).__name__}: after {int(guard.alarms)} alarms the largest learning "
            f"rate is {max_lr:.3g} < min_lr={guard.min_lr:g}; training diverged. Last alarms "
            f"(step, loss): {[(h['step'], h['loss']) for h in history[-5:]]}. {cause}.",
            history,
        )
