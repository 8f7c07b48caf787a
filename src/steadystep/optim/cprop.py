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
    These gates are 0-d tensors, and a 0-d tensor passed where a foreach op takes a *Scalar*
    (``torch._foreach_lerp_(xs, ys, weight)``, ``torch._foreach_add_(xs, t)`` on CPU) is read
    with ``.item()``: a host sync per step on CUDA. The foreach paths therefore pass them as
    lists (``[weight] * n``, the ``Tensor[]`` overloads), which read them on the device.

Note [FSDP2]
    Under ``torch.distributed.fsdp.fully_shard`` parameters, gradients and the statistics created
    ``zeros_like`` them are DTensors. CProp is elementwise, so the classes hand the functional
    cores this rank's shards (``local_tensor``: aliases, in-place ops write the DTensors); step
    counts stay plain 0-d tensors. Only ``found_finite`` needs the other ranks: a NaN in one
    rank's shard must make every rank skip, or the shards of one parameter would drift apart
    (one all-reduce of a 0-d flag per step, see :func:`grads_finite`). ``stats()`` covers this
    rank's shards, with no collective (as ALeRA's), so a Monitor on one rank cannot hang.
"""

from __future__ import annotations

import math
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, TypeVar

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
# Tensors below this many elements are handled together rather than one by one (one kernel
# call, one reduction; Note [Batching small tensors]); above it, a CPU loop gets all threads.
_PARALLEL_NUMEL = 1 << 16


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

    A tensor is finite exactly when its smallest and largest elements are: ``aminmax``
    propagates NaN and returns -inf / inf where they occur. One reduction per tensor, exact for
    every dtype (a sum would overflow on large finite values), and no slower than a sum.
    Empty tensors are finite and are skipped (``aminmax`` has no identity).

    DTensor gradients (FSDP2) are read on this rank's shards and the flag is combined over
    ranks in one all-reduce of a 0-d tensor, so every rank decides alike (Note [FSDP2]).
    """
    shards = [local_tensor(g) for g in grads]
    extremes: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    small: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in shards:
        if g.numel() >= _PARALLEL_NUMEL:
            extremes.setdefault((g.device, g.dtype), []).extend(torch.aminmax(g))
        elif g.numel():
            small.setdefault((g.device, g.dtype), []).append(g.reshape(-1))
    for key, gs in small.items():  # one reduction over all small tensors (a few bytes each)
        extremes.setdefault(key, []).extend(torch.aminmax(torch.cat(gs) if len(gs) > 1 else gs[0]))
    flags = [torch.stack(values).isfinite().all() for values in extremes.values()]
    if not flags:
        device = shards[0].device if shards else torch.device("cpu")
        ok = torch.ones((), dtype=torch.bool, device=device)
    else:
        ok = flags[0] if len(flags) == 1 else torch.stack(flags).all()
    if any(s is not g for s, g in zip(shards, grads, strict=True)):  # some were DTensors
        ok = all_reduce_sum((~ok).to(torch.float32)) == 0
    return ok


# --------------------------------------------------------------------------------------------
# Hyperparameters and the scalars of one step (0-d tensors on the device)
# --------------------------------------------------------------------------------------------

_GROUP_KEYS = ("cprop_beta", "cprop_c", "cprop_eps", "cprop_cdf", "cprop_method")


class _CPropHyper(NamedTuple):
    """CProp's hyperparameters; a param group holds them under :data:`_GROUP_KEYS`."""

    beta: float
    c: float
    eps: float
    cdf: str
    method: str

    def group_entries(self) -> dict[str, Any]:
        return dict(zip(_GROUP_KEYS, self, strict=True))


def _cprop_hyper(group: dict[str, Any]) -> _CPropHyper:
    return _CPropHyper(*(group[key] for key in _GROUP_KEYS))


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


def _group_by_dtype(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in order."""
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype), []).append(i)
    return out


def _advance_steps(
    stats: list[Tensor],
    state_steps: list[Tensor],
    found_finite: Tensor,
    beta: float,
    *,
    foreach: bool,
) -> list[tuple[list[int], torch.dtype, Tensor, _Gates]]:
    """Per (device, dtype) of the statistics: the indices, the dtype, ``found_finite`` on that
    device and the step's gates; the step counts are advanced here (by 0 on a skipped step)."""
    out = []
    for (device, dtype), idx in _group_by_dtype(stats).items():
        ok = found_finite.to(device)
        gates = _gates(ok, beta, dtype)
        keep32 = gates.keep.to(torch.float32)
        if foreach:
            torch._foreach_add_([state_steps[i] for i in idx], [keep32] * len(idx))
        else:
            for i in idx:
                state_steps[i].add_(keep32)
        out.append((idx, dtype, ok, gates))
    return out


_Lists = TypeVar("_Lists", bound=tuple)


def _select(lists: _Lists, idx: list[int]) -> _Lists:
    """The entries ``idx`` of every list of a tensor-lists tuple (a None list stays None)."""
    return type(lists)(*(None if xs is None else [xs[i] for i in idx] for xs in lists))


def _in_dtype(param: Tensor, dtype: torch.dtype) -> Tensor:
    return param if param.dtype == dtype else param.to(dtype)


def _sanitised(grad: Tensor, found_finite: Tensor, dtype: torch.dtype) -> Tensor:
    """A fresh copy of ``grad`` in ``dtype``, all zeros when the step is skipped."""
    return torch.where(found_finite, grad, 0).to(dtype)


def _with_weight_decay(raw: Tensor, p: Tensor, weight_decay: float, keep: Tensor) -> Tensor:
    """``g + weight_decay * p`` (times ``keep``: a skipped step's ``g`` is 0, so is this)."""
    return raw if weight_decay == 0 else raw.add(p, alpha=weight_decay).mul_(keep)


def _with_weight_decay_foreach(
    raws: list[Tensor], params: list[Tensor], weight_decay: float, keep: Tensor
) -> list[Tensor]:
    if weight_decay == 0:
        return raws
    dirs = torch._foreach_add(
        raws, [_in_dtype(p, raws[0].dtype) for p in params], alpha=weight_decay
    )
    torch._foreach_mul_(dirs, keep)
    return dirs


def _bias_corrections_foreach(beta: float, ts: list[Tensor]) -> list[Tensor]:
    """``1 - beta**t`` for every ``t``."""
    out = torch._foreach_pow(beta, ts)
    torch._foreach_neg_(out)
    torch._foreach_add_(out, 1)
    return out


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
    exp_avg: Tensor, second: Tensor, step: Tensor, keep: Tensor, cprop: _CPropHyper
) -> Tensor:
    """The scale ``s`` of one tensor from its updated statistics (a new tensor)."""
    beta, c, eps, cdf, method = cprop
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
    cprop: _CPropHyper,
) -> list[Tensor]:
    """:func:`_scale_one` over lists with ``torch._foreach_*`` ops (bitwise the same on CPU)."""
    beta, c, eps, cdf, method = cprop
    dtype = exp_avgs[0].dtype
    ts = [_step_time(step, dtype) for step in steps]
    firsts = [(step == 1).to(dtype) for step in steps]
    if math.isinf(c):
        ones = [torch.ones_like(m) for m in exp_avgs]
        torch._foreach_mul_(ones, keep)
        return ones
    bias_corrections = _bias_corrections_foreach(beta, ts)
    m_hats = torch._foreach_div(exp_avgs, bias_corrections)
    denoms = torch._foreach_div(seconds, bias_corrections)
    if method == "conformity":
        ns = torch._foreach_div(bias_corrections, 1 - beta)
        torch._foreach_sub_(ns, 1)
        torch._foreach_add_(ns, eps)
        torch._foreach_addcmul_(denoms, m_hats, m_hats, value=-1)
        torch._foreach_clamp_min_(denoms, 0)
        torch._foreach_div_(denoms, ns)
    if method != "relative":
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
    torch._foreach_lerp_(exp_avgs, raws, [gates.cprop_weight] * len(raws))
    if seconds is None:
        return
    torch._foreach_mul_(seconds, gates.cprop_beta)
    if method == "relative":
        torch._foreach_add_(seconds, torch._foreach_abs(raws), alpha=1 - beta)
    else:
        torch._foreach_addcmul_(seconds, raws, raws, value=1 - beta)


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
    groups = _advance_steps(exp_avgs, state_steps, found_finite, beta, foreach=foreach)
    for idx, dtype, ok, gates in groups:
        raws = [_sanitised(grads[i], ok, dtype) for i in idx]
        if foreach:
            ms, vs = [exp_avgs[i] for i in idx], [seconds[i] for i in idx]
            _update_stats_foreach(ms, vs, raws, gates, beta=beta, method=method)
            continue
        for i, raw in zip(idx, raws, strict=True):
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
    cprop = _CPropHyper(beta, c, eps, cdf, method)
    out: list[Tensor] = [exp_avgs[0]] * len(exp_avgs)
    for (device, dtype), idx in _group_by_dtype(exp_avgs).items():
        keep = found_finite.to(device=device, dtype=dtype)
        if foreach:
            ms, vs, steps = ([xs[i] for i in idx] for xs in (exp_avgs, seconds, state_steps))
            scales = _scale_foreach(ms, vs, steps, keep, cprop)
        else:
            scales = [_scale_one(exp_avgs[i], seconds[i], state_steps[i], keep, cprop) for i in idx]
        for i, s in zip(idx, scales, strict=True):
            out[i] = s
    return out


# --------------------------------------------------------------------------------------------
# Native SGD + CProp
# --------------------------------------------------------------------------------------------


class _SGDHyper(NamedTuple):
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool


class _SGDTensors(NamedTuple):
    """One entry per parameter (this rank's shards under FSDP2)."""

    params: list[Tensor]
    grads: list[Tensor]  # raw gradients, never written
    momentum_buffers: list[Tensor | None]  # None entries without momentum
    cprop_exp_avgs: list[Tensor]  # CProp's m
    cprop_exp_avg_sqs: list[Tensor]  # CProp's v (the EMA of |g| for method="relative")
    state_steps: list[Tensor]  # 0-d float32 t


def _momentum_coefficients(
    step: Tensor, found_finite: Tensor, momentum_gate: Tensor, dampening: float
) -> tuple[Tensor, Tensor]:
    """``(a, b)`` of ``buf <- a * buf + b * g``.

    torch.optim.SGD starts the buffer at g (no dampening) on the first step: ``(0, 1)`` then,
    ``(momentum, 1 - dampening)`` after, and ``(1, any)`` on a skipped step (g = 0 there).
    """
    first = (step == 1) & found_finite
    a = torch.where(first, torch.zeros_like(momentum_gate), momentum_gate)
    b = torch.where(first, torch.ones_like(momentum_gate), 1 - dampening)
    return a, b


def _sgd_direction_one(
    grad: Tensor,
    buf: Tensor | None,
    step: Tensor,
    found_finite: Tensor,
    momentum_gate: Tensor,
    sgd: _SGDHyper,
) -> Tensor:
    """torch.optim.SGD's update ``-lr * d`` (a new tensor); ``buf`` updated in place."""
    if buf is not None:
        a, b = _momentum_coefficients(step, found_finite, momentum_gate, sgd.dampening)
        buf.mul_(a).addcmul_(grad, b)
        grad = grad.add(buf, alpha=sgd.momentum) if sgd.nesterov else buf
    return grad.mul(-sgd.lr)


def _single_tensor_cprop_sgd(
    tensors: _SGDTensors, *, found_finite: Tensor, sgd: _SGDHyper, cprop: _CPropHyper
) -> None:
    steps = tensors.state_steps
    for idx, dtype, ok, gates in _advance_steps(
        tensors.cprop_exp_avgs, steps, found_finite, cprop.beta, foreach=False
    ):
        momentum_gate = _gate(ok, sgd.momentum, 1.0, dtype)
        for i in idx:
            param, m, v = tensors.params[i], tensors.cprop_exp_avgs[i], tensors.cprop_exp_avg_sqs[i]
            raw = _sanitised(tensors.grads[i], ok, dtype)
            grad = _with_weight_decay(raw, _in_dtype(param, dtype), sgd.weight_decay, gates.keep)
            _update_stats_one(m, v, raw, gates, beta=cprop.beta, method=cprop.method)
            buf = tensors.momentum_buffers[i]
            update = _sgd_direction_one(grad, buf, steps[i], ok, momentum_gate, sgd)
            param.addcmul_(_scale_one(m, v, steps[i], gates.keep, cprop), update)


def _multi_tensor_cprop_sgd(
    tensors: _SGDTensors, *, found_finite: Tensor, sgd: _SGDHyper, cprop: _CPropHyper
) -> None:
    for idx, dtype, ok, gates in _advance_steps(
        tensors.cprop_exp_avgs, tensors.state_steps, found_finite, cprop.beta, foreach=True
    ):
        ts = _select(tensors, idx)
        raws = [_sanitised(grad, ok, dtype) for grad in ts.grads]
        dirs = _with_weight_decay_foreach(raws, ts.params, sgd.weight_decay, gates.keep)
        ms, vs = ts.cprop_exp_avgs, ts.cprop_exp_avg_sqs
        _update_stats_foreach(ms, vs, raws, gates, beta=cprop.beta, method=cprop.method)
        if sgd.momentum != 0:
            bufs = ts.momentum_buffers
            momentum_gate = _gate(ok, sgd.momentum, 1.0, dtype)
            coefficients = [
                _momentum_coefficients(step, ok, momentum_gate, sgd.dampening)
                for step in ts.state_steps
            ]
            torch._foreach_mul_(bufs, [a for a, _ in coefficients])
            torch._foreach_addcmul_(bufs, dirs, [b for _, b in coefficients])
            dirs = torch._foreach_add(dirs, bufs, alpha=sgd.momentum) if sgd.nesterov else bufs
        updates = torch._foreach_mul(dirs, -sgd.lr)
        scales = _scale_foreach(ms, vs, ts.state_steps, gates.keep, cprop)
        torch._foreach_addcmul_(ts.params, scales, updates)


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
    fused: bool = False,
) -> None:
    """Functional :class:`CPropSGD`: SGD's update scaled per element by CProp, in place.

    ``fused`` runs one torch.compile-generated loop per tensor (Note [Fused path]); else
    ``foreach`` picks ``torch._foreach_*`` ops over the per-tensor reference loop.
    """
    if fused:
        fn = _fused_cprop_sgd
    else:
        fn = _multi_tensor_cprop_sgd if foreach else _single_tensor_cprop_sgd
    fn(
        _SGDTensors(
            params, grads, momentum_buffers, cprop_exp_avgs, cprop_exp_avg_sqs, state_steps
        ),
        found_finite=found_finite,
        sgd=_SGDHyper(lr, momentum, dampening, weight_decay, nesterov),
        cprop=_CPropHyper(cprop_beta, cprop_c, cprop_eps, cdf, method),
    )


# --------------------------------------------------------------------------------------------
# Native Adam / AdamW + CProp
# --------------------------------------------------------------------------------------------


class _AdamHyper(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    decoupled_weight_decay: bool


class _AdamTensors(NamedTuple):
    """One entry per parameter (this rank's shards under FSDP2)."""

    params: list[Tensor]
    grads: list[Tensor]  # raw gradients, never written
    exp_avgs: list[Tensor]  # Adam's m
    exp_avg_sqs: list[Tensor]  # Adam's v
    max_exp_avg_sqs: list[Tensor] | None  # running max of v (amsgrad), else None
    cprop_exp_avgs: list[Tensor]  # CProp's m
    cprop_exp_avg_sqs: list[Tensor] | None  # CProp's v (or EMA of |g|); None: exp_avg_sqs
    state_steps: list[Tensor]  # 0-d float32 t, Adam's and CProp's


def _single_tensor_cprop_adam(
    tensors: _AdamTensors, *, found_finite: Tensor, adam: _AdamHyper, cprop: _CPropHyper
) -> None:
    lr, beta1, beta2, eps, weight_decay, amsgrad, decoupled = adam
    l2 = 0.0 if decoupled else weight_decay  # the penalty Adam's gradient gets
    for idx, dtype, ok, gates in _advance_steps(
        tensors.exp_avgs, tensors.state_steps, found_finite, cprop.beta, foreach=False
    ):
        weight1 = _gate(ok, 1.0 - beta1, 0.0, dtype)
        beta2_gate = _gate(ok, beta2, 1.0, dtype)
        for i in idx:
            param, exp_avg, exp_avg_sq = (
                tensors.params[i],
                tensors.exp_avgs[i],
                tensors.exp_avg_sqs[i],
            )
            step, cprop_m = tensors.state_steps[i], tensors.cprop_exp_avgs[i]
            # CProp's statistics see the raw gradient; its v is Adam's exp_avg_sq when shared
            cprop_v = None if tensors.cprop_exp_avg_sqs is None else tensors.cprop_exp_avg_sqs[i]
            t = _step_time(step, dtype)
            p = _in_dtype(param, dtype)
            raw = _sanitised(tensors.grads[i], ok, dtype)
            grad = _with_weight_decay(raw, p, l2, gates.keep)
            _update_stats_one(cprop_m, cprop_v, raw, gates, beta=cprop.beta, method=cprop.method)
            exp_avg.lerp_(grad, weight1)
            exp_avg_sq.mul_(beta2_gate).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**t
            bias_correction2_sqrt = (1 - beta2**t).sqrt()
            if amsgrad:
                max_exp_avg_sq = tensors.max_exp_avg_sqs[i]
                torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
                denom = max_exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
            else:
                denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
            update = torch.div(exp_avg, denom, out=denom).mul_(-lr / bias_correction1)
            if decoupled and weight_decay != 0:
                update.add_(p, alpha=-lr * weight_decay)
            second = exp_avg_sq if cprop_v is None else cprop_v
            param.addcmul_(_scale_one(cprop_m, second, step, gates.keep, cprop), update)


def _multi_tensor_cprop_adam(
    tensors: _AdamTensors, *, found_finite: Tensor, adam: _AdamHyper, cprop: _CPropHyper
) -> None:
    lr, beta1, beta2, eps, weight_decay, amsgrad, decoupled = adam
    l2 = 0.0 if decoupled else weight_decay
    for idx, dtype, ok, gates in _advance_steps(
        tensors.exp_avgs, tensors.state_steps, found_finite, cprop.beta, foreach=True
    ):
        ts = _select(tensors, idx)
        ms, vs, cms, cvs = ts.exp_avgs, ts.exp_avg_sqs, ts.cprop_exp_avgs, ts.cprop_exp_avg_sqs
        times = [_step_time(step, dtype) for step in ts.state_steps]
        raws = [_sanitised(grad, ok, dtype) for grad in ts.grads]
        dirs = _with_weight_decay_foreach(raws, ts.params, l2, gates.keep)
        _update_stats_foreach(cms, cvs, raws, gates, beta=cprop.beta, method=cprop.method)
        torch._foreach_lerp_(ms, dirs, [_gate(ok, 1.0 - beta1, 0.0, dtype)] * len(ms))
        torch._foreach_mul_(vs, _gate(ok, beta2, 1.0, dtype))
        torch._foreach_addcmul_(vs, dirs, dirs, value=1 - beta2)
        bias_correction1 = _bias_corrections_foreach(beta1, times)
        bias_correction2_sqrt = _bias_corrections_foreach(beta2, times)
        torch._foreach_sqrt_(bias_correction2_sqrt)
        if amsgrad:
            torch._foreach_maximum_(ts.max_exp_avg_sqs, vs)
            denoms = torch._foreach_sqrt(ts.max_exp_avg_sqs)
        else:
            denoms = torch._foreach_sqrt(vs)
        torch._foreach_div_(denoms, bias_correction2_sqrt)
        torch._foreach_add_(denoms, eps)
        updates = torch._foreach_div(ms, denoms)
        # -lr / bias_correction1, with the same rounding as the reference's 0-d division
        torch._foreach_mul_(updates, [-lr / bc for bc in bias_correction1])
        if decoupled and weight_decay != 0:
            p32 = [_in_dtype(p, dtype) for p in ts.params]
            torch._foreach_add_(updates, p32, alpha=-lr * weight_decay)
        scales = _scale_foreach(cms, vs if cvs is None else cvs, ts.state_steps, gates.keep, cprop)
        torch._foreach_addcmul_(ts.params, scales, updates)


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

    ``cprop_exp_avg_sqs=None`` means CProp's ``v`` is Adam's ``exp_avg_sq`` (shared);
    ``max_exp_avg_sqs`` is read only with ``amsgrad``.
    """
    if fused:
        fn = _fused_cprop_adam
    elif foreach:
        fn = _multi_tensor_cprop_adam
    else:
        fn = _single_tensor_cprop_adam
    fn(
        _AdamTensors(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs if amsgrad else None,
            cprop_exp_avgs,
            cprop_exp_avg_sqs,
            state_steps,
        ),
        found_finite=found_finite,
        adam=_AdamHyper(lr, beta1, beta2, eps, weight_decay, amsgrad, decoupled_weight_decay),
        cprop=_CPropHyper(cprop_beta, cprop_c, cprop_eps, cdf, method),
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


# The wrapper's passes read only CProp's columns; Adam's get these neutral values.
_NO_ADAM = _AdamHyper(
    lr=0.0,
    beta1=0.0,
    beta2=0.0,
    eps=0.0,
    weight_decay=0.0,
    amsgrad=False,
    decoupled_weight_decay=True,
)


def _adam_coefficients(
    steps: Tensor, found_finite: Tensor, *, adam: _AdamHyper, cprop: _CPropHyper
) -> Tensor:
    """Rows of :data:`_COEFS` (float64) for the stacked, already advanced step counts.

    Everything that is the same for all elements of a tensor is computed here, once per tensor
    and for all tensors at once (a few vector ops), so the compiled kernel does no ``pow`` and
    as few divisions per element as the math allows (CPU kernels are compute-bound here).
    """
    lr, beta1, beta2, eps, weight_decay = (
        adam.lr,
        adam.beta1,
        adam.beta2,
        adam.eps,
        adam.weight_decay,
    )
    cprop_beta, cprop_eps = cprop.beta, cprop.eps
    keep = found_finite.to(torch.float64)
    t = steps.to(torch.float64).clamp(min=1)
    first = (steps == 1).to(torch.float64) * keep
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    cprop_bias_correction = 1 - cprop_beta**t
    n = cprop_bias_correction / (1 - cprop_beta)
    inv_cprop_bc = cprop_bias_correction.reciprocal()
    constant = _CDF_CONSTANT[cprop.cdf] if cprop.method == "conformity" else 1.0
    ratio = inv_cprop_bc * constant
    if cprop.method == "conformity":
        variance_scale = inv_cprop_bc / (n - 1 + cprop_eps) / ratio**2
    elif cprop.method == "relative":
        variance_scale = inv_cprop_bc / ratio  # se = a_hat + eps, not under a square root
    else:
        variance_scale = inv_cprop_bc / ratio**2
    c = 1.0 if math.isinf(cprop.c) else cprop.c

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


def _advance_to_coefficients(
    steps: list[Tensor], found_finite: Tensor, *, adam: _AdamHyper, cprop: _CPropHyper
) -> Tensor:
    """Advance the step counts (by 0 when skipped), then a :data:`_COEFS` row per tensor."""
    torch._foreach_add_(steps, [found_finite.to(torch.float32)] * len(steps))
    return _adam_coefficients(torch.stack(steps), found_finite, adam=adam, cprop=cprop)


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


def _scale_flags(cprop: _CPropHyper) -> dict[str, Any]:
    """The structural choices :func:`_fused_scale` is compiled for (static arguments)."""
    return {
        "cdf": cprop.cdf,
        "method": cprop.method,
        "c_is_inf": math.isinf(cprop.c),
        "c_is_one": cprop.c == 1,
        "eps_is_zero": cprop.eps == 0,
    }


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
        s = k[..., _K["cprop_c"]] * torch.ones_like(cm)  # c is 1 here, 0 on a skipped step
    else:
        if method == "conformity":
            # (v_hat - m_hat^2) / (n - 1 + eps) = (cv - cm^2 / bc) / (bc (n - 1 + eps))
            centred = cv - (cm * cm) * k[..., _K["inv_cprop_bias_correction"]]
            se = torch.sqrt(torch.clamp(centred, min=0) * k[..., _K["variance_scale"]])
        elif method == "relative":
            se = cv * k[..., _K["variance_scale"]]
        else:
            se = torch.sqrt(cv * k[..., _K["variance_scale"]])
        se = se + k[..., _K["scaled_cprop_eps"]]  # se / r, see _adam_coefficients
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
            confidence = torch.clamp(confidence * k[..., _K["cprop_c"]], max=1)
        s = torch.maximum(confidence, k[..., _K["first"]])
    return s


def _coefficients(coef: Tensor, rows: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The coefficients in compiled code: ``coef`` is one :data:`_COEFS` row, or with ``rows``
    the table of a batch, gathered per element (Note [Batching small tensors]); columns are
    read as ``k[..., j]`` either way."""
    k = coef.to(dtype)
    return k if rows is None else k[rows]


def _fused_l2(raw: Tensor, p: Tensor, k: Tensor, found_finite: Tensor) -> Tensor:
    """``g + weight_decay * p`` in compiled code, 0 on a skipped step (where ``p`` stays)."""
    return torch.where(found_finite, raw + k[..., _K["weight_decay"]] * p, 0)


def _ema(old: Tensor, new: Tensor, k: Tensor, beta: str) -> Tensor:
    """``beta * old + (1 - beta) * new`` with the gated factors of row ``k`` (compiled code)."""
    return old * k[..., _K[beta]] + k[..., _K["one_minus_" + beta]] * new


def _fused_cprop_stats(
    cprop_exp_avg: Tensor, cprop_second: Tensor | None, raw: Tensor, k: Tensor, method: str
) -> tuple[Tensor, Tensor | None]:
    """CProp's EMAs from the raw gradient (compiled code); no second one when shared."""
    cm = _ema(cprop_exp_avg, raw, k, "cprop_beta")
    if cprop_second is None:
        return cm, None
    second = torch.abs(raw) if method == "relative" else raw * raw
    return cm, _ema(cprop_second, second, k, "cprop_beta")


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
    rows: Tensor | None = None,
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
    k = _coefficients(coef, rows, dtype)
    p = param.to(dtype)
    raw = _sanitised(grad, found_finite, dtype)
    g = raw if decoupled else _fused_l2(raw, p, k, found_finite)
    # Adam; on a skipped step g = 0, beta = 1, 1 - beta = 0: the old values come back exactly
    m = _ema(exp_avg, g, k, "beta1")
    v = _ema(exp_avg_sq, g * g, k, "beta2")
    vmax = torch.maximum(max_exp_avg_sq, v) if max_exp_avg_sq is not None else v
    denom = torch.sqrt(vmax) * k[..., _K["inv_bias_correction2_sqrt"]] + k[..., _K["eps"]]
    update = k[..., _K["neg_step_size"]] * m / denom
    if decoupled:
        update = update - k[..., _K["lr_weight_decay"]] * p
    cm, cv = _fused_cprop_stats(cprop_exp_avg, cprop_second, raw, k, method)
    s = _fused_scale(
        cm,
        v if cv is None else cv,
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


def _fused_wrapper_stats_kernel(
    param: Tensor,
    grad: Tensor,
    snapshot: Tensor,
    cprop_exp_avg: Tensor,
    cprop_second: Tensor,
    coef: Tensor,
    found_finite: Tensor,
    rows: Tensor | None = None,
    *,
    method: str,
) -> None:
    """Before the base step: CProp's EMAs from the raw gradient and the snapshot ``p_old``."""
    dtype = cprop_exp_avg.dtype
    raw = _sanitised(grad, found_finite, dtype)
    snapshot.copy_(param)
    k = _coefficients(coef, rows, dtype)
    cm, cv = _fused_cprop_stats(cprop_exp_avg, cprop_second, raw, k, method)
    cprop_exp_avg.copy_(cm)
    cprop_second.copy_(cv)


def _fused_wrapper_apply_kernel(
    param: Tensor,
    snapshot: Tensor,
    cprop_exp_avg: Tensor,
    cprop_second: Tensor,
    coef: Tensor,
    found_finite: Tensor,
    rows: Tensor | None = None,
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
        _coefficients(coef, rows, dtype),
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


_COMPILED: dict[str, Callable[..., None]] = {}
# Large tensors compile per numel (see _compiled); dynamo's default limit of 8 variants per
# function would be hit by any real model.
_RECOMPILE_LIMIT = 512


def _compiled(name: str, fn: Callable[..., None], numel: int) -> Callable[..., None]:
    """The compiled ``fn`` for a tensor of ``numel`` elements.

    Large tensors get a static-shape kernel (one compile per numel; inductor only parallelises a
    CPU loop whose length it knows), small ones share one dynamic-shape kernel (a single thread
    is right for them, and models with many small tensors compile once). Every numel of a
    static kernel gets its own code object, since dynamo keeps its cache on the code object and
    tries the guards of its entries one after another: a call then checks one entry, not one per
    shape in the model.
    """
    dynamic = numel < _PARALLEL_NUMEL
    variant = "dynamic" if dynamic else f"static_{numel}"
    key = f"{name}:{variant}"
    if key not in _COMPILED:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{variant}")
        twin = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)
        twin.__kwdefaults__ = fn.__kwdefaults__
        _COMPILED[key] = torch.compile(
            twin, dynamic=dynamic, fullgraph=True, options=_inductor_options()
        )
    return _COMPILED[key]


def _inductor_options() -> dict[str, Any]:
    """Let the C++ compiler contract ``a * b + c`` into fused multiply-adds on CPU.

    The CPU loop is compute-bound (Note [Fused path]) and most of its arithmetic is EMAs and a
    polynomial, i.e. multiply-adds: contraction makes the step about 10% faster and each of
    them exact before rounding. Triton contracts by default; torch versions without the
    setting keep their default.
    """
    import torch._inductor.config as inductor_config  # imported by torch.compile anyway

    if hasattr(inductor_config.cpp, "enable_floating_point_contract_flag"):
        return {"cpp.enable_floating_point_contract_flag": "fast"}
    return {}


# Note [Batching small tensors]
#   Calling a compiled function costs tens of microseconds of guards and wrappers, which for a
#   bias or a norm weight is far more than its arithmetic; a transformer has a hundred such
#   tensors. Tensors below _PARALLEL_NUMEL elements therefore go through the kernel together:
#   their flat views are concatenated, each element reads its tensor's coefficient row through
#   an index (``rows``), and what the kernel wrote is copied back. The copies move a few bytes
#   per small tensor. The arithmetic is the per-tensor call's; the C++ compiler may contract
#   it into multiply-adds differently, so results agree to rounding (tested), not bitwise.


def _launch(
    name: str,
    fn: Callable[..., None],
    calls: list[tuple[Tensor | None, ...]],
    coefs: Tensor,
    found_finite: Tensor,
    *,
    writes: tuple[int, ...],
    **static: Any,
) -> None:
    """The compiled ``fn`` over every tensor of a group.

    ``calls`` holds each tensor's elementwise arguments, its flat parameter first (whose length
    picks the kernel, see :func:`_compiled`); ``coefs`` their coefficient rows; ``writes`` the
    positions of the arguments ``fn`` writes. Small tensors run as one batch (Note [Batching
    small tensors]), the others one call each.
    """
    batches: dict[tuple[torch.dtype, ...], list[int]] = {}
    alone: list[int] = []
    for i, args in enumerate(calls):
        if args[0].numel() < _BATCH_NUMEL and all(
            a is None or (a.dim() == 1 and a.is_contiguous()) for a in args
        ):
            batches.setdefault(tuple(a.dtype for a in args if a is not None), []).append(i)
        else:
            alone.append(i)
    with torch._dynamo.config.patch(**_recompile_limit()):
        for idx in batches.values():
            if len(idx) == 1:
                alone += idx
            else:
                _launch_batch(
                    name, fn, [calls[i] for i in idx], idx, coefs, found_finite, writes, static
                )
        for i in alone:
            row = coefs[i].clone()  # no storage offset: it would specialise the kernel
            _compiled(name, fn, calls[i][0].numel())(*calls[i], row, found_finite, **static)


def _recompile_limit() -> dict[str, int]:
    """Dynamo's per-function compile limit raised to _RECOMPILE_LIMIT, under the name this torch
    uses (``cache_size_limit`` before torch 2.6)."""
    name = (
        "recompile_limit"
        if hasattr(torch._dynamo.config, "recompile_limit")
        else "cache_size_limit"
    )
    return {name: _RECOMPILE_LIMIT}


_BATCH_NUMEL = _PARALLEL_NUMEL  # tests set it to 0 to compare batches with single calls
_ROWS_CACHE: OrderedDict[tuple[Any, ...], Tensor] = OrderedDict()


def _element_rows(positions: list[int], sizes: list[int], device: torch.device) -> Tensor:
    """The coefficient row of every element of a batch (cached: a model's layout is fixed)."""
    key = (device, tuple(positions), tuple(sizes))
    rows = _ROWS_CACHE.get(key)
    if rows is None:
        # built on the host and copied once; later steps find it here (no per-step transfer)
        rows = torch.repeat_interleave(torch.tensor(positions), torch.tensor(sizes)).to(device)
        _ROWS_CACHE[key] = rows
        if len(_ROWS_CACHE) > 64:
            _ROWS_CACHE.popitem(last=False)
    return rows


def _launch_batch(
    name: str,
    fn: Callable[..., None],
    calls: list[tuple[Tensor | None, ...]],
    positions: list[int],
    coefs: Tensor,
    found_finite: Tensor,
    writes: tuple[int, ...],
    static: dict[str, Any],
) -> None:
    """One call of ``fn`` over the concatenation of small tensors (Note [Batching small
    tensors])."""
    sizes = [args[0].numel() for args in calls]
    columns = list(zip(*calls, strict=True))
    joined = [None if column[0] is None else torch.cat(column) for column in columns]
    rows = _element_rows(positions, sizes, joined[0].device)
    _compiled(f"{name}_batch", fn, sum(sizes))(*joined, coefs, found_finite, rows, **static)
    for j in writes:
        if joined[j] is not None:
            torch._foreach_copy_(list(columns[j]), list(joined[j].split(sizes)))


def _flat(t: Tensor | None) -> Tensor | None:
    """A plain 1-D view (same storage), so parameters of every shape share compiled code."""
    if t is None:
        return None
    t = t.detach()  # a view autograd does not track: the base step writes the parameter
    return t.view(-1) if t.is_contiguous() else t


def _shards(tensors: list[Any]) -> list[Any]:
    """This rank's shards of FSDP2 DTensors (aliases: in-place ops write the DTensor); other
    tensors and None as they are."""
    return [local_tensor(t) for t in tensors]


def _flat_shards(tensors: list[Tensor] | None, n: int) -> list[Tensor | None]:
    """Flat views of this rank's shards (:func:`_flat`); ``n`` Nones for a missing list."""
    return [None] * n if tensors is None else [_flat(t) for t in _shards(tensors)]


def _fused_run(
    name: str,
    kernel: Callable[..., None],
    tensors: _AdamTensors | _SGDTensors,
    stats: list[Tensor],
    found_finite: Tensor,
    coefficients: Callable[[list[Tensor], Tensor], Tensor],
    *,
    writes: tuple[int, ...],
    static: dict[str, Any],
) -> None:
    """A fused path: per (device, statistics dtype), the coefficient table of the advanced step
    counts, then ``kernel`` over flat views of every tensor list but the step counts (last)."""
    for (device, _), idx in _group_by_dtype(stats).items():
        ok = found_finite.to(device)
        ts = _select(tensors, idx)
        coefs = coefficients(ts.state_steps, ok)
        flats = [_flat_shards(xs, len(idx)) for xs in ts[:-1]]
        calls = list(zip(*flats, strict=True))
        _launch(name, kernel, calls, coefs, ok, writes=writes, **static)


def _fused_cprop_adam(
    tensors: _AdamTensors, *, found_finite: Tensor, adam: _AdamHyper, cprop: _CPropHyper
) -> None:
    static = {
        "amsgrad": adam.amsgrad,
        "decoupled": adam.decoupled_weight_decay or adam.weight_decay == 0,
        **_scale_flags(cprop),
    }
    _fused_run(
        "adam",
        _fused_adam_kernel,
        tensors,
        tensors.exp_avgs,
        found_finite,
        lambda steps, ok: _advance_to_coefficients(steps, ok, adam=adam, cprop=cprop),
        writes=(0, 2, 3, 4, 5, 6),  # the parameter and every state tensor, never the gradient
        static=static,
    )


# SGD's momentum coefficients, appended to the _COEFS rows of the SGD kernel: the buffer moves
# as buf <- a * buf + b * d with (a, b) = (0, 1) on the first clean step (torch.optim.SGD starts
# the buffer at d), (momentum, 1 - dampening) after, (1, 0) on a skipped step.
_SGD_COEFS = ("momentum_a", "momentum_b", "momentum")
_SGD_K = {name: len(_COEFS) + i for i, name in enumerate(_SGD_COEFS)}


def _sgd_coefficients(
    steps: list[Tensor], found_finite: Tensor, *, sgd: _SGDHyper, cprop: _CPropHyper
) -> Tensor:
    """Advance the step counts, then one row of :data:`_COEFS` + :data:`_SGD_COEFS` per tensor.

    SGD is Adam's row with ``beta1 = 0`` (so ``neg_step_size = -lr``) and the L2 weight decay
    column, plus the momentum columns.
    """
    l2 = _AdamHyper(sgd.lr, 0.0, 0.0, 0.0, sgd.weight_decay, False, False)
    coefs = _advance_to_coefficients(steps, found_finite, adam=l2, cprop=cprop)
    keep = found_finite.to(torch.float64)
    first = coefs[:, _K["first"]]
    gated_momentum = keep * (sgd.momentum - 1) + 1
    momentum_a = gated_momentum * (1 - first)
    momentum_b = (keep * (1 - sgd.dampening)) * (1 - first) + first
    momentum = torch.full_like(first, sgd.momentum)
    extra = torch.stack([momentum_a, momentum_b, momentum], dim=1)
    return torch.cat([coefs, extra], dim=1)


def _fused_sgd_kernel(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Tensor | None,
    cprop_exp_avg: Tensor,
    cprop_second: Tensor,
    coef: Tensor,
    found_finite: Tensor,
    rows: Tensor | None = None,
    *,
    weight_decay: bool,
    nesterov: bool,
    cdf: str,
    method: str,
    c_is_inf: bool,
    c_is_one: bool,
    eps_is_zero: bool,
) -> None:
    """SGD's whole per-element update with CProp's scale, one loop (Note [Fused path])."""
    dtype = cprop_exp_avg.dtype
    k = _coefficients(coef, rows, dtype)
    p = param.to(dtype)
    raw = _sanitised(grad, found_finite, dtype)
    d = _fused_l2(raw, p, k, found_finite) if weight_decay else raw
    cm, cv = _fused_cprop_stats(cprop_exp_avg, cprop_second, raw, k, method)
    buf = None
    if momentum_buffer is not None:
        buf = momentum_buffer * k[..., _SGD_K["momentum_a"]] + k[..., _SGD_K["momentum_b"]] * d
        d = d + k[..., _SGD_K["momentum"]] * buf if nesterov else buf
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
    # s = 0 on a skipped step; the select also keeps p where s * update would not be finite
    param.copy_(torch.where(found_finite, p + s * (k[..., _K["neg_step_size"]] * d), p))
    if momentum_buffer is not None:
        momentum_buffer.copy_(buf)
    cprop_exp_avg.copy_(cm)
    cprop_second.copy_(cv)


def _fused_cprop_sgd(
    tensors: _SGDTensors, *, found_finite: Tensor, sgd: _SGDHyper, cprop: _CPropHyper
) -> None:
    static = {
        "weight_decay": sgd.weight_decay != 0,
        "nesterov": sgd.nesterov,
        **_scale_flags(cprop),
    }
    _fused_run(
        "sgd",
        _fused_sgd_kernel,
        tensors,
        tensors.cprop_exp_avgs,
        found_finite,
        lambda steps, ok: _sgd_coefficients(steps, ok, sgd=sgd, cprop=cprop),
        writes=(0, 2, 3, 4),  # the parameter, momentum buffer and statistics
        static=static,
    )


class _FusedWrapperStep:
    """The wrapper's two compiled passes around the base step, for one param group."""

    def __init__(
        self,
        params: list[Tensor],
        states: list[dict[str, Tensor]],
        found_finite: Tensor,
        group: dict[str, Any],
    ) -> None:
        self.cprop = _cprop_hyper(group)
        key = _second_key(self.cprop.method)
        # Note [FSDP2]: CProp is elementwise, so it runs on this rank's shards
        n = len(params)
        self.params = _flat_shards(params, n)
        self.grads = _flat_shards([p.grad for p in params], n)
        self.ms = _flat_shards([st["cprop_exp_avg"] for st in states], n)
        self.vs = _flat_shards([st[key] for st in states], n)
        self.found_finite = found_finite
        steps = [st["step"] for st in states]
        self.coefs = _advance_to_coefficients(steps, found_finite, adam=_NO_ADAM, cprop=self.cprop)
        self.snapshots: list[Tensor] = []

    def before(self) -> None:
        self.snapshots = [torch.empty_like(p) for p in self.params]
        calls = zip(self.params, self.grads, self.snapshots, self.ms, self.vs, strict=True)
        _launch(
            "wrapper_stats",
            _fused_wrapper_stats_kernel,
            list(calls),
            self.coefs,
            self.found_finite,
            writes=(2, 3, 4),  # the snapshot and the statistics
            method=self.cprop.method,
        )

    def after(self) -> None:
        calls = zip(self.params, self.snapshots, self.ms, self.vs, strict=True)
        _launch(
            "wrapper_apply",
            _fused_wrapper_apply_kernel,
            list(calls),
            self.coefs,
            self.found_finite,
            writes=(0,),
            **_scale_flags(self.cprop),
        )


# --------------------------------------------------------------------------------------------
# Shared pieces of the classes
# --------------------------------------------------------------------------------------------


def _second_key(method: str) -> str:
    return "cprop_exp_avg_abs" if method == "relative" else "cprop_exp_avg_sq"


def _validate_group(group: dict[str, Any]) -> None:
    _check_hyper(*_cprop_hyper(group), prefix="cprop_")


def _zeros_stat(param: Tensor) -> Tensor:
    """A statistic shaped like ``param`` (fp32 for bf16/fp16 parameters), all zeros."""
    return torch.zeros_like(param, dtype=_stats_dtype(param), memory_format=torch.preserve_format)


def _init_cprop_state(state: dict[str, Any], param: Tensor, method: str, share_v: bool) -> None:
    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
    state["cprop_exp_avg"] = _zeros_stat(param)
    if not share_v:
        state[_second_key(method)] = _zeros_stat(param)


def _params_with_grad(group: dict[str, Any], group_index: int, owner: str) -> list[Tensor]:
    """The group's parameters that have a gradient (checked: dense and real)."""
    params = []
    for pi, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        _check_grad(p.grad, owner, group_index, pi, p.shape)
        params.append(p)
    return params


def _collect(
    groups: list[dict[str, Any]], owner: str, init_state: Callable[[dict[str, Any], Tensor], None]
) -> tuple[list[tuple[dict[str, Any], list[Tensor]]], Tensor]:
    """Per group the parameters with a gradient (``init_state(group, p)`` creates state), and
    the step's ``found_finite`` over all of them."""
    work = []
    for gi, group in enumerate(groups):
        params = _params_with_grad(group, gi, owner)
        for p in params:
            init_state(group, p)
        work.append((group, params))
    return work, grads_finite([p.grad for _, params in work for p in params])


def _call_closure(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _states_by_param(saved: dict[Any, Any], params: list[Tensor], what: str) -> dict[Tensor, Any]:
    """Saved per-parameter state keyed by index -> keyed by parameter (copied, see _copy_state)."""
    out = {}
    for key, value in saved.items():
        if not isinstance(key, int) or not 0 <= key < len(params):
            raise ValueError(f"{what} has state for unknown parameter index {key!r}")
        out[params[key]] = _copy_state(value, params[key])
    return out


def _group_stats(
    groups: list[dict[str, Any]], state_of: Callable[[Tensor], dict[str, Any] | None]
) -> dict[str, Tensor]:
    """Mean scale and fraction of elements with ``s < 0.5``, per group and overall (0-d).

    Under FSDP2 they cover this rank's shards (Note [FSDP2]): no collective, as in ALeRA's
    stats, so a Monitor on one rank alone cannot hang the others.
    """
    out: dict[str, Tensor] = {}
    totals: list[tuple[Tensor, Tensor, int]] = []
    for gi, group in enumerate(groups):
        sums, belows, count = [], [], 0
        for p in group["params"]:
            st = state_of(p)
            if not st or "cprop_exp_avg" not in st:
                continue
            m = local_tensor(st["cprop_exp_avg"])
            second = st.get(_second_key(group["cprop_method"]), st.get("exp_avg_sq"))
            keep = torch.ones((), dtype=m.dtype, device=m.device)
            s = _scale_one(m, local_tensor(second), st["step"], keep, _cprop_hyper(group))
            sums.append(s.sum(dtype=torch.float32))
            belows.append((s < 0.5).sum(dtype=torch.float32))
            count += s.numel()
        if count == 0:
            continue
        total, below = torch.stack(sums).sum(), torch.stack(belows).sum()
        out[f"group{gi}.mean_scale"] = total / count
        out[f"group{gi}.frac_scale_below_half"] = below / count
        totals.append((total, below, count))
    if totals:
        n = sum(c for _, _, c in totals)
        out["mean_scale"] = torch.stack([t for t, _, _ in totals]).sum() / n
        out["frac_scale_below_half"] = torch.stack([b for _, b, _ in totals]).sum() / n
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


def _use_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
    return _default_foreach(params) if group["foreach"] is None else group["foreach"]


def _native_cprop_kwargs(group: dict[str, Any]) -> dict[str, Any]:
    """A group's CProp hyperparameters as :func:`cprop_sgd` / :func:`cprop_adam` name them."""
    return dict(
        zip(
            ("cprop_beta", "cprop_c", "cprop_eps", "cdf", "method"),
            _cprop_hyper(group),
            strict=True,
        )
    )


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
        self.state.update(_states_by_param(saved_state, params, "state_dict"))

    def stats(self) -> dict[str, Tensor]:
        """Telemetry as 0-d tensors, no host sync: ``group{i}.mean_scale``,
        ``group{i}.frac_scale_below_half`` and the totals ``mean_scale``,
        ``frac_scale_below_half`` over every element with state. The scale is recomputed from
        the current statistics, so it is the scale that the last step applied."""
        return _group_stats(self.param_groups, lambda p: self.state.get(p))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Tensor | None = None) -> Any:
        """One step. ``closure`` re-evaluates the model; ``loss`` is accepted and unused."""
        out = _call_closure(closure)
        work, found_finite = _collect(self.param_groups, type(self).__name__, self._init_state)
        for group, params in work:
            if params:
                self._step_group(group, params, found_finite)
        return out

    def _init_state(self, group: dict[str, Any], param: Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], found_finite: Tensor
    ) -> None:  # pragma: no cover
        raise NotImplementedError


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
        fused (bool, optional): one torch.compile-generated kernel per tensor (CPU or CUDA;
            the first step compiles, which takes seconds) (default: None = False).

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
        fused: bool | None = None,
    ) -> None:
        if foreach and fused:
            raise ValueError(
                "foreach and fused pick different implementations and cannot both be True, "
                f"got foreach={foreach!r}, fused={fused!r}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            **_CPropHyper(cprop_beta, cprop_c, cprop_eps, cdf, method).group_entries(),
            "foreach": foreach,
            "fused": fused,
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

    def _init_state(self, group: dict[str, Any], param: Tensor) -> None:
        state = self.state[param]
        if "step" not in state:
            _init_cprop_state(state, param, group["cprop_method"], share_v=False)
        if group["momentum"] != 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = _zeros_stat(param)

    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], found_finite: Tensor
    ) -> None:
        states = [self.state[p] for p in params]
        momentum = group["momentum"]
        # Note [FSDP2]: CProp is elementwise, so it runs on this rank's shards
        cprop_sgd(
            _shards(params),
            _shards([p.grad for p in params]),
            _shards([st.get("momentum_buffer") if momentum != 0 else None for st in states]),
            _shards([st["cprop_exp_avg"] for st in states]),
            _shards([st[_second_key(group["cprop_method"])] for st in states]),
            [st["step"] for st in states],
            found_finite=found_finite,
            lr=group["lr"],
            momentum=momentum,
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            **_native_cprop_kwargs(group),
            foreach=_use_foreach(group, params),
            fused=bool(group["fused"]),
        )


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
            raise ValueError(
                "foreach and fused pick different implementations and cannot both be True, "
                f"got foreach={foreach!r}, fused={fused!r}"
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "decoupled_weight_decay": self._decoupled,
            **_CPropHyper(cprop_beta, cprop_c, cprop_eps, cdf, method).group_entries(),
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

    def _init_state(self, group: dict[str, Any], param: Tensor) -> None:
        state = self.state[param]
        if "step" not in state:
            _init_cprop_state(state, param, group["cprop_method"], share_v=self._shares_v(group))
            state["exp_avg"] = _zeros_stat(param)
            state["exp_avg_sq"] = _zeros_stat(param)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])

    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], found_finite: Tensor
    ) -> None:
        key = _second_key(group["cprop_method"])
        # parameters whose v is shared and those with their own v go in separate calls
        for shared in (True, False):
            ps = [p for p in params if (key not in self.state[p]) == shared]
            if ps:
                self._run(group, ps, found_finite, None if shared else key)

    def _run(
        self, group: dict[str, Any], params: list[Tensor], found_finite: Tensor, key: str | None
    ) -> None:
        states = [self.state[p] for p in params]
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
            **_native_cprop_kwargs(group),
            foreach=_use_foreach(group, params),
            fused=bool(group["fused"]),
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
        self.cprop_defaults = _CPropHyper(beta, c, eps, cdf, method).group_entries()
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
        self.cprop_state = _states_by_param(cprop_saved, params, "cprop_state")
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
        out = _call_closure(closure)
        base_closure = None
        if closure is not None:
            pending = [out]

            def base_closure() -> Any:
                if pending:
                    return pending.pop()
                with torch.enable_grad():
                    return closure()

        work, found_finite = _collect(self.param_groups, "CProp", self._init_state)
        if self.fused:
            return self._fused_step(work, found_finite, base_closure, out)
        for group, params in work:
            if params:
                cprop_update_(
                    _shards([p.grad for p in params]),
                    *self._statistics(group, params),
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
            scales = cprop_scales(
                *self._statistics(group, params),
                found_finite=found_finite,
                **_cprop_hyper(group)._asdict(),
                foreach=_default_foreach(params),
            )
            for p, old, s in zip(_shards(params), olds, scales, strict=True):
                _apply_scale_(p, old, s, found_finite)
        return out

    def _init_state(self, group: dict[str, Any], param: Tensor) -> None:
        if param not in self.cprop_state:
            self.cprop_state[param] = {}
            _init_cprop_state(self.cprop_state[param], param, group["cprop_method"], False)

    def _statistics(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """CProp's ``m``, ``v`` (this rank's shards, Note [FSDP2]) and step counts."""
        states = [self.cprop_state[p] for p in params]
        key = _second_key(group["cprop_method"])
        return (
            _shards([st["cprop_exp_avg"] for st in states]),
            _shards([st[key] for st in states]),
            [st["step"] for st in states],
        )

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
