"""The CProp wrapper's two passes around any base optimizer's step, in Triton (Note [Triton
kernels] in :mod:`._triton_common`): before it the snapshot ``p_old`` and CProp's statistics,
after it ``p <- lerp(p_old, p, s)``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from steadystep._kernels._triton_common import (
    advance,
    elementwise,
    hyper_row,
    ld,
    pointer,
    program_block,
    st,
    static_config,
    to_param,
    whole_or_partial,
)
from steadystep._kernels._triton_cprop import COLUMNS, H_CPROP_BETA, H_CPROP_C, coefficients, scale

__all__ = ["wrap_after", "wrap_before"]


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
        cprop_beta = tl.load(hyper + H_CPROP_BETA).to(SDTYPE)
        one_minus_cprop_beta = (1.0 - tl.load(hyper + H_CPROP_BETA)).to(SDTYPE)
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
    t, offs, mask, whole = program_block(block_tensor, block_starts, numels, BLOCK)
    p_ptr = pointer(p_ptrs, t, PDTYPE, ALIGNED)
    g_ptr = pointer(g_ptrs, t, PDTYPE, ALIGNED)
    snap_ptr = pointer(snap_ptrs, t, PDTYPE, ALIGNED)
    cm_ptr = pointer(cm_ptrs, t, SDTYPE, ALIGNED)
    cv_ptr = pointer(cv_ptrs, t, SDTYPE, ALIGNED)
    whole_or_partial(
        _wrap_before_body,
        (p_ptr, g_ptr, snap_ptr, cm_ptr, cv_ptr, found_finite, hyper, offs, mask),
        (PDTYPE, SDTYPE, METHOD),
        whole,
    )


def wrap_before(lists, found_finite: Tensor, hyper, config, lr_multiplier=None) -> None:
    """Snapshot and CProp statistics before the base step (``lists``: the arrays of
    ``ss_wrap_before`` in kernels_cprop.c, by name); the step counts advance."""
    row = hyper_row(hyper, lists["params"][0].device)
    elementwise(_wrap_before_kernel, lists, found_finite, row, METHOD=config["SS_METHOD"])
    advance(lists["state_steps"], found_finite)


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
        cprop_c = tl.load(hyper + H_CPROP_C).to(SDTYPE)
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
    t, offs, mask, whole = program_block(block_tensor, block_starts, numels, BLOCK)
    p_ptr = pointer(p_ptrs, t, PDTYPE, ALIGNED)
    snap_ptr = pointer(snap_ptrs, t, PDTYPE, ALIGNED)
    cm_ptr = pointer(cm_ptrs, t, SDTYPE, ALIGNED)
    cv_ptr = pointer(cv_ptrs, t, SDTYPE, ALIGNED)
    row = coefs + t * COLUMNS
    whole_or_partial(
        _wrap_after_body,
        (p_ptr, snap_ptr, cm_ptr, cv_ptr, found_finite, row, hyper, offs, mask),
        (PDTYPE, SDTYPE, METHOD, CDF, C_INF, C_ONE, EPS_ZERO),
        whole,
    )


def wrap_after(lists, found_finite: Tensor, hyper, config, lr_multiplier=None) -> None:
    """After the base step: ``p <- lerp(snapshot, p, s)``, or ``snapshot`` on a skipped step
    (``lists``: the arrays of ``ss_wrap_after``)."""
    device = lists["params"][0].device
    row = hyper_row(hyper, device)
    one = torch.ones((), dtype=torch.float64, device=device)
    # the step counts were advanced by the pass before
    coefs = coefficients(lists["state_steps"], row, one, config["SS_METHOD"], 0.0)
    elementwise(_wrap_after_kernel, lists, found_finite, row, coefs, **static_config(config))
