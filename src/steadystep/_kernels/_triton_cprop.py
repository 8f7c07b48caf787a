"""CProp's native steps (Adam/AdamW, SGD) and the wrapper's two passes in Triton (Note
[Triton kernels] in :mod:`._triton_common`).

Every step first writes a small table of per-tensor coefficients (bias corrections from each
tensor's own step count, in float64; one launch for all tensors), which the elementwise
kernel's programs then load: the transcendental float64 work is done once per tensor, not once
per block of elements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    pointer_table,
    program_block,
    st,
    static_config,
    to_param,
    whole_or_partial,
)
from steadystep._kernels.layout import column

__all__ = ["adam", "coefficients", "scale", "sgd"]

# Columns of the hyperparameter row, by name (Note [hyperparameter layout]); H_ keeps them
# apart from the kernels' constexpr switches (MOMENTUM is SS_MOMENTUM there)
H_LR = tl.constexpr(column("lr"))
H_BETA1 = tl.constexpr(column("beta1"))
H_BETA2 = tl.constexpr(column("beta2"))
H_EPS = tl.constexpr(column("eps"))
H_WEIGHT_DECAY = tl.constexpr(column("weight_decay"))
H_CPROP_BETA = tl.constexpr(column("cprop_beta"))
H_CPROP_C = tl.constexpr(column("cprop_c"))
H_CPROP_EPS = tl.constexpr(column("cprop_eps"))
H_CDF_CONSTANT = tl.constexpr(column("cdf_constant"))
H_MOMENTUM = tl.constexpr(column("momentum"))
H_DAMPENING = tl.constexpr(column("dampening"))

# The per-tensor coefficient table (float64), one row per tensor, the fields of ``coef_t`` in
# kernels_cprop.c that depend on the step count (and one spare column: rows of 8 doubles).
COEF_FIELDS = (
    "neg_step_size",  # -lr / (1 - beta1^t)
    "inv_bias_correction2_sqrt",  # 1 / sqrt(1 - beta2^t)
    "inv_cprop_bias_correction",  # 1 / (1 - cprop_beta^t)
    "variance_scale",
    "scaled_cprop_eps",
    "first",  # 1 at the first step
    "lr_weight_decay",
    "spare",
)
COLUMNS = tl.constexpr(len(COEF_FIELDS))
NEG_STEP_SIZE = tl.constexpr(COEF_FIELDS.index("neg_step_size"))
INV_BIAS_CORRECTION2_SQRT = tl.constexpr(COEF_FIELDS.index("inv_bias_correction2_sqrt"))
INV_CPROP_BIAS_CORRECTION = tl.constexpr(COEF_FIELDS.index("inv_cprop_bias_correction"))
VARIANCE_SCALE = tl.constexpr(COEF_FIELDS.index("variance_scale"))
SCALED_CPROP_EPS = tl.constexpr(COEF_FIELDS.index("scaled_cprop_eps"))
FIRST = tl.constexpr(COEF_FIELDS.index("first"))
LR_WEIGHT_DECAY = tl.constexpr(COEF_FIELDS.index("lr_weight_decay"))


@triton.jit
def _coef_kernel(
    step_ptrs, n, hyper, lr_scale_ptr, out, step_offset, METHOD: tl.constexpr, BLOCK_T: tl.constexpr
):
    """One row of coefficients per tensor from its step count plus ``step_offset`` (1 before
    this step's advance, 0 after it); see ``coefficients`` in ``kernels_cprop.c``."""
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = offs < n
    step_ptr = tl.load(step_ptrs + offs, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    raw = tl.load(step_ptr, mask=mask, other=0.0).to(tl.float64) + step_offset
    first = (raw == 1.0).to(tl.float64)
    step = tl.maximum(raw, 1.0)
    lr = tl.load(hyper + H_LR) * tl.load(lr_scale_ptr).to(tl.float64)
    beta1 = tl.load(hyper + H_BETA1)
    beta2 = tl.load(hyper + H_BETA2)
    cprop_beta = tl.load(hyper + H_CPROP_BETA)
    cprop_eps = tl.load(hyper + H_CPROP_EPS)
    constant = tl.load(hyper + H_CDF_CONSTANT)
    # beta**t as exp(t log beta); a beta of 0 (SGD's rows) gives 0 without a log of 0
    bias_correction1 = 1.0 - tl.exp(step * tl.log(tl.maximum(beta1, 1e-300)))
    bias_correction2 = 1.0 - tl.exp(step * tl.log(tl.maximum(beta2, 1e-300)))
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
    row = out + offs * COLUMNS
    tl.store(row + NEG_STEP_SIZE, -lr / bias_correction1, mask=mask)
    tl.store(row + INV_BIAS_CORRECTION2_SQRT, 1.0 / tl.sqrt(bias_correction2), mask=mask)
    tl.store(row + INV_CPROP_BIAS_CORRECTION, inv_cprop_bc, mask=mask)
    tl.store(row + VARIANCE_SCALE, variance_scale, mask=mask)
    tl.store(row + SCALED_CPROP_EPS, cprop_eps / ratio, mask=mask)
    tl.store(row + FIRST, first, mask=mask)
    tl.store(row + LR_WEIGHT_DECAY, lr * tl.load(hyper + H_WEIGHT_DECAY), mask=mask)


def coefficients(
    steps: Sequence[Tensor],
    hyper: Tensor,
    lr_scale: Tensor,
    method: int,
    step_offset: float,
) -> Tensor:
    n = len(steps)
    device = steps[0].device
    out = torch.empty(n, len(COEF_FIELDS), dtype=torch.float64, device=device)
    _coef_kernel[(triton.cdiv(n, 1024),)](
        pointer_table(steps, device),
        n,
        hyper,
        lr_scale,
        out,
        step_offset,
        METHOD=method,
        BLOCK_T=1024,
    )
    return out


@triton.jit
def _tanh_nonnegative(y):
    """tanh(y) for y >= 0 as (1 - e) / (1 + e), e = exp(-2y) in (0, 1]: no overflow."""
    e = tl.exp(-2.0 * y)
    return (1.0 - e) / (1.0 + e)


@triton.jit
def scale(
    cm,
    cv,
    row,
    cprop_c,
    SDTYPE: tl.constexpr,
    METHOD: tl.constexpr,
    CDF: tl.constexpr,
    C_INF: tl.constexpr,
    C_ONE: tl.constexpr,
    EPS_ZERO: tl.constexpr,
):
    """CProp's scale from the updated statistics and the tensor's coefficient row."""
    if C_INF:
        s = tl.full(cm.shape, 1.0, cm.dtype)
    else:
        inv_cprop_bc = tl.load(row + INV_CPROP_BIAS_CORRECTION).to(SDTYPE)
        variance_scale = tl.load(row + VARIANCE_SCALE).to(SDTYPE)
        if METHOD == 0:
            centred = cv - (cm * cm) * inv_cprop_bc
            se = tl.sqrt(tl.maximum(centred, 0.0) * variance_scale)
        elif METHOD == 1:
            se = cv * variance_scale
        else:
            se = tl.sqrt(cv * variance_scale)
        se = se + tl.load(row + SCALED_CPROP_EPS).to(SDTYPE)
        if EPS_ZERO:
            se = tl.maximum(se, 1.1754943508222875e-38)
        x = tl.abs(cm) / se
        if METHOD != 0:
            conf = x
        elif CDF == 0:
            conf = tl.erf(x)
        elif CDF == 1:
            conf = _tanh_nonnegative(x * (x * x * 0.03528 + 0.7988))
        else:
            conf = _tanh_nonnegative(x)
        if not C_ONE:
            conf = tl.minimum(conf * cprop_c, 1.0)
        s = tl.maximum(conf, tl.load(row + FIRST).to(SDTYPE))
    return s


@triton.jit
def _adam_body(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    vmax_ptr,
    cm_ptr,
    cv_ptr,
    row,
    hyper,
    offs,
    mask,
    PDTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr,
    L2: tl.constexpr,
    DECOUPLED: tl.constexpr,
    SHARED_V: tl.constexpr,
    METHOD: tl.constexpr,
    CDF: tl.constexpr,
    C_INF: tl.constexpr,
    C_ONE: tl.constexpr,
    EPS_ZERO: tl.constexpr,
    EVEN: tl.constexpr,
):
    beta1 = tl.load(hyper + H_BETA1).to(SDTYPE)
    beta2 = tl.load(hyper + H_BETA2).to(SDTYPE)
    eps = tl.load(hyper + H_EPS).to(SDTYPE)
    cprop_beta = tl.load(hyper + H_CPROP_BETA).to(SDTYPE)
    cprop_c = tl.load(hyper + H_CPROP_C).to(SDTYPE)
    one_minus_beta1 = (1.0 - tl.load(hyper + H_BETA1)).to(SDTYPE)
    one_minus_beta2 = (1.0 - tl.load(hyper + H_BETA2)).to(SDTYPE)
    one_minus_cprop_beta = (1.0 - tl.load(hyper + H_CPROP_BETA)).to(SDTYPE)
    raw = ld(g_ptr, offs, mask, EVEN).to(SDTYPE)
    p = ld(p_ptr, offs, mask, EVEN).to(SDTYPE)
    if L2:
        g = raw + tl.load(hyper + H_WEIGHT_DECAY).to(SDTYPE) * p
    else:
        g = raw
    m = ld(m_ptr, offs, mask, EVEN) * beta1 + one_minus_beta1 * g
    v = ld(v_ptr, offs, mask, EVEN) * beta2 + one_minus_beta2 * (g * g)
    if AMSGRAD:
        vmax = tl.maximum(ld(vmax_ptr, offs, mask, EVEN), v)
        st(vmax_ptr, offs, vmax, mask, EVEN)
    else:
        vmax = v
    denom = tl.sqrt(vmax) * tl.load(row + INV_BIAS_CORRECTION2_SQRT).to(SDTYPE) + eps
    update = tl.load(row + NEG_STEP_SIZE).to(SDTYPE) * m / denom
    if DECOUPLED:
        update = update - tl.load(row + LR_WEIGHT_DECAY).to(SDTYPE) * p
    cm = ld(cm_ptr, offs, mask, EVEN) * cprop_beta + one_minus_cprop_beta * raw
    if SHARED_V:
        cv = v
    else:
        if METHOD == 1:
            second = tl.abs(raw)
        else:
            second = raw * raw
        cv = ld(cv_ptr, offs, mask, EVEN) * cprop_beta + one_minus_cprop_beta * second
        st(cv_ptr, offs, cv, mask, EVEN)
    s = scale(cm, cv, row, cprop_c, SDTYPE, METHOD, CDF, C_INF, C_ONE, EPS_ZERO)
    st(p_ptr, offs, to_param(p + s * update, PDTYPE), mask, EVEN)
    st(m_ptr, offs, m, mask, EVEN)
    st(v_ptr, offs, v, mask, EVEN)
    st(cm_ptr, offs, cm, mask, EVEN)


@triton.jit
def _adam_kernel(
    p_ptrs,
    g_ptrs,
    m_ptrs,
    v_ptrs,
    vmax_ptrs,
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
    AMSGRAD: tl.constexpr,
    L2: tl.constexpr,
    DECOUPLED: tl.constexpr,
    SHARED_V: tl.constexpr,
    METHOD: tl.constexpr,
    CDF: tl.constexpr,
    C_INF: tl.constexpr,
    C_ONE: tl.constexpr,
    EPS_ZERO: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if tl.load(found_finite) == 0:
        return
    t, offs, mask, whole = program_block(block_tensor, block_starts, numels, BLOCK)
    p_ptr = pointer(p_ptrs, t, PDTYPE, ALIGNED)
    g_ptr = pointer(g_ptrs, t, PDTYPE, ALIGNED)
    m_ptr = pointer(m_ptrs, t, SDTYPE, ALIGNED)
    v_ptr = pointer(v_ptrs, t, SDTYPE, ALIGNED)
    vmax_ptr = pointer(vmax_ptrs, t, SDTYPE, ALIGNED)
    cm_ptr = pointer(cm_ptrs, t, SDTYPE, ALIGNED)
    cv_ptr = pointer(cv_ptrs, t, SDTYPE, ALIGNED)
    row = coefs + t * COLUMNS
    whole_or_partial(
        _adam_body,
        (p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, cm_ptr, cv_ptr, row, hyper, offs, mask),
        (PDTYPE, SDTYPE, AMSGRAD, L2, DECOUPLED, SHARED_V, METHOD, CDF, C_INF, C_ONE, EPS_ZERO),
        whole,
    )


def _native_step(
    kernel: Any,
    lists: dict[str, Sequence[Tensor | None] | None],
    found_finite: Tensor,
    hyper: tuple[float, ...],
    config: dict[str, int],
    lr_multiplier: Tensor,
) -> None:
    """A native CProp step: the coefficient table, the elementwise kernel, the step counts."""
    row = hyper_row(hyper, lists["params"][0].device)
    steps = lists["state_steps"]
    coefs = coefficients(steps, row, lr_multiplier, config["SS_METHOD"], 1.0)
    elementwise(kernel, lists, found_finite, row, coefs, **static_config(config))
    advance(steps, found_finite)


def adam(lists, found_finite, hyper, config, lr_multiplier) -> None:
    """Adam(W) + CProp over ``lists`` (the arrays of ``ss_adam`` in kernels_cprop.c, by name);
    a no-op unless ``found_finite``."""
    _native_step(_adam_kernel, lists, found_finite, hyper, config, lr_multiplier)


@triton.jit
def _sgd_body(
    p_ptr,
    g_ptr,
    buf_ptr,
    cm_ptr,
    cv_ptr,
    row,
    hyper,
    offs,
    mask,
    PDTYPE: tl.constexpr,
    SDTYPE: tl.constexpr,
    L2: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    METHOD: tl.constexpr,
    CDF: tl.constexpr,
    C_INF: tl.constexpr,
    C_ONE: tl.constexpr,
    EPS_ZERO: tl.constexpr,
    EVEN: tl.constexpr,
):
    cprop_beta = tl.load(hyper + H_CPROP_BETA).to(SDTYPE)
    cprop_c = tl.load(hyper + H_CPROP_C).to(SDTYPE)
    one_minus_cprop_beta = (1.0 - tl.load(hyper + H_CPROP_BETA)).to(SDTYPE)
    raw = ld(g_ptr, offs, mask, EVEN).to(SDTYPE)
    p = ld(p_ptr, offs, mask, EVEN).to(SDTYPE)
    if L2:
        d = raw + tl.load(hyper + H_WEIGHT_DECAY).to(SDTYPE) * p
    else:
        d = raw
    cm = ld(cm_ptr, offs, mask, EVEN) * cprop_beta + one_minus_cprop_beta * raw
    if METHOD == 1:
        second = tl.abs(raw)
    else:
        second = raw * raw
    cv = ld(cv_ptr, offs, mask, EVEN) * cprop_beta + one_minus_cprop_beta * second
    if MOMENTUM:
        # torch.optim.SGD starts the buffer at d on the first step
        momentum = tl.load(hyper + H_MOMENTUM)
        first = tl.load(row + FIRST) == 1.0
        momentum_a = tl.where(first, 0.0, momentum).to(SDTYPE)
        momentum_b = tl.where(first, 1.0, 1.0 - tl.load(hyper + H_DAMPENING)).to(SDTYPE)
        buf = ld(buf_ptr, offs, mask, EVEN) * momentum_a + momentum_b * d
        st(buf_ptr, offs, buf, mask, EVEN)
        if NESTEROV:
            d = d + momentum.to(SDTYPE) * buf
        else:
            d = buf
    s = scale(cm, cv, row, cprop_c, SDTYPE, METHOD, CDF, C_INF, C_ONE, EPS_ZERO)
    # the first column is -lr / (1 - 0**t) = -lr for SGD's rows
    neg_lr = tl.load(row + NEG_STEP_SIZE).to(SDTYPE)
    st(p_ptr, offs, to_param(p + s * (neg_lr * d), PDTYPE), mask, EVEN)
    st(cm_ptr, offs, cm, mask, EVEN)
    st(cv_ptr, offs, cv, mask, EVEN)


@triton.jit
def _sgd_kernel(
    p_ptrs,
    g_ptrs,
    buf_ptrs,
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
    L2: tl.constexpr,
    MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    METHOD: tl.constexpr,
    CDF: tl.constexpr,
    C_INF: tl.constexpr,
    C_ONE: tl.constexpr,
    EPS_ZERO: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if tl.load(found_finite) == 0:
        return
    t, offs, mask, whole = program_block(block_tensor, block_starts, numels, BLOCK)
    p_ptr = pointer(p_ptrs, t, PDTYPE, ALIGNED)
    g_ptr = pointer(g_ptrs, t, PDTYPE, ALIGNED)
    buf_ptr = pointer(buf_ptrs, t, SDTYPE, ALIGNED)
    cm_ptr = pointer(cm_ptrs, t, SDTYPE, ALIGNED)
    cv_ptr = pointer(cv_ptrs, t, SDTYPE, ALIGNED)
    row = coefs + t * COLUMNS
    whole_or_partial(
        _sgd_body,
        (p_ptr, g_ptr, buf_ptr, cm_ptr, cv_ptr, row, hyper, offs, mask),
        (PDTYPE, SDTYPE, L2, MOMENTUM, NESTEROV, METHOD, CDF, C_INF, C_ONE, EPS_ZERO),
        whole,
    )


def sgd(lists, found_finite, hyper, config, lr_multiplier) -> None:
    """SGD + CProp over ``lists`` (the arrays of ``ss_sgd``); as :func:`adam` otherwise."""
    _native_step(_sgd_kernel, lists, found_finite, hyper, config, lr_multiplier)
