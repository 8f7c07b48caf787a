"""steadystep's fused multi-tensor kernels: one call per step for a whole parameter list.

Each function here takes tensor lists and hyperparameters like the functional cores in
:mod:`steadystep.optim`, and does the same arithmetic in one kernel call (the C library of
:mod:`steadystep._kernels._cpu` on CPU) instead of one op (or one compiled call) per tensor. It
returns False, having touched nothing, when the tensors are not ones it supports (another device,
a dtype without a kernel, non-contiguous memory, no C compiler); the caller then takes its
reference or foreach path. Host work per call is building the pointer arrays, O(number of
tensors) in Python, and no read of any tensor's value.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from steadystep._kernels import _cpu

__all__ = [
    "CDF_CONSTANT",
    "adam_",
    "alera_",
    "enabled",
    "grads_ok",
    "gradient_limit",
    "rollback_",
    "sgd_",
    "supported",
    "wrapper_after_",
    "wrapper_before_",
]

_PARAM_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
_METHOD_CODE = {"conformity": 0, "relative": 1, "moment": 2}
_CDF_CODE = {"normal": 0, "bft": 1, "bfo": 2, "logistic": 3}
# x = |m_hat| / se enters erf or tanh scaled by this (folded into the coefficients)
CDF_CONSTANT = {
    "normal": 1.0 / math.sqrt(2.0),
    "bft": 1.0,
    "bfo": 1.702 / 2.0,
    "logistic": math.pi / math.sqrt(3.0) / 2.0,
}
_ONE = torch.ones((), dtype=torch.float64)  # the LR scale when none is given


def enabled() -> bool:
    """False when ``STEADYSTEP_FUSED=0`` is set: every optimizer then takes its eager path."""
    return os.environ.get("STEADYSTEP_FUSED", "1").strip().lower() not in ("0", "false", "no")


def gradient_limit(dtype: torch.dtype) -> float:
    """The largest gradient magnitude a step accepts for statistics of ``dtype``.

    Note [huge gradients]: second-moment statistics hold ``g**2``; a finite gradient whose
    square overflows would put inf (then NaN) into them. A gradient element above
    ``2**(max_exponent / 2 - 1)`` (2**63 ~ 9.2e18 for float32 statistics, 2**511 for float64)
    is therefore treated like a non-finite one and the step is skipped: its square and the EMA
    sums stay at least 4x below the largest finite value.
    """
    max_exponent = math.frexp(torch.finfo(dtype).max)[1]  # 128 for float32, 1024 for float64
    return 2.0 ** (max_exponent // 2 - 1)


def supported(*lists: Sequence[Tensor | None]) -> bool:
    """Can the CPU kernels take these tensors: dense, contiguous CPU tensors of one of the
    supported dtypes (None entries allowed)."""
    if not enabled():
        return False
    for ts in lists:
        for t in ts:
            if t is None:
                continue
            if (
                t.device.type != "cpu"
                or t.layout != torch.strided
                or not t.is_contiguous()
                or t.dtype not in _PARAM_CODE
                or type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)
            ):
                return False
    return True


def _pointers(tensors: Sequence[Tensor | None]) -> ctypes.Array:
    return (ctypes.c_void_p * max(len(tensors), 1))(
        *[None if t is None else t.data_ptr() for t in tensors]
    )


def _numels(tensors: Sequence[Tensor]) -> ctypes.Array:
    return (ctypes.c_int64 * max(len(tensors), 1))(*[t.numel() for t in tensors])


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _scale_config(c: float, eps: float, cdf: str, method: str) -> dict[str, int]:
    return {
        "SS_METHOD": _METHOD_CODE[method],
        "SS_CDF": _CDF_CODE[cdf],
        "SS_C_INF": int(math.isinf(c)),
        "SS_C_ONE": int(c == 1),
        "SS_EPS_ZERO": int(eps == 0),
    }


def _hyper(**values: float) -> _cpu.Hyper:
    h = _cpu.Hyper()
    for name, value in values.items():
        setattr(h, name, float(value))
    return h


def _cprop_hyper(cprop_beta: float, cprop_c: float, cprop_eps: float, cdf: str, method: str):
    constant = CDF_CONSTANT[cdf] if method == "conformity" else 1.0
    c = 1.0 if math.isinf(cprop_c) else cprop_c
    return dict(cprop_beta=cprop_beta, cprop_c=c, cprop_eps=cprop_eps, cdf_constant=constant)


def _flag(found_finite: Tensor) -> Tensor:
    if found_finite.dtype != torch.bool or found_finite.device.type != "cpu":
        raise ValueError(f"found_finite must be a 0-d bool CPU tensor, got {found_finite!r}")
    return found_finite.contiguous()


def _steps_ok(steps: Sequence[Tensor]) -> bool:
    return all(
        s.dtype == torch.float32 and s.device.type == "cpu" and s.numel() == 1 for s in steps
    )


def grads_ok(grads: Sequence[Tensor], limit: float) -> Tensor | None:
    """0-d bool: every element of every gradient is finite with ``|g| <= limit``; None when the
    kernels cannot take these tensors."""
    if not grads or not supported(grads):
        return None
    out = torch.ones((), dtype=torch.bool)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, gs in by_dtype.items():
        lib = _cpu.library({"SS_PARAM": _PARAM_CODE[dtype]})
        if lib is None:
            return None
        ok = torch.empty((), dtype=torch.bool)
        lib.ss_grads_ok(len(gs), _pointers(gs), _numels(gs), limit, ok.data_ptr(), _threads())
        out = out & ok
    return out


def _stats_dtype_ok(params: Sequence[Tensor], *stats: Sequence[Tensor | None]) -> bool:
    want = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    return all(p.dtype == params[0].dtype for p in params) and all(
        s is None or s.dtype == want for ss in stats for s in ss
    )


def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    cprop_exp_avgs: Sequence[Tensor],
    cprop_seconds: Sequence[Tensor] | None,
    steps: Sequence[Tensor],
    *,
    found_finite: Tensor,
    lr: float,
    lr_scale: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    decoupled: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> bool:
    """Adam (``decoupled``: AdamW) with CProp's scale over all tensors in one call, in place;
    the step counts advance by one. A no-op, step counts included, unless ``found_finite``.
    ``cprop_seconds=None``: CProp's ``v`` is ``exp_avg_sqs``. False when unsupported."""
    n = len(params)
    amsgrad_list = max_exp_avg_sqs if amsgrad else None
    lists = (params, grads, exp_avgs, exp_avg_sqs, cprop_exp_avgs)
    optional = [x for x in (amsgrad_list, cprop_seconds) if x is not None]
    if n == 0:
        return True
    if not supported(*lists, *optional) or not _steps_ok(steps):
        return False
    if not _stats_dtype_ok(params, exp_avgs, exp_avg_sqs, cprop_exp_avgs, *optional):
        return False
    if any(g.dtype != p.dtype for g, p in zip(grads, params, strict=True)):
        return False
    config = {
        "SS_PARAM": _PARAM_CODE[params[0].dtype],
        "SS_AMSGRAD": int(amsgrad),
        "SS_L2": int(not decoupled and weight_decay != 0),
        "SS_DECOUPLED": int(decoupled and weight_decay != 0),
        "SS_SHARED_V": int(cprop_seconds is None),
        **_scale_config(cprop_c, cprop_eps, cdf, method),
    }
    lib = _cpu.library(config)
    if lib is None:
        return False
    hyper = _hyper(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        momentum=0.0,
        dampening=0.0,
        **_cprop_hyper(cprop_beta, cprop_c, cprop_eps, cdf, method),
    )
    scale = _ONE if lr_scale is None else lr_scale
    none = [None] * n
    status = lib.ss_adam(
        n,
        _pointers(params),
        _pointers(grads),
        _pointers(exp_avgs),
        _pointers(exp_avg_sqs),
        _pointers(amsgrad_list if amsgrad_list is not None else none),
        _pointers(cprop_exp_avgs),
        _pointers(cprop_seconds if cprop_seconds is not None else none),
        _pointers(steps),
        _numels(params),
        ctypes.byref(hyper),
        scale.data_ptr(),
        _flag(found_finite).data_ptr(),
        _threads(),
    )
    if status != 0:
        raise MemoryError("steadystep's fused Adam kernel could not allocate its coefficients")
    return True


def sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    cprop_exp_avgs: Sequence[Tensor],
    cprop_seconds: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    found_finite: Tensor,
    lr: float,
    lr_scale: Tensor | None,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> bool:
    """SGD (momentum, dampening, Nesterov, L2) with CProp's scale over all tensors in one
    call; as :func:`adam_` otherwise."""
    n = len(params)
    if n == 0:
        return True
    buffers = momentum_buffers if momentum != 0 else [None] * n
    if not supported(params, grads, buffers, cprop_exp_avgs, cprop_seconds):
        return False
    if not _steps_ok(steps) or not _stats_dtype_ok(
        params, buffers, cprop_exp_avgs, cprop_seconds
    ):
        return False
    config = {
        "SS_PARAM": _PARAM_CODE[params[0].dtype],
        "SS_L2": int(weight_decay != 0),
        "SS_MOMENTUM": int(momentum != 0),
        "SS_NESTEROV": int(nesterov),
        **_scale_config(cprop_c, cprop_eps, cdf, method),
    }
    lib = _cpu.library(config)
    if lib is None:
        return False
    hyper = _hyper(
        lr=lr,
        beta1=0.0,
        beta2=0.0,
        eps=0.0,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        **_cprop_hyper(cprop_beta, cprop_c, cprop_eps, cdf, method),
    )
    scale = _ONE if lr_scale is None else lr_scale
    status = lib.ss_sgd(
        n,
        _pointers(params),
        _pointers(grads),
        _pointers(buffers),
        _pointers(cprop_exp_avgs),
        _pointers(cprop_seconds),
        _pointers(steps),
        _numels(params),
        ctypes.byref(hyper),
        scale.data_ptr(),
        _flag(found_finite).data_ptr(),
        _threads(),
    )
    if status != 0:
        raise MemoryError("steadystep's fused SGD kernel could not allocate its coefficients")
    return True


def _wrapper_lib(params, cprop_c, cprop_eps, cdf, method):
    return _cpu.library(
        {"SS_PARAM": _PARAM_CODE[params[0].dtype], **_scale_config(cprop_c, cprop_eps, cdf, method)}
    )


def wrapper_before_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    snapshots: Sequence[Tensor],
    cprop_exp_avgs: Sequence[Tensor],
    cprop_seconds: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    found_finite: Tensor,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> bool:
    """The CProp wrapper's pass before the base step: ``snapshot <- p``, CProp's statistics
    from the raw gradient, step counts + 1 (all a no-op unless ``found_finite``)."""
    n = len(params)
    if n == 0:
        return True
    if not supported(params, grads, snapshots, cprop_exp_avgs, cprop_seconds):
        return False
    if not _steps_ok(steps) or not _stats_dtype_ok(params, cprop_exp_avgs, cprop_seconds):
        return False
    lib = _wrapper_lib(params, cprop_c, cprop_eps, cdf, method)
    if lib is None:
        return False
    hyper = _hyper(
        lr=0.0,
        beta1=0.0,
        beta2=0.0,
        eps=0.0,
        weight_decay=0.0,
        momentum=0.0,
        dampening=0.0,
        **_cprop_hyper(cprop_beta, cprop_c, cprop_eps, cdf, method),
    )
    lib.ss_wrap_before(
        n,
        _pointers(params),
        _pointers(grads),
        _pointers(snapshots),
        _pointers(cprop_exp_avgs),
        _pointers(cprop_seconds),
        _pointers(steps),
        _numels(params),
        ctypes.byref(hyper),
        _flag(found_finite).data_ptr(),
        _threads(),
    )
    return True


def wrapper_after_(
    params: Sequence[Tensor],
    snapshots: Sequence[Tensor],
    cprop_exp_avgs: Sequence[Tensor],
    cprop_seconds: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    found_finite: Tensor,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> bool:
    """After the base step: ``p <- lerp(snapshot, p, s)``, or ``snapshot`` on a skipped step."""
    n = len(params)
    if n == 0:
        return True
    if not supported(params, snapshots, cprop_exp_avgs, cprop_seconds):
        return False
    lib = _wrapper_lib(params, cprop_c, cprop_eps, cdf, method)
    if lib is None:
        return False
    hyper = _hyper(
        lr=0.0,
        beta1=0.0,
        beta2=0.0,
        eps=0.0,
        weight_decay=0.0,
        momentum=0.0,
        dampening=0.0,
        **_cprop_hyper(cprop_beta, cprop_c, cprop_eps, cdf, method),
    )
    lib.ss_wrap_after(
        n,
        _pointers(params),
        _pointers(snapshots),
        _pointers(cprop_exp_avgs),
        _pointers(cprop_seconds),
        _pointers(steps),
        _numels(params),
        ctypes.byref(hyper),
        _flag(found_finite).data_ptr(),
        _threads(),
    )
    return True


def _doubles(values: Sequence[float]) -> ctypes.Array:
    return (ctypes.c_double * max(len(values), 1))(*values)


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
    alpha: float,
    C: float,
    norm_eps: float,
    beta1: float = 0.0,
    beta2: float = 0.0,
    eps: float = 0.0,
) -> bool:
    """One ALeRA step (Ag-Adam's when ``exp_avgs`` is given) over all tensors in one call.

    Tensor ``i`` belongs to unit ``tensor_unit[i]``; a unit has ``unit_numels[u]`` elements, the
    step count ``unit_steps[u]`` of its reference mean ``E_t`` and (but with
    ``element_multipliers``, "param" granularity) the 0-d multiplier ``unit_multipliers[u]``.
    The learning rate of tensor ``i`` is ``tensor_lr[i] * tensor_lr_scale[i]`` (a 0-d tensor, or
    None for 1). On a step taken, every tensor of ``counters`` advances by one (and each of
    ``adam_steps`` that is not a counter already), and ``mirrors`` receive unit 0's new multiplier. A gradient that is not
    finite or above :func:`gradient_limit` skips the step (``skipped`` + 1); ``skip`` (0-d bool)
    masks it without counting. False, having touched nothing, when the kernels cannot take
    these tensors.
    """
    n = len(params)
    if n == 0:
        return True
    stats = [relaxed_paths, element_multipliers, exp_avgs, exp_avg_sqs]
    scalars = [
        *(unit_multipliers or []),
        *[s for s in tensor_lr_scale if s is not None],
        *mirrors,
    ]
    if not supported(params, grads, *[x for x in stats if x is not None], scalars):
        return False
    if not _stats_dtype_ok(params, *[x for x in stats if x is not None], scalars):
        return False
    floats = [*unit_steps, *counters, *(adam_steps or [])]
    if not _steps_ok(floats) or skipped.dtype != torch.int64 or skipped.device.type != "cpu":
        return False
    if any(g.dtype != p.dtype for g, p in zip(grads, params, strict=True)):
        return False
    if skip is not None and (skip.dtype != torch.bool or skip.device.type != "cpu"):
        return False
    lib = _cpu.library({"SS_PARAM": _PARAM_CODE[params[0].dtype]})
    if lib is None:
        return False
    stats_dtype = relaxed_paths[0].dtype
    info = torch.finfo(stats_dtype)
    hyper = _cpu.AleraHyper()
    hyper.alpha, hyper.C, hyper.norm_eps = alpha, C, norm_eps
    hyper.limit = gradient_limit(stats_dtype)
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
    status = lib.ss_alera(
        n,
        _pointers(params),
        _pointers(grads),
        _pointers(relaxed_paths),
        _pointers(element_multipliers or none),
        _pointers(exp_avgs or none),
        _pointers(exp_avg_sqs or none),
        _pointers(adam_steps or none),
        _numels(params),
        (ctypes.c_int64 * n)(*tensor_unit),
        _doubles(tensor_weight_decay),
        _doubles(tensor_lr),
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
        None if skip is None else skip.contiguous().data_ptr(),
        ctypes.byref(hyper),
        _threads(),
    )
    if status != 0:
        raise MemoryError("steadystep's fused ALeRA kernel could not allocate its work space")
    return True


def rollback_(params: Sequence[Tensor], snapshots: Sequence[Tensor], alarm: Tensor) -> bool:
    """The guard's masked rollback in one call: ``p <- snapshot`` where ``alarm`` (0-d bool),
    else ``snapshot <- p`` (bitwise copies, any dtype). False when unsupported."""
    if not params:
        return True
    if not enabled() or alarm.device.type != "cpu" or alarm.dtype != torch.bool:
        return False
    for p, s in zip(params, snapshots, strict=True):
        if (
            p.device.type != "cpu"
            or s.device.type != "cpu"
            or not p.is_contiguous()
            or not s.is_contiguous()
            or p.layout != torch.strided
            or p.dtype != s.dtype
            or p.numel() != s.numel()
        ):
            return False
    lib = _cpu.library({"SS_PARAM": 0})
    if lib is None:
        return False
    nbytes = (ctypes.c_int64 * len(params))(*[p.numel() * p.element_size() for p in params])
    lib.ss_rollback(
        len(params), _pointers(params), _pointers(snapshots), nbytes, alarm.data_ptr(), _threads()
    )
    return True
