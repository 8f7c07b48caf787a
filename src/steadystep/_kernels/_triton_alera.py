"""ALeRA / Ag-Adam in Triton (Note [Triton kernels] in
:mod:`._triton_common`): two passes with the units' scalar math on the device between them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from steadystep._kernels._triton_common import (
    TL_DTYPE,
    all_aligned,
    block_table,
    cached,
    gather,
    hyper_row,
    launch_shape,
    ld,
    pointer,
    pointer_tables,
    program_block,
    scatter,
    st,
    to_device,
    to_param,
    whole_or_partial,
)
from steadystep._kernels.dtypes import stats_dtype

__all__ = ["alera"]

# The update pass's scalar row (float64), by name: the relaxed path's decay, the per-element
# log change's gain and offset ("param" granularity), its bound and the multipliers' range, and
# Ag-Adam's hyperparameters (the fields of ``alera_ctx`` in kernels_alera.c that pass 2 reads).
SCALAR_FIELDS = (
    "decay",
    "gain",
    "offset",
    "log_bound",
    "stats_tiny",
    "stats_max",
    "beta1",
    "beta2",
    "eps",
)
DECAY = tl.constexpr(SCALAR_FIELDS.index("decay"))
GAIN = tl.constexpr(SCALAR_FIELDS.index("gain"))
OFFSET = tl.constexpr(SCALAR_FIELDS.index("offset"))
LOG_BOUND = tl.constexpr(SCALAR_FIELDS.index("log_bound"))
STATS_TINY = tl.constexpr(SCALAR_FIELDS.index("stats_tiny"))
STATS_MAX = tl.constexpr(SCALAR_FIELDS.index("stats_max"))
BETA1 = tl.constexpr(SCALAR_FIELDS.index("beta1"))
BETA2 = tl.constexpr(SCALAR_FIELDS.index("beta2"))
EPS = tl.constexpr(SCALAR_FIELDS.index("eps"))


# ---------------------------------------------------------------------------------------------
# ALeRA and Ag-Adam (the scheme of kernels_alera.c: two passes, vector math on the units between)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _alera_sums_body(
    p_ptr,
    g_ptr,
    r_ptr,
    wd,
    out,
    limit,
    offs,
    mask,
    SDTYPE: tl.constexpr,
    EVEN: tl.constexpr,
):
    g = ld(g_ptr, offs, mask, EVEN).to(SDTYPE)
    d = g + wd * ld(p_ptr, offs, mask, EVEN).to(SDTYPE)
    r = ld(r_ptr, offs, mask, EVEN)
    bad = tl.max((~(tl.abs(g.to(tl.float64)) <= limit) & mask).to(tl.float64), axis=0)
    tl.store(out + 0, tl.sum(d * d, axis=0).to(tl.float64))
    tl.store(out + 1, tl.sum(r * d, axis=0).to(tl.float64))
    tl.store(out + 2, tl.sum(r * r, axis=0).to(tl.float64))
    tl.store(out + 3, bad)


@triton.jit
def _alera_sums_kernel(
    p_ptrs,
    g_ptrs,
    r_ptrs,
    wd,
    block_tensor,
    block_starts,
    numels,
    out,
    limit_ptr,
    PDTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, offs, mask, whole = program_block(block_tensor, block_starts, numels, BLOCK)
    g_ptr = pointer(g_ptrs, t, PDTYPE, ALIGNED)
    p_ptr = pointer(p_ptrs, t, PDTYPE, ALIGNED)
    r_ptr = pointer(r_ptrs, t, SDTYPE, ALIGNED)
    weight_decay = tl.load(wd + t).to(SDTYPE)
    limit = tl.load(limit_ptr)  # float64: 2**511 does not fit a float32 argument
    row = out + tl.program_id(0) * 4
    whole_or_partial(
        _alera_sums_body,
        (p_ptr, g_ptr, r_ptr, weight_decay, row, limit, offs, mask),
        (SDTYPE,),
        whole,
    )


@triton.jit
def _alera_update_body(
    p_ptr,
    g_ptr,
    r_ptr,
    me_ptr,
    m1_ptr,
    m2_ptr,
    weight_decay,
    unit_scale,
    k,
    ib,
    scalars,
    offs,
    mask,
    PDTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    PARAM_WISE: tl.constexpr,
    ADAM: tl.constexpr,
    EVEN: tl.constexpr,
):
    decay = tl.load(scalars + DECAY).to(SDTYPE)
    g = ld(g_ptr, offs, mask, EVEN).to(SDTYPE)
    p = ld(p_ptr, offs, mask, EVEN).to(SDTYPE)
    if ADAM:
        d = g
    else:
        d = g + weight_decay * p
    r = ld(r_ptr, offs, mask, EVEN) * decay + unit_scale * d
    st(r_ptr, offs, r, mask, EVEN)
    if PARAM_WISE:
        gain = tl.load(scalars + GAIN).to(SDTYPE)
        offset = tl.load(scalars + OFFSET).to(SDTYPE)
        bound = tl.load(scalars + LOG_BOUND).to(SDTYPE)
        tiny = tl.load(scalars + STATS_TINY).to(SDTYPE)
        top = tl.load(scalars + STATS_MAX).to(SDTYPE)
        log_change = tl.minimum(tl.maximum(gain * r * r + offset, -bound), bound)
        m = ld(me_ptr, offs, mask, EVEN) * tl.exp(log_change)
        m = tl.minimum(tl.maximum(m, tiny), top)
        st(me_ptr, offs, m, mask, EVEN)
        k = k * m
    if ADAM:
        beta1 = tl.load(scalars + BETA1).to(SDTYPE)
        beta2 = tl.load(scalars + BETA2).to(SDTYPE)
        eps = tl.load(scalars + EPS).to(SDTYPE)
        m1 = ld(m1_ptr, offs, mask, EVEN) * beta1 + (1.0 - beta1) * g
        m2 = ld(m2_ptr, offs, mask, EVEN) * beta2 + (1.0 - beta2) * (g * g)
        st(m1_ptr, offs, m1, mask, EVEN)
        st(m2_ptr, offs, m2, mask, EVEN)
        new = p + k * (m1 / (tl.sqrt(m2) * ib + eps))
    else:
        new = p + k * d
    st(p_ptr, offs, to_param(new, PDTYPE), mask, EVEN)


@triton.jit
def _alera_update_kernel(
    p_ptrs,
    g_ptrs,
    r_ptrs,
    me_ptrs,
    m1_ptrs,
    m2_ptrs,
    wd,
    scale,
    coef,
    inv_bc2_sqrt,
    block_tensor,
    block_starts,
    numels,
    take,
    scalars,
    PDTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    PARAM_WISE: tl.constexpr,
    ADAM: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if tl.load(take) == 0:
        return
    t, offs, mask, whole = program_block(block_tensor, block_starts, numels, BLOCK)
    p_ptr = pointer(p_ptrs, t, PDTYPE, ALIGNED)
    g_ptr = pointer(g_ptrs, t, PDTYPE, ALIGNED)
    r_ptr = pointer(r_ptrs, t, SDTYPE, ALIGNED)
    me_ptr = pointer(me_ptrs, t, SDTYPE, ALIGNED)
    m1_ptr = pointer(m1_ptrs, t, SDTYPE, ALIGNED)
    m2_ptr = pointer(m2_ptrs, t, SDTYPE, ALIGNED)
    weight_decay = tl.load(wd + t).to(SDTYPE)
    unit_scale = tl.load(scale + t).to(SDTYPE)
    k = tl.load(coef + t).to(SDTYPE)
    ib = tl.load(inv_bc2_sqrt + t).to(SDTYPE)
    whole_or_partial(
        _alera_update_body,
        (
            p_ptr,
            g_ptr,
            r_ptr,
            me_ptr,
            m1_ptr,
            m2_ptr,
            weight_decay,
            unit_scale,
            k,
            ib,
            scalars,
            offs,
            mask,
        ),
        (PDTYPE, SDTYPE, PARAM_WISE, ADAM),
        whole,
    )


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
    sdtype = stats_dtype(dtype)
    alpha, C = hyper["alpha"], hyper["C"]
    stats_max, stats_tiny = hyper["stats_max"], hyper["stats_tiny"]
    block, warps = launch_shape()
    index, start, numel_t = block_table(tuple(p.numel() for p in params), device, block)
    blocks = index.numel()
    # structural vectors: cached (they change only with the layout)
    key = (tuple(plan["tensor_unit"]), tuple(plan["tensor_weight_decay"]), tuple(plan["tensor_lr"]))
    tensor_unit, wd, lr = cached(
        ("alera", device, key),
        lambda: (
            to_device(plan["tensor_unit"], torch.int64, device),
            to_device(plan["tensor_weight_decay"], torch.float64, device),
            to_device(plan["tensor_lr"], torch.float64, device),
        ),
    )
    units = len(plan["unit_steps"])
    unit_numel = cached(
        ("alera-numel", device, tuple(plan["unit_numels"])),
        lambda: to_device(plan["unit_numels"], torch.float64, device),
    )
    partial = torch.empty(blocks, 4, dtype=torch.float64, device=device)
    none = [None] * n
    keys = ("params", "grads", "relaxed_paths", "element_multipliers", "exp_avgs", "exp_avg_sqs")
    found, aligned = pointer_tables([lists[k] or none for k in keys], device)
    aligned = aligned and all_aligned(lists["adam_steps"] or [])
    tables = dict(zip(keys, found, strict=True))
    if blocks:
        _alera_sums_kernel[(blocks,)](
            tables["params"],
            tables["grads"],
            tables["relaxed_paths"],
            wd,
            index,
            start,
            numel_t,
            partial,
            hyper_row((hyper["limit"],), device),
            PDTYPE=TL_DTYPE[dtype],
            SDTYPE=TL_DTYPE[sdtype],
            ALIGNED=aligned,
            BLOCK=block,
            num_warps=warps,
        )
    sums = torch.zeros(n, 4, dtype=torch.float64, device=device).index_add_(0, index, partial)
    unit_dd = torch.zeros(units, dtype=torch.float64, device=device).index_add_(
        0, tensor_unit, sums[:, 0]
    )
    bad = (sums[:, 3] > 0).any() | ~(unit_dd <= stats_max).all()
    if plan.get("found_finite") is not None:  # a decision made before (every rank's)
        bad = bad | ~plan["found_finite"]
    skip = plan["skip"]
    masked = torch.zeros((), dtype=torch.bool, device=device) if skip is None else skip
    take = ~bad & ~masked
    skipped = plan["skipped"]
    skipped.add_((bad & ~masked).to(skipped.dtype))
    take64 = take.to(torch.float64)
    counters = plan["counters"]
    scatter(counters, gather(counters, device) + take64)

    decay = 1.0 - alpha
    norm = unit_dd.sqrt().to(sdtype)
    unit_scale = torch.where(norm > hyper["norm_eps"], alpha / norm, 0.0).to(torch.float64)
    scale_t = unit_scale[tensor_unit]
    sq_t = (
        (decay * decay * sums[:, 2] + 2.0 * decay * scale_t * sums[:, 1])
        .add_(scale_t * scale_t * sums[:, 0])
        .clamp_(min=0)
    )
    unit_sq = torch.zeros(units, dtype=torch.float64, device=device).index_add_(
        0, tensor_unit, sq_t
    )
    bound = hyper["log_bound"]
    param_wise = bool(hyper["param_wise"])
    unit_steps = gather(plan["unit_steps"], device)
    # every tensor's LR factor: its group multiplier ("tensor"/"param" granularity), else 1
    one = cached(("one", device, sdtype), lambda: torch.ones((), dtype=sdtype, device=device))
    scale_lr = gather([one if s is None else s for s in plan["tensor_lr_scale"]], device)
    coef = -lr * scale_lr
    if not param_wise:
        m_u = gather(plan["unit_multipliers"], device)
        mean = _random_walk_mean(alpha, unit_steps)
        log_change = ((unit_sq - mean) * (C * unit_numel.sqrt() / alpha)).to(sdtype)
        factor = log_change.clamp(-bound, bound).exp()
        new_m = (m_u.to(sdtype) * factor).clamp(stats_tiny, stats_max).to(torch.float64)
        new_m = torch.where(take, new_m, m_u)
        scatter(plan["unit_multipliers"], new_m)
        if plan["mirrors"]:
            scatter(plan["mirrors"], new_m[:1].expand(len(plan["mirrors"])))
        coef = coef * new_m[tensor_unit]
    adam = bool(hyper["adam"])
    inv_bc2_sqrt = coef  # unused without Adam
    if adam:
        adam_steps = lists["adam_steps"]
        steps = gather(adam_steps, device)
        if hyper["advance_adam_steps"]:
            steps = steps + take64
            scatter(adam_steps, steps)
        coef = coef / (1.0 - hyper["beta1"] ** steps)
        inv_bc2_sqrt = (1.0 - hyper["beta2"] ** steps).rsqrt()
    values = dict(
        decay=decay,
        gain=C * hyper["total_numel"] / alpha,
        log_bound=bound,
        stats_tiny=stats_tiny,
        stats_max=stats_max,
        beta1=hyper["beta1"],
        beta2=hyper["beta2"],
        eps=hyper["eps"],
    )
    # the row of SCALAR_FIELDS: the offset is computed on the device, the rest cached
    row = hyper_row(tuple(values[name] for name in SCALAR_FIELDS if name != "offset"), device)
    offset = _random_walk_mean(alpha, unit_steps[:1]) * (-C / alpha) if param_wise else row[:1]
    at = SCALAR_FIELDS.index("offset")
    scalars = torch.cat([row[:at], offset, row[at:]])
    if blocks:
        _alera_update_kernel[(blocks,)](
            tables["params"],
            tables["grads"],
            tables["relaxed_paths"],
            tables["element_multipliers"],
            tables["exp_avgs"],
            tables["exp_avg_sqs"],
            wd,
            scale_t,
            coef,
            inv_bc2_sqrt,
            index,
            start,
            numel_t,
            take,
            scalars,
            PDTYPE=TL_DTYPE[dtype],
            SDTYPE=TL_DTYPE[sdtype],
            PARAM_WISE=param_wise,
            ADAM=adam,
            ALIGNED=aligned,
            BLOCK=block,
            num_warps=warps,
        )
