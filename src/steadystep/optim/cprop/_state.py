"""What the CProp classes share: the base optimizers' hyperparameters (with the plain twins
of :mod:`~steadystep.optim.cprop.reference` too), per-parameter state, the step's parameters
and ``found_finite``, checkpoint copies and telemetry (used by
:mod:`~steadystep.optim.cprop.native` and :mod:`~steadystep.optim.cprop.wrapper`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from steadystep._tensors import grads_finite, local_tensor
from steadystep.checkpoint import Kind, step_tensor
from steadystep.optim.cprop._math import (
    _check_grad,
    _check_hyper,
    _cprop_hyper,
    _scale_one,
    _second_key,
    _stats_dtype,
)


def _sgd_defaults(
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool
) -> dict[str, Any]:
    """``torch.optim.SGD``'s hyperparameters by name, as :class:`CPropSGD` keeps them in its
    param groups' defaults and its plain twin (:mod:`~steadystep.optim.cprop.reference`) in
    ``base``."""
    return {
        "lr": lr,
        "momentum": momentum,
        "dampening": dampening,
        "weight_decay": weight_decay,
        "nesterov": nesterov,
    }


def _adam_defaults(
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    decoupled: bool,
) -> dict[str, Any]:
    """``torch.optim.Adam``'s (``AdamW``'s where ``decoupled``) hyperparameters by name, as
    :class:`CPropAdam` and its plain twin keep them (``betas`` as a tuple)."""
    return {
        "lr": lr,
        "betas": tuple(betas),
        "eps": eps,
        "weight_decay": weight_decay,
        "amsgrad": amsgrad,
        "decoupled_weight_decay": decoupled,
    }


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


def _cprop_state_spec(group: dict[str, Any]) -> dict[str, tuple[Kind, bool]]:
    """CProp's per-parameter state in ``group`` as :func:`_init_cprop_state` creates it
    (``{key: (kind, required)}``, checked on load by the classes and the wrapper)."""
    return {
        "step": ("scalar", True),
        "cprop_exp_avg": ("param", True),
        _second_key(group["cprop_method"]): ("param", True),
    }


def _params_with_grad(group: dict[str, Any], group_index: int, owner: str) -> list[Tensor]:
    """The group's parameters that have a gradient (checked: dense and real)."""
    params = []
    strided = torch.strided
    for pi, p in enumerate(group["params"]):
        g = p.grad
        if g is None:
            continue
        if g.layout is not strided or g.is_complex():
            _check_grad(g, owner, group_index, pi, p.shape)
        params.append(p)
    return params


def _collect(
    groups: list[dict[str, Any]],
    owner: str,
    init_state: Callable[[dict[str, Any], Tensor], None],
    found_finite: Tensor | None = None,
) -> tuple[list[tuple[dict[str, Any], list[Tensor]]], Tensor]:
    """Per group the parameters with a gradient (``init_state(group, p)`` creates state), and
    the step's ``found_finite`` over all of them (``found_finite`` when the caller has it)."""
    work = []
    for gi, group in enumerate(groups):
        params = _params_with_grad(group, gi, owner)
        for p in params:
            init_state(group, p)
        work.append((group, params))
    if found_finite is None:
        found_finite = grads_finite([p.grad for _, params in work for p in params])
    return work, found_finite


def _call_closure(closure: Callable[[], Any] | None) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _states_by_param(
    saved: dict[Any, Any],
    params: list[Tensor],
    what: str,
    saved_groups: list[dict[str, Any]] | None = None,
) -> dict[Tensor, Any]:
    """Saved per-parameter state keyed by index -> keyed by parameter (copied, see _copy_state;
    a float ``step`` of an old torch-style checkpoint becomes the 0-d tensor the step needs).

    With ``saved_groups`` a key is the id the saved groups list the parameter under, as in
    torch's ``load_state_dict``: ``torch.distributed.checkpoint`` hands back FQNs there."""
    index: dict[Any, int] = {}
    if saved_groups is not None:
        saved_ids = [i for group in saved_groups for i in group["params"]]
        index = {saved_id: i for i, saved_id in enumerate(saved_ids)}
    out = {}
    for key, value in saved.items():
        i = index.get(key, key)
        if not isinstance(i, int) or not 0 <= i < len(params):
            raise ValueError(f"{what} has state for unknown parameter index {key!r}")
        state = _copy_state(value, params[i])
        if "step" in state:
            state["step"] = step_tensor(state["step"], params[i].device)
        out[params[i]] = state
    return out


def _scales(
    groups: list[dict[str, Any]], state_of: Callable[[Tensor], dict[str, Any] | None]
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """``(group index, parameter, s)`` for every parameter with CProp state, in group order:
    the scale recomputed from the current statistics (a new tensor, this rank's shard under
    FSDP2), i.e. the scale that the last step applied. One at a time, so a caller that reduces
    them never holds more than one."""
    for gi, group in enumerate(groups):
        for p in group["params"]:
            st = state_of(p)
            if not st or "cprop_exp_avg" not in st:
                continue
            m = local_tensor(st["cprop_exp_avg"])
            second = st.get(_second_key(group["cprop_method"]), st.get("exp_avg_sq"))
            keep = torch.ones((), dtype=m.dtype, device=m.device)
            yield gi, p, _scale_one(m, local_tensor(second), st["step"], keep, _cprop_hyper(group))


def _group_stats(
    groups: list[dict[str, Any]], state_of: Callable[[Tensor], dict[str, Any] | None]
) -> dict[str, Tensor]:
    """Mean scale and fraction of elements with ``s < 0.5``, per group and overall (0-d).

    Under FSDP2 they cover this rank's shards (Note [FSDP2]): no collective, as in ALeRA's
    stats, so a Monitor on one rank alone cannot hang the others.
    """
    sums: dict[int, list[Tensor]] = {}
    belows: dict[int, list[Tensor]] = {}
    counts: dict[int, int] = {}
    for gi, _, s in _scales(groups, state_of):
        sums.setdefault(gi, []).append(s.sum(dtype=torch.float32))
        belows.setdefault(gi, []).append((s < 0.5).sum(dtype=torch.float32))
        counts[gi] = counts.get(gi, 0) + s.numel()
    out: dict[str, Tensor] = {}
    totals: list[tuple[Tensor, Tensor, int]] = []
    for gi, count in counts.items():
        if count == 0:
            continue
        total, below = torch.stack(sums[gi]).sum(), torch.stack(belows[gi]).sum()
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
    # temporaries; the per-tensor loop is as fast or faster there (measured when these paths
    # were the default; the fused kernels are now).
    return bool(params) and all(p.device.type == "cuda" for p in params)
