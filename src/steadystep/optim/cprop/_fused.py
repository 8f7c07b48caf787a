"""CProp's fused paths: the native steps and the wrapper's two passes as one kernel call per
tensor list (:mod:`steadystep._kernels`: C on CPU, Triton on CUDA), with the arithmetic of
:mod:`~steadystep.optim.cprop._math`.

Note [Fused path]
    The whole per-element update (Adam's moments or SGD's momentum, CProp's statistics, the
    scale and the parameter write) reads and writes every element once, for all tensors of a
    param group in one call; what is the same for a whole tensor (bias corrections, step sizes)
    is computed once per tensor in float64. In float32 the normal cdf is Abramowitz & Stegun's
    7.1.28 (:func:`erf_float32`, absolute error below 2e-6) on CPU and the device's ``erf`` on
    CUDA, so the fused path agrees with the reference to rounding, not bitwise. A skipped step
    (``found_finite`` False) returns at once on the device: parameters, state and step counts
    stay bitwise as they were.

Each function returns False, having touched nothing, when the kernels cannot take the tensors
(the caller then takes the reference or foreach path, or raises for ``fused=True``).
"""

from __future__ import annotations

from torch import Tensor

from steadystep import _kernels as kernels
from steadystep.optim.cprop._math import (
    _AdamHyper,
    _AdamTensors,
    _CPropHyper,
    _SGDHyper,
    _SGDTensors,
)

__all__ = ["erf_float32", "fused_cprop_adam", "fused_cprop_sgd"]

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


def fused_cprop_adam(
    tensors: _AdamTensors, *, found_finite: Tensor, adam: _AdamHyper, cprop: _CPropHyper
) -> bool:
    """:func:`~steadystep.optim.cprop.cprop_adam` in one kernel call (Note [Fused path])."""
    return kernels.adam_(
        tensors.params,
        tensors.grads,
        tensors.exp_avgs,
        tensors.exp_avg_sqs,
        tensors.max_exp_avg_sqs,
        tensors.cprop_exp_avgs,
        tensors.cprop_exp_avg_sqs,
        tensors.state_steps,
        found_finite=found_finite,
        lr=adam.lr,
        lr_scale=adam.lr_multiplier,
        beta1=adam.beta1,
        beta2=adam.beta2,
        eps=adam.eps,
        weight_decay=adam.weight_decay,
        amsgrad=adam.amsgrad,
        decoupled=adam.decoupled_weight_decay,
        cprop_beta=cprop.beta,
        cprop_c=cprop.c,
        cprop_eps=cprop.eps,
        cdf=cprop.cdf,
        method=cprop.method,
    )


def fused_cprop_sgd(
    tensors: _SGDTensors, *, found_finite: Tensor, sgd: _SGDHyper, cprop: _CPropHyper
) -> bool:
    """:func:`~steadystep.optim.cprop.cprop_sgd` in one kernel call (Note [Fused path])."""
    return kernels.sgd_(
        tensors.params,
        tensors.grads,
        tensors.momentum_buffers,
        tensors.cprop_exp_avgs,
        tensors.cprop_exp_avg_sqs,
        tensors.state_steps,
        found_finite=found_finite,
        lr=sgd.lr,
        lr_scale=sgd.lr_multiplier,
        momentum=sgd.momentum,
        dampening=sgd.dampening,
        weight_decay=sgd.weight_decay,
        nesterov=sgd.nesterov,
        cprop_beta=cprop.beta,
        cprop_c=cprop.c,
        cprop_eps=cprop.eps,
        cdf=cprop.cdf,
        method=cprop.method,
    )
