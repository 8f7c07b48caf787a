"""CProp's math: the statistics, the scale and the gates of a skipped step (reference and
foreach twins), used by :mod:`~steadystep.optim.cprop.functional` and the classes.

Preechakul & Kijsirikul, "CProp: Adaptive Learning Rate Scaling from Past Gradient Conformity"
(2019), Algorithm 1, with the decisions in docs/decisions.md. For every element, with ``t`` the
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
    (one all-reduce of a 0-d flag per step, see :func:`steadystep._tensors.grads_finite`).
    ``stats()`` covers this rank's shards, with no collective (as ALeRA's), so a Monitor on one
    rank cannot hang.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

from steadystep._validation import (
    check_choice,
    check_nonnegative,
    check_positive,
    check_unit_interval,
)

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


def cprop_kwargs(cprop: _CPropHyper) -> dict[str, float | str]:
    """CProp's hyperparameters as the native steps, the wrapper's passes and the kernels name
    them (``cprop_beta``, ``cprop_c``, ``cprop_eps``, ``cdf``, ``method``)."""
    beta, c, eps, cdf, method = cprop
    return dict(cprop_beta=beta, cprop_c=c, cprop_eps=eps, cdf=cdf, method=method)


def _cprop_hyper(group: dict[str, Any]) -> _CPropHyper:
    return _CPropHyper(*(group[key] for key in _GROUP_KEYS))


class _Gates(NamedTuple):
    """Per-step 0-d factors that turn a non-finite step into an exact no-op (one per dtype)."""

    keep: Tensor  # 1 if found_finite else 0
    cprop_beta: Tensor  # beta if found_finite else 1: decay of CProp's EMAs
    cprop_weight: Tensor  # 1 - beta if found_finite else 0: weight of g in CProp's EMAs


def _gate(found_finite: Tensor, if_ok: float, if_skip: float, dtype: torch.dtype) -> Tensor:
    taken = torch.full((), if_ok, dtype=dtype, device=found_finite.device)
    skipped = torch.full((), if_skip, dtype=dtype, device=found_finite.device)
    return torch.where(found_finite, taken, skipped)


def _gates(found_finite: Tensor, beta: float, dtype: torch.dtype) -> _Gates:
    return _Gates(
        keep=found_finite.to(dtype),
        cprop_beta=_gate(found_finite, beta, 1.0, dtype),
        cprop_weight=_gate(found_finite, 1.0 - beta, 0.0, dtype),
    )


def _scale_gate(keep: Tensor, lr_multiplier: Tensor | None) -> Tensor:
    """The 0-d factor of the scale ``s`` in the native steps: ``keep`` times the LR multiplier.

    SGD's and Adam's updates ``d`` are linear in ``lr``, so ``p + (s * lr_multiplier) * d(lr)`` is
    the step at ``lr * lr_multiplier``, with no extra pass (``s`` is multiplied by ``keep``
    anyway); a multiplier of 1 gives ``keep`` exactly, so the numbers are the plain step's.
    """
    if lr_multiplier is None:
        return keep
    return keep * lr_multiplier.to(device=keep.device, dtype=keep.dtype)


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
        device_found_finite = found_finite.to(device)
        gates = _gates(device_found_finite, beta, dtype)
        keep32 = gates.keep.to(torch.float32)
        if foreach:
            torch._foreach_add_([state_steps[i] for i in idx], [keep32] * len(idx))
        else:
            for i in idx:
                state_steps[i].add_(keep32)
        out.append((idx, dtype, device_found_finite, gates))
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


# --------------------------------------------------------------------------------------------
# The tensor lists and hyperparameters of the native optimizers' functional cores
# --------------------------------------------------------------------------------------------


class _SGDHyper(NamedTuple):
    lr: float
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    lr_multiplier: Tensor | None = None  # 0-d; the step is taken at lr * lr_multiplier


class _AdamHyper(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    decoupled_weight_decay: bool
    lr_multiplier: Tensor | None = None  # 0-d; the step is taken at lr * lr_multiplier


class _SGDTensors(NamedTuple):
    """One entry per parameter (this rank's shards under FSDP2)."""

    params: list[Tensor]
    grads: list[Tensor]  # raw gradients, never written
    momentum_buffers: list[Tensor | None]  # None entries without momentum
    cprop_exp_avgs: list[Tensor]  # CProp's m
    cprop_exp_avg_sqs: list[Tensor]  # CProp's v (the EMA of |g| for method="relative")
    state_steps: list[Tensor]  # 0-d float32 t


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


def _second_key(method: str) -> str:
    return "cprop_exp_avg_abs" if method == "relative" else "cprop_exp_avg_sq"


# erf for float32, Abramowitz & Stegun 7.1.28: erf(x) = 1 - (1 + a1 x + ... + a6 x^6)^-16 for
# x >= 0, |error| < 3e-7 (2e-6 with float32 rounding; tests/test_cprop.py checks it). It costs
# one division and 17 multiply-adds, and vectorises, where a libm erf does not.
_ERF_A = (0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638)


def erf_float32(x: Tensor) -> Tensor:
    """erf for ``x >= 0`` in float32 without exp (absolute error below 2e-6): the function the
    CPU kernels compute, as torch ops.

    Examples:
        >>> import torch
        >>> round(float(erf_float32(torch.tensor(1.0))), 5)  # erf(1) = 0.8427008
        0.8427
    """
    # erf(4) = 1 in float32; the clamp also keeps r**16 clear of subnormals, which are slow
    x = x.clamp(max=4.0)
    poly = x * _ERF_A[5] + _ERF_A[4]
    for coefficient in _ERF_A[3::-1]:
        poly = poly * x + coefficient
    r = 1 / (poly * x + 1)
    r = r * r
    r = r * r
    r = r * r
    return 1 - r * r
