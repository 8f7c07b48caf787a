"""torch's SGD, Adam and AdamW rebuilt as their native CProp classes (what
:func:`~steadystep.stabilize` builds by default: the same numbers as ``CProp(base)`` up to
rounding, in fewer passes over memory, and every guard decision on the device)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from steadystep.optim.cprop.native import CPropAdam, CPropAdamW, CPropSGD
from steadystep.optim.cprop.native import _NativeCPropBase as NativeCPropBase

__all__ = ["NATIVE", "NativeCPropBase", "can_convert", "is_native", "native_for"]

# torch's optimizers that have a native CProp class with the same hyperparameters, and the
# constructor arguments that carry over (the defaults of groups added later).
NATIVE: dict[type[Optimizer], tuple[type[NativeCPropBase], tuple[str, ...]]] = {
    torch.optim.SGD: (CPropSGD, ("lr", "momentum", "dampening", "weight_decay", "nesterov")),
    torch.optim.Adam: (CPropAdam, ("lr", "betas", "eps", "weight_decay", "amsgrad")),
    torch.optim.AdamW: (CPropAdamW, ("lr", "betas", "eps", "weight_decay", "amsgrad")),
}


def can_convert(base: Optimizer) -> bool:
    """Can ``base`` be rebuilt as its native CProp class with the same numbers?

    Exactly torch's SGD/Adam/AdamW (a subclass may change the step), not yet stepped (its state
    would be lost), no hooks of its own, and no setting the native classes lack (``maximize``,
    ``capturable``, ``differentiable``, a tensor learning rate or betas).
    """
    if type(base) not in NATIVE or base.state:
        return False
    hooks = (
        base._optimizer_step_pre_hooks,
        base._optimizer_step_post_hooks,
        base._optimizer_state_dict_pre_hooks,
        base._optimizer_state_dict_post_hooks,
        base._optimizer_load_state_dict_pre_hooks,
        base._optimizer_load_state_dict_post_hooks,
    )
    if any(hooks):
        return False
    decoupled = type(base) is torch.optim.AdamW
    for group in base.param_groups:
        if group.get("maximize") or group.get("capturable") or group.get("differentiable"):
            return False
        if any(isinstance(group.get(k), Tensor) for k in ("lr", "weight_decay")):
            return False
        if any(isinstance(b, Tensor) for b in group.get("betas", ())):
            return False
        if "betas" in group and bool(group.get("decoupled_weight_decay", False)) != decoupled:
            return False
    return True


def native_for(base: Optimizer, **settings: Any) -> NativeCPropBase:
    """The native CProp class of ``base`` (exactly torch's SGD, Adam or AdamW, see
    :func:`can_convert`), built on the same param-group dicts, so an LR scheduler built on
    ``base`` keeps driving them.

    ``settings`` are CProp's (``beta``, ``c``, ``eps``, ``cdf``, ``method``, ``fused``); the
    base's hyperparameters carry over. ``fused`` replaces torch's flag of that name in the
    groups (steadystep's fused path is its own: C on CPU, Triton on CUDA).

    Examples:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> type(native_for(torch.optim.AdamW([p], lr=1e-3), beta=0.99)).__name__
        'CPropAdamW'
    """
    if not can_convert(base):
        raise ValueError(
            f"base must be exactly torch.optim.SGD, Adam or AdamW, not yet stepped, without "
            "hooks, maximize, capturable, differentiable or tensor hyperparameters, to be "
            f"rebuilt as its native CProp class; got {type(base).__name__} (wrap it with "
            "ss.CProp(base) instead)"
        )
    cls, names = NATIVE[type(base)]
    fused = settings.get("fused")
    for group in base.param_groups:
        # steadystep's fused path is its own (C / Triton kernels); torch's flag is not it
        group["fused"] = fused
        if fused:
            group["foreach"] = None
    hyper = {name: base.defaults[name] for name in names}
    cprop = {f"cprop_{k}": settings[k] for k in ("beta", "c", "eps") if k in settings}
    cprop.update({k: settings[k] for k in ("cdf", "method") if k in settings})
    return cls(base.param_groups, **hyper, **cprop, fused=fused)


def is_native(optimizer: Any) -> bool:
    """Is ``optimizer`` one of the native CProp classes (CPropSGD, CPropAdam, CPropAdamW)?"""
    return isinstance(optimizer, NativeCPropBase)
