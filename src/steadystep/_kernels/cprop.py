"""CProp's fused steps: the native Adam/AdamW and SGD steps, the wrapper's two passes."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

from torch import Tensor

from steadystep._kernels import _cpu
from steadystep._kernels._common import (
    _PARAM_CODE,
    _backend,
    _c_hyper,
    _check_flag,
    _hyper_values,
    _lr_scale,
    _numels,
    _pointers,
    _scale_config,
    _status,
    _steps_ok,
    _threads,
    _triton,
)

__all__ = ["adam_", "sgd_", "wrapper_after_", "wrapper_before_"]


# ---------------------------------------------------------------------------------------------
# CProp's native steps and the wrapper's passes
# ---------------------------------------------------------------------------------------------


def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    cprop_exp_avgs: Sequence[Tensor],
    cprop_seconds: Sequence[Tensor] | None,
    steps: Sequence[Tensor],
    *,
    found_finite: Tensor,
    lr: float,
    lr_scale: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    decoupled: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> bool:
    """Adam (``decoupled``: AdamW) with CProp's scale over all tensors, in place; the step
    counts advance by one. A no-op, step counts included, unless ``found_finite``.
    ``cprop_seconds=None``: CProp's ``v`` is ``exp_avg_sqs``; ``max_exp_avg_sqs`` is read with
    ``amsgrad`` only; the step is taken at ``lr * lr_scale`` (0-d float64). False when
    unsupported."""
    n = len(params)
    if n == 0:
        return True
    vmax = max_exp_avg_sqs if amsgrad else None
    stats = (exp_avgs, exp_avg_sqs, cprop_exp_avgs, vmax, cprop_seconds)
    backend = _backend(params, grads, stats=[s for s in stats if s is not None])
    if backend is None:
        return False
    device = params[0].device
    if not _steps_ok(steps, device) or isinstance(lr, Tensor):
        return False
    config = {
        "SS_PARAM": _PARAM_CODE[params[0].dtype],
        "SS_AMSGRAD": int(amsgrad),
        "SS_L2": int(not decoupled and weight_decay != 0),
        "SS_DECOUPLED": int(decoupled and weight_decay != 0),
        "SS_SHARED_V": int(cprop_seconds is None),
        **_scale_config(cprop_c, cprop_eps, cdf, method),
    }
    hyper = _hyper_values(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        cprop_beta=cprop_beta,
        cprop_c=cprop_c,
        cprop_eps=cprop_eps,
        cdf=cdf,
        method=method,
    )
    found_finite = _check_flag(found_finite, device)
    scale = _lr_scale(lr_scale, device)
    if backend == "cuda":
        lists = dict(
            params=params,
            grads=grads,
            exp_avgs=exp_avgs,
            exp_avg_sqs=exp_avg_sqs,
            max_exp_avg_sqs=vmax,
            cprop_exp_avgs=cprop_exp_avgs,
            cprop_seconds=cprop_seconds,
            steps=steps,
        )
        _triton().adam(lists, found_finite, hyper, scale, config)
        return True
    lib = _cpu.library(config)
    if lib is None:
        return False
    none = [None] * n
    c_hyper = _c_hyper(hyper)
    _status(
        lib.ss_adam(
            n,
            _pointers(params),
            _pointers(grads),
            _pointers(exp_avgs),
            _pointers(exp_avg_sqs),
            _pointers(vmax if vmax is not None else none),
            _pointers(cprop_exp_avgs),
            _pointers(cprop_seconds if cprop_seconds is not None else none),
            _pointers(steps),
            _numels(params),
            ctypes.byref(c_hyper),
            scale.data_ptr(),
            found_finite.data_ptr(),
            _threads(),
        ),
        "Adam",
    )
    return True


def sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    cprop_exp_avgs: Sequence[Tensor],
    cprop_seconds: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    found_finite: Tensor,
    lr: float,
    lr_scale: Tensor | None,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> bool:
    """SGD (momentum, dampening, Nesterov, L2) with CProp's scale over all tensors; as
    :func:`adam_` otherwise."""
    n = len(params)
    if n == 0:
        return True
    buffers = list(momentum_buffers) if momentum != 0 else [None] * n
    stats = (buffers, cprop_exp_avgs, cprop_seconds)
    backend = _backend(params, grads, stats=stats)
    if backend is None:
        return False
    device = params[0].device
    if not _steps_ok(steps, device) or isinstance(lr, Tensor):
        return False
    config = {
        "SS_PARAM": _PARAM_CODE[params[0].dtype],
        "SS_L2": int(weight_decay != 0),
        "SS_MOMENTUM": int(momentum != 0),
        "SS_NESTEROV": int(nesterov),
        **_scale_config(cprop_c, cprop_eps, cdf, method),
    }
    hyper = _hyper_values(
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        cprop_beta=cprop_beta,
        cprop_c=cprop_c,
        cprop_eps=cprop_eps,
        cdf=cdf,
        method=method,
    )
    found_finite = _check_flag(found_finite, device)
    scale = _lr_scale(lr_scale, device)
    if backend == "cuda":
        lists = dict(
            params=params,
            grads=grads,
            momentum_buffers=buffers,
            cprop_exp_avgs=cprop_exp_avgs,
            cprop_seconds=cprop_seconds,
            steps=steps,
        )
        _triton().sgd(lists, found_finite, hyper, scale, config)
        return True
    lib = _cpu.library(config)
    if lib is None:
        return False
    c_hyper = _c_hyper(hyper)
    _status(
        lib.ss_sgd(
            n,
            _pointers(params),
            _pointers(grads),
            _pointers(buffers),
            _pointers(cprop_exp_avgs),
            _pointers(cprop_seconds),
            _pointers(steps),
            _numels(params),
            ctypes.byref(c_hyper),
            scale.data_ptr(),
            found_finite.data_ptr(),
            _threads(),
        ),
        "SGD",
    )
    return True


def _wrapper_args(params, snapshots, cprop_exp_avgs, cprop_seconds, steps, grads=None):
    backend = _backend(
        params, snapshots, *([grads] if grads else []), stats=[cprop_exp_avgs, cprop_seconds]
    )
    if backend is None:
        return None
    if not _steps_ok(steps, params[0].device):
        return None
    return backend


def _wrapper_setup(
    params: Sequence[Tensor],
    found_finite: Tensor,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> tuple[tuple[float, ...], dict[str, int], Tensor]:
    """What both wrapper passes hand their kernel: the hyperparameters, the compile-time
    configuration and the flag on the parameters' device."""
    hyper = _hyper_values(
        cprop_beta=cprop_beta, cprop_c=cprop_c, cprop_eps=cprop_eps, cdf=cdf, method=method
    )
    config = {
        "SS_PARAM": _PARAM_CODE[params[0].dtype],
        **_scale_config(cprop_c, cprop_eps, cdf, method),
    }
    return hyper, config, _check_flag(found_finite, params[0].device)


def wrapper_before_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    snapshots: Sequence[Tensor],
    cprop_exp_avgs: Sequence[Tensor],
    cprop_seconds: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    found_finite: Tensor,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> bool:
    """The CProp wrapper's pass before the base step: ``snapshot <- p`` always, and where
    ``found_finite`` CProp's statistics from the raw gradient and the step counts + 1."""
    n = len(params)
    if n == 0:
        return True
    backend = _wrapper_args(params, snapshots, cprop_exp_avgs, cprop_seconds, steps, grads)
    if backend is None:
        return False
    hyper, config, found_finite = _wrapper_setup(
        params, found_finite, cprop_beta, cprop_c, cprop_eps, cdf, method
    )
    if backend == "cuda":
        lists = dict(
            params=params,
            grads=grads,
            snapshots=snapshots,
            cprop_exp_avgs=cprop_exp_avgs,
            cprop_seconds=cprop_seconds,
            steps=steps,
        )
        _triton().wrapper_before(lists, found_finite, hyper, config)
        return True
    lib = _cpu.library(config)
    if lib is None:
        return False
    c_hyper = _c_hyper(hyper)
    _status(
        lib.ss_wrap_before(
            n,
            _pointers(params),
            _pointers(grads),
            _pointers(snapshots),
            _pointers(cprop_exp_avgs),
            _pointers(cprop_seconds),
            _pointers(steps),
            _numels(params),
            ctypes.byref(c_hyper),
            found_finite.data_ptr(),
            _threads(),
        ),
        "CProp",
    )
    return True


def wrapper_after_(
    params: Sequence[Tensor],
    snapshots: Sequence[Tensor],
    cprop_exp_avgs: Sequence[Tensor],
    cprop_seconds: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    found_finite: Tensor,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
    cdf: str,
    method: str,
) -> bool:
    """After the base step: ``p <- lerp(snapshot, p, s)`` (exactly ``p`` at ``s = 1``), or
    ``snapshot`` on a skipped step (the base may have written anything there)."""
    n = len(params)
    if n == 0:
        return True
    backend = _wrapper_args(params, snapshots, cprop_exp_avgs, cprop_seconds, steps)
    if backend is None:
        return False
    hyper, config, found_finite = _wrapper_setup(
        params, found_finite, cprop_beta, cprop_c, cprop_eps, cdf, method
    )
    if backend == "cuda":
        lists = dict(
            params=params,
            snapshots=snapshots,
            cprop_exp_avgs=cprop_exp_avgs,
            cprop_seconds=cprop_seconds,
            steps=steps,
        )
        _triton().wrapper_after(lists, found_finite, hyper, config)
        return True
    lib = _cpu.library(config)
    if lib is None:
        return False
    c_hyper = _c_hyper(hyper)
    _status(
        lib.ss_wrap_after(
            n,
            _pointers(params),
            _pointers(snapshots),
            _pointers(cprop_exp_avgs),
            _pointers(cprop_seconds),
            _pointers(steps),
            _numels(params),
            ctypes.byref(c_hyper),
            found_finite.data_ptr(),
            _threads(),
        ),
        "CProp",
    )
    return True
