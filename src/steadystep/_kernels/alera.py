"""ALeRA / Ag-Adam's fused step and the guard's fused rollback."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from steadystep._kernels import _cpu
from steadystep._kernels._common import (
    _PARAM_CODE,
    _backend,
    _check_flag,
    _doubles,
    _int64s,
    _numels,
    _pointers,
    _status,
    _steps_ok,
    _threads,
    _triton,
    gradient_limit,
    stats_dtype,
)

__all__ = ["alera_", "rollback_"]


# ---------------------------------------------------------------------------------------------
# ALeRA / Ag-Adam and the guard's rollback
# ---------------------------------------------------------------------------------------------


def alera_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    relaxed_paths: Sequence[Tensor],
    element_multipliers: Sequence[Tensor] | None,
    exp_avgs: Sequence[Tensor] | None,
    exp_avg_sqs: Sequence[Tensor] | None,
    adam_steps: Sequence[Tensor] | None,
    *,
    tensor_unit: Sequence[int],
    tensor_weight_decay: Sequence[float],
    tensor_lr: Sequence[float],
    tensor_lr_scale: Sequence[Tensor | None],
    unit_multipliers: Sequence[Tensor] | None,
    unit_steps: Sequence[Tensor],
    unit_numels: Sequence[int],
    counters: Sequence[Tensor],
    mirrors: Sequence[Tensor],
    skipped: Tensor,
    skip: Tensor | None,
    found_finite: Tensor | None = None,
    alpha: float,
    C: float,
    norm_eps: float,
    beta1: float = 0.0,
    beta2: float = 0.0,
    eps: float = 0.0,
) -> bool:
    """One ALeRA step (Ag-Adam's when ``exp_avgs`` is given) over all tensors in one call.

    Tensor ``i`` belongs to unit ``tensor_unit[i]``; unit ``u`` has ``unit_numels[u]`` elements,
    the step count ``unit_steps[u]`` of its reference mean ``E_t`` and (but with
    ``element_multipliers``, "param" granularity) the 0-d multiplier ``unit_multipliers[u]``.
    Tensor ``i``'s learning rate is ``tensor_lr[i] * tensor_lr_scale[i]`` (a 0-d tensor, or None
    for 1). On a step taken every tensor of ``counters`` advances by one (and each of
    ``adam_steps`` that is not a counter already) and ``mirrors`` receive unit 0's new
    multiplier ("global" granularity keeps a copy per group). A gradient element that is not
    finite or above :func:`gradient_limit` skips the step and adds one to ``skipped``, and so
    does ``found_finite`` (0-d bool) False: a decision made before, e.g. every rank's under
    ``torch.distributed``; ``skip`` (0-d bool) masks the step without counting. False, having
    touched nothing, when unsupported.
    """
    n = len(params)
    if n == 0:
        return True
    stats = [x for x in (relaxed_paths, element_multipliers, exp_avgs, exp_avg_sqs) if x]
    scalars = [
        *(unit_multipliers or []),
        *[s for s in tensor_lr_scale if s is not None],
        *mirrors,
    ]
    backend = _backend(params, grads, stats=[*stats, scalars])
    if backend is None:
        return False
    device = params[0].device
    if not _steps_ok([*unit_steps, *counters, *(adam_steps or [])], device):
        return False
    if skipped.dtype != torch.int64 or skipped.device != device:
        return False
    if skip is not None:
        skip = _check_flag(skip, device, "skip")
    if found_finite is not None:
        found_finite = _check_flag(found_finite, device)
    sdtype = stats_dtype(params[0].dtype)
    if backend == "cuda":
        lists = dict(
            params=params,
            grads=grads,
            relaxed_paths=relaxed_paths,
            element_multipliers=element_multipliers,
            exp_avgs=exp_avgs,
            exp_avg_sqs=exp_avg_sqs,
            adam_steps=adam_steps,
        )
        plan = dict(
            tensor_unit=list(tensor_unit),
            tensor_weight_decay=[float(x) for x in tensor_weight_decay],
            tensor_lr=[float(x) for x in tensor_lr],
            tensor_lr_scale=list(tensor_lr_scale),
            unit_multipliers=unit_multipliers,
            unit_steps=list(unit_steps),
            unit_numels=list(unit_numels),
            counters=list(counters),
            mirrors=list(mirrors),
            skipped=skipped,
            skip=skip,
            found_finite=found_finite,
        )
        hyper = dict(
            alpha=alpha,
            C=C,
            norm_eps=norm_eps,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            limit=gradient_limit(sdtype),
        )
        _triton().alera(lists, plan, hyper)
        return True
    lib = _cpu.library({"SS_PARAM": _PARAM_CODE[params[0].dtype]})
    if lib is None:
        return False
    info = torch.finfo(sdtype)
    hyper = _cpu.AleraHyper()
    hyper.alpha, hyper.C, hyper.norm_eps = alpha, C, norm_eps
    hyper.limit = gradient_limit(sdtype)
    hyper.stats_max, hyper.stats_tiny = info.max, info.tiny
    hyper.log_bound = math.log(info.max) - 1.0  # exp(bound) is finite after rounding
    hyper.total_numel = float(sum(unit_numels))
    hyper.beta1, hyper.beta2, hyper.eps = beta1, beta2, eps
    hyper.param_wise = int(element_multipliers is not None)
    hyper.adam = int(exp_avgs is not None)
    # Adam's counts may be the units' own ("tensor" granularity): then they advance once
    counted = {id(t) for t in counters}
    hyper.advance_adam_steps = int(not any(id(t) in counted for t in adam_steps or []))
    none = [None] * n
    _status(
        lib.ss_alera(
            n,
            _pointers(params),
            _pointers(grads),
            _pointers(relaxed_paths),
            _pointers(element_multipliers or none),
            _pointers(exp_avgs or none),
            _pointers(exp_avg_sqs or none),
            _pointers(adam_steps or none),
            _numels(params),
            _int64s(list(tensor_unit)),
            _doubles(tensor_weight_decay),
            _doubles([float(x) for x in tensor_lr]),
            _pointers(tensor_lr_scale),
            len(unit_steps),
            _pointers(unit_multipliers or [None] * len(unit_steps)),
            _pointers(unit_steps),
            _doubles([float(x) for x in unit_numels]),
            len(counters),
            _pointers(counters),
            len(mirrors),
            _pointers(mirrors),
            skipped.data_ptr(),
            None if skip is None else skip.data_ptr(),
            None if found_finite is None else found_finite.data_ptr(),
            ctypes.byref(hyper),
            _threads(),
        ),
        "ALeRA",
    )
    return True


def rollback_(
    params: Sequence[Tensor],
    snapshots: Sequence[Tensor],
    alarm: Tensor,
    *,
    hold: Tensor | None = None,
) -> bool:
    """The guard's masked rollback in one call: ``p <- snapshot`` where ``alarm`` (0-d bool),
    else ``snapshot <- p`` unless ``hold`` (0-d bool: a step that takes no update, so the
    snapshot keeps what the next alarm must restore); bitwise copies of any dtype. False when
    unsupported."""
    if not params:
        return True
    backend = _backend(params, snapshots, dtypes="any")
    if backend is None:
        return False
    sizes = [p.nbytes for p in params]
    if any(p.dtype is not s.dtype for p, s in zip(params, snapshots, strict=True)) or sizes != [
        s.nbytes for s in snapshots
    ]:
        return False
    alarm = _check_flag(alarm, params[0].device, "alarm")
    if hold is not None:
        hold = _check_flag(hold, params[0].device, "hold")
    if backend == "cuda":
        _triton().rollback(params, snapshots, alarm, hold)
        return True
    lib = _cpu.library({"SS_PARAM": 0})
    if lib is None:
        return False
    nbytes = _int64s(sizes)
    lib.ss_rollback(
        len(params),
        _pointers(params),
        _pointers(snapshots),
        nbytes,
        alarm.data_ptr(),
        None if hold is None else hold.data_ptr(),
        _threads(),
    )
    return True
