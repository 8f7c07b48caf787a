"""The CProp wrapper's two passes around any base optimizer's step, in Triton (Note [Triton
kernels] in :mod:`._triton_common`): before it the snapshot ``p_old`` and CProp's statistics,
after it ``p <- lerp(p_old, p, s)``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from steadystep._kernels._triton_common import (
    TL_DTYPE,
    advance,
    block_start,
    hyper_row,
    launch,
    ld,
    pointer,
    pointer_tables,
    st,
    stats_dtype,
    to_param,
)
from steadystep._kernels._triton_cprop import coefficients, scale

__all__ = ["wrapper_after", "wrapper_before"]


def _static(config: dict[str, int]) -> dict[str, int]:
    return {k.removeprefix("SS_"): v for k, v in config.items() if k != "SS_PARAM"}


@triton.jit
def _wrap_before_body(
    p_ptr,
    g_ptr,
    snap_ptr,
    cm_ptr,
    cv_ptr,
    found_finite,
    hyper,
    offs,
    mask,
    PDTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    METHOD: tl.constexpr,
    EVEN: tl.constexpr,
):
    st(snap_ptr, offs, ld(p_ptr, offs, mask, EVEN), mask, EVEN)
    if tl.load(found_finite) != 0:  # else only the snapshot: the pass after restores it
        cprop_beta = tl.load(hyper + 5).to(SDTYPE)
        one_minus_cprop_beta = (1.0 - tl.load(hyper + 5)).to(SDTYPE)
        raw = ld(g_ptr, offs, mask, EVEN).to(SDTYPE)
        if METHOD == 1:
            second = tl.abs(raw)
        else:
            second = raw * raw
        cm = ld(cm_ptr, offs, mask, EVEN) * cprop_beta + one_minus_cprop_beta * raw
        cv = ld(cv_ptr, offs, mask, EVEN) * cprop_beta + one_minus_cprop_beta * second
        st(cm_ptr, offs, cm, mask, EVEN)
        st(cv_ptr, offs, cv, mask, EVEN)


@triton.jit
def _wrap_before_kernel(
    p_ptrs,
    g_ptrs,
    snap_ptrs,
    cm_ptrs,
    cv_ptrs,
    block_tensor,
    block_starts,
    numels,
    found_finite,
    hyper,
    PDTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    METHOD: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = block_start(block_starts, pid, BLOCK)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    p_ptr = pointer(p_ptrs, t, PDTYPE, ALIGNED)
    g_ptr = pointer(g_ptrs, t, PDTYPE, ALIGNED)
    snap_ptr = pointer(snap_ptrs, t, PDTYPE, ALIGNED)
    cm_ptr = pointer(cm_ptrs, t, SDTYPE, ALIGNED)
    cv_ptr = pointer(cv_ptrs, t, SDTYPE, ALIGNED)
    if start + BLOCK <= n:
        _wrap_before_body(
            p_ptr,
            g_ptr,
            snap_ptr,
            cm_ptr,
            cv_ptr,
            found_finite,
            hyper,
            offs,
            mask,
            PDTYPE,
            SDTYPE,
            METHOD,
            True,
        )
    else:
        _wrap_before_body(
            p_ptr,
            g_ptr,
            snap_ptr,
            cm_ptr,
            cv_ptr,
            found_finite,
            hyper,
            offs,
            mask,
            PDTYPE,
            SDTYPE,
            METHOD,
            False,
        )


def wrapper_before(lists, found_finite: Tensor, hyper, config) -> None:
    """Snapshot and CProp statistics before the base step (keys params, grads, snapshots,
    cprop_exp_avgs, cprop_seconds, steps); the step counts advance."""
    params = lists["params"]
    device = params[0].device
    keys = ("params", "grads", "snapshots", "cprop_exp_avgs", "cprop_seconds")
    dtype = params[0].dtype
    tables, aligned = pointer_tables([lists[k] for k in keys], device)
    launch(
        _wrap_before_kernel,
        tuple(p.numel() for p in params),
        device,
        *tables,
        found_finite=found_finite,
        hyper=hyper_row(hyper, device),
        aligned=aligned,
        PDTYPE=TL_DTYPE[dtype],
        SDTYPE=TL_DTYPE[stats_dtype(dtype)],
        METHOD=config["SS_METHOD"],
    )
    advance(lists["steps"], found_finite)


@triton.jit
def _wrap_after_body(
    p_ptr,
    snap_ptr,
    cm_ptr,
    cv_ptr,
    found_finite,
    row,
    hyper,
    offs,
    mask,
    PDTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    METHOD: tl.constexpr,
    CDF: tl.constexpr,
    C_INF: tl.constexpr,
    C_ONE: tl.constexpr,
    EPS_ZERO: tl.constexpr,
    EVEN: tl.constexpr,
):
    old = ld(snap_ptr, offs, mask, EVEN)
    if tl.load(found_finite) == 0:
        st(p_ptr, offs, old, mask, EVEN)  # skipped: the base may have written anything
    else:
        cprop_c = tl.load(hyper + 6).to(SDTYPE)
        cm = ld(cm_ptr, offs, mask, EVEN)
        cv = ld(cv_ptr, offs, mask, EVEN)
        s = scale(cm, cv, row, cprop_c, SDTYPE, METHOD, CDF, C_INF, C_ONE, EPS_ZERO)
        old_s = old.to(SDTYPE)
        now = ld(p_ptr, offs, mask, EVEN).to(SDTYPE)
        diff = now - old_s
        out = tl.where(s < 0.5, old_s + s * diff, now - diff * (1.0 - s))  # torch.lerp
        st(p_ptr, offs, to_param(out, PDTYPE), mask, EVEN)


@triton.jit
def _wrap_after_kernel(
    p_ptrs,
    snap_ptrs,
    cm_ptrs,
    cv_ptrs,
    coefs,
    block_tensor,
    block_starts,
    numels,
    found_finite,
    hyper,
    PDTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    METHOD: tl.constexpr,
    CDF: tl.constexpr,
    C_INF: tl.constexpr,
    C_ONE: tl.constexpr,
    EPS_ZERO: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = block_start(block_starts, pid, BLOCK)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    p_ptr = pointer(p_ptrs, t, PDTYPE, ALIGNED)
    snap_ptr = pointer(snap_ptrs, t, PDTYPE, ALIGNED)
    cm_ptr = pointer(cm_ptrs, t, SDTYPE, ALIGNED)
    cv_ptr = pointer(cv_ptrs, t, SDTYPE, ALIGNED)
    row = coefs + t * 8
    if start + BLOCK <= n:
        _wrap_after_body(
            p_ptr,
            snap_ptr,
            cm_ptr,
            cv_ptr,
            found_finite,
            row,
            hyper,
            offs,
            mask,
            PDTYPE,
            SDTYPE,
            METHOD,
            CDF,
            C_INF,
            C_ONE,
            EPS_ZERO,
            True,
        )
    else:
        _wrap_after_body(
            p_ptr,
            snap_ptr,
            cm_ptr,
            cv_ptr,
            found_finite,
            row,
            hyper,
            offs,
            mask,
            PDTYPE,
            SDTYPE,
            METHOD,
            CDF,
            C_INF,
            C_ONE,
            EPS_ZERO,
            False,
        )


def wrapper_after(lists, found_finite: Tensor, hyper, config) -> None:
    """After the base step: ``p <- lerp(snapshot, p, s)``, or ``snapshot`` on a skipped step
    (keys params, snapshots, cprop_exp_avgs, cprop_seconds, steps)."""
    params = lists["params"]
    device = params[0].device
    keys = ("params", "snapshots", "cprop_exp_avgs", "cprop_seconds")
    row = hyper_row(hyper, device)
    one = torch.ones((), dtype=torch.float64, device=device)
    # the step counts were advanced by the pass before
    coefs = coefficients(lists["steps"], row, one, config["SS_METHOD"], 0.0)
    dtype = params[0].dtype
    tables, aligned = pointer_tables([lists[k] for k in keys], device)
    launch(
        _wrap_after_kernel,
        tuple(p.numel() for p in params),
        device,
        *tables,
        coefs,
        found_finite=found_finite,
        hyper=row,
        aligned=aligned,
        PDTYPE=TL_DTYPE[dtype],
        SDTYPE=TL_DTYPE[stats_dtype(dtype)],
        **_static(config),
    )
