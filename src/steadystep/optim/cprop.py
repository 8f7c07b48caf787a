"""CProp: scale any optimizer's update by the confidence that past gradients agree in sign.

Preechakul & Kijsirikul, "CProp: Adaptive Learning Rate Scaling from Past Gradient Conformity"
(2019), Algorithm 1, with the decisions recorded in DESIGN.md. For every element, with ``t`` the
element's step count, ``g`` the raw gradient ``p.grad`` (before any weight decay), ``beta`` the
CProp horizon, ``c`` the overconfidence coefficient and ``eps`` the floor:

.. math::

    m_t &= \\beta m_{t-1} + (1-\\beta) g_t, \\qquad v_t = \\beta v_{t-1} + (1-\\beta) g_t^2 \\\\
    \\hat m_t &= m_t / (1-\\beta^t), \\qquad \\hat v_t = v_t / (1-\\beta^t), \\qquad
        n_t = (1-\\beta^t) / (1-\\beta) \\\\
    se_t &= \\sqrt{\\max(\\hat v_t - \\hat m_t^2, 0) / (n_t - 1 + \\epsilon)} + \\epsilon \\\\
    s_t &= \\min\\bigl(1,\\ 2c\\,\\lvert\\Phi(0;\\hat m_t, se_t) - \\tfrac12\\rvert\\bigr),
        \\qquad s_1 = 1 \\\\
    \\theta_t &= \\theta_{t-1} + s_t \\odot (\\theta^{\\text{base}}_t - \\theta_{t-1})

where :math:`\\theta^{\\text{base}}_t` is what the base optimizer would have written. The scale
is computed in the equivalent form ``s = min(1, c * F(|m_hat| / se))`` with
``F(x) = 2 |Phi(0; m, se) - 1/2|`` written as ``erf(x / sqrt(2))`` (``cdf="normal"``) or as a
``tanh`` (the logistic approximations ``"bfo"``, ``"bft"``, ``"logistic"``), which avoids the
cancellation of ``Phi - 0.5`` and cannot overflow. The paper's section 2.4 alternatives use the
same EMAs: ``method="relative"``: ``s = min(1, c |m_hat| / (a_hat + eps))`` with ``a`` the EMA of
``|g|``; ``method="moment"``: ``s = min(1, c |m_hat| / (sqrt(v_hat) + eps))``.

Symbols map to arguments as ``beta -> beta`` (``cprop_beta`` in the native classes),
``c -> c`` (``cprop_c``), ``eps -> eps`` (``cprop_eps``).

Public objects:

* :class:`CProp` wraps any ``torch.optim.Optimizer``.
* :class:`CPropSGD`, :class:`CPropAdam`, :class:`CPropAdamW` are fast native paths with the same
  numbers as ``CProp(torch.optim.SGD/Adam/AdamW(...))``.
* :func:`cprop_update_`, :func:`cprop_scales`, :func:`cprop_sgd`, :func:`cprop_adam` are the
  functional cores (tensor lists positional, hyperparameters keyword-only).

Note [Dead elements]
    An element whose gradient has always been exactly 0 (a dead ReLU unit, an unused embedding
    row) has ``m = v = 0``, so ``se = eps``, ``Phi = 1/2`` and ``s = 0`` from ``t = 2`` on: its
    whole update is suppressed, decoupled weight decay included. This is the formula, kept on
    purpose; ``c = inf`` turns the scaling off entirely.

Note [Skipping a non-finite step without a host sync]
    One 0-d boolean ``found_finite`` (all gradients finite) is computed on the device per step.
    The update is then written so that ``found_finite = False`` is an exact no-op: the gradient
    is replaced by 0 (``torch.where``), EMA decays become 1 and EMA weights 0 (``beta_eff``,
    ``weight``), the step count adds 0, and the scale is multiplied by 0. ``x * 1 + 0 * 0`` and
    ``m + 0 * (0 - m)`` return their input exactly, so every statistic stays as it was and the
    next clean step equals a run without the bad batch. Bias corrections use ``max(t, 1)`` so a
    skipped first step never divides 0 by 0.

Note [FSDP2]
    Under ``torch.distributed.fsdp.fully_shard`` parameters, gradients and the statistics created
    ``zeros_like`` them are DTensors. CProp is elementwise, so the classes hand the functional
    cores this rank's shards (``local_tensor``: aliases, in-place ops write the DTensors); step
    counts stay plain 0-d tensors. Only two things need the other ranks: ``found_finite`` (a NaN
    in one rank's shard must make every rank skip, or the shards of one parameter would drift
    apart: one all-reduce of a 0-d flag per step, see :func:`grads_finite`) and ``stats()``
    (the shards' sums, one all-reduce per call).
"""

from __future__ import annotations

import math
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from steadystep._distributed import all_reduce_sum
from steadystep._validation import (
    check_choice,
    check_finite,
    check_nonnegative,
    check_param_tensors,
    check_positive,
    check_unit_interval,
)
from steadystep.optim.alera import local_tensor

__all__ = [
    "CDFS",
    "METHODS",
    "CProp",
    "CPropAdam",
    "CPropAdamW",
    "CPropSGD",
    "cprop_adam",
    "cprop_scales",
    "cprop_sgd",
    "cprop_update_",
    "erf_float32",
    "grads_finite",
]

CDFS = ("normal", "bft", "bfo", "logistic")
METHODS = ("conformity", "relative", "moment")

# F(x) = 2 |Phi(0; m, se) - 1/2| with x = |m| / se. For a logistic CDF 1 / (1 + exp(-k z)),
# 2 |cdf - 1/2| = tanh(k |z| / 2), so the approximations become one tanh each.
_SQRT1_2 = 1.0 / math.sqrt(2.0)
_BFO_HALF_K = 1.702 / 2.0  # Bowling et al. (2009) one-term fit, halved for tanh
_BFT_HALF_K1, _BFT_HALF_K3 = 1.5976 / 2.0, 0.07056 / 2.0  # the two-term fit
_LOGISTIC_HALF_K = math.pi / math.sqrt(3.0) / 2.0  # logistic with the normal's variance

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _stats_dtype(param: Tensor) -> torch.dtype:
    """Statistics of bf16/fp16 parameters are kept in fp32; others in the parameter's dtype."""
    return torch.float32 if param.dtype in _LOW_PRECISION else param.dtype


def _check_hyper(beta: float, c: float, eps: float, cdf: str, method: str, prefix: str) -> None:
    check_unit_interval(f"{prefix}beta", beta)
    check_positive(f"{prefix}c", c, allow_inf=True)
    check_nonnegative(f"{prefix}eps", eps)
    check_choice("cdf", cdf, CDFS)
    check_choice("method", method, METHODS)


def _check_grad(grad: Tensor, owner: str, group_index: int, param_index: int, shape) -> None:
    where = f"parameter {param_index} of param group {group_index} (shape {tuple(shape)})"
    if grad.layout != torch.strided:
        raise RuntimeError(
            f"{owner} does not support sparse gradients ({where}); use torch.optim.SparseAdam "
            "for those parameters, or a dense gradient (e.g. nn.Embedding(sparse=False))"
        )
    if grad.is_complex():
        raise RuntimeError(
            f"{owner} does not support complex gradients ({where}); optimize the real view "
            "of the parameter instead (torch.view_as_real)"
        )


def grads_finite(grads: list[Tensor]) -> Tensor:
    """0-d bool tensor: every element of every gradient is finite (no host sync).

    The sum of a tensor is finite exactly when all its elements are (``inf - inf`` is NaN), up
    to an overflow of the sum itself, which would need gradients near ``1e38 / numel``.
    Low-precision gradients are summed in fp32 so that a large fp16 sum does not overflow.

    DTensor gradients (FSDP2) are read on this rank's shards and the flag is combined over
    ranks in one all-reduce of a 0-d tensor, so every rank decides alike (Note [FSDP2]).
    """
    if not grads:
        return torch.ones((), dtype=torch.bool)
    shards = [local_tensor(g) for g in grads]
    sums = [
        g.sum(dtype=torch.float32) if g.dtype in _LOW_PRECISION else g.sum().to(torch.float64)
        for g in shards
    ]
    ok = torch.stack(sums).sum().isfinite() if len(sums) > 1 else sums[0].isfinite()
    if any(s is not g for s, g in zip(shards, grads, strict=True)):  # some were DTensors
        ok = all_reduce_sum((~ok).to(torch.float32)) == 0
    return ok


# --------------------------------------------------------------------------------------------
# Scalars of one step (0-d tensors on the device)
# --------------------------------------------------------------------------------------------


class _Gates(NamedTuple):
    """Per-step 0-d factors that turn a non-finite step into an exact no-op (one per dtype)."""

    keep: Tensor  # 1 if found_finite else 0
    cprop_beta: Tensor  # beta if found_finite else 1: decay of CProp's EMAs
    cprop_weight: Tensor  # 1 - beta if found_finite else 0: weight of g in CProp's EMAs


def _gate(found_finite: Tensor, if_ok: float, if_skip: float, dtype: torch.dtype) -> Tensor:
    ok = torch.full((), if_ok, dtype=dtype, device=found_finite.device)
    skip = torch.full((), if_skip, dtype=dtype, device=found_finite.device)
    return torch.where(found_finite, ok, skip)


def _gates(found_finite: Tensor, beta: float, dtype: torch.dtype) -> _Gates:
    return _Gates(
        keep=found_finite.to(dtype),
        cprop_beta=_gate(found_finite, beta, 1.0, dtype),
        cprop_weight=_gate(found_finite, 1.0 - beta, 0.0, dtype),
    )


def _step_time(step: Tensor, dtype: torch.dtype) -> Tensor:
    """``max(t, 1)`` in the statistics' dtype (``step`` is a 0-d float32 count)."""
    return step.clamp(min=1).to(dtype)


# --------------------------------------------------------------------------------------------
# CProp statistics and scale: reference (one tensor at a time) and foreach
# --------------------------------------------------------------------------------------------


def _confidence_(x: Tensor, cdf: str) -> Tensor:
    """``2 |Phi(0; m, se) - 1/2|`` from ``x = |m| / se >= 0``, in place on ``x``."""
    if cdf == "normal":
        return x.mul_(_SQRT1_2).erf_()
    if cdf == "bfo":
        return x.mul_(_BFO_HALF_K).tanh_()
    if cdf == "bft":
        # tanh(x * (k3 x^2 + k1)); x = inf gives tanh(inf) = 1, never NaN
        return x.mul_((x * x).mul_(_BFT_HALF_K3).add_(_BFT_HALF_K1)).tanh_()
    return x.mul_(_LOGISTIC_HALF_K).tanh_()


def _confidence_foreach_(xs: list[Tensor], cdf: str) -> list[Tensor]:
    if cdf == "normal":
        torch._foreach_mul_(xs, _SQRT1_2)
        torch._foreach_erf_(xs)
    elif cdf == "bfo":
        torch._foreach_mul_(xs, _BFO_HALF_K)
        torch._foreach_tanh_(xs)
    elif cdf == "bft":
        poly = torch._foreach_mul(xs, xs)
        torch._foreach_mul_(poly, _BFT_HALF_K3)
        torch._foreach_add_(poly, _BFT_HALF_K1)
        torch._foreach_mul_(xs, poly)
        torch._foreach_tanh_(xs)
    else:
        torch._foreach_mul_(xs, _LOGISTIC_HALF_K)
        torch._foreach_tanh_(xs)
    return xs


def _scale_one(
    exp_avg: Tensor,
    second: Tensor,
    step: Tensor,
    keep: Tensor,
    *,
    beta: float,
    c: float,
    eps: float,
    cdf: str,
    method: str,
) -> Tensor:
    """The scale ``s`` of one tensor from its updated statistics (a new tensor)."""
    t = _step_time(step, exp_avg.dtype)
    # first = 1 at the (clean) first step: s_1 = 1 exactly, since n_1 - 1 = 0 would turn float
    # noise in v_hat - m_hat^2 into an arbitrary se
    first = (step == 1).to(exp_avg.dtype)
    if math.isinf(c):
        return torch.ones_like(exp_avg).mul_(keep)
    bias_correction = 1 - beta**t
    m_hat = exp_avg / bias_correction
    if method == "conformity":
        v_hat = second / bias_correction
        n = bias_correction / (1 - beta)
        # in place from here on: on CPU every fresh full-size tensor costs page faults
        denom = v_hat.addcmul_(m_hat, m_hat, value=-1).clamp_(min=0)
        denom.div_(n - 1 + eps).sqrt_().add_(eps)
    elif method == "relative":
        denom = (second / bias_correction).add_(eps)
    else:
        denom = (second / bias_correction).sqrt_().add_(eps)
    if eps == 0:
        # with eps = 0 a dead element gives 0 / 0; the smallest normal makes it 0 / tiny = 0
        denom.clamp_(min=torch.finfo(denom.dtype).tiny)
    ratio = m_hat.abs_().div_(denom)
    conf = _confidence_(ratio, cdf) if method == "conformity" else ratio
    if c != 1:  # multiplying by 1 is exact: skip the pass
        conf.mul_(c)
    return conf.clamp_(max=1).clamp_(min=first).mul_(keep)


def _scale_foreach(
    exp_avgs: list[Tensor],
    seconds: list[Tensor],
    steps: list[Tensor],
    keep: Tensor,
    *,
    beta: float,
    c: float,
    eps: float,
    cdf: str,
    method: str,
) -> list[Tensor]:
    """:func:`_scale_one` over lists with ``torch._foreach_*`` ops (bitwise the same on CPU)."""
    dtype = exp_avgs[0].dtype
    ts = [_step_time(step, dtype) for step in steps]
    firsts = [(step == 1).to(dtype) for step in steps]
    if math.isinf(c):
        ones = [torch.ones_like(m) for m in exp_avgs]
        torch._foreach_mul_(ones, keep)
        return ones
    bias_corrections = torch._foreach_pow(beta, ts)
    torch._foreach_neg_(bias_corrections)
    torch._foreach_add_(bias_corrections, 1)
    m_hats = torch._foreach_div(exp_avgs, bias_corrections)
    if method == "conformity":
        v_hats = torch._foreach_div(seconds, bias_corrections)
        ns = torch._foreach_div(bias_corrections, 1 - beta)
        torch._foreach_sub_(ns, 1)
        torch._foreach_add_(ns, eps)
        denoms = v_hats
        torch._foreach_addcmul_(denoms, m_hats, m_hats, value=-1)
        torch._foreach_clamp_min_(denoms, 0)
        torch._foreach_div_(denoms, ns)
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
    elif method == "relative":
        denoms = torch._foreach_div(seconds, bias_corrections)
        torch._foreach_add_(denoms, eps)
    else:
        denoms = torch._foreach_div(seconds, bias_corrections)
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, eps)
    if eps == 0:
        torch._foreach_clamp_min_(denoms, torch.finfo(dtype).tiny)
    torch._foreach_abs_(m_hats)
    torch._foreach_div_(m_hats, denoms)
    confs = _confidence_foreach_(m_hats, cdf) if method == "conformity" else m_hats
    if c != 1:
        torch._foreach_mul_(confs, c)
    torch._foreach_clamp_max_(confs, 1)
    torch._foreach_clamp_min_(confs, firsts)
    torch._foreach_mul_(confs, keep)
    return confs


def _update_stats_one(
    exp_avg: Tensor, second: Tensor | None, raw: Tensor, gates: _Gates, *, beta: float, method: str
) -> None:
    """CProp's EMAs from the (sanitised) raw gradient; ``second=None`` when shared with Adam."""
    exp_avg.lerp_(raw, gates.cprop_weight)
    if second is None:
        return
    if method == "relative":
        second.mul_(gates.cprop_beta).add_(raw.abs(), alpha=1 - beta)
    else:
        second.mul_(gates.cprop_beta).addcmul_(raw, raw, value=1 - beta)


def _update_stats_foreach(
    exp_avgs: list[Tensor],
    seconds: list[Tensor] | None,
    raws: list[Tensor],
    gates: _Gates,
    *,
    beta: float,
    method: str,
) -> None:
    torch._foreach_lerp_(exp_avgs, raws, gates.cprop_weight)
    if seconds is None:
        return
    torch._foreach_mul_(seconds, gates.cprop_beta)
    if method == "relative":
        torch._foreach_add_(seconds, torch._foreach_abs(raws), alpha=1 - beta)
    else:
        torch._foreach_addcmul_(seconds, raws, raws, value=1 - beta)


def _sanitised(grad: Tensor, found_finite: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh copy of ``grad`` in ``dtype``, all zeros when the step is skipped."""
    return torch.where(found_finite, grad, 0).to(dtype)


def cprop_update_(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    seconds: list[Tensor],
    state_steps: list[Tensor],
    *,
    found_finite: Tensor,
    beta: float,
    method: str,
    foreach: bool = False,
) -> None:
    """Update CProp's statistics in place from raw gradients (``grads`` are never written).

    Args:
        grads: raw gradients ``g``.
        exp_avgs: ``m`` (EMA of ``g``), in the statistics dtype.
        seconds: ``v`` (EMA of ``g**2``), or the EMA of ``|g|`` for ``method="relative"``.
        state_steps: 0-d float32 step counts ``t``; they advance by 1 (by 0 when skipped).
        found_finite: 0-d bool; False turns the whole update into a no-op.
        beta: EMA horizon. method: ``"conformity"``, ``"relative"`` or ``"moment"``.
        foreach: use ``torch._foreach_*`` ops (same numbers on CPU).
    """
    for (device, dtype), idx in _group_by_dtype(exp_avgs).items():
        ok = found_finite.to(device)
        gates = _gates(ok, beta, dtype)
        keep32 = gates.keep.to(torch.float32)
        raws = [_sanitised(grads[i], ok, dtype) for i in idx]
        if foreach:
            torch._foreach_add_([state_steps[i] for i in idx], keep32)
            _update_stats_foreach(
                [exp_avgs[i] for i in idx],
                [seconds[i] for i in idx],
                raws,
                gates,
                beta=beta,
                method=method,
            )
            continue
        for i, raw in zip(idx, raws, strict=True):
            state_steps[i].add_(keep32)
            _update_stats_one(exp_avgs[i], seconds[i], raw, gates, beta=beta, method=method)


def cprop_scales(
    exp_avgs: list[Tensor],
    seconds: list[Tensor],
    state_steps: list[Tensor],
    *,
    found_finite: Tensor,
    beta: float,
    c: float,
    eps: float,
    cdf: str,
    method: str,
    foreach: bool = False,
) -> list[Tensor]:
    """The per-element scales ``s`` (new tensors, in the statistics dtype) from updated stats.

    ``s`` is 0 everywhere when ``found_finite`` is False, and 1 at ``t = 1`` or for ``c = inf``.
    """
    kw = {"beta": beta, "c": c, "eps": eps, "cdf": cdf, "method": method}
    out: list[Tensor] = [exp_avgs[0]] * len(exp_avgs)
    for (device, dtype), idx in _group_by_dtype(exp_avgs).items():
        keep = found_finite.to(device=device, dtype=dtype)
        if foreach:
            scales = _scale_foreach(
                [exp_avgs[i] for i in idx],
                [seconds[i] for i in idx],
                [state_steps[i] for i in idx],
                keep,
                **kw,
            )
        else:
            scales = [_scale_one(exp_avgs[i], seconds[i], state_steps[i], keep, **kw) for i in idx]
        for i, s in zip(idx, scales, strict=True):
            out[i] = s
    return out


def _group_by_dtype(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in order."""
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype), []).append(i)
    return out


# --------------------------------------------------------------------------------------------
# Native SGD + CProp
# --------------------------------------------------------------------------------------------


def _first_step(step: Tensor, found_finite: Tensor) -> Tensor:
    """0-d bool: this is the element's first clean step (``t`` was just advanced to 1)."""
    return (step == 1) & found_finite


def _sgd_direction_one(
    grad: Tensor,
    buf: Tensor | None,
    step: Tensor,
    found_finite: Tensor,
    momentum_gate: Tensor,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
) -> Tensor:
    """torch.optim.SGD's update ``-lr * d`` (a new tensor); ``buf`` updated in place."""
    if buf is not None:
        # torch.optim.SGD starts the buffer at g (no dampening) on the first step:
        # buf <- a * buf + b * g with (a, b) = (0, 1) then, (momentum, 1 - dampening) after,
        # and (1, any) on a skipped step (g = 0 there)
        first = _first_step(step, found_finite)
        a = torch.where(first, torch.zeros_like(momentum_gate), momentum_gate)
        b = torch.where(first, torch.ones_like(momentum_gate), 1 - dampening)
        buf.mul_(a).addcmul_(grad, b)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    return grad.mul(-lr)


def _single_tensor_cprop_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    cprop_exp_avgs: list[Tensor],
    cprop_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    found_finite: Tensor,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> None:
    gates_by_dtype: dict[Any, tuple[_Gates, Tensor]] = {}
    for i, param in enumerate(params):
        m = cprop_exp_avgs[i]
        dtype = m.dtype
        if dtype not in gates_by_dtype:
            gates_by_dtype[dtype] = (
                _gates(found_finite, cprop_beta, dtype),
                _gate(found_finite, momentum, 1.0, dtype),
            )
        gates, momentum_gate = gates_by_dtype[dtype]
        step = state_steps[i]
        step.add_(gates.keep.to(torch.float32))
        p = param if param.dtype == dtype else param.to(dtype)
        raw = _sanitised(grads[i], found_finite, dtype)
        grad = raw if weight_decay == 0 else raw.add(p, alpha=weight_decay).mul_(gates.keep)
        _update_stats_one(m, cprop_exp_avg_sqs[i], raw, gates, beta=cprop_beta, method=method)
        update = _sgd_direction_one(
            grad,
            momentum_buffers[i],
            step,
            found_finite,
            momentum_gate,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
        )
        s = _scale_one(
            m,
            cprop_exp_avg_sqs[i],
            step,
            gates.keep,
            beta=cprop_beta,
            c=cprop_c,
            eps=cprop_eps,
            cdf=cdf,
            method=method,
        )
        param.addcmul_(s, update)


def _multi_tensor_cprop_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    cprop_exp_avgs: list[Tensor],
    cprop_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    found_finite: Tensor,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> None:
    for (_, dtype), idx in _group_by_dtype(cprop_exp_avgs).items():
        ps = [params[i] for i in idx]
        ms = [cprop_exp_avgs[i] for i in idx]
        vs = [cprop_exp_avg_sqs[i] for i in idx]
        steps = [state_steps[i] for i in idx]
        gates = _gates(found_finite, cprop_beta, dtype)
        torch._foreach_add_(steps, gates.keep.to(torch.float32))
        p32 = [p if p.dtype == dtype else p.to(dtype) for p in ps]
        raws = [_sanitised(grads[i], found_finite, dtype) for i in idx]
        if weight_decay == 0:
            dirs = raws
        else:
            dirs = torch._foreach_add(raws, p32, alpha=weight_decay)
            torch._foreach_mul_(dirs, gates.keep)
        _update_stats_foreach(ms, vs, raws, gates, beta=cprop_beta, method=method)
        if momentum != 0:
            bufs = [momentum_buffers[i] for i in idx]
            momentum_gate = _gate(found_finite, momentum, 1.0, dtype)
            firsts = [_first_step(step, found_finite) for step in steps]
            a = [torch.where(f, torch.zeros_like(momentum_gate), momentum_gate) for f in firsts]
            b = [torch.where(f, torch.ones_like(momentum_gate), 1 - dampening) for f in firsts]
            torch._foreach_mul_(bufs, a)
            torch._foreach_addcmul_(bufs, dirs, b)
            dirs = torch._foreach_add(dirs, bufs, alpha=momentum) if nesterov else bufs
        updates = torch._foreach_mul(dirs, -lr)
        scales = _scale_foreach(
            ms,
            vs,
            steps,
            gates.keep,
            beta=cprop_beta,
            c=cprop_c,
            eps=cprop_eps,
            cdf=cdf,
            method=method,
        )
        torch._foreach_addcmul_(ps, scales, updates)


def cprop_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    cprop_exp_avgs: list[Tensor],
    cprop_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    found_finite: Tensor,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
    foreach: bool = False,
) -> None:
    """Functional :class:`CPropSGD`: SGD's update scaled per element by CProp, in place."""
    fn = _multi_tensor_cprop_sgd if foreach else _single_tensor_cprop_sgd
    fn(
        params,
        grads,
        momentum_buffers,
        cprop_exp_avgs,
        cprop_exp_avg_sqs,
        state_steps,
        found_finite=found_finite,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        cprop_beta=cprop_beta,
        cprop_c=cprop_c,
        cprop_eps=cprop_eps,
        cdf=cdf,
        method=method,
    )


# --------------------------------------------------------------------------------------------
# Native Adam / AdamW + CProp
# --------------------------------------------------------------------------------------------


def _single_tensor_cprop_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    cprop_exp_avgs: list[Tensor],
    cprop_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    found_finite: Tensor,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    decoupled_weight_decay: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> None:
    gates_by_dtype: dict[Any, tuple[_Gates, Tensor, Tensor]] = {}
    for i, param in enumerate(params):
        exp_avg, exp_avg_sq, step = exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        dtype = exp_avg.dtype
        if dtype not in gates_by_dtype:
            gates_by_dtype[dtype] = (
                _gates(found_finite, cprop_beta, dtype),
                _gate(found_finite, 1.0 - beta1, 0.0, dtype),
                _gate(found_finite, beta2, 1.0, dtype),
            )
        gates, weight1, beta2_gate = gates_by_dtype[dtype]
        step.add_(gates.keep.to(torch.float32))
        t = _step_time(step, dtype)
        p = param if param.dtype == dtype else param.to(dtype)
        raw = _sanitised(grads[i], found_finite, dtype)
        if weight_decay == 0 or decoupled_weight_decay:
            grad = raw
        else:
            grad = raw.add(p, alpha=weight_decay).mul_(gates.keep)
        # CProp's statistics see the raw gradient; v is Adam's exp_avg_sq when shared (None)
        cprop_v = None if cprop_exp_avg_sqs is None else cprop_exp_avg_sqs[i]
        _update_stats_one(cprop_exp_avgs[i], cprop_v, raw, gates, beta=cprop_beta, method=method)
        exp_avg.lerp_(grad, weight1)
        exp_avg_sq.mul_(beta2_gate).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**t
        bias_correction2_sqrt = (1 - beta2**t).sqrt()
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            denom = max_exp_avg_sqs[i].sqrt().div_(bias_correction2_sqrt).add_(eps)
        else:
            denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
        update = torch.div(exp_avg, denom, out=denom).mul_(-lr / bias_correction1)
        if decoupled_weight_decay and weight_decay != 0:
            update.add_(p, alpha=-lr * weight_decay)
        s = _scale_one(
            cprop_exp_avgs[i],
            exp_avg_sq if cprop_v is None else cprop_v,
            step,
            gates.keep,
            beta=cprop_beta,
            c=cprop_c,
            eps=cprop_eps,
            cdf=cdf,
            method=method,
        )
        param.addcmul_(s, update)


def _multi_tensor_cprop_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    cprop_exp_avgs: list[Tensor],
    cprop_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    found_finite: Tensor,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    decoupled_weight_decay: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> None:
    for (_, dtype), idx in _group_by_dtype(exp_avgs).items():
        ps = [params[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        cms = [cprop_exp_avgs[i] for i in idx]
        cvs = None if cprop_exp_avg_sqs is None else [cprop_exp_avg_sqs[i] for i in idx]
        steps = [state_steps[i] for i in idx]
        gates = _gates(found_finite, cprop_beta, dtype)
        weight1 = _gate(found_finite, 1.0 - beta1, 0.0, dtype)
        beta2_gate = _gate(found_finite, beta2, 1.0, dtype)
        torch._foreach_add_(steps, gates.keep.to(torch.float32))
        ts = [_step_time(step, dtype) for step in steps]
        p32 = [p if p.dtype == dtype else p.to(dtype) for p in ps]
        raws = [_sanitised(grads[i], found_finite, dtype) for i in idx]
        if weight_decay == 0 or decoupled_weight_decay:
            dirs = raws
        else:
            dirs = torch._foreach_add(raws, p32, alpha=weight_decay)
            torch._foreach_mul_(dirs, gates.keep)
        _update_stats_foreach(cms, cvs, raws, gates, beta=cprop_beta, method=method)
        torch._foreach_lerp_(ms, dirs, weight1)
        torch._foreach_mul_(vs, beta2_gate)
        torch._foreach_addcmul_(vs, dirs, dirs, value=1 - beta2)
        bias_correction1 = torch._foreach_pow(beta1, ts)
        torch._foreach_neg_(bias_correction1)
        torch._foreach_add_(bias_correction1, 1)
        bias_correction2_sqrt = torch._foreach_pow(beta2, ts)
        torch._foreach_neg_(bias_correction2_sqrt)
        torch._foreach_add_(bias_correction2_sqrt, 1)
        torch._foreach_sqrt_(bias_correction2_sqrt)
        if amsgrad:
            maxs = [max_exp_avg_sqs[i] for i in idx]
            torch._foreach_maximum_(maxs, vs)
            denoms = torch._foreach_sqrt(maxs)
        else:
            denoms = torch._foreach_sqrt(vs)
        torch._foreach_div_(denoms, bias_correction2_sqrt)
        torch._foreach_add_(denoms, eps)
        updates = torch._foreach_div(ms, denoms)
        # -lr / bias_correction1, with the same rounding as the reference's 0-d division
        step_sizes = [-lr / bc for bc in bias_correction1]
        torch._foreach_mul_(updates, step_sizes)
        if decoupled_weight_decay and weight_decay != 0:
            torch._foreach_add_(updates, p32, alpha=-lr * weight_decay)
        scales = _scale_foreach(
            cms,
            vs if cvs is None else cvs,
            steps,
            gates.keep,
            beta=cprop_beta,
            c=cprop_c,
            eps=cprop_eps,
            cdf=cdf,
            method=method,
        )
        torch._foreach_addcmul_(ps, scales, updates)


def cprop_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    cprop_exp_avgs: list[Tensor],
    cprop_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    found_finite: Tensor,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    decoupled_weight_decay: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
    foreach: bool = False,
    fused: bool = False,
) -> None:
    """Functional :class:`CPropAdam` / :class:`CPropAdamW`, in place.

    ``cprop_exp_avg_sqs=None`` means CProp's ``v`` is Adam's ``exp_avg_sq`` (shared).
    """
    kw = {
        "found_finite": found_finite,
        "amsgrad": amsgrad,
        "beta1": beta1,
        "beta2": beta2,
        "lr": lr,
        "weight_decay": weight_decay,
        "eps": eps,
        "decoupled_weight_decay": decoupled_weight_decay,
        "cprop_beta": cprop_beta,
        "cprop_c": cprop_c,
        "cprop_eps": cprop_eps,
        "cdf": cdf,
        "method": method,
    }
    if fused:
        fn = _fused_cprop_adam
    elif foreach:
        fn = _multi_tensor_cprop_adam
    else:
        fn = _single_tensor_cprop_adam
    fn(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        cprop_exp_avgs,
        cprop_exp_avg_sqs,
        state_steps,
        **kw,
    )


# --------------------------------------------------------------------------------------------
# Fused Adam / AdamW + CProp: one torch.compile-generated kernel per tensor
# --------------------------------------------------------------------------------------------

# Note [Fused path]
#   The whole per-element update (Adam's moments, CProp's statistics, the scale and the
#   parameter write) is one pure function of the old values; torch.compile (inductor) turns it
#   into a single loop over memory (C++/OpenMP on CPU, Triton on CUDA), so every tensor is read
#   and written once. Everything that is constant over a tensor (bias corrections, step size,
#   lr, betas) is computed beforehand for all tensors at once and enters as one small float64
#   row per tensor, so a scheduler never triggers a recompile and the loop does no pow;
#   structural choices (amsgrad, cdf, c == 1, ...) are static. Shapes are static too (see
#   _RECOMPILE_LIMIT): one compile per distinct numel, cached on disk by inductor. A skipped
#   (non-finite) step is folded into the row's EMA factors (beta -> 1, 1 - beta -> 0) and one
#   select on the parameter, at no extra memory traffic. The CPU loop is compute-bound (erf,
#   two square roots, three divisions per element), hence erf_float32 below.


# Columns of the per-tensor coefficient rows handed to the compiled kernel. The EMA factors are
# gated (Note [Skipping a non-finite step without a host sync]) so a skipped step writes the old
# values back without a select per state tensor.
_COEFS = (
    "neg_step_size",  # -lr / (1 - beta1^t)
    "inv_bias_correction2_sqrt",  # 1 / sqrt(1 - beta2^t)
    "inv_cprop_bias_correction",  # 1 / (1 - cprop_beta^t)
    "variance_scale",  # conformity: 1 / ((1 - cprop_beta^t) (n_t - 1 + cprop_eps) r^2)
    "scaled_cprop_eps",  # cprop_eps / r
    "first",  # 1 at the first clean step (s = 1), else 0
    "cprop_c",  # c, 0 on a skipped step
    "lr_weight_decay",
    "weight_decay",
    "eps",
    "beta1",  # beta1, 1 on a skipped step; and so on
    "one_minus_beta1",
    "beta2",
    "one_minus_beta2",
    "cprop_beta",
    "one_minus_cprop_beta",
)
_K = {name: i for i, name in enumerate(_COEFS)}
_CDF_CONSTANT = {"normal": _SQRT1_2, "bfo": _BFO_HALF_K, "bft": 1.0, "logistic": _LOGISTIC_HALF_K}


def _adam_coefficients(
    steps: Tensor,
    found_finite: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> Tensor:
    """Rows of :data:`_COEFS` (float64) for the stacked, already advanced step counts.

    Everything that is the same for all elements of a tensor is computed here, once per tensor
    and for all tensors at once (a few vector ops), so the compiled kernel does no ``pow`` and
    as few divisions per element as the math allows (CPU kernels are compute-bound here).
    """
    keep = found_finite.to(torch.float64)
    t = steps.to(torch.float64).clamp(min=1)
    first = (steps == 1).to(torch.float64) * keep
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    cprop_bias_correction = 1 - cprop_beta**t
    n = cprop_bias_correction / (1 - cprop_beta)
    inv_cprop_bc = cprop_bias_correction.reciprocal()
    constant = _CDF_CONSTANT[cdf] if method == "conformity" else 1.0
    ratio = inv_cprop_bc * constant
    if method == "conformity":
        variance_scale = inv_cprop_bc / (n - 1 + cprop_eps) / ratio**2
    elif method == "relative":
        variance_scale = inv_cprop_bc / ratio  # se = a_hat + eps, not under a square root
    else:
        variance_scale = inv_cprop_bc / ratio**2
    c = 1.0 if math.isinf(cprop_c) else cprop_c

    def gated(if_ok: float, if_skip: float) -> Tensor:
        return (keep * (if_ok - if_skip) + if_skip).expand_as(t)

    columns = {
        "neg_step_size": -lr / bias_correction1,
        "inv_bias_correction2_sqrt": bias_correction2.sqrt().reciprocal(),
        "inv_cprop_bias_correction": inv_cprop_bc,
        # r = constant / bias correction: x = |cm| r / se = |cm| / (se / r), so r moves into
        # the denominator's coefficients and the kernel saves a multiply per element
        "variance_scale": variance_scale,
        "scaled_cprop_eps": cprop_eps / ratio,
        "first": first,
        "cprop_c": c * keep.expand_as(t),
        "lr_weight_decay": torch.full_like(t, lr * weight_decay),
        "weight_decay": torch.full_like(t, weight_decay),
        "eps": torch.full_like(t, eps),
        "beta1": gated(beta1, 1.0),
        "one_minus_beta1": gated(1 - beta1, 0.0),
        "beta2": gated(beta2, 1.0),
        "one_minus_beta2": gated(1 - beta2, 0.0),
        "cprop_beta": gated(cprop_beta, 1.0),
        "one_minus_cprop_beta": gated(1 - cprop_beta, 0.0),
    }
    return torch.stack([columns[name] for name in _COEFS], dim=1)


# erf for float32 in the fused kernel: Abramowitz & Stegun 7.1.28,
# erf(x) = 1 - (1 + a1 x + ... + a6 x^6)^-16 for x >= 0, |error| < 3e-7 (2e-6 with float32
# rounding; tests/test_cprop.py checks it). It costs one division and 17 multiply-adds, where
# ATen's vectorised erf (through exp) costs as much as the rest of the fused update on CPU.
_ERF_A = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)


def erf_float32(x: Tensor) -> Tensor:
    """erf for ``x >= 0`` in float32 without exp (absolute error below 2e-6)."""
    # erf(4) = 1 in float32; the clamp also keeps r**16 clear of subnormals, which are slow
    x = torch.clamp(x, max=4.0)
    poly = x * _ERF_A[5] + _ERF_A[4]
    for coefficient in _ERF_A[3::-1]:
        poly = poly * x + coefficient
    r = 1 / (poly * x + 1)
    r = r * r
    r = r * r
    r = r * r
    return 1 - r * r


def _fused_scale(
    cm: Tensor,
    cv: Tensor,
    k: Tensor,
    *,
    cdf: str,
    method: str,
    c_is_inf: bool,
    c_is_one: bool,
    eps_is_zero: bool,
) -> Tensor:
    """CProp's scale from updated statistics inside compiled code; ``k`` is a :data:`_COEFS` row."""
    dtype = cm.dtype
    if c_is_inf:
        s = k[_K["cprop_c"]] * torch.ones_like(cm)  # c is 1 here, 0 on a skipped step
    else:
        if method == "conformity":
            # (v_hat - m_hat^2) / (n - 1 + eps) = (cv - cm^2 / bc) / (bc (n - 1 + eps))
            centred = cv - (cm * cm) * k[_K["inv_cprop_bias_correction"]]
            se = torch.sqrt(torch.clamp(centred, min=0) * k[_K["variance_scale"]])
        elif method == "relative":
            se = cv * k[_K["variance_scale"]]
        else:
            se = torch.sqrt(cv * k[_K["variance_scale"]])
        se = se + k[_K["scaled_cprop_eps"]]  # se / r, see _adam_coefficients
        if eps_is_zero:
            se = torch.clamp(se, min=torch.finfo(dtype).tiny)
        x = torch.abs(cm) / se
        if method != "conformity":
            confidence = x
        elif cdf == "normal":
            confidence = erf_float32(x) if dtype == torch.float32 else torch.erf(x)
        elif cdf == "bft":
            confidence = torch.tanh(x * (x * x * _BFT_HALF_K3 + _BFT_HALF_K1))
        else:
            confidence = torch.tanh(x)
        if not c_is_one:
            confidence = torch.clamp(confidence * k[_K["cprop_c"]], max=1)
        s = torch.maximum(confidence, k[_K["first"]])
    return s


def _fused_adam_kernel(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    cprop_exp_avg: Tensor,
    cprop_second: Tensor | None,
    coef: Tensor,
    found_finite: Tensor,
    *,
    amsgrad: bool,
    decoupled: bool,
    cdf: str,
    method: str,
    c_is_inf: bool,
    c_is_one: bool,
    eps_is_zero: bool,
) -> None:
    """The whole per-element update of one tensor; compiled into one loop (Note [Fused path])."""
    dtype = exp_avg.dtype
    k = coef.to(dtype)
    p = param.to(dtype)
    raw = torch.where(found_finite, grad.to(dtype), 0)
    g = raw if decoupled else torch.where(found_finite, raw + k[_K["weight_decay"]] * p, 0)
    # Adam; on a skipped step g = 0, beta = 1, 1 - beta = 0: the old values come back exactly
    m = exp_avg * k[_K["beta1"]] + k[_K["one_minus_beta1"]] * g
    v = exp_avg_sq * k[_K["beta2"]] + k[_K["one_minus_beta2"]] * (g * g)
    vmax = torch.maximum(max_exp_avg_sq, v) if max_exp_avg_sq is not None else v
    denom = torch.sqrt(vmax) * k[_K["inv_bias_correction2_sqrt"]] + k[_K["eps"]]
    update = k[_K["neg_step_size"]] * m / denom
    if decoupled:
        update = update - k[_K["lr_weight_decay"]] * p
    # CProp's statistics from the raw gradient
    cm = cprop_exp_avg * k[_K["cprop_beta"]] + k[_K["one_minus_cprop_beta"]] * raw
    if cprop_second is None:
        cv = v
    elif method == "relative":
        cv = cprop_second * k[_K["cprop_beta"]] + k[_K["one_minus_cprop_beta"]] * torch.abs(raw)
    else:
        cv = cprop_second * k[_K["cprop_beta"]] + k[_K["one_minus_cprop_beta"]] * (raw * raw)
    s = _fused_scale(
        cm,
        cv,
        k,
        cdf=cdf,
        method=method,
        c_is_inf=c_is_inf,
        c_is_one=c_is_one,
        eps_is_zero=eps_is_zero,
    )
    # the select keeps p even where a skipped step's update would not be finite (eps = 0)
    param.copy_(torch.where(found_finite, p + s * update, p))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if max_exp_avg_sq is not None:
        max_exp_avg_sq.copy_(vmax)
    cprop_exp_avg.copy_(cm)
    if cprop_second is not None:
        cprop_second.copy_(cv)


_COMPILED: dict[str, Callable[..., None]] = {}
# Large tensors compile per numel (see _compiled); dynamo's default limit of 8 variants per
# function would be hit by any real model.
_RECOMPILE_LIMIT = 512
_PARALLEL_NUMEL = 1 << 16


def _flat(t: Tensor | None) -> Tensor | None:
    """A plain 1-D view (same storage), so parameters of every shape share compiled code."""
    if t is None:
        return None
    t = t.detach()
    return t.view(-1) if t.is_contiguous() else t


def _shards(tensors: list[Any]) -> list[Any]:
    """This rank's shards of FSDP2 DTensors (aliases: in-place ops write the DTensor); other
    tensors and None as they are."""
    return [local_tensor(t) for t in tensors]


def _fused_cprop_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    cprop_exp_avgs: list[Tensor],
    cprop_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    found_finite: Tensor,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    decoupled_weight_decay: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> None:
    if not params:
        return
    static = {
        "amsgrad": amsgrad,
        "decoupled": decoupled_weight_decay or weight_decay == 0,
        "cdf": cdf,
        "method": method,
        "c_is_inf": math.isinf(cprop_c),
        "c_is_one": cprop_c == 1,
        "eps_is_zero": cprop_eps == 0,
    }
    for (device, _), idx in _group_by_dtype(exp_avgs).items():
        ok = found_finite.to(device)
        steps = [state_steps[i] for i in idx]
        torch._foreach_add_(steps, ok.to(torch.float32))
        coefs = _adam_coefficients(
            torch.stack(steps),
            ok,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            eps=eps,
            cprop_beta=cprop_beta,
            cprop_c=cprop_c,
            cprop_eps=cprop_eps,
            cdf=cdf,
            method=method,
        )
        rows = [row.clone() for row in coefs]  # no storage offsets: they would specialise
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            for row, i in enumerate(idx):
                kernel = _compiled("adam", _fused_adam_kernel, params[i].numel())
                kernel(
                    _flat(params[i]),
                    _flat(grads[i]),
                    _flat(exp_avgs[i]),
                    _flat(exp_avg_sqs[i]),
                    _flat(max_exp_avg_sqs[i]) if amsgrad else None,
                    _flat(cprop_exp_avgs[i]),
                    None if cprop_exp_avg_sqs is None else _flat(cprop_exp_avg_sqs[i]),
                    rows[row],
                    ok,
                    **static,
                )


def _fused_wrapper_stats_kernel(
    param: Tensor,
    grad: Tensor,
    snapshot: Tensor,
    cprop_exp_avg: Tensor,
    cprop_second: Tensor,
    coef: Tensor,
    found_finite: Tensor,
    *,
    method: str,
) -> None:
    """Before the base step: CProp's EMAs from the raw gradient and the snapshot ``p_old``."""
    dtype = cprop_exp_avg.dtype
    k = coef.to(dtype)
    raw = torch.where(found_finite, grad.to(dtype), 0)
    snapshot.copy_(param)
    cprop_exp_avg.copy_(cprop_exp_avg * k[_K["cprop_beta"]] + k[_K["one_minus_cprop_beta"]] * raw)
    second = torch.abs(raw) if method == "relative" else raw * raw
    cprop_second.copy_(cprop_second * k[_K["cprop_beta"]] + k[_K["one_minus_cprop_beta"]] * second)


def _fused_wrapper_apply_kernel(
    param: Tensor,
    snapshot: Tensor,
    cprop_exp_avg: Tensor,
    cprop_second: Tensor,
    coef: Tensor,
    found_finite: Tensor,
    *,
    cdf: str,
    method: str,
    c_is_inf: bool,
    c_is_one: bool,
    eps_is_zero: bool,
) -> None:
    """After the base step: ``p <- lerp(p_old, p_new, s)``, or ``p_old`` on a skipped step."""
    dtype = cprop_exp_avg.dtype
    s = _fused_scale(
        cprop_exp_avg,
        cprop_second,
        coef.to(dtype),
        cdf=cdf,
        method=method,
        c_is_inf=c_is_inf,
        c_is_one=c_is_one,
        eps_is_zero=eps_is_zero,
    )
    old = snapshot.to(dtype)
    # lerp is exactly p_new at s = 1 (c = inf gives the bare optimizer bitwise)
    new = torch.lerp(old, param.to(dtype), s)
    param.copy_(torch.where(found_finite, new, old))


def _compiled(name: str, fn: Callable[..., None], numel: int) -> Callable[..., None]:
    """The compiled ``fn`` for a tensor of ``numel`` elements.

    Large tensors get a static-shape kernel (one compile per numel; inductor only parallelises a
    CPU loop whose length it knows), small ones share one dynamic-shape kernel (a single thread
    is right for them, and models with many small tensors compile once). The two variants get
    distinct code objects, since dynamo keeps its cache on the code object.
    """
    dynamic = numel < _PARALLEL_NUMEL
    key = f"{name}:{'dynamic' if dynamic else 'static'}"
    if key not in _COMPILED:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{'dynamic' if dynamic else 'static'}")
        twin = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)
        twin.__kwdefaults__ = fn.__kwdefaults__
        _COMPILED[key] = torch.compile(twin, dynamic=dynamic, fullgraph=True)
    return _COMPILED[key]


class _FusedWrapperStep:
    """The wrapper's two compiled passes around the base step, for one param group."""

    def __init__(
        self,
        params: list[Tensor],
        states: list[dict[str, Tensor]],
        found_finite: Tensor,
        group: dict[str, Any],
    ) -> None:
        # Note [FSDP2]: CProp is elementwise, so it runs on this rank's shards
        self.params, self.group = _shards(params), group
        self.grads = _shards([p.grad for p in params])
        method = group["cprop_method"]
        self.ms = _shards([st["cprop_exp_avg"] for st in states])
        self.vs = _shards([st[_second_key(method)] for st in states])
        self.ok = found_finite
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, found_finite.to(torch.float32))
        self.coefs = _adam_coefficients(
            torch.stack(steps),
            found_finite,
            lr=0.0,
            beta1=0.0,
            beta2=0.0,
            weight_decay=0.0,
            eps=0.0,
            cprop_beta=group["cprop_beta"],
            cprop_c=group["cprop_c"],
            cprop_eps=group["cprop_eps"],
            cdf=group["cprop_cdf"],
            method=method,
        )
        self.rows = [row.clone() for row in self.coefs]
        self.snapshots: list[Tensor] = []

    def before(self) -> None:
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            for row, p in enumerate(self.params):
                kernel = _compiled("wrapper_stats", _fused_wrapper_stats_kernel, p.numel())
                flat = _flat(p)
                snapshot = torch.empty_like(flat)
                self.snapshots.append(snapshot)
                kernel(
                    flat,
                    _flat(self.grads[row]),
                    snapshot,
                    _flat(self.ms[row]),
                    _flat(self.vs[row]),
                    self.rows[row],
                    self.ok,
                    method=self.group["cprop_method"],
                )

    def after(self) -> None:
        c = self.group["cprop_c"]
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            for row, p in enumerate(self.params):
                kernel = _compiled("wrapper_apply", _fused_wrapper_apply_kernel, p.numel())
                kernel(
                    _flat(p),
                    self.snapshots[row],
                    _flat(self.ms[row]),
                    _flat(self.vs[row]),
                    self.rows[row],
                    self.ok,
                    cdf=self.group["cprop_cdf"],
                    method=self.group["cprop_method"],
                    c_is_inf=math.isinf(c),
                    c_is_one=c == 1,
                    eps_is_zero=self.group["cprop_eps"] == 0,
                )


# --------------------------------------------------------------------------------------------
# Shared pieces of the classes
# --------------------------------------------------------------------------------------------

_GROUP_KEYS = ("cprop_beta", "cprop_c", "cprop_eps", "cprop_cdf", "cprop_method")


def _second_key(method: str) -> str:
    return "cprop_exp_avg_abs" if method == "relative" else "cprop_exp_avg_sq"


def _validate_group(group: dict[str, Any]) -> None:
    _check_hyper(
        group["cprop_beta"],
        group["cprop_c"],
        group["cprop_eps"],
        group["cprop_cdf"],
        group["cprop_method"],
        prefix="cprop_",
    )


def _init_cprop_state(state: dict[str, Any], param: Tensor, method: str, share_v: bool) -> None:
    dtype = _stats_dtype(param)
    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
    state["cprop_exp_avg"] = torch.zeros_like(
        param, dtype=dtype, memory_format=torch.preserve_format
    )
    if not share_v:
        state[_second_key(method)] = torch.zeros_like(
            param, dtype=dtype, memory_format=torch.preserve_format
        )


def _group_stats(
    groups: list[dict[str, Any]], state_of: Callable[[Tensor], dict[str, Any] | None]
) -> dict[str, Tensor]:
    """Mean scale and fraction of elements with ``s < 0.5``, per group and overall (0-d).

    Under FSDP2 each rank sums over its shards and the sums are added over ranks in one
    all-reduce (Note [FSDP2]), so every rank reports the whole tensors' figures.
    """
    rows: list[tuple[int, Tensor, int]] = []  # (group index, [sum of s, count below 1/2], n)
    sharded = False
    for gi, group in enumerate(groups):
        sums, belows, count = [], [], 0
        for p in group["params"]:
            st = state_of(p)
            if not st or "cprop_exp_avg" not in st:
                continue
            m = st["cprop_exp_avg"]
            second = st.get(_second_key(group["cprop_method"]), st.get("exp_avg_sq"))
            local_m = local_tensor(m)
            sharded = sharded or local_m is not m
            s = _scale_one(
                local_m,
                local_tensor(second),
                st["step"],
                torch.ones((), dtype=m.dtype, device=local_m.device),
                beta=group["cprop_beta"],
                c=group["cprop_c"],
                eps=group["cprop_eps"],
                cdf=group["cprop_cdf"],
                method=group["cprop_method"],
            )
            sums.append(s.sum(dtype=torch.float32))
            belows.append((s < 0.5).sum(dtype=torch.float32))
            count += m.numel()  # a DTensor's numel is the whole tensor's
        if count:
            rows.append(
                (gi, torch.stack([torch.stack(sums).sum(), torch.stack(belows).sum()]), count)
            )
    if not rows:
        return {}
    totals = torch.stack([row for _, row, _ in rows])
    if sharded:
        totals = all_reduce_sum(totals)
    out: dict[str, Tensor] = {}
    for (gi, _, count), (total, below) in zip(rows, totals, strict=True):
        out[f"group{gi}.mean_scale"] = total / count
        out[f"group{gi}.frac_scale_below_half"] = below / count
    n = sum(count for _, _, count in rows)
    out["mean_scale"] = totals[:, 0].sum() / n
    out["frac_scale_below_half"] = totals[:, 1].sum() / n
    return out


def _param_index_map(groups: list[dict[str, Any]]) -> list[Tensor]:
    """Parameters in the order torch's Optimizer.state_dict numbers them."""
    seen: set[int] = set()
    order: list[Tensor] = []
    for group in groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                order.append(p)
    return order


def _copy_state(value: Any, param: Tensor) -> Any:
    """Deep copy onto ``param``'s device keeping dtypes (fp32 statistics of bf16 stay fp32)."""
    if isinstance(value, Tensor):
        return value.detach().to(device=param.device, copy=True)
    if isinstance(value, dict):
        return {k: _copy_state(v, param) for k, v in value.items()}
    return value


def _default_foreach(params: list[Tensor]) -> bool:
    # On CPU torch's foreach ops loop over tensors like the reference does, with more
    # temporaries; the per-tensor loop is as fast or faster there (see benchmarks/bench_cprop).
    return bool(params) and all(p.device.type == "cuda" for p in params)


class _NativeCPropBase(Optimizer):
    """Validation, state_dict handling and telemetry shared by the native CProp optimizers."""

    _owner = "CProp"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # the constructor's spelling (cdf=, method=) is accepted in groups too
        for short in ("cdf", "method"):
            if short in param_group:
                param_group[f"cprop_{short}"] = param_group.pop(short)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_param_tensors(group["params"], self._owner)
        _validate_group(group)
        self._validate_base_group(group)

    def _validate_base_group(self, group: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; statistics keep their saved dtype (fp32 for bf16 params).

        ``torch.optim.Optimizer.load_state_dict`` would cast every floating state tensor to the
        parameter's dtype, rounding fp32 statistics of bf16 parameters; the state is therefore
        copied here, on the parameter's device, dtype unchanged.
        """
        saved_state = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        params = _param_index_map(self.param_groups)
        for key, value in saved_state.items():
            if not isinstance(key, int) or not 0 <= key < len(params):
                raise ValueError(f"state_dict has state for unknown parameter index {key!r}")
            self.state[params[key]] = _copy_state(value, params[key])

    def stats(self) -> dict[str, Tensor]:
        """Telemetry as 0-d tensors, no host sync: ``group{i}.mean_scale``,
        ``group{i}.frac_scale_below_half`` and the totals ``mean_scale``,
        ``frac_scale_below_half`` over every element with state. The scale is recomputed from
        the current statistics, so it is the scale that the last step applied."""
        return _group_stats(self.param_groups, lambda p: self.state.get(p))

    def _gather(self, group: dict[str, Any], gi: int) -> list[Tensor]:
        params = []
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            _check_grad(p.grad, type(self).__name__, gi, pi, p.shape)
            params.append(p)
        return params


_CPROP_ARGS_DOC = """
    CProp arguments (keyword-only):
        cprop_beta (float): horizon ``beta`` of CProp's EMAs, in [0, 1) (default: 0.999).
        cprop_c (float): overconfidence ``c`` > 0; ``inf`` turns the scaling off (default: 1.0).
        cprop_eps (float): floor ``eps`` >= 0 of the standard error (default: 1e-8).
        cdf (str): ``"normal"`` (erf), ``"bft"``, ``"bfo"`` or ``"logistic"`` (default: "normal").
        method (str): ``"conformity"`` (the paper's), ``"relative"`` or ``"moment"``
            (its section 2.4 alternatives) (default: "conformity").
        foreach (bool, optional): ``torch._foreach_*`` ops; None picks them on CUDA only.
"""


class CPropSGD(_NativeCPropBase):
    """SGD (momentum, dampening, Nesterov, weight decay) with CProp's per-element scale.

    The update of ``torch.optim.SGD`` (``d = -lr * g'`` where ``g' = g + weight_decay * p``,
    then through the momentum buffer ``b <- momentum * b + (1 - dampening) * g'``, ``g' = b``
    or ``g' + momentum * b`` with ``nesterov``) is scaled per element, ``p <- p + s * d``, with
    ``s`` of :mod:`steadystep.optim.cprop` computed from the raw gradient ``g``. The numbers
    match ``CProp(torch.optim.SGD(...))`` up to rounding.

    Args:
        params: iterable of parameters or param-group dicts.
        lr (float): learning rate (default: 1e-3).
        momentum (float): momentum factor (default: 0).
        dampening (float): dampening of the momentum (default: 0).
        weight_decay (float): L2 penalty added to the gradient SGD sees (default: 0).
        nesterov (bool): Nesterov momentum (default: False).
    <CPROP_ARGS>
    State per parameter: ``step`` (0-d float32), ``cprop_exp_avg``, ``cprop_exp_avg_sq``
    (``cprop_exp_avg_abs`` for ``method="relative"``) and ``momentum_buffer`` when
    ``momentum != 0``; fp32 for bf16/fp16 parameters.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ss.CPropSGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> opt.step()
        >>> sorted(opt.stats())
        ['frac_scale_below_half', 'group0.frac_scale_below_half', 'group0.mean_scale', 'mean_scale']
    """

    _owner = "CPropSGD"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        cprop_beta: float = 0.999,
        cprop_c: float = 1.0,
        cprop_eps: float = 1e-8,
        cdf: str = "normal",
        method: str = "conformity",
        foreach: bool | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "cprop_beta": cprop_beta,
            "cprop_c": cprop_c,
            "cprop_eps": cprop_eps,
            "cprop_cdf": cdf,
            "cprop_method": method,
            "foreach": foreach,
            "fused": None,
        }
        super().__init__(params, defaults)

    def _validate_base_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("lr", group["lr"])
        check_nonnegative("momentum", group["momentum"])
        check_finite("dampening", group["dampening"])
        check_nonnegative("weight_decay", group["weight_decay"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "nesterov=True requires momentum > 0 and dampening == 0, got "
                f"momentum={group['momentum']}, dampening={group['dampening']}"
            )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Tensor | None = None) -> Any:
        """One step. ``closure`` re-evaluates the model; ``loss`` is accepted and unused."""
        out = None
        if closure is not None:
            with torch.enable_grad():
                out = closure()
        work = []
        for gi, group in enumerate(self.param_groups):
            params = self._gather(group, gi)
            for p in params:
                state = self.state[p]
                if "step" not in state:
                    _init_cprop_state(state, p, group["cprop_method"], share_v=False)
                if group["momentum"] != 0 and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(
                        p, dtype=_stats_dtype(p), memory_format=torch.preserve_format
                    )
            work.append((group, params))
        found_finite = grads_finite([p.grad for _, ps in work for p in ps])
        for group, params in work:
            if not params:
                continue
            states = [self.state[p] for p in params]
            foreach = group["foreach"]
            # Note [FSDP2]: CProp is elementwise, so it runs on this rank's shards
            cprop_sgd(
                _shards(params),
                _shards([p.grad for p in params]),
                _shards(
                    [st.get("momentum_buffer") if group["momentum"] != 0 else None for st in states]
                ),
                _shards([st["cprop_exp_avg"] for st in states]),
                _shards([st[_second_key(group["cprop_method"])] for st in states]),
                [st["step"] for st in states],
                found_finite=found_finite,
                lr=group["lr"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                nesterov=group["nesterov"],
                cprop_beta=group["cprop_beta"],
                cprop_c=group["cprop_c"],
                cprop_eps=group["cprop_eps"],
                cdf=group["cprop_cdf"],
                method=group["cprop_method"],
                foreach=_default_foreach(params) if foreach is None else foreach,
            )
        return out


class CPropAdam(_NativeCPropBase):
    """Adam (L2 weight decay, AMSGrad) with CProp's per-element scale.

    ``torch.optim.Adam``'s update ``d`` (``m <- beta1 m + (1-beta1) g'``,
    ``v <- beta2 v + (1-beta2) g'^2``, ``d = -lr / (1-beta1^t) * m / (sqrt(v / (1-beta2^t)) + eps)``
    with ``g' = g + weight_decay * p``; :class:`CPropAdamW` decays ``p`` by ``lr * weight_decay``
    inside ``d`` instead) is applied as ``p <- p + s * d``. CProp's ``s`` comes from the raw
    gradient ``g``; the numbers match ``CProp(torch.optim.Adam(...))`` up to rounding.

    When ``betas[1] == cprop_beta`` and Adam sees the raw gradient (``weight_decay == 0``, or
    always for AdamW) and ``method != "relative"``, CProp's ``v`` *is* Adam's ``exp_avg_sq``
    (one buffer less, fewer bytes moved); decided when a parameter's state is created.

    Args:
        params: iterable of parameters or param-group dicts.
        lr (float): learning rate (default: 1e-3).
        betas (tuple[float, float]): Adam's ``beta1, beta2`` (default: (0.9, 0.999)).
        eps (float): Adam's denominator floor (default: 1e-8).
        weight_decay (float): L2 penalty (decoupled in :class:`CPropAdamW`) (default: 0).
        amsgrad (bool): use the running maximum of ``v`` (default: False).
    <CPROP_ARGS>
        fused (bool, optional): one torch.compile-generated kernel per tensor (CPU or CUDA;
            the first step compiles, which takes seconds) (default: None = False).

    State per parameter: ``step`` (0-d float32, Adam's and CProp's ``t``), ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad), ``cprop_exp_avg`` and, unless shared,
    ``cprop_exp_avg_sq`` (``cprop_exp_avg_abs`` for ``method="relative"``). All statistics are
    fp32 for bf16/fp16 parameters (``torch.optim.Adam`` would keep them in bf16).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ss.CPropAdam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        ['cprop_exp_avg', 'exp_avg', 'exp_avg_sq', 'step']
    """

    _owner = "CPropAdam"
    _decoupled = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        cprop_beta: float = 0.999,
        cprop_c: float = 1.0,
        cprop_eps: float = 1e-8,
        cdf: str = "normal",
        method: str = "conformity",
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if foreach and fused:
            raise ValueError("foreach and fused cannot both be True")
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "decoupled_weight_decay": self._decoupled,
            "cprop_beta": cprop_beta,
            "cprop_c": cprop_c,
            "cprop_eps": cprop_eps,
            "cprop_cdf": cdf,
            "cprop_method": method,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def _validate_base_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("lr", group["lr"])
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got betas={betas!r}")
        check_unit_interval("betas[0]", betas[0])
        check_unit_interval("betas[1]", betas[1])
        check_nonnegative("eps", group["eps"])
        check_nonnegative("weight_decay", group["weight_decay"])

    def _shares_v(self, group: dict[str, Any]) -> bool:
        raw_grad = group["decoupled_weight_decay"] or group["weight_decay"] == 0
        return (
            raw_grad
            and group["betas"][1] == group["cprop_beta"]
            and group["cprop_method"] != "relative"
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Tensor | None = None) -> Any:
        """One step. ``closure`` re-evaluates the model; ``loss`` is accepted and unused."""
        out = None
        if closure is not None:
            with torch.enable_grad():
                out = closure()
        work = []
        for gi, group in enumerate(self.param_groups):
            params = self._gather(group, gi)
            share = self._shares_v(group)
            for p in params:
                state = self.state[p]
                if "step" not in state:
                    _init_cprop_state(state, p, group["cprop_method"], share_v=share)
                    dtype = _stats_dtype(p)
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(
                            p, dtype=dtype, memory_format=torch.preserve_format
                        )
                if group["amsgrad"] and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
            work.append((group, params))
        found_finite = grads_finite([p.grad for _, ps in work for p in ps])
        for group, params in work:
            key = _second_key(group["cprop_method"])
            # parameters whose v is shared and those with their own v go in separate calls
            for shared in (True, False):
                ps = [p for p in params if (key not in self.state[p]) == shared]
                if ps:
                    self._run(group, ps, found_finite, key if not shared else None)
        return out

    def _run(
        self, group: dict[str, Any], params: list[Tensor], found_finite: Tensor, key: str | None
    ) -> None:
        states = [self.state[p] for p in params]
        foreach, fused = group["foreach"], group["fused"]
        beta1, beta2 = group["betas"]
        # Note [FSDP2]: CProp is elementwise, so it runs on this rank's shards
        cprop_adam(
            _shards(params),
            _shards([p.grad for p in params]),
            _shards([st["exp_avg"] for st in states]),
            _shards([st["exp_avg_sq"] for st in states]),
            _shards([st["max_exp_avg_sq"] for st in states]) if group["amsgrad"] else [],
            _shards([st["cprop_exp_avg"] for st in states]),
            None if key is None else _shards([st[key] for st in states]),
            [st["step"] for st in states],
            found_finite=found_finite,
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            cprop_beta=group["cprop_beta"],
            cprop_c=group["cprop_c"],
            cprop_eps=group["cprop_eps"],
            cdf=group["cprop_cdf"],
            method=group["cprop_method"],
            foreach=_default_foreach(params) if foreach is None else foreach,
            fused=bool(fused),
        )


class CPropAdamW(CPropAdam):
    """AdamW (decoupled weight decay, default 1e-2) with CProp's per-element scale.

    As :class:`CPropAdam` with ``d = -lr * weight_decay * p - lr / (1-beta1^t) * m / denom``;
    Adam always sees the raw gradient, so CProp's ``v`` is shared whenever
    ``betas[1] == cprop_beta``. Matches ``CProp(torch.optim.AdamW(...))`` up to rounding.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ss.CPropAdamW(model.parameters(), lr=3e-3, cprop_c=1.0)
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> opt.step()
        >>> opt.state[model.weight]["step"]
        tensor(1.)
    """

    _owner = "CPropAdamW"
    _decoupled = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        cprop_beta: float = 0.999,
        cprop_c: float = 1.0,
        cprop_eps: float = 1e-8,
        cdf: str = "normal",
        method: str = "conformity",
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            cprop_beta=cprop_beta,
            cprop_c=cprop_c,
            cprop_eps=cprop_eps,
            cdf=cdf,
            method=method,
            foreach=foreach,
            fused=fused,
        )


for _cls in (CPropSGD, CPropAdam):
    _cls.__doc__ = (_cls.__doc__ or "").replace("    <CPROP_ARGS>\n", _CPROP_ARGS_DOC.lstrip("\n"))


# --------------------------------------------------------------------------------------------
# The wrapper around any optimizer
# --------------------------------------------------------------------------------------------


class CProp(Optimizer):
    """Wrap any ``torch.optim.Optimizer`` and scale its update per element by CProp.

    Each step: the raw gradients update CProp's statistics, the base optimizer steps at its full
    rate, and the change it made is scaled, ``p <- p_old + s * (p_new - p_old)`` (computed as
    ``torch.lerp(p_old, p_new, s)``, exactly ``p_new`` where ``s == 1``). The base optimizer's
    own state evolves as it would without CProp. See :mod:`steadystep.optim.cprop` for ``s``.

    Args:
        optimizer: the base optimizer (SGD, Adam, AdamW, RMSprop, Adagrad, NAdam, your own).
        beta (float): horizon of CProp's EMAs, in [0, 1) (default: 0.999).
        c (float): overconfidence coefficient > 0; ``c = inf`` gives ``s = 1`` everywhere, i.e.
            bitwise the bare optimizer (default: 1.0).
        eps (float): floor of the standard error, >= 0 (default: 1e-8).
        cdf (str): ``"normal"``, ``"bft"``, ``"bfo"`` or ``"logistic"`` (default: "normal").
        method (str): ``"conformity"``, ``"relative"`` or ``"moment"`` (default: "conformity").
        fused (bool, optional): CProp's own work as two torch.compile-generated passes per
            tensor (statistics and snapshot before the base step, scale after it) instead of
            eager ops; the first step compiles (default: None = False).

    These are defaults: they are stored in every param group of the base optimizer as
    ``cprop_beta``, ``cprop_c``, ``cprop_eps``, ``cprop_cdf``, ``cprop_method`` (a group that
    already has one keeps it), so they checkpoint with the groups and can differ per group.

    ``param_groups``, ``state`` (the base's), ``defaults``, ``add_param_group`` and
    ``zero_grad`` delegate to the base. CProp's own per-parameter state (``step``,
    ``cprop_exp_avg``, ``cprop_exp_avg_sq`` or ``cprop_exp_avg_abs``; fp32 for bf16/fp16
    parameters) is in :attr:`cprop_state` and in ``state_dict()["cprop_state"]``, next to the
    base's ``state`` and ``param_groups``. Step hooks registered on the wrapper run around the
    whole CProp step (they see the scaled parameters); hooks on the base run inside it.

    Extra memory: CProp's two statistics per parameter, plus one copy of the parameters while a
    step runs (the snapshot ``p_old``).

    A non-finite gradient leaves CProp's statistics unchanged and restores the parameters to
    their values before the step (decided on the device); the base optimizer's own state still
    sees that gradient; guarding it is :class:`CatastropheGuard`'s job (or use the native
    classes, whose whole state is protected).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ss.CProp(torch.optim.AdamW(model.parameters(), lr=3e-3), beta=0.999, c=1.0)
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> opt.step()
        >>> opt.cprop_state[model.weight]["step"]
        tensor(1.)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        beta: float = 0.999,
        c: float = 1.0,
        eps: float = 1e-8,
        cdf: str = "normal",
        method: str = "conformity",
        fused: bool | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"CProp wraps a torch.optim.Optimizer, got optimizer={type(optimizer).__name__}"
            )
        _check_hyper(beta, c, eps, cdf, method, prefix="")
        self.optimizer = optimizer
        self.fused = bool(fused)
        self.cprop_defaults = {
            "cprop_beta": beta,
            "cprop_c": c,
            "cprop_eps": eps,
            "cprop_cdf": cdf,
            "cprop_method": method,
        }
        self.cprop_state: dict[Tensor, dict[str, Tensor]] = {}
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        for group in self.optimizer.param_groups:
            self._set_group_defaults(group)

    # -- delegation ------------------------------------------------------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__.copy()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"CProp({self.optimizer!r}, {self.cprop_defaults})"

    def _set_group_defaults(self, group: dict[str, Any]) -> None:
        for key, value in self.cprop_defaults.items():
            group.setdefault(key, value)
        _validate_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; it gets CProp's defaults unless it sets its own."""
        self.optimizer.add_param_group(param_group)
        self._set_group_defaults(self.optimizer.param_groups[-1])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base's ``state_dict()`` plus ``"cprop_state"``: {param index: CProp state}."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        out = dict(self.optimizer.state_dict())
        params = _param_index_map(self.param_groups)
        out["cprop_state"] = {
            i: dict(self.cprop_state[p]) for i, p in enumerate(params) if p in self.cprop_state
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a :meth:`state_dict` (the base's part through the base's own loader)."""
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if "cprop_state" not in state_dict:
            raise ValueError(
                "state_dict has no 'cprop_state': it was not saved from a CProp wrapper; load "
                "it into the base optimizer (CProp(...).optimizer.load_state_dict) instead"
            )
        cprop_saved = state_dict.pop("cprop_state")
        self.optimizer.load_state_dict(state_dict)
        params = _param_index_map(self.param_groups)
        self.cprop_state = {}
        for key, value in cprop_saved.items():
            if not isinstance(key, int) or not 0 <= key < len(params):
                raise ValueError(f"cprop_state has state for unknown parameter index {key!r}")
            self.cprop_state[params[key]] = _copy_state(value, params[key])
        for group in self.param_groups:
            self._set_group_defaults(group)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    # -- the step --------------------------------------------------------------------------

    def stats(self) -> dict[str, Tensor]:
        """Telemetry as 0-d tensors, no host sync (see :meth:`CPropSGD.stats`)."""
        return _group_stats(self.param_groups, lambda p: self.cprop_state.get(p))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Tensor | None = None) -> Any:
        """Update CProp's statistics, step the base optimizer, scale what it changed.

        With a ``closure``, CProp evaluates it once to read the gradients; the base receives a
        closure whose first call returns that loss and later calls (e.g. L-BFGS line search)
        re-evaluate. ``loss`` is accepted for API uniformity and unused.
        """
        out = None
        base_closure = None
        if closure is not None:
            with torch.enable_grad():
                out = closure()
            pending = [out]

            def base_closure() -> Any:
                if pending:
                    return pending.pop()
                with torch.enable_grad():
                    return closure()

        work = []
        for gi, group in enumerate(self.param_groups):
            params = []
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                _check_grad(p.grad, "CProp", gi, pi, p.shape)
                params.append(p)
                if p not in self.cprop_state:
                    self.cprop_state[p] = {}
                    _init_cprop_state(self.cprop_state[p], p, group["cprop_method"], False)
            work.append((group, params))
        found_finite = grads_finite([p.grad for _, ps in work for p in ps])
        if self.fused:
            return self._fused_step(work, found_finite, base_closure, out)
        for group, params in work:
            if not params:
                continue
            states = [self.cprop_state[p] for p in params]
            cprop_update_(
                _shards([p.grad for p in params]),
                _shards([st["cprop_exp_avg"] for st in states]),
                _shards([st[_second_key(group["cprop_method"])] for st in states]),
                [st["step"] for st in states],
                found_finite=found_finite,
                beta=group["cprop_beta"],
                method=group["cprop_method"],
                foreach=_default_foreach(params),
            )
        # statistics are read before the base steps, so a base that writes into p.grad (torch's
        # never do) cannot change them
        snapshots = [[p.clone() for p in _shards(params)] for _, params in work]

        base_out = self.optimizer.step(base_closure) if base_closure else self.optimizer.step()
        if out is None:
            out = base_out

        for (group, params), olds in zip(work, snapshots, strict=True):
            if not params:
                continue
            states = [self.cprop_state[p] for p in params]
            scales = cprop_scales(
                _shards([st["cprop_exp_avg"] for st in states]),
                _shards([st[_second_key(group["cprop_method"])] for st in states]),
                [st["step"] for st in states],
                found_finite=found_finite,
                beta=group["cprop_beta"],
                c=group["cprop_c"],
                eps=group["cprop_eps"],
                cdf=group["cprop_cdf"],
                method=group["cprop_method"],
                foreach=_default_foreach(params),
            )
            for p, old, s in zip(_shards(params), olds, scales, strict=True):
                _apply_scale_(p, old, s, found_finite)
        return out

    def _fused_step(
        self,
        work: list[tuple[dict[str, Any], list[Tensor]]],
        found_finite: Tensor,
        base_closure: Callable[[], Any] | None,
        out: Any,
    ) -> Any:
        passes = [
            _FusedWrapperStep(params, [self.cprop_state[p] for p in params], found_finite, group)
            for group, params in work
            if params
        ]
        for fused_pass in passes:
            fused_pass.before()
        base_out = self.optimizer.step(base_closure) if base_closure else self.optimizer.step()
        for fused_pass in passes:
            fused_pass.after()
        return base_out if out is None else out


def _apply_scale_(param: Tensor, old: Tensor, s: Tensor, found_finite: Tensor) -> None:
    """``param <- lerp(old, param, s)`` (exactly ``param`` at s = 1); ``old`` when skipped."""
    if param.dtype == s.dtype:
        # in place, no temporaries: a skipped step first puts old back (the base may have
        # written NaN), then lerp(old, old, 0) = old
        p = param.detach()
        torch.where(found_finite, p, old, out=p)
        torch.lerp(old, p, s, out=p)
        return
    old32 = old.to(s.dtype)
    new = torch.lerp(old32, param.to(s.dtype), s)
    param.copy_(torch.where(found_finite, new, old32))
