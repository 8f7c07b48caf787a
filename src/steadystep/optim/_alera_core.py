"""ALeRA's functional core: the unit layout of a step, the relaxed paths, the multipliers and
the parameter update, as functions of tensor lists (Schoenauer Sebag, Schoenauer & Sebag,
section 2.1; the math is in :class:`~steadystep.ALeRA`'s docstring).

:func:`layout_step` turns the parameters with a gradient into a :class:`AgnosticStep` (weight
decay, norms, finiteness, step counts, multipliers and learning rates per unit);
:func:`agnostic_update` advances the relaxed paths and gives the multipliers' log changes;
:func:`alera` is the whole ALeRA step (those, the multipliers, the update) and
:class:`~steadystep.AgAdam` takes Adam's step for the update. Every function has a readable
per-tensor path and a ``torch._foreach`` path that tests hold equal.

Note [units]: a "unit" is the set of elements that share one learning-rate multiplier and one
normalisation ``g / ||g||``: all parameters ("global"), one param group ("group", a layer with
ss.layer_groups), one tensor ("tensor"). For "param" (SPALeRA) the normalisation is global but
every element has its own multiplier, compared with mean ``E_t / D`` and std ``alpha / D``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from steadystep import _kernels as kernels
from steadystep._distributed import all_ranks, is_distributed
from steadystep._tensors import grads_finite, reduce_square_norms
from steadystep.agnostic import apply_log_change_, log_lr_change, random_walk_mean

__all__ = [
    "GRANULARITIES",
    "AgnosticStep",
    "Gathered",
    "GroupState",
    "agnostic_update",
    "alera",
    "fused_alera_",
    "grad_norms",
    "layout_step",
    "param_multipliers",
    "unit_counts",
    "unit_layout",
    "unit_norms",
]

GRANULARITIES = ("global", "group", "tensor", "param")


class Gathered(NamedTuple):
    """The parameters that have a gradient, in param-group order (this rank's shards under
    FSDP2), with what a step reads of their state."""

    keys: list[torch.Tensor]  # the parameters themselves (keys of the optimizer's state)
    params: list[torch.Tensor]
    grads: list[torch.Tensor]  # raw p.grad, never written
    relaxed_paths: list[torch.Tensor]  # r
    weight_decays: list[float]  # of each parameter's group
    group_index: list[int]  # the param group of each parameter
    members: list[list[int]]  # per param group, the indices of its parameters here
    param_multipliers: list[torch.Tensor | None]  # state["lr_multiplier"] ("tensor", "param")
    tensor_steps: list[torch.Tensor]  # state["step"] of each tensor ("tensor" only, else [])
    numels: list[int]  # sizes of the whole tensors
    sharded: list[bool]  # DTensors split across ranks (their norms are summed over ranks)


class AgnosticStep(NamedTuple):
    """One step laid out per unit (Note [units]), as :func:`alera` takes it."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]  # d = g + weight_decay * theta, NaN/inf elements masked to 0
    unit_norm: list[torch.Tensor]  # ||d_u|| per unit, 0-d (whole tensors under FSDP2)
    relaxed_paths: list[torch.Tensor]  # r per parameter
    multipliers: list[torch.Tensor]  # per unit (``"param"``: per parameter, elementwise)
    units: list[list[int]]  # per unit, indices into params
    unit_steps: list[torch.Tensor]  # per unit, its step count t after this step (0-d float32)
    lrs: list[float | torch.Tensor]  # per parameter, lr without the unit's multiplier
    take_step: torch.Tensor  # 0-d bool: every gradient finite and not masked by the guard
    foreach: bool
    numels: list[int]
    sharded: list[bool]


class GroupState(NamedTuple):
    """What a step reads of the param groups: per group its step count, LR multiplier and
    learning rate, then the skipped-steps counter."""

    steps: list[torch.Tensor]  # group["step"]
    multipliers: list[torch.Tensor]  # group["lr_multiplier"]
    lrs: list[float | torch.Tensor]  # group["lr"]
    skipped_steps: torch.Tensor  # optimizer-wide: one tensor that every group holds


def layout_step(
    gathered: Gathered,
    groups: GroupState,
    *,
    granularity: str,
    skip: torch.Tensor | None,
    foreach: bool,
) -> AgnosticStep:
    """Lay a step out per unit and advance its counts; no host read.

    The gradient each unit sees is ``d = g + weight_decay * theta`` (weight decay enters once,
    for ``r`` and the update alike). ``found_finite`` (every ``||d_u||`` finite, Note [finite
    from norms], and every raw gradient element within the limit of Note [huge gradients] in
    :mod:`steadystep._kernels`) and ``skip`` (a guard's mask) give ``take_step``; the step
    counts (:func:`unit_counts`) advance by ``take_step`` and ``groups.skipped_steps`` counts
    the steps skipped for a non-finite gradient that the guard did not mask.
    """
    params = gathered.params
    # Weight decay enters once, into the gradient that both r and the update see.
    grads = [
        g if wd == 0.0 else g.add(p, alpha=wd)
        for g, p, wd in zip(gathered.grads, params, gathered.weight_decays, strict=True)
    ]
    dtypes = [r.dtype for r in gathered.relaxed_paths]
    norms = grad_norms(grads, dtypes, foreach=foreach)
    # Whole-tensor norms on every rank, so every rank decides alike (skip included).
    norms = reduce_square_norms(norms, gathered.sharded)

    units, owners, unit_steps, counters = unit_counts(gathered, groups.steps, granularity)
    norm_u = unit_norms(norms, units, dtypes)
    # Note [finite from norms]: a NaN or inf anywhere makes its unit's norm non-finite; the
    # gradient limit (Note [huge gradients] in steadystep._kernels) takes a pass of its own.
    # The same decision on every rank (a NaN in one rank's p.grad after DDP's all-reduce skips
    # all), in one all-reduce.
    found_finite = torch.stack([torch.isfinite(n) for n in norm_u]).all()
    within = grads_finite(gathered.grads, collective=False).to(found_finite.device)
    found_finite = all_ranks(found_finite & within)
    take_step = found_finite
    nonfinite_skip = ~found_finite
    if skip is not None:
        skip = skip.to(take_step.device)
        take_step = take_step & ~skip
        nonfinite_skip = nonfinite_skip & ~skip
    # Note [why a masking pass]: 0 * nan is nan. In place where ``grads`` is our temporary.
    grads = [
        _mask_nonfinite(d, owned=d is not g) for d, g in zip(grads, gathered.grads, strict=True)
    ]
    increment = take_step.to(torch.float32)
    for t in counters:
        t.add_(increment.to(t.device))
    groups.skipped_steps.add_(nonfinite_skip.to(groups.skipped_steps.device))

    group_index = gathered.group_index
    if granularity in ("global", "group"):
        # The group multiplier is the adapted rate; the update uses lr times it.
        multipliers = [groups.multipliers[gi] for gi in owners]
        lrs = [groups.lrs[gi] for gi in group_index]
    else:
        # Per-tensor/element rates, times the group factor (1 unless a guard cut it).
        cut_lrs = {gi: groups.multipliers[gi] * groups.lrs[gi] for gi in set(group_index)}
        multipliers = [m for m in gathered.param_multipliers if m is not None]
        lrs = [cut_lrs[gi] for gi in group_index]
    return AgnosticStep(
        params=params,
        grads=grads,
        unit_norm=norm_u,
        relaxed_paths=gathered.relaxed_paths,
        multipliers=multipliers,
        units=units,
        unit_steps=unit_steps,
        lrs=lrs,
        take_step=take_step,
        foreach=foreach,
        numels=gathered.numels,
        sharded=gathered.sharded,
    )


def unit_layout(
    members: list[list[int]], group_index: list[int], granularity: str
) -> tuple[list[list[int]], list[int], list[int]]:
    """``(units, owners, active)`` of a step (Note [units]): the parameter indices of each unit,
    the param group whose ``step``/``lr_multiplier`` each unit uses (for ``"tensor"``: the
    tensor's group), and the groups with a gradient this step. ``members[g]`` are group
    ``g``'s indices among the parameters with a gradient; ``group_index[i]`` is parameter
    ``i``'s group."""
    active = [gi for gi, group_members in enumerate(members) if group_members]
    if granularity in ("global", "param"):
        units = [[i for group_members in members for i in group_members]]
        owners = [0 if granularity == "global" else active[0]]
    elif granularity == "group":
        units = [members[gi] for gi in active]
        owners = active
    else:
        units = [[i] for i in range(len(group_index))]
        owners = list(group_index)
    return units, owners, active


def unit_counts(
    gathered: Gathered, group_steps: list[torch.Tensor], granularity: str
) -> tuple[list[list[int]], list[int], list[torch.Tensor], list[torch.Tensor]]:
    """``(units, owners, unit_steps, counters)`` of a step: :func:`unit_layout`'s units and
    owners, the step count ``t`` of each unit's ``E_t`` (its owner group's ``"step"``; for
    ``"tensor"`` the tensor's own, Note [unit step] of :class:`~steadystep.ALeRA`), and the
    counts that a step taken advances by one: every group's for ``"global"`` (each group keeps
    the one count), else those of the groups with a gradient, and for ``"tensor"`` the
    tensors' own."""
    units, owners, active = unit_layout(gathered.members, gathered.group_index, granularity)
    counted = range(len(group_steps)) if granularity == "global" else active
    counters = [group_steps[gi] for gi in counted]
    if granularity == "tensor":
        return units, owners, gathered.tensor_steps, counters + gathered.tensor_steps
    return units, owners, [group_steps[gi] for gi in owners], counters


def grad_norms(
    grads: list[torch.Tensor], dtypes: list[torch.dtype], *, foreach: bool
) -> list[torch.Tensor]:
    """Per-tensor L2 norms, accumulated in the statistics' dtype (0-d tensors)."""
    # dtype=None where it is the tensor's own: the same result, without the slower casting path.
    casts = [None if g.dtype == dt else dt for g, dt in zip(grads, dtypes, strict=True)]
    if foreach and len(set(casts)) == 1:
        return list(torch._foreach_norm(grads, 2, dtype=casts[0]))
    return [torch.linalg.vector_norm(g, dtype=dt) for g, dt in zip(grads, casts, strict=True)]


def unit_norms(
    norms: list[torch.Tensor], units: list[list[int]], dtypes: list[torch.dtype]
) -> list[torch.Tensor]:
    """``||g_u|| = sqrt(sum_{i in u} ||g_i||^2)`` per unit, in the unit's statistics dtype.

    Note [finite from norms]: ``||g_u||`` is finite iff every element of the unit's gradient
    is (a NaN or inf anywhere makes the sum of squares NaN or inf), so the skip flag of a step
    costs no pass over the gradients: it is ``all(isfinite(||g_u||))`` over the units.
    """
    return [
        torch.stack([norms[i].to(dtypes[u[0]]) for i in u]).square().sum().sqrt() for u in units
    ]


def _mask_nonfinite(d: torch.Tensor, *, owned: bool) -> torch.Tensor:
    """``d`` with its NaN/inf elements replaced by 0: in place when ``owned`` (a temporary of
    ours), else into a new tensor (``p.grad`` is never written).

    Note [why a masking pass]: a skipped step multiplies the gradient by a 0-d scale that is 0,
    but ``0 * nan`` and ``0 * inf`` are NaN in IEEE arithmetic, so a non-finite gradient fed to
    ``r.addcmul_(g, 0)`` or ``p.addcmul_(g, 0)`` would still poison ``r`` and ``theta``. Eager
    torch has no multiply-add that drops a NaN operand under a 0 weight, so the gradient goes
    through one select first: ``nan_to_num`` (identity on finite values, so steps with a finite
    gradient are bitwise those of the unmasked math) rather than ``torch.where`` with a 0-d
    condition, which on CPU is several times slower than a plain elementwise pass.
    """
    if owned:
        return d.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    return torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)


def agnostic_update(
    grads: list[torch.Tensor],
    unit_norm: list[torch.Tensor],
    relaxed_paths: list[torch.Tensor],
    units: list[list[int]],
    unit_steps: list[torch.Tensor],
    *,
    alpha: float,
    C: float,
    norm_eps: float,
    param_wise: bool,
    take_step: torch.Tensor,
    foreach: bool,
    numels: list[int] | None = None,
    sharded: list[bool] | None = None,
) -> list[torch.Tensor]:
    """Advance the relaxed paths in place and return the multipliers' log changes (sync-free).

    For each unit ``u`` with gradient ``g_u`` (finite: see :func:`_mask_nonfinite`) and norm
    ``unit_norm[u] = ||g_u||`` (:func:`unit_norms`):

        r_i <- (1 - alpha) r_i + alpha g_i / ||g_u||   if ||g_u|| > norm_eps, else (1 - alpha) r_i
        log_change_u = C (||r_u||^2 - E_t) / (alpha / sqrt(d_u)),   t = unit_steps[u]

    and, with ``param_wise``, per element ``log_change_i = C (D r_i^2 - E_t) / alpha`` (one
    tensor shaped like each parameter). Where ``take_step`` is False every relaxed path stays as it
    was (decay 1, step 0). The log changes are to be applied with
    :func:`~steadystep.agnostic.apply_log_change_`, which also masks them with ``take_step``.

    For FSDP2 shards, ``grads``/``relaxed_paths`` are this rank's shards, ``unit_norm`` already
    the whole units' norms, ``numels`` the whole tensors' sizes and ``sharded`` marks the
    tensors whose ``||r||^2`` is summed over ranks (one all-reduce).
    """
    if numels is None:
        numels = [g.numel() for g in grads]
    if sharded is None:
        sharded = [False] * len(grads)
    r0 = relaxed_paths[0]
    decay = torch.where(
        take_step, torch.full((), 1.0 - alpha, dtype=r0.dtype, device=r0.device), 1.0
    )
    scales: list[torch.Tensor] = [decay] * len(grads)
    unit_numels = []
    for unit, norm in zip(units, unit_norm, strict=True):
        # alpha / ||g|| only where the gradient has a direction; never a division by ~0.
        has_direction = (norm > norm_eps) & take_step
        scale = torch.where(has_direction, alpha / torch.where(has_direction, norm, 1.0), 0.0)
        for i in unit:
            scales[i] = scale
        unit_numels.append(sum(numels[i] for i in unit))

    if foreach:
        torch._foreach_mul_(relaxed_paths, decay)
        torch._foreach_addcmul_(relaxed_paths, grads, scales)
    else:
        for r, g, s in zip(relaxed_paths, grads, scales, strict=True):
            r.mul_(decay).addcmul_(g, s)

    if param_wise:
        # C (D r^2 - E_t) / alpha as one multiply-add per element (r is read once, no r^2
        # temporary): (C D / alpha) * r * r + (-C E_t / alpha).
        mean = random_walk_mean(alpha, unit_steps[0].to(r0.dtype))
        offset = mean * (-C / alpha)
        gain = C * float(sum(unit_numels)) / alpha
        return [torch.addcmul(offset, r, r, value=gain) for r in relaxed_paths]
    r_sq = grad_norms(relaxed_paths, [r.dtype for r in relaxed_paths], foreach=foreach)
    r_sq = reduce_square_norms(r_sq, sharded)
    log_changes = []
    for unit, step, numel in zip(units, unit_steps, unit_numels, strict=True):
        sq = torch.stack([r_sq[i] for i in unit]).square().sum()
        log_changes.append(log_lr_change(sq, step, alpha=alpha, C=C, numel=float(numel)))
    return log_changes


def param_multipliers(
    units: list[list[int]], multipliers: list[torch.Tensor], n: int, *, param_wise: bool
) -> list[torch.Tensor]:
    """The adapted multiplier of each of the ``n`` parameters: its unit's (the same tensor for
    every parameter of a unit), or with ``param_wise`` its own per-element one."""
    if param_wise:
        return list(multipliers)
    out = [multipliers[0]] * n
    for unit, m in zip(units, multipliers, strict=True):
        for i in unit:
            out[i] = m
    return out


def alera(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    unit_norm: list[torch.Tensor],
    relaxed_paths: list[torch.Tensor],
    multipliers: list[torch.Tensor],
    units: list[list[int]],
    unit_steps: list[torch.Tensor],
    lrs: list[float | torch.Tensor],
    *,
    alpha: float,
    C: float,
    norm_eps: float,
    param_wise: bool,
    take_step: torch.Tensor,
    foreach: bool,
    numels: list[int] | None = None,
    sharded: list[bool] | None = None,
) -> None:
    """Functional ALeRA step: relaxed paths, multipliers, then ``theta_i -= lr_i m_i d_i``.

    ``multipliers[u]`` is unit ``u``'s adapted multiplier (with ``param_wise``: one per-element
    tensor per parameter); ``lrs[i]`` is parameter ``i``'s learning rate without it. ``grads``
    (the ``d_i``) must be finite (non-finite elements masked) and include weight decay;
    ``unit_norm`` are the units' norms. Where ``take_step`` (0-d bool) is False nothing changes:
    the decay, the step of ``r``, the exponent and the update's coefficient are all 0-d values
    that turn the same passes into no-ops, so no pass is spent on masking.

    With ``foreach`` the per-parameter update is one ``torch._foreach_addcmul_`` with 0-d
    tensor coefficients; without, the readable loop below (same ops, same bits on CPU).
    """
    log_changes = agnostic_update(
        grads,
        unit_norm,
        relaxed_paths,
        units,
        unit_steps,
        alpha=alpha,
        C=C,
        norm_eps=norm_eps,
        param_wise=param_wise,
        take_step=take_step,
        foreach=foreach,
        numels=numels,
        sharded=sharded,
    )
    for m, change in zip(multipliers, log_changes, strict=True):
        apply_log_change_(m, change, take_step)  # m <- m exp(change), clipped; kept if skipped
    # theta <- theta + coef * d with coef = -lr * m, and coef = 0 on a skipped step.
    per_param = param_multipliers(units, multipliers, len(params), param_wise=param_wise)
    if param_wise:
        coefs = [m * torch.where(take_step, -lr, 0.0) for m, lr in zip(per_param, lrs, strict=True)]
    else:
        coefs = []
        neg_lrs: dict[tuple[int, int], torch.Tensor] = {}
        for m, lr in zip(per_param, lrs, strict=True):
            key = (id(m), id(lr))  # one 0-d coefficient per unit and distinct lr, not per tensor
            if key not in neg_lrs:
                neg_lrs[key] = torch.where(take_step, m * -lr, 0.0)
            coefs.append(neg_lrs[key])
    if foreach:
        torch._foreach_addcmul_(params, grads, coefs)
    else:
        for p, d, coef in zip(params, grads, coefs, strict=True):
            p.addcmul_(d, coef)


def fused_alera_(
    gathered: Gathered,
    groups: GroupState,
    adam: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None,
    *,
    granularity: str,
    skip: torch.Tensor | None,
    fused: bool | None,
    owner: str,
    **hyper: float,
) -> bool:
    """The whole ALeRA step (Ag-Adam's with ``adam``: its moments and step counts) in one call
    of :func:`steadystep._kernels.alera_`, the arguments as for :func:`layout_step`; ``hyper``:
    the kernel's hyperparameters (``alpha``, ``C``, ``norm_eps``; Ag-Adam's ``beta1``,
    ``beta2``, ``eps``). False,
    having changed nothing, where the kernels cannot take it (FSDP2 shards, tensor learning
    rates, tensors without a kernel); then ``fused=True`` raises
    :class:`~steadystep._kernels.FusedUnsupportedError`."""
    lrs = [groups.lrs[gi] for gi in gathered.group_index]
    supported = not any(gathered.sharded) and not any(isinstance(x, torch.Tensor) for x in lrs)
    if supported:
        units, owners, unit_steps, counters = unit_counts(gathered, groups.steps, granularity)
        tensor_unit = [0] * len(gathered.params)
        for u, members in enumerate(units):
            for i in members:
                tensor_unit[i] = u
        if granularity in ("global", "group"):
            unit_multipliers = [groups.multipliers[gi] for gi in owners]
            lr_scales: list[torch.Tensor | None] = [None] * len(gathered.params)
        else:
            param_wise = granularity == "param"
            unit_multipliers = None if param_wise else list(gathered.param_multipliers)
            lr_scales = [groups.multipliers[gi] for gi in gathered.group_index]
        exp_avgs, exp_avg_sqs, adam_steps = adam if adam is not None else (None, None, None)
        global_ = granularity == "global"
        supported = kernels.alera_(
            gathered.params,
            gathered.grads,
            gathered.relaxed_paths,
            list(gathered.param_multipliers) if granularity == "param" else None,
            exp_avgs,
            exp_avg_sqs,
            adam_steps,
            tensor_unit=tensor_unit,
            tensor_weight_decay=gathered.weight_decays,
            tensor_lr=lrs,
            tensor_lr_scale=lr_scales,
            unit_multipliers=unit_multipliers,
            unit_steps=unit_steps,
            unit_numels=[sum(gathered.numels[i] for i in unit) for unit in units],
            counters=counters,
            mirrors=list(groups.multipliers[1:]) if global_ else [],
            skipped=groups.skipped_steps,
            skip=skip,
            # the kernel decides on this rank's gradients; under torch.distributed every rank
            # must decide alike (a NaN in one rank's p.grad after DDP's all-reduce)
            found_finite=grads_finite(gathered.grads) if is_distributed() else None,
            **hyper,
        )
    if not supported and fused:
        needs = ", float learning rates and no FSDP2 sharding"
        raise kernels.FusedUnsupportedError(owner, gathered.params, needs)
    return supported
