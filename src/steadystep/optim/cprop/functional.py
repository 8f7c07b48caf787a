"""CProp's functional cores: statistics and scales for the wrapper, and the whole SGD / Adam
(AdamW) + CProp steps of the native classes.

Tensor lists are positional and hyperparameters keyword-only, as in ``torch.optim``'s
functional API; each step dispatches to a per-tensor reference loop (``_single_tensor_*``,
the readable one), a ``torch._foreach_*`` path (``_multi_tensor_*``, bitwise the same on CPU) or
the fused multi-tensor kernels of :mod:`steadystep._kernels` (Note [Fused path]), whose
arguments have the names used here. The math is in :mod:`~steadystep.optim.cprop._math`.

Note [Fused path]
    The whole per-element update (Adam's moments or SGD's momentum, CProp's statistics, the
    scale and the parameter write) reads and writes every element once, for all tensors of a
    param group in one call; what is the same for a whole tensor (bias corrections, step sizes)
    is computed once per tensor in float64. In float32 the normal cdf is Abramowitz & Stegun's
    7.1.28 (:func:`erf_float32`, absolute error below 2e-6) on CPU and the device's ``erf`` on
    CUDA, so the fused path agrees with the reference to rounding, not bitwise. A skipped step
    (``found_finite`` False) returns at once on the device: parameters, state and step counts
    stay bitwise as they were.
    The kernels take the tensors only where they can (one device, a dtype with a kernel, dense
    contiguous memory, a C compiler or Triton); ``fused=None`` then falls back to the eager
    paths and ``fused=True`` raises :class:`~steadystep._kernels.FusedUnsupportedError`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from steadystep import _kernels as kernels
from steadystep._kernels import FusedUnsupportedError
from steadystep.optim.cprop._math import (
    _AdamHyper,
    _AdamTensors,
    _advance_steps,
    _bias_corrections_foreach,
    _CPropHyper,
    _gate,
    _group_by_dtype,
    _in_dtype,
    _sanitised,
    _scale_foreach,
    _scale_gate,
    _scale_one,
    _select,
    _SGDHyper,
    _SGDTensors,
    _step_time,
    _update_stats_foreach,
    _update_stats_one,
    _with_weight_decay,
    _with_weight_decay_foreach,
    cprop_kwargs,
)

__all__ = [
    "cprop_adam",
    "cprop_after_",
    "cprop_before_",
    "cprop_scales",
    "cprop_sgd",
    "cprop_update_",
]


# --------------------------------------------------------------------------------------------
# Tensor hyperparameters (Note [tensor hyperparameters])
# --------------------------------------------------------------------------------------------


def _host_value(name: str, value: float | Tensor) -> float:
    """A constant hyperparameter as a float; a one-element tensor is read with ``float``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        return float(value)
    return value


def _split_lr(
    lr: float | Tensor, lr_multiplier: Tensor | None, params: list[Tensor]
) -> tuple[float, Tensor | None]:
    """``(lr, lr_multiplier)`` with a float ``lr``: a CPU tensor read on the host, one on an
    accelerator folded into the multiplier on the device (no host read)."""
    if not isinstance(lr, Tensor):
        return lr, lr_multiplier
    if lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    device = params[0].device if params else lr.device
    if lr.device.type == "cpu" or device.type == "cpu":
        return float(lr), lr_multiplier  # host memory (or a CPU step): no device sync
    lr64 = lr.detach().reshape(()).to(device=device, dtype=torch.float64)
    if lr_multiplier is None:
        return 1.0, lr64
    return 1.0, lr_multiplier.to(device=device) * lr64


# --------------------------------------------------------------------------------------------
# CProp's statistics and scales (the wrapper's two halves)
# --------------------------------------------------------------------------------------------


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
    for idx, dtype, device_found_finite, gates in groups:
        raws = [_sanitised(grads[i], device_found_finite, dtype) for i in idx]
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
    return _scales(exp_avgs, seconds, state_steps, found_finite, cprop, foreach)


def _scales(
    exp_avgs: list[Tensor],
    seconds: list[Tensor],
    state_steps: list[Tensor],
    found_finite: Tensor,
    cprop: _CPropHyper,
    foreach: bool,
) -> list[Tensor]:
    """:func:`cprop_scales` with CProp's hyperparameters as one tuple."""
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


def cprop_before_(
    params: list[Tensor],
    grads: list[Tensor],
    cprop_exp_avgs: list[Tensor],
    cprop_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    found_finite: Tensor,
    cprop: _CPropHyper,
    foreach: bool = False,
    fused: bool | None = False,
) -> tuple[bool, list[Tensor]]:
    """The CProp wrapper's pass before its base optimizer steps: CProp's statistics from the
    raw gradients (:func:`cprop_update_`) and a snapshot ``p_old`` of ``params``. Returns
    ``(fused, snapshots)``: whether the fused kernel took the pass (then :func:`cprop_after_`
    must be fused too) and the snapshots. ``cprop``: CProp's hyperparameters; ``fused`` as in
    :func:`cprop_sgd`."""
    if fused is not False:
        # one buffer for the whole group's snapshot: one allocation, not one per tensor
        sizes = [p.numel() for p in params]
        flat = torch.empty(sum(sizes), dtype=params[0].dtype, device=params[0].device)
        olds = [t.view_as(p) for t, p in zip(flat.split(sizes), params, strict=True)]
        arrays = (params, grads, olds, cprop_exp_avgs, cprop_exp_avg_sqs, state_steps)
        kwargs = cprop_kwargs(cprop)
        if kernels.wrapper_pass_("wrap_before", arrays, found_finite=found_finite, cprop=kwargs):
            return True, olds
        if fused:
            raise FusedUnsupportedError("CProp", params)
    cprop_update_(
        grads,
        cprop_exp_avgs,
        cprop_exp_avg_sqs,
        state_steps,
        found_finite=found_finite,
        beta=cprop.beta,
        method=cprop.method,
        foreach=foreach,
    )
    return False, [p.clone() for p in params]


def cprop_after_(
    params: list[Tensor],
    snapshots: list[Tensor],
    cprop_exp_avgs: list[Tensor],
    cprop_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    found_finite: Tensor,
    cprop: _CPropHyper,
    foreach: bool = False,
    fused: bool,
) -> None:
    """The CProp wrapper's pass after its base optimizer stepped: ``p <- lerp(p_old, p, s)``
    (exactly ``p`` where ``s = 1``), or ``p_old`` on a skipped step (the base may have written
    anything there). ``fused``: what :func:`cprop_before_` returned."""
    stats = (cprop_exp_avgs, cprop_exp_avg_sqs, state_steps)
    if fused:
        kwargs = cprop_kwargs(cprop)
        arrays = (params, snapshots, *stats)
        kernels.wrapper_pass_("wrap_after", arrays, found_finite=found_finite, cprop=kwargs)
        return
    scales = _scales(*stats, found_finite, cprop, foreach)
    for p, old, s in zip(params, snapshots, scales, strict=True):
        _apply_scale_(p, old, s, found_finite)


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


# --------------------------------------------------------------------------------------------
# SGD + CProp
# --------------------------------------------------------------------------------------------


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
    for idx, dtype, device_found_finite, gates in _advance_steps(
        tensors.cprop_exp_avgs, steps, found_finite, cprop.beta, foreach=False
    ):
        momentum_gate = _gate(device_found_finite, sgd.momentum, 1.0, dtype)
        scale_gate = _scale_gate(gates.keep, sgd.lr_multiplier)
        for i in idx:
            param, m, v = tensors.params[i], tensors.cprop_exp_avgs[i], tensors.cprop_exp_avg_sqs[i]
            raw = _sanitised(tensors.grads[i], device_found_finite, dtype)
            grad = _with_weight_decay(raw, _in_dtype(param, dtype), sgd.weight_decay, gates.keep)
            _update_stats_one(m, v, raw, gates, beta=cprop.beta, method=cprop.method)
            buf = tensors.momentum_buffers[i]
            update = _sgd_direction_one(
                grad, buf, steps[i], device_found_finite, momentum_gate, sgd
            )
            param.addcmul_(_scale_one(m, v, steps[i], scale_gate, cprop), update)


def _multi_tensor_cprop_sgd(
    tensors: _SGDTensors, *, found_finite: Tensor, sgd: _SGDHyper, cprop: _CPropHyper
) -> None:
    for idx, dtype, device_found_finite, gates in _advance_steps(
        tensors.cprop_exp_avgs, tensors.state_steps, found_finite, cprop.beta, foreach=True
    ):
        ts = _select(tensors, idx)
        raws = [_sanitised(grad, device_found_finite, dtype) for grad in ts.grads]
        dirs = _with_weight_decay_foreach(raws, ts.params, sgd.weight_decay, gates.keep)
        ms, vs = ts.cprop_exp_avgs, ts.cprop_exp_avg_sqs
        _update_stats_foreach(ms, vs, raws, gates, beta=cprop.beta, method=cprop.method)
        if sgd.momentum != 0:
            bufs = ts.momentum_buffers
            momentum_gate = _gate(device_found_finite, sgd.momentum, 1.0, dtype)
            coefficients = [
                _momentum_coefficients(step, device_found_finite, momentum_gate, sgd.dampening)
                for step in ts.state_steps
            ]
            torch._foreach_mul_(bufs, [a for a, _ in coefficients])
            torch._foreach_addcmul_(bufs, dirs, [b for _, b in coefficients])
            dirs = torch._foreach_add(dirs, bufs, alpha=sgd.momentum) if sgd.nesterov else bufs
        updates = torch._foreach_mul(dirs, -sgd.lr)
        scale_gate = _scale_gate(gates.keep, sgd.lr_multiplier)
        scales = _scale_foreach(ms, vs, ts.state_steps, scale_gate, cprop)
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
    lr: float | Tensor,
    momentum: float | Tensor,
    dampening: float | Tensor,
    weight_decay: float | Tensor,
    nesterov: bool,
    lr_multiplier: Tensor | None = None,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
    foreach: bool = False,
    fused: bool | None = False,
) -> None:
    """Functional :class:`CPropSGD`: SGD's update scaled per element by CProp, in place.

    ``fused=True`` runs the whole step as one multi-tensor kernel call (Note [Fused path]) and
    raises where the kernels cannot take the tensors; ``fused=None`` does so where they can and
    else falls back; otherwise ``foreach`` picks ``torch._foreach_*`` ops over the per-tensor
    reference loop. ``lr_multiplier`` (0-d float64 tensor, optional) multiplies ``lr`` on the
    device: the step is taken at ``lr * lr_multiplier`` with no host read (a guard's LR cuts).
    ``lr`` and the other hyperparameters may be one-element tensors (Note [tensor
    hyperparameters]).
    """
    lr, lr_multiplier = _split_lr(lr, lr_multiplier, params)
    momentum = _host_value("momentum", momentum)
    dampening = _host_value("dampening", dampening)
    weight_decay = _host_value("weight_decay", weight_decay)
    tensors = _SGDTensors(
        params, grads, momentum_buffers, cprop_exp_avgs, cprop_exp_avg_sqs, state_steps
    )
    sgd = _SGDHyper(lr, momentum, dampening, weight_decay, nesterov, lr_multiplier)
    cprop = _CPropHyper(cprop_beta, cprop_c, cprop_eps, cdf, method)
    if fused is not False and kernels.sgd_(
        *tensors, found_finite=found_finite, cprop=cprop_kwargs(cprop), **sgd._asdict()
    ):
        return
    if fused:
        raise FusedUnsupportedError("cprop_sgd", params)
    fn = _multi_tensor_cprop_sgd if foreach else _single_tensor_cprop_sgd
    fn(tensors, found_finite=found_finite, sgd=sgd, cprop=cprop)


# --------------------------------------------------------------------------------------------
# Adam / AdamW + CProp
# --------------------------------------------------------------------------------------------


def _decay_gate(
    found_finite: Tensor, lr: float, weight_decay: float, decoupled: bool, dtype: torch.dtype
) -> Tensor | None:
    """AdamW's decoupled decay factor ``-lr * weight_decay`` (0-d), 0 on a skipped step; None
    without decoupled decay.

    Note [a skipped step at any lr]: the skip multiplies the update by a scale of 0, but
    ``inf * 0`` is NaN. The other terms of the update are the (unchanged) statistics times
    ``lr``, finite whenever a clean step at that ``lr`` is; the decay term is ``p * lr * wd``
    of the parameters the last step moved (at lr = 1e30 they are near 1e30, and the term is
    inf in float32). Its factor is therefore selected, 0 on a skipped step (``torch.where`` on
    the 0-d factor, no extra pass), so the term is ``p * 0 = 0`` and the parameters stay
    bitwise as they were.
    """
    if not decoupled or weight_decay == 0:
        return None
    return _gate(found_finite, -lr * weight_decay, 0.0, dtype)


def _single_tensor_cprop_adam(
    tensors: _AdamTensors, *, found_finite: Tensor, adam: _AdamHyper, cprop: _CPropHyper
) -> None:
    lr, beta1, beta2, eps, weight_decay, amsgrad, decoupled, lr_multiplier = adam
    l2 = 0.0 if decoupled else weight_decay  # the penalty Adam's gradient gets
    for idx, dtype, device_found_finite, gates in _advance_steps(
        tensors.exp_avgs, tensors.state_steps, found_finite, cprop.beta, foreach=False
    ):
        weight1 = _gate(device_found_finite, 1.0 - beta1, 0.0, dtype)
        beta2_gate = _gate(device_found_finite, beta2, 1.0, dtype)
        scale_gate = _scale_gate(gates.keep, lr_multiplier)
        decay = _decay_gate(device_found_finite, lr, weight_decay, decoupled, dtype)
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
            raw = _sanitised(tensors.grads[i], device_found_finite, dtype)
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
            if decay is not None:
                update.add_(p * decay)
            second = exp_avg_sq if cprop_v is None else cprop_v
            param.addcmul_(_scale_one(cprop_m, second, step, scale_gate, cprop), update)


def _multi_tensor_cprop_adam(
    tensors: _AdamTensors, *, found_finite: Tensor, adam: _AdamHyper, cprop: _CPropHyper
) -> None:
    lr, beta1, beta2, eps, weight_decay, amsgrad, decoupled, lr_multiplier = adam
    l2 = 0.0 if decoupled else weight_decay
    for idx, dtype, device_found_finite, gates in _advance_steps(
        tensors.exp_avgs, tensors.state_steps, found_finite, cprop.beta, foreach=True
    ):
        ts = _select(tensors, idx)
        ms, vs, cms, cvs = ts.exp_avgs, ts.exp_avg_sqs, ts.cprop_exp_avgs, ts.cprop_exp_avg_sqs
        times = [_step_time(step, dtype) for step in ts.state_steps]
        raws = [_sanitised(grad, device_found_finite, dtype) for grad in ts.grads]
        dirs = _with_weight_decay_foreach(raws, ts.params, l2, gates.keep)
        _update_stats_foreach(cms, cvs, raws, gates, beta=cprop.beta, method=cprop.method)
        torch._foreach_lerp_(
            ms, dirs, [_gate(device_found_finite, 1.0 - beta1, 0.0, dtype)] * len(ms)
        )
        torch._foreach_mul_(vs, _gate(device_found_finite, beta2, 1.0, dtype))
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
        decay = _decay_gate(device_found_finite, lr, weight_decay, decoupled, dtype)
        if decay is not None:
            p32 = [_in_dtype(p, dtype) for p in ts.params]
            torch._foreach_add_(updates, torch._foreach_mul(p32, decay))
        scale_gate = _scale_gate(gates.keep, lr_multiplier)
        scales = _scale_foreach(cms, vs if cvs is None else cvs, ts.state_steps, scale_gate, cprop)
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
    beta1: float | Tensor,
    beta2: float | Tensor,
    lr: float | Tensor,
    weight_decay: float | Tensor,
    eps: float | Tensor,
    decoupled_weight_decay: bool,
    lr_multiplier: Tensor | None = None,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
    foreach: bool = False,
    fused: bool | None = False,
) -> None:
    """Functional :class:`CPropAdam` / :class:`CPropAdamW`, in place.

    ``cprop_exp_avg_sqs=None`` means CProp's ``v`` is Adam's ``exp_avg_sq`` (shared);
    ``max_exp_avg_sqs`` is read only with ``amsgrad``; ``lr_multiplier``, ``fused`` and
    ``foreach`` as in :func:`cprop_sgd`; ``lr`` and the other hyperparameters may be
    one-element tensors (Note [tensor hyperparameters]).
    """
    lr, lr_multiplier = _split_lr(lr, lr_multiplier, params)
    beta1, beta2 = _host_value("betas[0]", beta1), _host_value("betas[1]", beta2)
    eps = _host_value("eps", eps)
    weight_decay = _host_value("weight_decay", weight_decay)
    tensors = _AdamTensors(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs if amsgrad else None,
        cprop_exp_avgs,
        cprop_exp_avg_sqs,
        state_steps,
    )
    adam = _AdamHyper(
        lr, beta1, beta2, eps, weight_decay, amsgrad, decoupled_weight_decay, lr_multiplier
    )
    cprop = _CPropHyper(cprop_beta, cprop_c, cprop_eps, cdf, method)
    if fused is not False and kernels.adam_(
        *tensors, found_finite=found_finite, cprop=cprop_kwargs(cprop), **adam._asdict()
    ):
        return
    if fused:
        raise FusedUnsupportedError("cprop_adam", params)
    fn = _multi_tensor_cprop_adam if foreach else _single_tensor_cprop_adam
    fn(tensors, found_finite=found_finite, adam=adam, cprop=cprop)
