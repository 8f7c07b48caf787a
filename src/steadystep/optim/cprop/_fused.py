"""CProp's fused paths: the whole per-element step as one torch.compile-generated loop.

:func:`~steadystep.optim.cprop.cprop_adam` and :func:`~steadystep.optim.cprop.cprop_sgd` with
``fused=True`` run :func:`_fused_cprop_adam` / :func:`_fused_cprop_sgd`; the wrapper's
``fused=True`` runs :class:`_FusedWrapperStep` (statistics before the base step, scale after).
The kernels follow :mod:`~steadystep.optim.cprop._math` (same formulas, rearranged so that per
element there are as few divisions as the math allows); tests hold them to the reference paths.
Compiling and launching is :mod:`steadystep.optim._compile`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from steadystep._tensors import flat_shards
from steadystep.optim._compile import launch
from steadystep.optim.cprop._math import (
    _BFO_HALF_K,
    _BFT_HALF_K1,
    _BFT_HALF_K3,
    _LOGISTIC_HALF_K,
    _SQRT1_2,
    _AdamHyper,
    _AdamTensors,
    _cprop_hyper,
    _CPropHyper,
    _group_by_dtype,
    _sanitised,
    _second_key,
    _select,
    _SGDHyper,
    _SGDTensors,
)

# Note [Fused path]
#   The whole per-element update (Adam's moments, CProp's statistics, the scale and the
#   parameter write) is one pure function of the old values; torch.compile (inductor) turns it
#   into a single loop over memory (C++/OpenMP on CPU, Triton on CUDA), so every tensor is read
#   and written once. Everything that is constant over a tensor (bias corrections, step size,
#   lr, betas) is computed beforehand for all tensors at once and enters as one small float64
#   row per tensor, so a scheduler never triggers a recompile and the loop does no pow;
#   structural choices (amsgrad, cdf, c == 1, ...) are static. Shapes are static too
#   (steadystep.optim._compile): one compile per distinct numel, cached on disk by inductor. A
#   skipped (non-finite) step is folded into the row's EMA factors (beta -> 1, 1 - beta -> 0)
#   and one select on the parameter, at no extra memory traffic. The CPU loop is compute-bound
#   (erf, two square roots, three divisions per element), hence erf_float32 below.


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
    if adam.lr_multiplier is not None:  # lr on the device; the same float64 arithmetic
        lr = adam.lr_multiplier.to(device=t.device, dtype=torch.float64) * lr
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
        "neg_step_size": bias_correction1.reciprocal() * -lr,  # -lr / bc1 as torch computes it
        "inv_bias_correction2_sqrt": bias_correction2.sqrt().reciprocal(),
        "inv_cprop_bias_correction": inv_cprop_bc,
        # r = constant / bias correction: x = |cm| r / se = |cm| / (se / r), so r moves into
        # the denominator's coefficients and the kernel saves a multiply per element
        "variance_scale": variance_scale,
        "scaled_cprop_eps": cprop_eps / ratio,
        "first": first,
        "cprop_c": c * keep.expand_as(t),
        "lr_weight_decay": torch.ones_like(t) * (lr * weight_decay),
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
        device_found_finite = found_finite.to(device)
        ts = _select(tensors, idx)
        coefs = coefficients(ts.state_steps, device_found_finite)
        flats = [flat_shards(xs, len(idx)) for xs in ts[:-1]]
        calls = list(zip(*flats, strict=True))
        launch(name, kernel, calls, coefs, device_found_finite, writes=writes, **static)


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
        lambda steps, device_found_finite: _advance_to_coefficients(
            steps, device_found_finite, adam=adam, cprop=cprop
        ),
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
    l2 = _AdamHyper(sgd.lr, 0.0, 0.0, 0.0, sgd.weight_decay, False, False, sgd.lr_multiplier)
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
        lambda steps, device_found_finite: _sgd_coefficients(
            steps, device_found_finite, sgd=sgd, cprop=cprop
        ),
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
        self.params = flat_shards(params, n)
        self.grads = flat_shards([p.grad for p in params], n)
        self.ms = flat_shards([st["cprop_exp_avg"] for st in states], n)
        self.vs = flat_shards([st[key] for st in states], n)
        self.found_finite = found_finite
        steps = [st["step"] for st in states]
        self.coefs = _advance_to_coefficients(steps, found_finite, adam=_NO_ADAM, cprop=self.cprop)
        self.snapshots: list[Tensor] = []

    def before(self) -> None:
        self.snapshots = [torch.empty_like(p) for p in self.params]
        calls = zip(self.params, self.grads, self.snapshots, self.ms, self.vs, strict=True)
        launch(
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
        launch(
            "wrapper_apply",
            _fused_wrapper_apply_kernel,
            list(calls),
            self.coefs,
            self.found_finite,
            writes=(0,),
            **_scale_flags(self.cprop),
        )
