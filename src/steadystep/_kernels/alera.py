"""ALeRA / Ag-Adam's fused step."""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from steadystep._kernels import _cpu
from steadystep._kernels._common import (
    PARAM_CODE,
    backend,
    check_flag,
    doubles,
    gradient_limit,
    int64s,
    numels,
    pointers,
    stats_dtype,
    status,
    steps_ok,
    threads,
    triton,
)

__all__ = ["alera_"]

_LISTS = "params grads relaxed_paths element_multipliers exp_avgs exp_avg_sqs adam_steps".split()


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
    kind = backend(params, grads, stats=[*stats, scalars])
    if kind is None:
        return False
    device = params[0].device
    if not steps_ok([*unit_steps, *counters, *(adam_steps or [])], device):
        return False
    if skipped.dtype != torch.int64 or skipped.device != device:
        return False
    if skip is not None:
        skip = check_flag(skip, device, "skip")
    if found_finite is not None:
        found_finite = check_flag(found_finite, device)
    sdtype = stats_dtype(params[0].dtype)
    info = torch.finfo(sdtype)
    # Adam's counts may be the units' own ("tensor" granularity): then they advance once
    counted = {id(t) for t in counters}
    hyper = dict(
        alpha=alpha,
        C=C,
        norm_eps=norm_eps,
        limit=gradient_limit(sdtype),
        stats_max=info.max,
        stats_tiny=info.tiny,
        log_bound=math.log(info.max) - 1.0,  # exp(bound) is finite after rounding
        total_numel=float(sum(unit_numels)),
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        param_wise=int(element_multipliers is not None),
        adam=int(exp_avgs is not None),
        advance_adam_steps=int(not any(id(t) in counted for t in adam_steps or [])),
    )
    # the tensor lists, in the C function's order (the Triton kernel takes them by name)
    arrays = (params, grads, relaxed_paths, element_multipliers, exp_avgs, exp_avg_sqs, adam_steps)
    if kind == "cuda":
        lists = dict(zip(_LISTS, arrays, strict=True))
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
        triton().alera(lists, plan, hyper)
        return True
    lib = _cpu.library({"SS_PARAM": PARAM_CODE[params[0].dtype]})
    if lib is None:
        return False
    none = [None] * n
    status(
        lib.ss_alera(
            n,
            *(pointers(ts or none) for ts in arrays),
            numels(params),
            int64s(list(tensor_unit)),
            doubles(tensor_weight_decay),
            doubles([float(x) for x in tensor_lr]),
            pointers(tensor_lr_scale),
            len(unit_steps),
            pointers(unit_multipliers or [None] * len(unit_steps)),
            pointers(unit_steps),
            doubles([float(x) for x in unit_numels]),
            len(counters),
            pointers(counters),
            len(mirrors),
            pointers(mirrors),
            skipped.data_ptr(),
            None if skip is None else skip.data_ptr(),
            None if found_finite is None else found_finite.data_ptr(),
            ctypes.byref(_cpu.AleraHyper(**hyper)),
            threads(),
        ),
        "ALeRA",
    )
    return True
