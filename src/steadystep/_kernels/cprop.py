"""CProp's fused steps: the native Adam/AdamW and SGD steps, the wrapper's two passes.

Each entry point checks that the kernels take its tensors, then hands them to the C kernel of
the same name (CPU) or its Triton twin (CUDA) in one call: the tensor lists in the C function's
order, the hyperparameter row (Note [hyperparameter layout]) and the 0-d flags. Argument names
are those of :mod:`steadystep.optim.cprop.functional`, whose ``fused`` paths call these.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor

from steadystep._kernels import _cpu
from steadystep._kernels._common import (
    PARAM_CODE,
    backend,
    check_flag,
    cprop_hyper_values,
    lr_multiplier_of,
    numels,
    pointers,
    scale_config,
    status,
    steps_ok,
    threads,
    triton,
)

__all__ = ["adam_", "sgd_", "wrapper_pass_"]

_Lists = dict[str, Sequence[Tensor | None] | None]

# Each kernel's tensor lists by name, in the order of its C function's pointer arrays (the
# Triton kernels take them by these names), each followed by the step counts ``state_steps``.
_ARRAYS = {
    "adam": "params grads exp_avgs exp_avg_sqs max_exp_avg_sqs cprop_exp_avgs cprop_exp_avg_sqs",
    "sgd": "params grads momentum_buffers cprop_exp_avgs cprop_exp_avg_sqs",
    "wrap_before": "params grads snapshots cprop_exp_avgs cprop_exp_avg_sqs",
    "wrap_after": "params snapshots cprop_exp_avgs cprop_exp_avg_sqs",
}
# the lists that are not statistics (those are in the statistics dtype)
_NOT_STATS = ("params", "grads", "snapshots", "state_steps")


def _launch(
    kind: str,
    name: str,
    where: str,
    lists: _Lists,
    config: dict[str, int],
    hyper: tuple[float, ...],
    found_finite: Tensor,
    lr_multiplier: Tensor | None = None,
) -> bool:
    """Run C's ``ss_<name>`` or Triton's ``<name>`` over ``lists`` (keyed and ordered as the
    C function's pointer arrays, ``state_steps`` last; None for an absent list); ``where``
    names the step in an allocation error. False where the C library cannot be built."""
    params = lists["params"]
    if kind == "cuda":
        getattr(triton(), name)(lists, found_finite, hyper, config, lr_multiplier)
        return True
    lib = _cpu.library(config)
    if lib is None:
        return False
    none = [None] * len(params)
    arrays = [pointers(none if ts is None else ts) for ts in lists.values()]
    extra = () if lr_multiplier is None else (lr_multiplier.data_ptr(),)
    code = getattr(lib, f"ss_{name}")(
        len(params),
        *arrays,
        numels(params),
        ctypes.byref(_cpu.Hyper(*hyper)),
        *extra,
        found_finite.data_ptr(),
        threads(),
    )
    status(code, where)
    return True


def _backend(
    params: Sequence[Tensor],
    others: Sequence[Sequence[Tensor]],
    stats: Sequence[Sequence[Tensor | None] | None],
    state_steps: Sequence[Tensor],
) -> str | None:
    """ "cpu" or "cuda" where the kernels take these tensors (one device, one parameter dtype
    with a kernel, the statistics in its statistics dtype, float32 step counts, all dense and
    contiguous), else None."""
    kind = backend(params, *others, stats=[s for s in stats if s is not None])
    return kind if kind is not None and steps_ok(state_steps, params[0].device) else None


def _step(
    name: str,
    where: str,
    arrays: Sequence[Sequence[Tensor | None] | None],
    found_finite: Tensor,
    cprop: Mapping[str, Any],
    config: dict[str, int] | None = None,
    hyper: dict[str, Any] | None = None,
    lr_multiplier: Tensor | None = None,
) -> bool:
    """One fused call of kernel ``name`` over ``arrays`` (its lists in :data:`_ARRAYS`'s order,
    ``state_steps`` last) where the kernels take the tensors; False where they do not.
    ``config``: the step's switches, ``hyper`` its hyperparameters, besides the parameter
    dtype's and CProp's (``cprop``: ``cprop_beta``, ``cprop_c``, ``cprop_eps``, ``cdf``,
    ``method``). A native step (``hyper`` has ``lr``) is taken at ``lr * lr_multiplier``;
    ``where`` names it in an allocation error."""
    lists = dict(zip([*_ARRAYS[name].split(), "state_steps"], arrays, strict=True))
    params = lists["params"]
    if not params:
        return True
    config, hyper = config or {}, hyper or {}
    others = [lists[k] for k in ("grads", "snapshots") if k in lists]
    stats = [ts for k, ts in lists.items() if k not in _NOT_STATS]
    lr = hyper.get("lr")
    kind = None if isinstance(lr, Tensor) else _backend(params, others, stats, lists["state_steps"])
    if kind is None:
        return False
    scale = scale_config(cprop["cprop_c"], cprop["cprop_eps"], cprop["cdf"], cprop["method"])
    config = {"SS_PARAM": PARAM_CODE[params[0].dtype], **config, **scale}
    values = cprop_hyper_values(**hyper, **cprop)
    device = params[0].device
    flag = check_flag(found_finite, device)
    if lr is None:  # one of the wrapper's passes
        return _launch(kind, name, where, lists, config, values, flag)
    lr_scale = lr_multiplier_of(lr_multiplier, device)
    return _launch(kind, name, where, lists, config, values, flag, lr_scale)


def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor] | None,
    cprop_exp_avgs: Sequence[Tensor],
    cprop_exp_avg_sqs: Sequence[Tensor] | None,
    state_steps: Sequence[Tensor],
    *,
    found_finite: Tensor,
    cprop: Mapping[str, Any],
    lr: float,
    lr_multiplier: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    decoupled_weight_decay: bool,
) -> bool:
    """Adam (``decoupled_weight_decay``: AdamW) with CProp's scale over all tensors, in place;
    the step counts advance by one. A no-op, step counts included, unless ``found_finite``.
    ``cprop``: CProp's hyperparameters by name (``cprop_beta``, ``cprop_c``, ``cprop_eps``,
    ``cdf``, ``method``). ``cprop_exp_avg_sqs=None``: CProp's ``v`` is ``exp_avg_sqs``;
    ``max_exp_avg_sqs`` is read with ``amsgrad`` only; the step is taken at
    ``lr * lr_multiplier`` (0-d float64). False when unsupported."""
    decoupled = decoupled_weight_decay and weight_decay != 0
    config = {
        "SS_AMSGRAD": int(amsgrad),
        "SS_L2": int(not decoupled_weight_decay and weight_decay != 0),
        "SS_DECOUPLED": int(decoupled),
        "SS_SHARED_V": int(cprop_exp_avg_sqs is None),
    }
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    vmax = max_exp_avg_sqs if amsgrad else None
    stats = (exp_avgs, exp_avg_sqs, vmax, cprop_exp_avgs, cprop_exp_avg_sqs, state_steps)
    arrays = (params, grads, *stats)
    return _step("adam", "Adam", arrays, found_finite, cprop, config, hyper, lr_multiplier)


def sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    cprop_exp_avgs: Sequence[Tensor],
    cprop_exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    found_finite: Tensor,
    cprop: Mapping[str, Any],
    lr: float,
    lr_multiplier: Tensor | None,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
) -> bool:
    """SGD (momentum, dampening, Nesterov, L2) with CProp's scale over all tensors; as
    :func:`adam_` otherwise."""
    config = {
        "SS_L2": int(weight_decay != 0),
        "SS_MOMENTUM": int(momentum != 0),
        "SS_NESTEROV": int(nesterov),
    }
    hyper = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening)
    buffers = list(momentum_buffers) if momentum != 0 else [None] * len(params)
    arrays = (params, grads, buffers, cprop_exp_avgs, cprop_exp_avg_sqs, state_steps)
    return _step("sgd", "SGD", arrays, found_finite, cprop, config, hyper, lr_multiplier)


def wrapper_pass_(
    name: Literal["wrap_before", "wrap_after"],
    arrays: Sequence[Sequence[Tensor]],
    *,
    found_finite: Tensor,
    cprop: Mapping[str, Any],
) -> bool:
    """One of the CProp wrapper's two passes over ``arrays`` (the lists :data:`_ARRAYS` names
    for ``name``, ``state_steps`` last; ``cprop`` as in :func:`adam_`), in place; False when
    unsupported.

    ``"wrap_before"`` (``params, grads, snapshots, cprop_exp_avgs, cprop_exp_avg_sqs,
    state_steps``), before the base step: ``snapshot <- p`` always, and where ``found_finite``
    CProp's statistics from the raw gradient and the step counts + 1. ``"wrap_after"`` (the
    same lists but ``grads``), after it: ``p <- lerp(snapshot, p, s)`` (exactly ``p`` at
    ``s = 1``), or ``snapshot`` on a skipped step (the base may have written anything there)."""
    return _step(name, "CProp", arrays, found_finite, cprop)
