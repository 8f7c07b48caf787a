"""The guard's per-step decision on the CPU in a few C calls: a rolling-window detector's update
(Note [the detector kernel] in kernels_detect.c), the masked restores of a detector's
``revert`` and ``reset``, and the ladder with the state it leaves (Note [the ladder kernel] in
kernels_ladder.c). The torch code (:mod:`steadystep.detectors`,
:mod:`steadystep._guard_decision`) is the reference and the path everywhere else: CUDA,
``torch.compile``, ``STEADYSTEP_FUSED=0``. Each function returns None or False, having touched
nothing, where its kernel cannot take the inputs.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import torch
from torch import Tensor

from steadystep._kernels import _cpu
from steadystep._kernels._common import _compiling, enabled
from steadystep._kernels.rollback import CopyPlan, rollback_

__all__ = [
    "CopyPlan",
    "LadderSettings",
    "WindowSettings",
    "ladder_step",
    "masked_copy_",
    "settings",
    "window_update",
]

# dtype codes of the 0-d values the kernels read (read_T / read_value in the C files)
_VALUE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
_STATE_TYPE = {torch.float32: "float", torch.float64: "double"}
_TRUE = torch.ones((), dtype=torch.bool)
_D, _I64, _INT = ctypes.c_double, ctypes.c_int64, ctypes.c_int
# the dtypes of ladder_step's state (phase, waited, lr_scale, episode_scale, calm, alarms,
# rollbacks, skips, level_shifts, steps, history_step, history_loss) and outputs
_I, _F = torch.int64, torch.float64
_LADDER_STATE = (_I, _I, _F, _F, _I, _I, _I, _I, _I, _I, _I, torch.float32)
_LADDER_OUT = (torch.bool,) * 4 + (_F,)


class WindowSettings(ctypes.Structure):
    """``window_hyper_t`` of kernels_detect.c: a window detector's test."""

    _fields_ = [("sigma", _D), ("warmup_factor", _D), ("scale_floor", _D)]
    _fields_ += [("size", _I64), ("warmup", _I64), ("clip", _INT)]


class LadderSettings(ctypes.Structure):
    """``ladder_hyper_t`` of kernels_ladder.c: the guard's ladder."""

    _fields_ = [("lr_factor", _D), ("accept_after", _I64), ("recover_every", _I64)]
    _fields_ += [("history", _I64), ("rollback_only", _INT), ("backtrack", _INT)]


@functools.lru_cache(maxsize=128)
def settings(kind: type[ctypes.Structure], *values: float) -> ctypes.Structure:
    """One struct of ``kind`` per distinct setting, made once (a field by position)."""
    return kind(*values)


def _usable(tensors: Sequence[Tensor]) -> ctypes.CDLL | None:
    """The library, where every tensor is a contiguous CPU tensor and the kernels are on."""
    if _compiling() or not enabled():
        return None
    if not all(t.is_cpu and t.is_contiguous() for t in tensors):
        return None
    return _cpu.library({"SS_PARAM": 0})


def window_update(
    state: Sequence[Tensor],
    before: Sequence[Tensor],
    counters: Sequence[Tensor],
    loss: Tensor,
    grad_norm: Tensor | None,
    skip: Tensor | None,
    hyper: WindowSettings,
) -> Tensor | None:
    """A window-pair detector's update (``Detector.update`` of a RollingZScore or a
    SpikeDetector) in one call: ``state`` = (loss window, loss count, gradient-norm window,
    gradient-norm count), ``before`` the same shapes (written: what ``revert`` restores),
    ``counters`` = (observations, alarms, last_loss); ``loss`` and ``grad_norm`` one-element
    tensors, ``skip`` a one-element bool tensor or None. Returns the alarm (a new 0-d bool
    tensor)."""
    window, count, g_window, g_count = state
    kind = _STATE_TYPE.get(window.dtype)
    values = [loss] if grad_norm is None else [loss, grad_norm]
    if kind is None or any(v.dtype not in _VALUE_CODE for v in values):
        return None
    # what the kernel indexes: two windows of hyper.size values of one dtype, int64 counts
    size = hyper.size
    if window.shape != (size,) or g_window.shape != (size,) or counters[2].numel() != 1:
        return None
    if g_window.dtype is not window.dtype or counters[2].dtype is not window.dtype:
        return None
    ints = (count, g_count, counters[0], counters[1])
    if any(t.dtype is not torch.int64 or t.numel() != 1 for t in ints):
        return None
    if any(
        b.shape != t.shape or b.dtype is not t.dtype for b, t in zip(before, state, strict=True)
    ):
        return None
    if skip is not None and skip.dtype is not torch.bool:
        return None
    flags = [] if skip is None else [skip]
    lib = _usable([*state, *before, *counters, *values, *flags])
    if lib is None:
        return None
    alarm = torch.empty((), dtype=torch.bool)
    fn = lib.ss_window_update_float if kind == "float" else lib.ss_window_update_double
    fn(
        *(t.data_ptr() for t in (*state, *before, *counters)),
        loss.data_ptr(),
        _VALUE_CODE[loss.dtype],
        None if grad_norm is None else grad_norm.data_ptr(),
        0 if grad_norm is None else _VALUE_CODE[grad_norm.dtype],
        None if skip is None else skip.data_ptr(),
        ctypes.byref(hyper),
        alarm.data_ptr(),
    )
    return alarm


def masked_copy_(
    dst: Sequence[Tensor], src: Sequence[Tensor], mask: Tensor, plan: CopyPlan | None = None
) -> bool:
    """``d <- s`` for each pair where ``mask`` (a 0-d bool CPU tensor) is True, bitwise, in one
    call (kernels_rollback.c's ``ss_rollback`` with ``hold`` set) and without reading ``mask``
    on the host: a detector's ``revert`` and ``reset``. ``plan`` keeps the lists' checked C
    arguments between calls (Note [copy plans])."""
    if mask.dtype is not torch.bool or mask.numel() != 1 or not mask.is_cpu:
        return False
    if not dst or not dst[0].is_cpu:  # rollback_ checks the rest
        return False
    mask = mask if mask.dim() == 0 else mask.reshape(())
    return rollback_(dst, src, mask, hold=_TRUE, plan=plan)


def ladder_step(
    flags: Sequence[Tensor],
    values: Sequence[Tensor],
    state: Sequence[Tensor],
    hyper: LadderSettings,
    out: Sequence[Tensor],
) -> bool:
    """The guard's decision and the state it leaves, in one call: ``flags`` = (alarm,
    bad_grads), 0-d bools; ``values`` = (the loss the detector tested, the loss the history
    keeps); ``state`` = the guard's (phase, waited, lr_scale, episode_scale, calm, alarms,
    rollbacks, skips, level_shifts, steps, history_step, history_loss), written in place;
    ``out`` = (update, rollback, accept, revert: 0-d bools; factor: 0-d float64), written."""
    if any(v.dtype not in _VALUE_CODE or v.numel() != 1 for v in values):
        return False
    if any(f.dtype is not torch.bool or f.numel() != 1 for f in flags):
        return False
    # what the kernel reads and writes: ten 0-d counters and a ring of hyper.history slots
    sizes = (1,) * 10 + (hyper.history, hyper.history)
    if any(
        t.dtype is not dtype or t.numel() != n
        for t, dtype, n in zip(state, _LADDER_STATE, sizes, strict=True)
    ):
        return False
    if any(
        t.dtype is not dtype or t.numel() != 1 for t, dtype in zip(out, _LADDER_OUT, strict=True)
    ):
        return False
    lib = _usable([*flags, *values, *state, *out])
    if lib is None:
        return False
    (alarm, bad_grads), (observed, loss) = flags, values
    lib.ss_ladder_step(
        alarm.data_ptr(),
        bad_grads.data_ptr(),
        observed.data_ptr(),
        _VALUE_CODE[observed.dtype],
        loss.data_ptr(),
        _VALUE_CODE[loss.dtype],
        *(t.data_ptr() for t in state),
        ctypes.byref(hyper),
        *(t.data_ptr() for t in out),
    )
    return True
