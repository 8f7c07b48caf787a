"""ALeRA: agnostic learning-rate adaptation (Schoenauer Sebag, Schoenauer & Sebag, section 2.1).

The class validates and holds state; :func:`alera` is the functional core, with a readable
per-tensor reference path and a ``torch._foreach`` path that tests hold equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from steadystep._tensors import full_max, is_sharded, local_tensor, reduce_square_norms
from steadystep._validation import (
    check_choice,
    check_nonnegative,
    check_param_tensors,
    check_positive,
)
from steadystep.agnostic import log_lr_change, random_walk_mean

__all__ = [
    "GRANULARITIES",
    "ALeRA",
    "agnostic_update",
    "alera",
    "apply_log_change_",
    "grad_norms",
    "unit_norms",
]

GRANULARITIES = ("global", "group", "tensor", "param")
_WIDE_KEYS = ("alpha", "C", "norm_eps")  # optimizer-wide: a unit may span several groups


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics stay in at least float32: a multiplier step of ``exp(3e-6)`` vanishes in bf16."""
    return torch.promote_types(dtype, torch.float32)


def _check_alpha(alpha: float) -> float:
    alpha = check_positive("alpha", alpha)
    if not alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got alpha={alpha}")
    return alpha


# Note [units]: a "unit" is the set of elements that share one learning-rate multiplier and one
# normalisation ``g / ||g||``: all parameters ("global"), one param group ("group", a layer with
# ss.layer_groups), one tensor ("tensor"). For "param" (SPALeRA) the normalisation is global but
# every element has its own multiplier, compared with mean ``E_t / D`` and std ``alpha / D``.
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


def apply_log_change_(
    multiplier: torch.Tensor, log_change: torch.Tensor, ok: torch.Tensor
) -> torch.Tensor:
    """``multiplier *= exp(log_change)`` in place where ``ok``; unchanged (bitwise) where not.

    The in-place twin of :func:`steadystep.agnostic.apply_log_change` (same clamps, same op
    order, so the same bits): the exponent is clamped to ``[-log(max), log(max)]`` (to
    ``[0, 0]`` when ``ok`` is False: ``m * exp(0) = m`` exactly, with no ``torch.where`` pass)
    and the product to ``[tiny, max]``. ``log_change`` (a temporary) is overwritten.
    """
    info = torch.finfo(multiplier.dtype)
    bound = torch.full((), math.log(info.max) - 1.0, dtype=log_change.dtype, device=ok.device)
    hi = torch.where(ok, bound, 0.0)
    factor = log_change.clamp_(-hi, hi).exp_()
    return multiplier.mul_(factor).clamp_(info.tiny, info.max)


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
    ok: torch.Tensor,
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
    tensor shaped like each parameter). Where ``ok`` is False every relaxed path stays as it was
    (decay 1, step 0). The log changes are to be applied with :func:`apply_log_change_`, which
    also masks them with ``ok``.

    For FSDP2 shards, ``grads``/``relaxed_paths`` are this rank's shards, ``unit_norm`` already
    the whole units' norms, ``numels`` the whole tensors' sizes and ``sharded`` marks the
    tensors whose ``||r||^2`` is summed over ranks (one all-reduce).
    """
    if numels is None:
        numels = [g.numel() for g in grads]
    if sharded is None:
        sharded = [False] * len(grads)
    r0 = relaxed_paths[0]
    decay = torch.where(ok, torch.full((), 1.0 - alpha, dtype=r0.dtype, device=r0.device), 1.0)
    scales: list[torch.Tensor] = [decay] * len(grads)
    unit_numels = []
    for unit, norm in zip(units, unit_norm, strict=True):
        # alpha / ||g|| only where the gradient has a direction; never a division by ~0.
        has_direction = (norm > norm_eps) & ok
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
    ok: torch.Tensor,
    foreach: bool = False,
    numels: list[int] | None = None,
    sharded: list[bool] | None = None,
) -> None:
    """Functional ALeRA step: relaxed paths, multipliers, then ``theta_i -= lr_i m_i d_i``.

    ``multipliers[u]`` is unit ``u``'s adapted multiplier (with ``param_wise``: one per-element
    tensor per parameter); ``lrs[i]`` is parameter ``i``'s learning rate without it. ``grads``
    (the ``d_i``) must be finite (non-finite elements masked) and include weight decay;
    ``unit_norm`` are the units' norms. Where ``ok`` (0-d bool) is False nothing changes: the
    decay, the step of ``r``, the exponent and the update's coefficient are all 0-d values
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
        ok=ok,
        foreach=foreach,
        numels=numels,
        sharded=sharded,
    )
    for m, change in zip(multipliers, log_changes, strict=True):
        apply_log_change_(m, change, ok)
    # theta <- theta + coef * d with coef = -lr * m, and coef = 0 on a skipped step.
    if param_wise:
        coefs = [m * torch.where(ok, -lr, 0.0) for m, lr in zip(multipliers, lrs, strict=True)]
    else:
        coefs = [multipliers[0]] * len(params)
        for unit, m in zip(units, multipliers, strict=True):
            neg_lrs: dict[int, torch.Tensor] = {}
            for i in unit:
                key = id(lrs[i])  # one 0-d coefficient per distinct lr, not per tensor
                if key not in neg_lrs:
                    neg_lrs[key] = torch.where(ok, m * -lrs[i], 0.0)
                coefs[i] = neg_lrs[key]
    if foreach:
        torch._foreach_addcmul_(params, grads, coefs)
    else:
        for p, d, coef in zip(params, grads, coefs, strict=True):
            p.addcmul_(d, coef)


class ALeRA(Optimizer):
    """Agnostic LEarning Rate Adaptation on top of SGD.

    Compares the relaxed path of normalised gradients with a random walk of unit vectors and
    raises the learning rate while gradients agree more than chance, lowers it otherwise
    (Algorithm 1 of the paper without the greyed Page-Hinkley lines). Per step ``t`` and unit
    (see ``granularity``), with ``d = g + weight_decay * theta``:

    .. math::
        r &\\leftarrow (1 - \\alpha)\\, r + \\alpha\\, d / \\lVert d \\rVert
            \\quad (\\text{only the decay where } \\lVert d \\rVert \\le \\texttt{norm\\_eps})\\\\
        m &\\leftarrow m
            \\exp\\big(C\\,(\\lVert r \\rVert^2 - E_t) \\,/\\, (\\alpha/\\sqrt{n})\\big),
            \\qquad E_t = \\tfrac{\\alpha}{2-\\alpha}\\,(1 - (1-\\alpha)^{2t})\\\\
        \\theta &\\leftarrow \\theta - \\texttt{lr}\\; m\\; d

    ``r`` is ``state["relaxed_path"]``, ``m`` the multiplier (``group["lr_multiplier"]`` for
    ``"global"``/``"group"``, ``state["lr_multiplier"]`` for ``"tensor"``/``"param"``), ``n``
    the number of elements of the unit, ``alpha`` is ``alpha`` and ``C`` is ``C``. The multiplier
    is updated before the parameter update of the same step, as in the paper. The exponent is
    clipped so a multiplier never reaches inf or 0 (:func:`steadystep.agnostic.apply_log_change`).

    The relaxed path sees the same gradient the update uses, weight decay included (the paper's
    ``g`` is the gradient of the objective being minimised); weight decay is added once.

    Args:
        params: parameters or param groups (``ss.layer_groups(model)`` gives the paper's layers).
        lr: initial learning rate ``eta_0``; multipliers start at 1 and multiply it, so LR
            schedulers compose.
        alpha: memory rate of the relaxed path (default 0.01, the paper's robust setting).
        C: adaptation speed (default 3e-6).
        granularity: ``"global"`` (one rate), ``"group"`` (one per param group, default),
            ``"tensor"`` (one per tensor) or ``"param"`` (one per element: SPALeRA; ``r`` is
            normalised by the global norm, reference mean ``E_t / D``, std ``alpha / D``).
        weight_decay: L2 penalty added to the gradient (default 0).
        norm_eps: below this unit gradient norm the step has no direction and ``r`` only decays.
        foreach: use ``torch._foreach`` kernels (default: on CUDA only, where they are faster).

    ``group["lr_multiplier"]`` (0-d, every granularity) is also where
    :class:`~steadystep.CatastropheGuard` cuts the rate; ``group["step"]`` counts the steps
    taken (the ``t`` of ``E_t`` for ``"global"``, ``"group"`` and ``"param"``; for ``"tensor"``
    ``t`` is ``state["step"]``, the steps that tensor took, so a tensor whose gradient starts
    late starts its reference at ``E_1`` like its ``r`` starts at 0: Note [unit step]) and
    ``group["skipped_steps"]`` the steps skipped for a non-finite gradient (the same
    in every group). :meth:`stats` reports effective learning rates and that count. A step
    whose gradient holds a NaN or inf anywhere changes nothing (decided on the device).
    Parameters whose ``grad`` is None are left out of the step, and their unit.

    Example:
        >>> import torch, steadystep as ss
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = ss.ALeRA(ss.layer_groups(model), lr=0.1)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
        >>> opt.param_groups[0]["lr_multiplier"].shape
        torch.Size([])
    """

    _wide_keys: tuple[str, ...] = _WIDE_KEYS

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        *,
        alpha: float = 0.01,
        C: float = 3e-6,
        granularity: str = "group",
        weight_decay: float = 0.0,
        norm_eps: float = 1e-6,
        foreach: bool | None = None,
    ) -> None:
        check_positive("lr", lr)
        check_nonnegative("weight_decay", weight_decay)
        defaults = dict(
            lr=lr,
            alpha=_check_alpha(alpha),
            C=check_nonnegative("C", C),
            weight_decay=weight_decay,
            norm_eps=check_nonnegative("norm_eps", norm_eps),
            foreach=foreach,
        )
        self.granularity = check_choice("granularity", granularity, GRANULARITIES)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its ``lr_multiplier`` starts at 1 (at the global one for ``"global"``)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_param_tensors(group["params"], type(self).__name__)
        check_positive("lr", group["lr"])
        check_nonnegative("weight_decay", group["weight_decay"])
        for key in self._wide_keys:
            if group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key} is optimizer-wide in {type(self).__name__} (a unit can span groups); "
                    f"got {key}={group[key]} in a param group, {self.defaults[key]} overall"
                )
        if not group["params"]:
            device, dtype = torch.device("cpu"), torch.float32
        else:
            device = group["params"][0].device
            dtype = _state_dtype(group["params"][0].dtype)
            for p in group["params"][1:]:
                dtype = torch.promote_types(dtype, p.dtype)
        multiplier = torch.ones((), dtype=dtype, device=device)
        step = torch.zeros((), dtype=torch.float32, device=device)
        if self.granularity == "global" and len(self.param_groups) > 1:
            # One rate for everything: a late group joins at the current global value.
            first = self.param_groups[0]
            multiplier.copy_(first["lr_multiplier"])
            step.copy_(first["step"])
        skipped = torch.zeros((), dtype=torch.int64, device=device)
        if len(self.param_groups) > 1:
            # One optimizer-wide count: every group holds the same tensor (one add per step).
            skipped = self.param_groups[0]["skipped_steps"]
        group.setdefault("lr_multiplier", multiplier)
        group.setdefault("step", step)
        group.setdefault("skipped_steps", skipped)

    def state_dict(self) -> dict[str, Any]:
        """As torch's; the 0-d tensors of ``param_groups`` (``lr_multiplier``, ``step``,
        ``skipped_steps``) are clones, so they do not change with later steps. Per-parameter
        ``state`` holds the live tensors, as torch.optim's optimizers do (``copy.deepcopy`` the
        result to keep a consistent in-memory copy of it)."""
        out = super().state_dict()
        # Each group gets its own clone (skipped_steps too, shared live): the saved format keeps
        # one entry per group; load_state_dict shares the count again.
        out["param_groups"] = [
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in group.items()}
            for group in out["param_groups"]
        ]
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's, but statistics keep their saved dtype (fp32 stays fp32 for bf16 params)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            self.state[p] = {
                k: v.to(device=p.device, copy=True) if isinstance(v, torch.Tensor) else v
                for k, v in saved.items()
            }
        for group in self.param_groups:
            device = group["params"][0].device if group["params"] else torch.device("cpu")
            # A checkpoint written before skipped_steps existed starts the count at 0.
            group.setdefault("skipped_steps", torch.zeros((), dtype=torch.int64))
            for key in ("lr_multiplier", "step", "skipped_steps"):
                group[key] = group[key].to(device)
        for group in self.param_groups[1:]:  # one shared optimizer-wide count again
            group["skipped_steps"] = self.param_groups[0]["skipped_steps"]

    # -- telemetry --------------------------------------------------------------------------
    @torch.no_grad()
    def stats(self) -> dict[str, torch.Tensor]:
        """Telemetry as 0-d tensors, no host sync; the keys depend only on the number of
        groups and the granularity (a Monitor writes them as ``<component>/<key>``):

        * ``skipped_steps``: steps whose update was skipped for a non-finite gradient (a step
          a :class:`~steadystep.CatastropheGuard` already skipped on an alarm is not counted).
        * ``"global"``/``"group"``: ``group{i}.lr``, group ``i``'s effective learning rate
          ``lr * lr_multiplier``.
        * ``"tensor"``/``"param"``: ``group{i}.lr_mean``, ``group{i}.lr_min`` and
          ``group{i}.lr_max``, the effective rates ``lr * group multiplier * m`` over the
          group's per-tensor (``"tensor"``: mean over tensors) or per-element (``"param"``:
          mean over elements) multipliers ``m``; before a tensor's first step its ``m`` is 1.
          This reads every multiplier once (for ``"param"``: 4 bytes per parameter). Under
          FSDP2 these are over this rank's shards (no collective, so a rank-0 Monitor works).
        """
        out = {"skipped_steps": self.param_groups[0]["skipped_steps"]}
        for gi, group in enumerate(self.param_groups):
            base = group["lr_multiplier"] * group["lr"]
            if self.granularity in ("global", "group"):
                out[f"group{gi}.lr"] = base
                continue
            ms = [
                local_tensor(self.state[p]["lr_multiplier"])
                for p in group["params"]
                if "lr_multiplier" in self.state.get(p, {})
            ]
            ms = [m for m in ms if m.numel() > 0]  # an FSDP2 rank may hold an empty shard
            if not ms:
                lo = mean = hi = torch.ones((), dtype=base.dtype, device=base.device)
            elif self.granularity == "tensor":
                stacked = torch.stack(ms)
                lo, mean, hi = stacked.min(), stacked.mean(), stacked.max()
            else:
                lo = torch.stack([m.min() for m in ms]).min()
                hi = torch.stack([m.max() for m in ms]).max()
                total = torch.stack([m.sum(dtype=torch.float64) for m in ms]).sum()
                mean = (total / sum(m.numel() for m in ms)).to(base.dtype)
            out[f"group{gi}.lr_mean"] = base * mean.to(base.device)
            out[f"group{gi}.lr_min"] = base * lo.to(base.device)
            out[f"group{gi}.lr_max"] = base * hi.to(base.device)
        return out

    # -- the guard's protocol (steadystep.optim._protocol.MaskableOptimizer) ----------------
    @torch.no_grad()
    def scale_lr_(self, factor: torch.Tensor) -> None:
        """Multiply every effective learning rate by ``factor`` (0-d tensor), on the device."""
        for group in self.param_groups:
            m = group["lr_multiplier"]
            m.mul_(factor.to(device=m.device, dtype=m.dtype))

    @torch.no_grad()
    def max_lr(self) -> torch.Tensor:
        """Largest effective learning rate ``lr * multipliers`` over all parameters (0-d)."""
        values = []
        for group in self.param_groups:
            top = group["lr_multiplier"].double() * group["lr"]
            per_param = [
                full_max(self.state[p]["lr_multiplier"]).double().to(top.device)
                for p in group["params"]
                if "lr_multiplier" in self.state.get(p, {})
            ]
            if per_param:
                top = top * torch.stack(per_param).max()
            values.append(top)
        return torch.stack(values).max()

    # -- stepping ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(
        self, closure: Callable[[], Any] | None = None, *, loss: torch.Tensor | None = None
    ) -> Any:
        """One ALeRA step. ``closure`` re-evaluates the loss (returned); ``loss`` is accepted
        for a uniform signature with the guarded optimizers and returned as is."""
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.masked_step(None)
        return loss

    def _collect(self) -> tuple[list[list[int]], dict[str, list[Any]]]:
        """Flatten the groups: parameters with a gradient, their masked gradients and state."""
        lists: dict[str, list[Any]] = {
            k: []
            for k in (
                "params",
                "grads",
                "relaxed",
                "decay",
                "group",
                "param_m",
                "numel",
                "sharded",
                "keys",
            )
        }
        group_units: list[list[int]] = []
        for gi, group in enumerate(self.param_groups):
            members = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; "
                        "use dense embeddings (sparse=False)"
                    )
                state = self.state[p]
                if self.granularity == "tensor" and "step" not in state:
                    # Note [unit step]: E_t counts the unit's own steps; for "tensor" the unit
                    # is the tensor, which may get its first gradient after its group's. A
                    # checkpoint from before this count existed used the group's steps.
                    state["step"] = (
                        group["step"].clone()
                        if state
                        else torch.zeros((), dtype=torch.float32, device=p.device)
                    )
                if "relaxed_path" not in state:
                    sdtype = _state_dtype(p.dtype)
                    state["relaxed_path"] = torch.zeros_like(p, dtype=sdtype)
                    if self.granularity == "tensor":
                        state["lr_multiplier"] = torch.ones((), dtype=sdtype, device=p.device)
                    elif self.granularity == "param":
                        state["lr_multiplier"] = torch.ones_like(p, dtype=sdtype)
                members.append(len(lists["params"]))
                # Note [FSDP2]: the math runs on this rank's shards (state stays DTensor, so
                # checkpoints keep their layout); only norms need the other ranks' shards.
                lists["params"].append(local_tensor(p))
                lists["grads"].append(local_tensor(p.grad))
                lists["relaxed"].append(local_tensor(state["relaxed_path"]))
                lists["decay"].append(group["weight_decay"])
                lists["group"].append(gi)
                m = state.get("lr_multiplier")
                lists["param_m"].append(None if m is None else local_tensor(m))
                lists["numel"].append(p.numel())
                lists["sharded"].append(is_sharded(p))
                lists["keys"].append(p)
            group_units.append(members)
        return group_units, lists

    def _prepare(self, skip: torch.Tensor | None) -> dict[str, Any] | None:
        """Everything a step needs, laid out per unit (Note [units]); None without gradients."""
        group_units, lists = self._collect()
        params = lists["params"]
        if not params:
            return None
        foreach = self.defaults["foreach"]
        if foreach is None:
            foreach = params[0].is_cuda
        # Weight decay enters once, into the gradient that both r and the update see.
        grads = [
            g if wd == 0.0 else g.add(p, alpha=wd)
            for g, p, wd in zip(lists["grads"], params, lists["decay"], strict=True)
        ]
        dtypes = [r.dtype for r in lists["relaxed"]]
        norms = grad_norms(grads, dtypes, foreach=foreach)
        # Whole-tensor norms on every rank, so every rank decides alike (skip included).
        norms = reduce_square_norms(norms, lists["sharded"])

        groups = self.param_groups
        gran = self.granularity
        active = [gi for gi, members in enumerate(group_units) if members]
        if gran in ("global", "param"):
            units = [[i for members in group_units for i in members]]
            owners = [0 if gran == "global" else active[0]]
        elif gran == "group":
            units = [group_units[gi] for gi in active]
            owners = active
        else:
            units = [[i] for i in range(len(params))]
            owners = lists["group"]
        norm_u = unit_norms(norms, units, dtypes)
        # Note [finite from norms]: no pass over the gradients to find a NaN or inf.
        finite = torch.stack([torch.isfinite(n) for n in norm_u]).all()
        ok = finite
        nonfinite_skip = ~finite
        if skip is not None:
            skip = skip.to(ok.device)
            ok = ok & ~skip
            nonfinite_skip = nonfinite_skip & ~skip
        # Note [why a masking pass]: 0 * nan is nan. In place where ``grads`` is our temporary.
        grads = [
            _mask_nonfinite(d, owned=d is not g) for d, g in zip(grads, lists["grads"], strict=True)
        ]
        increment = ok.to(torch.float32)
        for gi in range(len(groups)) if gran == "global" else active:
            groups[gi]["step"].add_(increment)
        if gran == "tensor":
            unit_steps = [self.state[p]["step"] for p in lists["keys"]]
            for t in unit_steps:
                t.add_(increment.to(t.device))
        else:
            unit_steps = [groups[gi]["step"] for gi in owners]
        # Optimizer-wide: one tensor shared by every group (add_param_group, load_state_dict).
        skipped = groups[0]["skipped_steps"]
        skipped.add_(nonfinite_skip.to(skipped.device))

        if gran in ("global", "group"):
            # The group multiplier is the adapted rate; the update uses lr times it.
            multipliers = [groups[gi]["lr_multiplier"] for gi in owners]
            lrs: list[float | torch.Tensor] = [groups[gi]["lr"] for gi in lists["group"]]
        else:
            # Per-tensor/element rates, times the group factor (1 unless a guard cut it).
            group_lrs = {
                gi: groups[gi]["lr_multiplier"] * groups[gi]["lr"] for gi in set(lists["group"])
            }
            multipliers = lists["param_m"]
            lrs = [group_lrs[gi] for gi in lists["group"]]
        return dict(
            params=params,
            grads=grads,
            unit_norm=norm_u,
            relaxed_paths=lists["relaxed"],
            multipliers=multipliers,
            units=units,
            unit_steps=unit_steps,
            lrs=lrs,
            ok=ok,
            foreach=foreach,
            numels=lists["numel"],
            sharded=lists["sharded"],
            param_group_index=lists["group"],
            state_keys=lists["keys"],
        )

    def _sync_global(self) -> None:
        if self.granularity == "global":
            # Keep every group's copy of the one global rate identical.
            first = self.param_groups[0]["lr_multiplier"]
            for group in self.param_groups[1:]:
                group["lr_multiplier"].copy_(first)

    def _hyper(self) -> dict[str, Any]:
        d = self.defaults
        return dict(
            alpha=d["alpha"],
            C=d["C"],
            norm_eps=d["norm_eps"],
            param_wise=self.granularity == "param",
        )

    @torch.no_grad()
    def masked_step(self, skip: torch.Tensor | None) -> None:
        """The step, an exact no-op where ``skip`` (0-d bool) is True (decided on the device);
        ``skip=None`` is :meth:`step` (Note [host syncs] of :mod:`steadystep.guard`)."""
        work = self._prepare(skip)
        if work is None:
            return
        work.pop("param_group_index")
        work.pop("state_keys")
        alera(**work, **self._hyper())
        self._sync_global()
