"""The multi-tensor kernels for CUDA, in Triton (same arithmetic as ``cpu_kernels.c``).

Note [Triton kernels]
    One launch covers every tensor of a list: a cached *block table* names, for each program,
    the tensor it works on and the first element of its block; cached *pointer tables* (int64
    device tensors of data pointers, rebuilt only when a pointer changes) give each program its
    tensor's memory. Every decision is read on the device: a kernel returns at once when the
    step is skipped (the flag written by :func:`check`), and the per-tensor coefficients (bias
    corrections of the tensor's own step count) are computed per program in float64 from the
    step count and a float64 hyperparameter row, so neither a scheduler's new lr nor a guard's
    LR cut recompiles anything or copies anything to the device. A step is then: reset the
    flag, check the gradients, the update, advance the step counts; four launches whatever the
    number of tensors. Tests run these kernels on the CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "adam",
    "alera",
    "bad_flag",
    "check",
    "rollback",
    "sgd",
    "wrapper_after",
    "wrapper_before",
]

BLOCK = 2048
_TABLES: OrderedDict[tuple, Tensor] = OrderedDict()
_TABLE_LIMIT = 256


def _cached(key: tuple, make) -> Tensor:
    table = _TABLES.get(key)
    if table is None:
        table = make()
        _TABLES[key] = table
        if len(_TABLES) > _TABLE_LIMIT:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def _pointer_table(tensors: Sequence[Tensor | None], device: torch.device) -> Tensor:
    ptrs = tuple(0 if t is None else t.data_ptr() for t in tensors)
    return _cached(("ptr", device, ptrs), lambda: torch.tensor(ptrs, dtype=torch.int64).to(device))


def _block_table(numels: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(tensor index, first element) of every block, and the numels, as device tensors."""

    def make() -> tuple[Tensor, Tensor, Tensor]:
        index = [i for i, n in enumerate(numels) for _ in range(0, n, BLOCK)]
        start = [s for n in numels for s in range(0, n, BLOCK)]
        return (
            torch.tensor(index, dtype=torch.int32).to(device),
            torch.tensor(start, dtype=torch.int64).to(device),
            torch.tensor(numels, dtype=torch.int64).to(device),
        )

    return _cached(("blocks", device, numels), make)


def _hyper_row(values: tuple[float, ...], device: torch.device) -> Tensor:
    """The hyperparameters as a float64 device row (cached: changes only with the values)."""
    return _cached(("hyper", device, values), lambda: torch.tensor(values, dtype=torch.float64).to(device))


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16}


def bad_flag(device: torch.device) -> Tensor:
    """A fresh int32 flag, 0 = every gradient acceptable (one fill launch)."""
    return torch.zeros((), dtype=torch.int32, device=device)


# Hyperparameter row columns
_H = dict(
    lr=0,
    beta1=1,
    beta2=2,
    eps=3,
    weight_decay=4,
    cprop_beta=5,
    cprop_c=6,
    cprop_eps=7,
    cdf_constant=8,
    momentum=9,
    dampening=10,
)


@triton.jit
def _to_param(x, PDTYPE: tl.constexpr):
    """``x`` (statistics dtype) as the parameter dtype; bfloat16 rounds to nearest even in
    integer arithmetic, so compiled kernels and the interpreter round alike."""
    if PDTYPE == tl.bfloat16:
        u = x.to(tl.float32).to(tl.int32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(PDTYPE)


@triton.jit
def _check_kernel(
    g_ptrs, block_tensor, block_start, numels, flag, limit, PDTYPE: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(PDTYPE))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    bad = tl.max((~(tl.abs(g) <= limit)).to(tl.int32), axis=0)  # NaN compares False: bad
    if bad > 0:
        tl.atomic_max(flag, 1)


def check(grads: Sequence[Tensor], limit: float, flag: Tensor) -> None:
    """Set ``flag`` to 1 if any gradient element is non-finite or above ``limit``."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, gs in by_dtype.items():
        device = gs[0].device
        index, start, numels = _block_table(tuple(g.numel() for g in gs), device)
        if index.numel() == 0:
            continue
        _check_kernel[(index.numel(),)](
            _pointer_table(gs, device), index, start, numels, flag, limit,
            PDTYPE=_TL_DTYPE[dtype], BLOCK=BLOCK,
        )


@triton.jit
def _advance_kernel(step_ptrs, n, flag, BLOCK_T: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = offs < n
    ok = (tl.load(flag) == 0).to(tl.float32)
    ptrs = tl.load(step_ptrs + offs, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, step + ok, mask=mask)


def _advance(steps: Sequence[Tensor], flag: Tensor) -> None:
    device = steps[0].device
    n = len(steps)
    _advance_kernel[(triton.cdiv(n, 1024),)](_pointer_table(steps, device), n, flag, BLOCK_T=1024)


@triton.jit
def _step_count(step_ptrs, t, step_offset):
    """The tensor's step count plus ``step_offset`` (1 before this step's advance, 0 after)."""
    step_ptr = tl.load(step_ptrs + t).to(tl.pointer_type(tl.float32))
    return tl.load(step_ptr).to(tl.float64) + step_offset


@triton.jit
def _cprop_coefficients(step, hyper, METHOD: tl.constexpr):
    """CProp's per-tensor scalars (float64) at step ``step`` (see ``cpu_kernels.c``)."""
    cprop_beta = tl.load(hyper + 5)
    cprop_eps = tl.load(hyper + 7)
    constant = tl.load(hyper + 8)
    cprop_bc = 1.0 - tl.exp(step * tl.log(cprop_beta))
    n_t = cprop_bc / (1.0 - cprop_beta)
    inv_cprop_bc = 1.0 / cprop_bc
    ratio = inv_cprop_bc * constant
    if METHOD == 0:
        variance_scale = inv_cprop_bc / (n_t - 1.0 + cprop_eps) / (ratio * ratio)
    elif METHOD == 1:
        variance_scale = inv_cprop_bc / ratio
    else:
        variance_scale = inv_cprop_bc / (ratio * ratio)
    first = (step == 1.0).to(tl.float64)
    return inv_cprop_bc, variance_scale, cprop_eps / ratio, first


@triton.jit
def _scale(cm, cv, inv_cprop_bc, variance_scale, scaled_cprop_eps, first, cprop_c,
           METHOD: tl.constexpr, CDF: tl.constexpr, C_INF: tl.constexpr, C_ONE: tl.constexpr,
           EPS_ZERO: tl.constexpr):
    if C_INF:
        s = tl.full(cm.shape, 1.0, cm.dtype)
    else:
        if METHOD == 0:
            centred = cv - (cm * cm) * inv_cprop_bc
            se = tl.sqrt(tl.maximum(centred, 0.0) * variance_scale)
        elif METHOD == 1:
            se = cv * variance_scale
        else:
            se = tl.sqrt(cv * variance_scale)
        se = se + scaled_cprop_eps
        if EPS_ZERO:
            se = tl.maximum(se, 1.1754943508222875e-38)
        x = tl.abs(cm) / se
        if METHOD != 0:
            conf = x
        elif CDF == 0:
            conf = tl.erf(x)
        elif CDF == 1:
            y = x * (x * x * 0.03528 + 0.7988)
            conf = 1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0)  # tanh(y), y >= 0
        else:
            conf = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
        if not C_ONE:
            conf = tl.minimum(conf * cprop_c, 1.0)
        s = tl.maximum(conf, first)
    return s


@triton.jit
def _adam_kernel(
    p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, cm_ptrs, cv_ptrs, step_ptrs,
    block_tensor, block_start, numels, flag, hyper, lr_scale_ptr,
    PDTYPE: tl.constexpr, SDTYPE: tl.constexpr, AMSGRAD: tl.constexpr, L2: tl.constexpr,
    DECOUPLED: tl.constexpr, SHARED_V: tl.constexpr, METHOD: tl.constexpr, CDF: tl.constexpr,
    C_INF: tl.constexpr, C_ONE: tl.constexpr, EPS_ZERO: tl.constexpr, BLOCK: tl.constexpr,
):
    if tl.load(flag) != 0:
        return
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    step = _step_count(step_ptrs, t, 1.0)
    inv_cprop_bc, variance_scale, scaled_cprop_eps, first = _cprop_coefficients(step, hyper, METHOD)
    lr = tl.load(hyper + 0) * tl.load(lr_scale_ptr).to(tl.float64)
    neg_step_size = -lr / (1.0 - tl.exp(step * tl.log(tl.load(hyper + 1))))
    inv_bc2_sqrt = 1.0 / tl.sqrt(1.0 - tl.exp(step * tl.log(tl.load(hyper + 2))))
    beta1 = tl.load(hyper + 1).to(SDTYPE)
    beta2 = tl.load(hyper + 2).to(SDTYPE)
    eps = tl.load(hyper + 3).to(SDTYPE)
    wd = tl.load(hyper + 4)
    cprop_beta = tl.load(hyper + 5).to(SDTYPE)
    cprop_c = tl.load(hyper + 6).to(SDTYPE)
    one_minus_beta1 = (1.0 - tl.load(hyper + 1)).to(SDTYPE)
    one_minus_beta2 = (1.0 - tl.load(hyper + 2)).to(SDTYPE)
    one_minus_cprop_beta = (1.0 - tl.load(hyper + 5)).to(SDTYPE)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(PDTYPE))
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(PDTYPE))
    m_ptr = tl.load(m_ptrs + t).to(tl.pointer_type(SDTYPE))
    v_ptr = tl.load(v_ptrs + t).to(tl.pointer_type(SDTYPE))
    cm_ptr = tl.load(cm_ptrs + t).to(tl.pointer_type(SDTYPE))
    raw = tl.load(g_ptr + offs, mask=mask, other=0.0).to(SDTYPE)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(SDTYPE)
    if L2:
        g = raw + wd.to(SDTYPE) * p
    else:
        g = raw
    m = tl.load(m_ptr + offs, mask=mask, other=0.0) * beta1 + one_minus_beta1 * g
    v = tl.load(v_ptr + offs, mask=mask, other=0.0) * beta2 + one_minus_beta2 * (g * g)
    if AMSGRAD:
        vmax_ptr = tl.load(vmax_ptrs + t).to(tl.pointer_type(SDTYPE))
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0), v)
        tl.store(vmax_ptr + offs, vmax, mask=mask)
    else:
        vmax = v
    denom = tl.sqrt(vmax) * inv_bc2_sqrt.to(SDTYPE) + eps
    update = neg_step_size.to(SDTYPE) * m / denom
    if DECOUPLED:
        update = update - (lr * wd).to(SDTYPE) * p
    cm = tl.load(cm_ptr + offs, mask=mask, other=0.0) * cprop_beta + one_minus_cprop_beta * raw
    if SHARED_V:
        cv = v
    else:
        cv_ptr = tl.load(cv_ptrs + t).to(tl.pointer_type(SDTYPE))
        if METHOD == 1:
            second = tl.abs(raw)
        else:
            second = raw * raw
        cv = tl.load(cv_ptr + offs, mask=mask, other=0.0) * cprop_beta + one_minus_cprop_beta * second
        tl.store(cv_ptr + offs, cv, mask=mask)
    s = _scale(cm, cv, inv_cprop_bc.to(SDTYPE), variance_scale.to(SDTYPE),
               scaled_cprop_eps.to(SDTYPE), first.to(SDTYPE), cprop_c,
               METHOD, CDF, C_INF, C_ONE, EPS_ZERO)
    tl.store(p_ptr + offs, _to_param(p + s * update, PDTYPE), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    tl.store(cm_ptr + offs, cm, mask=mask)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def adam(
    lists: dict[str, Sequence[Tensor | None]],
    flag: Tensor,
    hyper: tuple[float, ...],
    lr_scale: Tensor,
    config: dict[str, int],
) -> None:
    """Adam(W) + CProp over ``lists`` (keys params, grads, exp_avgs, exp_avg_sqs,
    max_exp_avg_sqs, cprop_exp_avgs, cprop_seconds, steps); ``flag`` from :func:`check`."""
    params = lists["params"]
    device = params[0].device
    numels = tuple(p.numel() for p in params)
    index, start, numel_t = _block_table(numels, device)
    n = len(params)
    none = [None] * n
    tables = [
        _pointer_table(lists[k] if lists[k] is not None else none, device)
        for k in (
            "params",
            "grads",
            "exp_avgs",
            "exp_avg_sqs",
            "max_exp_avg_sqs",
            "cprop_exp_avgs",
            "cprop_seconds",
            "steps",
        )
    ]
    if index.numel():
        dtype = params[0].dtype
        _adam_kernel[(index.numel(),)](
            *tables, index, start, numel_t, flag, _hyper_row(hyper, device), lr_scale,
            PDTYPE=_TL_DTYPE[dtype], SDTYPE=_TL_DTYPE[_stats_dtype(dtype)], BLOCK=BLOCK,
            **{k.removeprefix("SS_"): v for k, v in config.items() if k != "SS_PARAM"},
        )
    _advance(lists["steps"], flag)


@triton.jit
def _sgd_kernel(
    p_ptrs, g_ptrs, buf_ptrs, cm_ptrs, cv_ptrs, step_ptrs,
    block_tensor, block_start, numels, flag, hyper, lr_scale_ptr,
    PDTYPE: tl.constexpr, SDTYPE: tl.constexpr, L2: tl.constexpr, MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, METHOD: tl.constexpr, CDF: tl.constexpr, C_INF: tl.constexpr,
    C_ONE: tl.constexpr, EPS_ZERO: tl.constexpr, BLOCK: tl.constexpr,
):
    if tl.load(flag) != 0:
        return
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    step = _step_count(step_ptrs, t, 1.0)
    inv_cprop_bc, variance_scale, scaled_cprop_eps, first = _cprop_coefficients(step, hyper, METHOD)
    lr = tl.load(hyper + 0) * tl.load(lr_scale_ptr).to(tl.float64)
    wd = tl.load(hyper + 4).to(SDTYPE)
    cprop_beta = tl.load(hyper + 5).to(SDTYPE)
    cprop_c = tl.load(hyper + 6).to(SDTYPE)
    one_minus_cprop_beta = (1.0 - tl.load(hyper + 5)).to(SDTYPE)
    momentum = tl.load(hyper + 9)
    dampening = tl.load(hyper + 10)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(PDTYPE))
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(PDTYPE))
    cm_ptr = tl.load(cm_ptrs + t).to(tl.pointer_type(SDTYPE))
    cv_ptr = tl.load(cv_ptrs + t).to(tl.pointer_type(SDTYPE))
    raw = tl.load(g_ptr + offs, mask=mask, other=0.0).to(SDTYPE)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(SDTYPE)
    if L2:
        d = raw + wd * p
    else:
        d = raw
    cm = tl.load(cm_ptr + offs, mask=mask, other=0.0) * cprop_beta + one_minus_cprop_beta * raw
    if METHOD == 1:
        second = tl.abs(raw)
    else:
        second = raw * raw
    cv = tl.load(cv_ptr + offs, mask=mask, other=0.0) * cprop_beta + one_minus_cprop_beta * second
    if MOMENTUM:
        # torch.optim.SGD starts the buffer at d on the first step
        momentum_a = tl.where(first == 1.0, 0.0, momentum).to(SDTYPE)
        momentum_b = tl.where(first == 1.0, 1.0, 1.0 - dampening).to(SDTYPE)
        buf_ptr = tl.load(buf_ptrs + t).to(tl.pointer_type(SDTYPE))
        buf = tl.load(buf_ptr + offs, mask=mask, other=0.0) * momentum_a + momentum_b * d
        tl.store(buf_ptr + offs, buf, mask=mask)
        if NESTEROV:
            d = d + momentum.to(SDTYPE) * buf
        else:
            d = buf
    s = _scale(cm, cv, inv_cprop_bc.to(SDTYPE), variance_scale.to(SDTYPE),
               scaled_cprop_eps.to(SDTYPE), first.to(SDTYPE), cprop_c,
               METHOD, CDF, C_INF, C_ONE, EPS_ZERO)
    tl.store(p_ptr + offs, _to_param(p + s * ((-lr).to(SDTYPE) * d), PDTYPE), mask=mask)
    tl.store(cm_ptr + offs, cm, mask=mask)
    tl.store(cv_ptr + offs, cv, mask=mask)


def sgd(
    lists: dict[str, Sequence[Tensor | None]],
    flag: Tensor,
    hyper: tuple[float, ...],
    lr_scale: Tensor,
    config: dict[str, int],
) -> None:
    """SGD + CProp (keys params, grads, momentum_buffers, cprop_exp_avgs, cprop_seconds, steps)."""
    params = lists["params"]
    device = params[0].device
    index, start, numel_t = _block_table(tuple(p.numel() for p in params), device)
    keys = ("params", "grads", "momentum_buffers", "cprop_exp_avgs", "cprop_seconds", "steps")
    tables = [_pointer_table(lists[k], device) for k in keys]
    if index.numel():
        dtype = params[0].dtype
        _sgd_kernel[(index.numel(),)](
            *tables, index, start, numel_t, flag, _hyper_row(hyper, device), lr_scale,
            PDTYPE=_TL_DTYPE[dtype], SDTYPE=_TL_DTYPE[_stats_dtype(dtype)], BLOCK=BLOCK,
            **{k.removeprefix("SS_"): v for k, v in config.items() if k != "SS_PARAM"},
        )
    _advance(lists["steps"], flag)


@triton.jit
def _wrap_before_kernel(
    p_ptrs, g_ptrs, snap_ptrs, cm_ptrs, cv_ptrs, block_tensor, block_start, numels, flag, hyper,
    PDTYPE: tl.constexpr, SDTYPE: tl.constexpr, METHOD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    cprop_beta = tl.load(hyper + 5).to(SDTYPE)
    one_minus_cprop_beta = (1.0 - tl.load(hyper + 5)).to(SDTYPE)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(PDTYPE))
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(PDTYPE))
    snap_ptr = tl.load(snap_ptrs + t).to(tl.pointer_type(PDTYPE))
    cm_ptr = tl.load(cm_ptrs + t).to(tl.pointer_type(SDTYPE))
    cv_ptr = tl.load(cv_ptrs + t).to(tl.pointer_type(SDTYPE))
    tl.store(snap_ptr + offs, tl.load(p_ptr + offs, mask=mask), mask=mask)
    if tl.load(flag) != 0:
        return  # the snapshot is taken anyway: the pass after restores it
    raw = tl.load(g_ptr + offs, mask=mask, other=0.0).to(SDTYPE)
    if METHOD == 1:
        second = tl.abs(raw)
    else:
        second = raw * raw
    cm = tl.load(cm_ptr + offs, mask=mask, other=0.0) * cprop_beta + one_minus_cprop_beta * raw
    cv = tl.load(cv_ptr + offs, mask=mask, other=0.0) * cprop_beta + one_minus_cprop_beta * second
    tl.store(cm_ptr + offs, cm, mask=mask)
    tl.store(cv_ptr + offs, cv, mask=mask)


def wrapper_before(lists, flag, hyper, config) -> None:
    """Snapshot and CProp statistics before the base step (keys params, grads, snapshots,
    cprop_exp_avgs, cprop_seconds, steps); the step counts advance."""
    params = lists["params"]
    device = params[0].device
    index, start, numel_t = _block_table(tuple(p.numel() for p in params), device)
    keys = ("params", "grads", "snapshots", "cprop_exp_avgs", "cprop_seconds")
    if index.numel():
        dtype = params[0].dtype
        _wrap_before_kernel[(index.numel(),)](
            *[_pointer_table(lists[k], device) for k in keys], index, start, numel_t, flag,
            _hyper_row(hyper, device),
            PDTYPE=_TL_DTYPE[dtype], SDTYPE=_TL_DTYPE[_stats_dtype(dtype)],
            METHOD=config["SS_METHOD"], BLOCK=BLOCK,
        )
    _advance(lists["steps"], flag)


@triton.jit
def _wrap_after_kernel(
    p_ptrs, snap_ptrs, cm_ptrs, cv_ptrs, step_ptrs, block_tensor, block_start, numels, flag,
    hyper,
    PDTYPE: tl.constexpr, SDTYPE: tl.constexpr, METHOD: tl.constexpr, CDF: tl.constexpr,
    C_INF: tl.constexpr, C_ONE: tl.constexpr, EPS_ZERO: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(PDTYPE))
    snap_ptr = tl.load(snap_ptrs + t).to(tl.pointer_type(PDTYPE))
    old = tl.load(snap_ptr + offs, mask=mask, other=0.0)
    if tl.load(flag) != 0:
        tl.store(p_ptr + offs, old, mask=mask)  # skipped: the base may have written anything
        return
    # the step counts were advanced by the pass before
    step = _step_count(step_ptrs, t, 0.0)
    inv_cprop_bc, variance_scale, scaled_cprop_eps, first = _cprop_coefficients(step, hyper, METHOD)
    cprop_c = tl.load(hyper + 6).to(SDTYPE)
    cm_ptr = tl.load(cm_ptrs + t).to(tl.pointer_type(SDTYPE))
    cv_ptr = tl.load(cv_ptrs + t).to(tl.pointer_type(SDTYPE))
    cm = tl.load(cm_ptr + offs, mask=mask, other=0.0)
    cv = tl.load(cv_ptr + offs, mask=mask, other=0.0)
    s = _scale(cm, cv, inv_cprop_bc.to(SDTYPE), variance_scale.to(SDTYPE),
               scaled_cprop_eps.to(SDTYPE), first.to(SDTYPE), cprop_c,
               METHOD, CDF, C_INF, C_ONE, EPS_ZERO)
    old_s = old.to(SDTYPE)
    now = tl.load(p_ptr + offs, mask=mask, other=0.0).to(SDTYPE)
    diff = now - old_s
    out = tl.where(s < 0.5, old_s + s * diff, now - diff * (1.0 - s))  # torch.lerp
    tl.store(p_ptr + offs, _to_param(out, PDTYPE), mask=mask)


def wrapper_after(lists, flag, hyper, config) -> None:
    """After the base step: ``p <- lerp(snapshot, p, s)``, or ``snapshot`` on a skipped step
    (keys params, snapshots, cprop_exp_avgs, cprop_seconds, steps)."""
    params = lists["params"]
    device = params[0].device
    index, start, numel_t = _block_table(tuple(p.numel() for p in params), device)
    keys = ("params", "snapshots", "cprop_exp_avgs", "cprop_seconds")
    if index.numel():
        dtype = params[0].dtype
        _wrap_after_kernel[(index.numel(),)](
            *[_pointer_table(lists[k], device) for k in keys],
            _pointer_table(lists["steps"], device), index, start, numel_t, flag,
            _hyper_row(hyper, device),
            PDTYPE=_TL_DTYPE[dtype], SDTYPE=_TL_DTYPE[_stats_dtype(dtype)], BLOCK=BLOCK,
            **{k.removeprefix("SS_"): v for k, v in config.items() if k != "SS_PARAM"},
        )


# ---------------------------------------------------------------------------------------------
# 0-d scalars scattered over many tensors (step counts, multipliers), through pointer tables
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gather_kernel(ptrs, n, out, DTYPE: tl.constexpr, BLOCK_T: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = offs < n
    src = tl.load(ptrs + offs, mask=mask, other=0).to(tl.pointer_type(DTYPE))
    tl.store(out + offs, tl.load(src, mask=mask, other=0.0).to(tl.float64), mask=mask)


@triton.jit
def _scatter_kernel(ptrs, n, values, DTYPE: tl.constexpr, BLOCK_T: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = offs < n
    dst = tl.load(ptrs + offs, mask=mask, other=0).to(tl.pointer_type(DTYPE))
    tl.store(dst, tl.load(values + offs, mask=mask, other=0.0).to(DTYPE), mask=mask)


def _gather(scalars: Sequence[Tensor], device: torch.device) -> Tensor:
    """The values of 0-d tensors (one dtype) as a float64 vector, in one launch."""
    n = len(scalars)
    out = torch.empty(n, dtype=torch.float64, device=device)
    if n:
        _gather_kernel[(triton.cdiv(n, 1024),)](
            _pointer_table(scalars, device), n, out, DTYPE=_TL_DTYPE[scalars[0].dtype],
            BLOCK_T=1024,
        )
    return out


def _scatter(scalars: Sequence[Tensor], values: Tensor) -> None:
    """Write ``values[i]`` (float64) into the 0-d tensor ``scalars[i]``, in one launch."""
    n = len(scalars)
    if n:
        _scatter_kernel[(triton.cdiv(n, 1024),)](
            _pointer_table(scalars, values.device), n, values.contiguous(),
            DTYPE=_TL_DTYPE[scalars[0].dtype], BLOCK_T=1024,
        )


# ---------------------------------------------------------------------------------------------
# ALeRA and Ag-Adam (the scheme of cpu_kernels.c: two passes, vector math on the units between)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _alera_sums_kernel(
    p_ptrs, g_ptrs, r_ptrs, wd, block_tensor, block_start, numels, out, limit,
    PDTYPE: tl.constexpr, SDTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(PDTYPE))
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(PDTYPE))
    r_ptr = tl.load(r_ptrs + t).to(tl.pointer_type(SDTYPE))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(SDTYPE)
    d = g + tl.load(wd + t).to(SDTYPE) * tl.load(p_ptr + offs, mask=mask, other=0.0).to(SDTYPE)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0)
    bad = tl.max((~(tl.abs(g) <= limit) & mask).to(tl.float64), axis=0)
    tl.store(out + pid * 4 + 0, tl.sum(d * d, axis=0).to(tl.float64))
    tl.store(out + pid * 4 + 1, tl.sum(r * d, axis=0).to(tl.float64))
    tl.store(out + pid * 4 + 2, tl.sum(r * r, axis=0).to(tl.float64))
    tl.store(out + pid * 4 + 3, bad)


@triton.jit
def _alera_update_kernel(
    p_ptrs, g_ptrs, r_ptrs, me_ptrs, m1_ptrs, m2_ptrs, wd, scale, coef, inv_bc2_sqrt,
    block_tensor, block_start, numels, take, scalars,
    PDTYPE: tl.constexpr, SDTYPE: tl.constexpr, PARAM_WISE: tl.constexpr, ADAM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if tl.load(take) == 0:
        return
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    decay = tl.load(scalars + 0).to(SDTYPE)
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(PDTYPE))
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(PDTYPE))
    r_ptr = tl.load(r_ptrs + t).to(tl.pointer_type(SDTYPE))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(SDTYPE)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(SDTYPE)
    if ADAM:
        d = g
    else:
        d = g + tl.load(wd + t).to(SDTYPE) * p
    r = tl.load(r_ptr + offs, mask=mask, other=0.0) * decay + tl.load(scale + t).to(SDTYPE) * d
    tl.store(r_ptr + offs, r, mask=mask)
    k = tl.load(coef + t).to(SDTYPE)
    if PARAM_WISE:
        gain = tl.load(scalars + 1).to(SDTYPE)
        offset = tl.load(scalars + 2).to(SDTYPE)
        bound = tl.load(scalars + 3).to(SDTYPE)
        tiny = tl.load(scalars + 4).to(SDTYPE)
        top = tl.load(scalars + 5).to(SDTYPE)
        me_ptr = tl.load(me_ptrs + t).to(tl.pointer_type(SDTYPE))
        log_change = tl.minimum(tl.maximum(gain * r * r + offset, -bound), bound)
        m = tl.load(me_ptr + offs, mask=mask, other=1.0) * tl.exp(log_change)
        m = tl.minimum(tl.maximum(m, tiny), top)
        tl.store(me_ptr + offs, m, mask=mask)
        k = k * m
    if ADAM:
        beta1 = tl.load(scalars + 6).to(SDTYPE)
        beta2 = tl.load(scalars + 7).to(SDTYPE)
        eps = tl.load(scalars + 8).to(SDTYPE)
        m1_ptr = tl.load(m1_ptrs + t).to(tl.pointer_type(SDTYPE))
        m2_ptr = tl.load(m2_ptrs + t).to(tl.pointer_type(SDTYPE))
        m1 = tl.load(m1_ptr + offs, mask=mask, other=0.0) * beta1 + (1.0 - beta1) * g
        m2 = tl.load(m2_ptr + offs, mask=mask, other=0.0) * beta2 + (1.0 - beta2) * (g * g)
        tl.store(m1_ptr + offs, m1, mask=mask)
        tl.store(m2_ptr + offs, m2, mask=mask)
        ib = tl.load(inv_bc2_sqrt + t).to(SDTYPE)
        new = p + k * (m1 / (tl.sqrt(m2) * ib + eps))
    else:
        new = p + k * d
    tl.store(p_ptr + offs, _to_param(new, PDTYPE), mask=mask)


def _random_walk_mean(alpha: float, t: Tensor) -> Tensor:
    return alpha / (2.0 - alpha) * (1.0 - (1.0 - alpha) ** (2.0 * t))


def alera(
    lists: dict[str, Sequence[Tensor | None] | None],
    plan: dict,
    hyper: dict[str, float],
) -> None:
    """One ALeRA / Ag-Adam step; the arguments of :func:`steadystep._kernels.alera_` sorted
    into ``lists`` (params, grads, relaxed_paths, element_multipliers, exp_avgs, exp_avg_sqs,
    adam_steps), ``plan`` (the unit layout and the 0-d tensors to read and write) and
    ``hyper``."""
    params = lists["params"]
    device = params[0].device
    n = len(params)
    dtype = params[0].dtype
    sdtype = _stats_dtype(dtype)
    info = torch.finfo(sdtype)
    alpha, C = hyper["alpha"], hyper["C"]
    index, start, numel_t = _block_table(tuple(p.numel() for p in params), device)
    blocks = index.numel()
    # structural vectors: cached (they change only with the layout)
    key = (tuple(plan["tensor_unit"]), tuple(plan["tensor_weight_decay"]), tuple(plan["tensor_lr"]))
    tensor_unit, wd, lr = _cached(
        ("alera", device, key),
        lambda: (
            torch.tensor(plan["tensor_unit"], dtype=torch.int64).to(device),
            torch.tensor(plan["tensor_weight_decay"], dtype=torch.float64).to(device),
            torch.tensor(plan["tensor_lr"], dtype=torch.float64).to(device),
        ),
    )
    units = len(plan["unit_steps"])
    unit_numel = _cached(
        ("alera-numel", device, tuple(plan["unit_numels"])),
        lambda: torch.tensor(plan["unit_numels"], dtype=torch.float64).to(device),
    )
    partial = torch.empty(blocks, 4, dtype=torch.float64, device=device)
    tables = {k: _pointer_table(lists[k], device) for k in ("params", "grads", "relaxed_paths")}
    if blocks:
        _alera_sums_kernel[(blocks,)](
            tables["params"], tables["grads"], tables["relaxed_paths"], wd, index, start,
            numel_t, partial, hyper["limit"],
            PDTYPE=_TL_DTYPE[dtype], SDTYPE=_TL_DTYPE[sdtype], BLOCK=BLOCK,
        )
    sums = torch.zeros(n, 4, dtype=torch.float64, device=device).index_add_(0, index, partial)
    unit_dd = torch.zeros(units, dtype=torch.float64, device=device).index_add_(
        0, tensor_unit, sums[:, 0]
    )
    bad = (sums[:, 3] > 0).any() | ~(unit_dd <= info.max).all()
    skip = plan["skip"]
    masked = torch.zeros((), dtype=torch.bool, device=device) if skip is None else skip
    take = ~bad & ~masked
    skipped = plan["skipped"]
    skipped.add_((bad & ~masked).to(skipped.dtype))
    take64 = take.to(torch.float64)
    counters = plan["counters"]
    _scatter(counters, _gather(counters, device) + take64)

    decay = 1.0 - alpha
    norm = unit_dd.sqrt().to(sdtype)
    unit_scale = torch.where(norm > hyper["norm_eps"], alpha / norm, 0.0).to(torch.float64)
    scale_t = unit_scale[tensor_unit]
    sq_t = (decay * decay * sums[:, 2] + 2.0 * decay * scale_t * sums[:, 1]).add_(
        scale_t * scale_t * sums[:, 0]
    ).clamp_(min=0)
    unit_sq = torch.zeros(units, dtype=torch.float64, device=device).index_add_(
        0, tensor_unit, sq_t
    )
    bound = math.log(info.max) - 1.0
    param_wise = lists["element_multipliers"] is not None
    unit_steps = _gather(plan["unit_steps"], device)
    # every tensor's LR factor: its group multiplier ("tensor"/"param" granularity), else 1
    one = _cached(("one", device, sdtype), lambda: torch.ones((), dtype=sdtype, device=device))
    scale_lr = _gather([one if s is None else s for s in plan["tensor_lr_scale"]], device)
    coef = -lr * scale_lr
    if not param_wise:
        m_u = _gather(plan["unit_multipliers"], device)
        mean = _random_walk_mean(alpha, unit_steps)
        log_change = ((unit_sq - mean) * (C * unit_numel.sqrt() / alpha)).to(sdtype)
        factor = log_change.clamp(-bound, bound).exp()
        new_m = (m_u.to(sdtype) * factor).clamp(info.tiny, info.max).to(torch.float64)
        new_m = torch.where(take, new_m, m_u)
        _scatter(plan["unit_multipliers"], new_m)
        if plan["mirrors"]:
            _scatter(plan["mirrors"], new_m[:1].expand(len(plan["mirrors"])))
        coef = coef * new_m[tensor_unit]
    adam = lists["exp_avgs"] is not None
    inv_bc2_sqrt = coef  # unused without Adam
    if adam:
        adam_steps = lists["adam_steps"]
        steps = _gather(adam_steps, device)
        counted = {id(t) for t in counters}
        if not any(id(t) in counted for t in adam_steps):
            steps = steps + take64
            _scatter(adam_steps, steps)
        coef = coef / (1.0 - hyper["beta1"] ** steps)
        inv_bc2_sqrt = (1.0 - hyper["beta2"] ** steps).rsqrt()
    total = float(sum(plan["unit_numels"]))
    constants = (decay, C * total / alpha, bound, info.tiny, info.max, hyper["beta1"],
                 hyper["beta2"], hyper["eps"])
    row = _hyper_row(constants, device)
    offset = _random_walk_mean(alpha, unit_steps[:1]) * (-C / alpha) if param_wise else row[:1]
    # [decay, gain, offset, bound, tiny, max, beta1, beta2, eps]
    scalars = torch.cat([row[:2], offset, row[2:]])
    none = [None] * n
    if blocks:
        _alera_update_kernel[(blocks,)](
            tables["params"], tables["grads"], tables["relaxed_paths"],
            _pointer_table(lists["element_multipliers"] or none, device),
            _pointer_table(lists["exp_avgs"] or none, device),
            _pointer_table(lists["exp_avg_sqs"] or none, device),
            wd, scale_t, coef, inv_bc2_sqrt, index, start, numel_t, take, scalars,
            PDTYPE=_TL_DTYPE[dtype], SDTYPE=_TL_DTYPE[sdtype], PARAM_WISE=param_wise,
            ADAM=adam, BLOCK=BLOCK,
        )


@triton.jit
def _rollback_kernel(
    p_ptrs, snap_ptrs, block_tensor, block_start, numels, alarm, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(tl.int8))
    snap_ptr = tl.load(snap_ptrs + t).to(tl.pointer_type(tl.int8))
    if tl.load(alarm) != 0:
        tl.store(p_ptr + offs, tl.load(snap_ptr + offs, mask=mask), mask=mask)
    else:
        tl.store(snap_ptr + offs, tl.load(p_ptr + offs, mask=mask), mask=mask)


def rollback(params: Sequence[Tensor], snapshots: Sequence[Tensor], alarm: Tensor) -> None:
    """``p <- snapshot`` where ``alarm``, else ``snapshot <- p``, as bytes: one launch."""
    device = params[0].device
    sizes = tuple(p.numel() * p.element_size() for p in params)
    index, start, numel_t = _block_table(sizes, device)
    if index.numel():
        _rollback_kernel[(index.numel(),)](
            _pointer_table(params, device), _pointer_table(snapshots, device), index, start,
            numel_t, alarm, BLOCK=BLOCK,
        )
