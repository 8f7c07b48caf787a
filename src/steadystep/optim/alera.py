"""ALeRA: agnostic learning-rate adaptation (Schoenauer Sebag, Schoenauer & Sebag, section 2.1).

The class validates, holds state and dispatches; the math is the functional core in
:mod:`steadystep.optim._alera_core` (:func:`alera`, with a readable per-tensor reference path
and a ``torch._foreach`` path that tests hold equal), whose public functions are also
importable from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from steadystep._kernels import stats_dtype
from steadystep._tensors import (
    full_max,
    local_tensor,
    scale_all_,
    sharded_flags,
    shards,
    step_lr,
)
from steadystep._validation import (
    check_choice,
    check_foreach_fused,
    check_loss,
    check_nonnegative,
    check_param_tensors,
    check_positive,
)
from steadystep.agnostic import apply_log_change_
from steadystep.optim._alera_checkpoint import ALeRACheckpoint
from steadystep.optim._alera_core import (
    GRANULARITIES,
    AgnosticStep,
    Gathered,
    GroupState,
    agnostic_update,
    alera,
    fused_alera_,
    grad_norms,
    layout_step,
    unit_norms,
)

__all__ = [
    "GRANULARITIES",
    "ALeRA",
    "agnostic_update",
    "alera",
    "apply_log_change_",
    "grad_norms",
    "unit_norms",
]

# optimizer-wide: a unit may span several groups
_WIDE_KEYS = ("alpha", "C", "norm_eps", "granularity")


def _check_alpha(alpha: float) -> float:
    alpha = check_positive("alpha", alpha)
    if not alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got alpha={alpha}")
    return alpha


class ALeRA(ALeRACheckpoint, Optimizer):
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
        foreach: use ``torch._foreach`` kernels where the step is not fused (default: on CUDA
            only, where they are faster); True also turns the default fused path off.
        fused: the whole step as one multi-tensor kernel call (two passes over the elements;
            :func:`steadystep._kernels.alera_`: C on CPU, Triton on CUDA). None (default):
            wherever the kernels take the parameters (not under FSDP2, not with tensor
            learning rates), else the foreach/per-tensor path; True: fused or an error; False:
            never. It agrees with the per-tensor path to rounding.

    ``group["lr_multiplier"]`` (0-d, every granularity) is also where
    :class:`~steadystep.CatastropheGuard` cuts the rate; ``group["step"]`` counts the steps
    taken (the ``t`` of ``E_t`` for ``"global"``, ``"group"`` and ``"param"``; for ``"tensor"``
    ``t`` is ``state["step"]``, the steps that tensor took, so a tensor whose gradient starts
    late starts its reference at ``E_1`` like its ``r`` starts at 0: Note [unit step]) and
    ``group["skipped_steps"]`` the steps skipped for a non-finite gradient (the same
    in every group). :meth:`stats` reports effective learning rates and that count. A step
    whose gradient holds a NaN or inf anywhere changes nothing (decided on the device).
    Parameters whose ``grad`` is None are left out of the step, and their unit.

    Examples:
        >>> import torch, steadystep as ss
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = ss.ALeRA(ss.layer_groups(model), lr=0.1)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
        >>> opt.param_groups[0]["lr_multiplier"].shape
        torch.Size([])
    """

    _wide_keys: tuple[str, ...] = _WIDE_KEYS
    _checkpoint_class = "ALeRA"  # Note [class tag] of steadystep.checkpoint

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
        fused: bool | None = None,
    ) -> None:
        check_positive("lr", lr)
        check_nonnegative("weight_decay", weight_decay)
        check_foreach_fused(foreach, fused)
        defaults = dict(
            lr=lr,
            alpha=_check_alpha(alpha),
            C=check_nonnegative("C", C),
            weight_decay=weight_decay,
            norm_eps=check_nonnegative("norm_eps", norm_eps),
            foreach=foreach,
            fused=fused,
            # In defaults (so in every group and the state_dict): torch.optim copies and pickles
            # only defaults, state and param_groups.
            granularity=check_choice("granularity", granularity, GRANULARITIES),
            **self._base_defaults(),
        )
        super().__init__(params, defaults)

    @property
    def granularity(self) -> str:
        """``"global"``, ``"group"``, ``"tensor"`` or ``"param"``: ``defaults["granularity"]``,
        also in every param group and so in the state_dict (checked on load)."""
        return self.defaults["granularity"]

    def _base_defaults(self) -> dict[str, Any]:
        """Defaults of the base step (none for SGD; Adam's ``betas``, ``eps`` in AgAdam)."""
        return {}

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
            dtype = stats_dtype(group["params"][0].dtype)
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
            base = group["lr_multiplier"] * step_lr(group["lr"])
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

    @torch.no_grad()
    def group_lrs(self) -> torch.Tensor:
        """The effective learning rate of each param group as one float64 vector, no host read:
        ``lr * group["lr_multiplier"]``, times for ``"tensor"``/``"param"`` the mean over the
        group's tensors of each tensor's mean multiplier (a tensor's multiplier is 1 before its
        first step; under FSDP2 this rank's shards). One number per layer, e.g. to plot.

        Examples:
            >>> import torch, steadystep as ss
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
            >>> opt = ss.ALeRA(ss.layer_groups(model), lr=0.1)
            >>> opt.group_lrs()
            tensor([0.1000, 0.1000], dtype=torch.float64)
        """
        values = []
        for group in self.param_groups:
            m = group["lr_multiplier"].double()
            shards = [
                local_tensor(self.state[p]["lr_multiplier"])
                for p in group["params"]
                if "lr_multiplier" in self.state.get(p, {})
            ]
            per_tensor = [t.double().mean() for t in shards if t.numel() > 0]
            if per_tensor:
                m = m * torch.stack(per_tensor).mean()
            values.append(step_lr(group["lr"]) * m)
        return torch.stack(values)

    # -- the guard's protocol (steadystep.compose.protocol.MaskableOptimizer) ----------------
    @torch.no_grad()
    def scale_lr_(self, factor: torch.Tensor) -> None:
        """Multiply every effective learning rate by ``factor`` (0-d tensor), on the device."""
        scale_all_([group["lr_multiplier"] for group in self.param_groups], factor)

    @torch.no_grad()
    def max_lr(self) -> torch.Tensor:
        """Largest effective learning rate ``lr * multipliers`` over all parameters (0-d)."""
        values = []
        for group in self.param_groups:
            top = group["lr_multiplier"].double() * step_lr(group["lr"])
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
        check_loss(f"{type(self).__name__}.step", loss)
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.masked_step(None)
        return loss

    def _gather(self) -> Gathered:
        """The parameters with a gradient, group by group, and their state (created here on a
        parameter's first gradient)."""
        keys: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        paths: list[torch.Tensor] = []
        decays: list[float] = []
        group_index: list[int] = []
        members: list[list[int]] = []
        multipliers: list[torch.Tensor | None] = []
        tensor_steps: list[torch.Tensor] = []
        per_tensor = self.granularity == "tensor"
        states = self.state
        for gi, group in enumerate(self.param_groups):
            first = len(keys)
            decay = group["weight_decay"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients; "
                        "use dense embeddings (sparse=False)"
                    )
                state = states[p]
                if "relaxed_path" not in state or (per_tensor and "step" not in state):
                    state = self._init_state(group, p)
                keys.append(p)
                grads.append(g)
                paths.append(state["relaxed_path"])
                decays.append(decay)
                multipliers.append(state.get("lr_multiplier"))
                if per_tensor:
                    tensor_steps.append(state["step"])
            members.append(list(range(first, len(keys))))
            group_index.extend([gi] * (len(keys) - first))
        # Note [FSDP2]: the math runs on this rank's shards (state stays DTensor, so
        # checkpoints keep their layout); only norms need the other ranks' shards.
        return Gathered(
            keys=keys,
            params=shards(keys),
            grads=shards(grads),
            relaxed_paths=shards(paths),
            weight_decays=decays,
            group_index=group_index,
            members=members,
            param_multipliers=shards(multipliers),
            tensor_steps=tensor_steps,
            numels=[p.numel() for p in keys],
            sharded=sharded_flags(keys),
        )

    def _init_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if self.granularity == "tensor" and "step" not in state:
            # Note [unit step]: E_t counts the unit's own steps; for "tensor" the unit is the
            # tensor, which may get its first gradient after its group's.
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if "relaxed_path" not in state:
            sdtype = stats_dtype(p.dtype)
            state["relaxed_path"] = torch.zeros_like(p, dtype=sdtype)
            if self.granularity == "tensor":
                state["lr_multiplier"] = torch.ones((), dtype=sdtype, device=p.device)
            elif self.granularity == "param":
                state["lr_multiplier"] = torch.ones_like(p, dtype=sdtype)
        return state

    def _layout(self, gathered: Gathered, skip: torch.Tensor | None) -> AgnosticStep:
        """This step laid out per unit (Note [units] in :mod:`steadystep.optim._alera_core`)."""
        foreach = self.defaults["foreach"]
        if foreach is None:
            foreach = gathered.params[0].is_cuda
        return layout_step(
            gathered, self._group_state(), granularity=self.granularity, skip=skip, foreach=foreach
        )

    def _group_state(self) -> GroupState:
        """The groups' step counts, LR multipliers and learning rates, then the skipped-steps
        counter (optimizer-wide: one tensor shared by every group, see add_param_group and
        load_state_dict)."""
        groups = self.param_groups
        return GroupState(
            steps=[g["step"] for g in groups],
            multipliers=[g["lr_multiplier"] for g in groups],
            lrs=[step_lr(g["lr"]) for g in groups],
            skipped_steps=groups[0]["skipped_steps"],
        )

    def _fused_step(
        self,
        gathered: Gathered,
        skip: torch.Tensor | None,
        adam: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> bool:
        """:func:`fused_alera_` (``adam``: Ag-Adam's moments and step counts); False, having
        changed nothing, where it does not run."""
        fused = self.defaults.get("fused")
        if fused is False or (fused is None and self.defaults["foreach"]):
            return False
        hyper = self.defaults
        beta1, beta2 = hyper.get("betas", (0.0, 0.0))
        kernel = dict(alpha=hyper["alpha"], C=hyper["C"], norm_eps=hyper["norm_eps"])
        kernel.update(beta1=beta1, beta2=beta2, eps=hyper.get("eps", 0.0))
        return fused_alera_(
            gathered,
            self._group_state(),
            adam,
            granularity=self.granularity,
            skip=skip,
            fused=fused,
            owner=type(self).__name__,
            **kernel,
        )

    def _sync_global(self) -> None:
        if self.granularity == "global":
            # Keep every group's copy of the one global rate identical.
            first = self.param_groups[0]["lr_multiplier"]
            for group in self.param_groups[1:]:
                group["lr_multiplier"].copy_(first)

    def _hyper(self) -> dict[str, Any]:
        d, param_wise = self.defaults, self.granularity == "param"
        return dict(alpha=d["alpha"], C=d["C"], norm_eps=d["norm_eps"], param_wise=param_wise)

    @torch.no_grad()
    def masked_step(
        self, skip: torch.Tensor | None, found_finite: torch.Tensor | None = None
    ) -> None:
        """The step, an exact no-op where ``skip`` (0-d bool) is True (decided on the device);
        ``skip=None`` is :meth:`step` (Note [host syncs] of :mod:`steadystep.guard`).
        ``found_finite`` (a caller's gradient check) is not needed: the step's norms pass
        checks the gradients as it reads them."""
        gathered = self._gather()
        if not gathered.params or self._fused_step(gathered, skip):
            return
        step = self._layout(gathered, skip)
        alera(**step._asdict(), **self._hyper())  # AgnosticStep's fields are alera's arguments
        self._sync_global()
