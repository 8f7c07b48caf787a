"""CPropSGD, CPropAdam, CPropAdamW: SGD and Adam(W) with CProp's scale in one step.

The classes validate, create state and dispatch to :func:`~steadystep.optim.cprop.cprop_sgd` /
:func:`~steadystep.optim.cprop.cprop_adam`; their numbers match
``CProp(torch.optim.SGD/Adam/AdamW(...))`` up to rounding, with the whole state (the base
optimizer's too) protected from a non-finite gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from steadystep._tensors import scale_all_, shards
from steadystep._validation import (
    check_betas,
    check_bool,
    check_finite,
    check_foreach_fused,
    check_loss,
    check_nonnegative,
    check_param_tensors,
)
from steadystep.checkpoint import (
    Kind,
)
from steadystep.compose.order import Composable
from steadystep.optim.cprop._checkpoint import (
    NativeCheckpoint,
    _set_lr_multiplier,
    _share_skipped_steps,
)
from steadystep.optim.cprop._math import (
    _cprop_hyper,
    _CPropHyper,
    _second_key,
    cprop_kwargs,
)
from steadystep.optim.cprop._state import (
    _adam_defaults,
    _call_closure,
    _collect,
    _cprop_state_spec,
    _default_foreach,
    _group_stats,
    _init_cprop_state,
    _scales,
    _sgd_defaults,
    _validate_group,
    _zeros_stat,
)
from steadystep.optim.cprop.functional import cprop_adam, cprop_sgd

__all__ = ["CPropAdam", "CPropAdamW", "CPropSGD"]


def _use_foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
    return _default_foreach(params) if group["foreach"] is None else group["foreach"]


def _use_fused(group: dict[str, Any]) -> bool | None:
    """``fused`` for the functional core: the group's choice; by default (None) the fused
    kernels wherever they take the tensors, unless ``foreach=True`` asked for that path."""
    if group["fused"] is None and group["foreach"]:
        return False
    return group["fused"]


class _NativeCPropBase(NativeCheckpoint, Optimizer, Composable):
    """Validation, state_dict handling, telemetry and the guard's protocol
    (:class:`~steadystep.compose.protocol.MaskableOptimizer`) of the native CProp optimizers.

    Each param group holds ``lr_multiplier``, a 0-d float64 tensor (1 at first) by which the
    step multiplies ``lr`` on the device; :class:`~steadystep.CatastropheGuard` cuts the rate
    there (:meth:`scale_lr_`), so a guarded step needs no host read.
    """

    composition_role = "cprop"  # Note [the order of the composition]

    _owner = "CProp"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base: dict[str, Any],
        cprop: _CPropHyper,
        *,
        foreach: bool | None,
        fused: bool | None,
    ) -> None:
        """``base``: the base optimizer's defaults; then CProp's and the path's."""
        check_foreach_fused(foreach, fused)
        defaults = {**base, **cprop.group_entries(), "foreach": foreach, "fused": fused}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # the constructor's spelling (cdf=, method=) is accepted in groups too
        for short in ("cdf", "method"):
            if short in param_group:
                param_group[f"cprop_{short}"] = param_group.pop(short)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_param_tensors(group["params"], self._owner)
        _validate_group(group)
        self._validate_base_group(group)
        _set_lr_multiplier(group)
        _share_skipped_steps(self.param_groups)

    def _validate_base_group(self, group: dict[str, Any]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _class_entries(self) -> dict[str, Any]:
        """Group entries the class fixes (a checkpoint must agree: CPropAdam vs CPropAdamW)."""
        return {}

    def _state_spec(self, group: dict[str, Any]) -> dict[str, tuple[Kind, bool]]:
        """``{key: (kind, required)}`` of a parameter's state in ``group`` (checked on load)."""
        return _cprop_state_spec(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("foreach", None)
            group.setdefault("fused", None)

    # -- the guard's protocol (steadystep.compose.protocol.MaskableOptimizer) -----------------

    @torch.no_grad()
    def scale_lr_(self, factor: Tensor) -> None:
        """Multiply every group's ``lr_multiplier`` by ``factor`` (0-d tensor), on the device."""
        scale_all_([group["lr_multiplier"] for group in self.param_groups], factor)

    @torch.no_grad()
    def max_lr(self) -> Tensor:
        """Largest effective learning rate ``lr * lr_multiplier`` over the groups (0-d)."""
        device = self.param_groups[0]["lr_multiplier"].device
        # a tensor lr may have any one-element shape (torch.optim accepts [1], [1, 1])
        lrs = [(g["lr_multiplier"] * g["lr"]).reshape(()).to(device) for g in self.param_groups]
        return torch.stack(lrs).max()

    @torch.no_grad()
    def masked_step(self, skip: Tensor | None, found_finite: Tensor | None = None) -> None:
        """The step, an exact no-op where ``skip`` (0-d bool) is True (decided on the device).

        A non-finite gradient skips the step the same way; ``skip=None`` is :meth:`step`.
        ``found_finite``: the caller's check of these gradients (the guard's), which spares
        this step its own pass over them; computed here when None.
        """
        work, found_finite = _collect(
            self.param_groups, type(self).__name__, self._init_state, found_finite
        )
        nonfinite = ~found_finite
        if skip is not None:
            skip = skip.to(found_finite.device)
            found_finite = found_finite & ~skip
            nonfinite = nonfinite & ~skip  # a step the guard skipped on an alarm is its own
        counter = self.param_groups[0]["skipped_steps"]
        counter.add_(nonfinite.to(device=counter.device, dtype=counter.dtype))
        for group, params in work:
            if params:
                self._step_group(group, params, found_finite)

    def stats(self) -> dict[str, Tensor]:
        """Telemetry as 0-d tensors, no host sync: ``skipped_steps`` (steps skipped for a
        non-finite gradient; a step a guard skipped on an alarm is not counted),
        ``group{i}.mean_scale``,
        ``group{i}.frac_scale_below_half`` and the totals ``mean_scale``,
        ``frac_scale_below_half`` over every element with state. The scale is recomputed from
        the current statistics, so it is the scale that the last step applied."""
        out = {"skipped_steps": self.param_groups[0]["skipped_steps"]}
        out.update(_group_stats(self.param_groups, lambda p: self.state.get(p)))
        return out

    def scales(self) -> dict[Tensor, Tensor]:
        """``{parameter: s}``: CProp's per-element scale of every parameter with state, in
        param-group order, as new tensors in the statistics' dtype (this rank's shards under
        FSDP2). It is recomputed from the current statistics, so it is the scale that the last
        step applied; :meth:`stats` summarises the same numbers.

        Examples:
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = ss.CPropAdamW(model.parameters())
            >>> model(torch.randn(8, 3)).pow(2).mean().backward()
            >>> opt.step()
            >>> opt.scales()[model.weight]  # s = 1 at the first step
            tensor([[1., 1., 1.]])
        """
        return {p: s for _, p, s in _scales(self.param_groups, lambda p: self.state.get(p))}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Tensor | None = None) -> Any:
        """One step. ``closure`` re-evaluates the model; ``loss`` is accepted and unused."""
        check_loss(f"{self._owner}.step", loss)
        out = _call_closure(closure)
        self.masked_step(None)
        return out

    def _init_state(self, group: dict[str, Any], param: Tensor) -> None:  # pragma: no cover
        raise NotImplementedError

    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], found_finite: Tensor
    ) -> None:  # pragma: no cover
        raise NotImplementedError


_CPROP_ARGS_DOC = """
    CProp arguments (keyword-only):
        cprop_beta (float): horizon ``beta`` of CProp's EMAs, in [0, 1) (default: 0.999).
        cprop_c (float): overconfidence ``c`` > 0; ``inf`` turns the scaling off (default: 1.0).
        cprop_eps (float): floor ``eps`` >= 0 of the standard error (default: 1e-8).
        cdf (str): ``"normal"`` (erf), ``"bft"``, ``"bfo"`` or ``"logistic"`` (default: "normal").
        method (str): ``"conformity"`` (the paper's), ``"relative"`` or ``"moment"``
            (its section 2.4 alternatives) (default: "conformity").
        foreach (bool, optional): ``torch._foreach_*`` ops where the step is not fused; None
            picks them on CUDA only; True also turns the default fused path off.
"""


class CPropSGD(_NativeCPropBase):
    """SGD (momentum, dampening, Nesterov, weight decay) with CProp's per-element scale.

    The update of ``torch.optim.SGD`` (``d = -lr * g'`` where ``g' = g + weight_decay * p``,
    then through the momentum buffer ``b <- momentum * b + (1 - dampening) * g'``, ``g' = b``
    or ``g' + momentum * b`` with ``nesterov``) is scaled per element, ``p <- p + s * d``, with
    ``s`` of :mod:`steadystep.optim.cprop` computed from the raw gradient ``g``. The numbers
    match ``CProp(torch.optim.SGD(...))`` up to rounding.

    Args:
        params: iterable of parameters or param-group dicts.
        lr (float): learning rate (default: 1e-3).
        momentum (float): momentum factor (default: 0).
        dampening (float): dampening of the momentum (default: 0).
        weight_decay (float): L2 penalty added to the gradient SGD sees (default: 0).
        nesterov (bool): Nesterov momentum (default: False).
    <CPROP_ARGS>
        fused (bool, optional): the whole step as one multi-tensor kernel call per param
            group (Note [Fused path] in :mod:`steadystep.optim.cprop.functional`: C on CPU, Triton
            on CUDA). None (default): fused wherever the kernels take the tensors, else the
            foreach (CUDA) or per-tensor (CPU) path; True: fused or an error; False: never.

    State per parameter: ``step`` (0-d float32), ``cprop_exp_avg``, ``cprop_exp_avg_sq``
    (``cprop_exp_avg_abs`` for ``method="relative"``) and ``momentum_buffer`` when
    ``momentum != 0``; fp32 for bf16/fp16 parameters. Per group: ``lr_multiplier`` (0-d float64,
    1 at first; the step is taken at ``lr * lr_multiplier``, where a
    :class:`~steadystep.CatastropheGuard` cuts the rate without a host read).

    Examples:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ss.CPropSGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> opt.step()
        >>> sorted(opt.stats())[:3]
        ['frac_scale_below_half', 'group0.frac_scale_below_half', 'group0.mean_scale']
        >>> int(opt.stats()["skipped_steps"])
        0
    """

    _owner = "CPropSGD"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        cprop_beta: float = 0.999,
        cprop_c: float = 1.0,
        cprop_eps: float = 1e-8,
        cdf: str = "normal",
        method: str = "conformity",
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        base = _sgd_defaults(lr, momentum, dampening, weight_decay, nesterov)
        cprop = _CPropHyper(cprop_beta, cprop_c, cprop_eps, cdf, method)
        super().__init__(params, base, cprop, foreach=foreach, fused=fused)

    def _validate_base_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("lr", group["lr"])
        check_nonnegative("momentum", group["momentum"])
        check_finite("dampening", group["dampening"])
        check_nonnegative("weight_decay", group["weight_decay"])
        check_bool("nesterov", group["nesterov"])
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "nesterov=True requires momentum > 0 and dampening == 0, got "
                f"momentum={group['momentum']}, dampening={group['dampening']}"
            )

    def _state_spec(self, group: dict[str, Any]) -> dict[str, tuple[Kind, bool]]:
        return {**super()._state_spec(group), "momentum_buffer": ("param", group["momentum"] != 0)}

    def _init_state(self, group: dict[str, Any], param: Tensor) -> None:
        state = self.state[param]
        if "step" not in state:
            _init_cprop_state(state, param, group["cprop_method"], share_v=False)
        if group["momentum"] != 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = _zeros_stat(param)

    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], found_finite: Tensor
    ) -> None:
        states = [self.state[p] for p in params]
        momentum = group["momentum"]
        # Note [FSDP2]: CProp is elementwise, so it runs on this rank's shards
        cprop_sgd(
            shards(params),
            shards([p.grad for p in params]),
            shards([st.get("momentum_buffer") if momentum != 0 else None for st in states]),
            shards([st["cprop_exp_avg"] for st in states]),
            shards([st[_second_key(group["cprop_method"])] for st in states]),
            [st["step"] for st in states],
            found_finite=found_finite,
            lr=group["lr"],
            momentum=momentum,
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
            lr_multiplier=group["lr_multiplier"],
            **cprop_kwargs(_cprop_hyper(group)),
            foreach=_use_foreach(group, params),
            fused=_use_fused(group),
        )


class CPropAdam(_NativeCPropBase):
    """Adam (L2 weight decay, AMSGrad) with CProp's per-element scale.

    ``torch.optim.Adam``'s update ``d`` (``m <- beta1 m + (1-beta1) g'``,
    ``v <- beta2 v + (1-beta2) g'^2``, ``d = -lr / (1-beta1^t) * m / (sqrt(v / (1-beta2^t)) + eps)``
    with ``g' = g + weight_decay * p``; :class:`CPropAdamW` decays ``p`` by ``lr * weight_decay``
    inside ``d`` instead) is applied as ``p <- p + s * d``. CProp's ``s`` comes from the raw
    gradient ``g``; the numbers match ``CProp(torch.optim.Adam(...))`` up to rounding.

    When ``betas[1] == cprop_beta`` and Adam sees the raw gradient (``weight_decay == 0``, or
    always for AdamW) and ``method != "relative"``, CProp's ``v`` *is* Adam's ``exp_avg_sq``
    (one buffer less, fewer bytes moved); decided when a parameter's state is created.

    Args:
        params: iterable of parameters or param-group dicts.
        lr (float): learning rate (default: 1e-3).
        betas (tuple[float, float]): Adam's ``beta1, beta2`` (default: (0.9, 0.999)).
        eps (float): Adam's denominator floor (default: 1e-8).
        weight_decay (float): L2 penalty (decoupled in :class:`CPropAdamW`) (default: 0).
        amsgrad (bool): use the running maximum of ``v`` (default: False).
    <CPROP_ARGS>
        fused (bool, optional): the whole step as one multi-tensor kernel call per param
            group (Note [Fused path] in :mod:`steadystep.optim.cprop.functional`: C on CPU, Triton
            on CUDA). None (default): fused wherever the kernels take the tensors, else the
            foreach (CUDA) or per-tensor (CPU) path; True: fused or an error; False: never.

    State per parameter: ``step`` (0-d float32, Adam's and CProp's ``t``), ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad), ``cprop_exp_avg`` and, unless shared,
    ``cprop_exp_avg_sq`` (``cprop_exp_avg_abs`` for ``method="relative"``). All statistics are
    fp32 for bf16/fp16 parameters (``torch.optim.Adam`` would keep them in bf16). Per group:
    ``lr_multiplier``, as in :class:`CPropSGD`.

    Examples:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ss.CPropAdam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> opt.step()
        >>> sorted(opt.state[model.weight])
        ['cprop_exp_avg', 'exp_avg', 'exp_avg_sq', 'step']
    """

    _owner = "CPropAdam"
    _decoupled = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        cprop_beta: float = 0.999,
        cprop_c: float = 1.0,
        cprop_eps: float = 1e-8,
        cdf: str = "normal",
        method: str = "conformity",
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        cprop = _CPropHyper(cprop_beta, cprop_c, cprop_eps, cdf, method)
        self._init_adam(params, lr, betas, eps, weight_decay, amsgrad, cprop, foreach, fused)

    def _init_adam(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        amsgrad: bool,
        cprop: _CPropHyper,
        foreach: bool | None,
        fused: bool | None,
    ) -> None:
        """The constructor's work, :class:`CPropAdamW`'s too (only its default ``weight_decay``
        differs)."""
        betas = check_betas("betas", betas)
        base = _adam_defaults(lr, betas, eps, weight_decay, amsgrad, self._decoupled)
        super().__init__(params, base, cprop, foreach=foreach, fused=fused)

    def _validate_base_group(self, group: dict[str, Any]) -> None:
        check_nonnegative("lr", group["lr"])
        check_betas("betas", group["betas"])
        check_nonnegative("eps", group["eps"])
        check_bool("amsgrad", group["amsgrad"])
        check_nonnegative("weight_decay", group["weight_decay"])

    def _shares_v(self, group: dict[str, Any]) -> bool:
        raw_grad = group["decoupled_weight_decay"] or group["weight_decay"] == 0
        return (
            raw_grad
            and group["betas"][1] == group["cprop_beta"]
            and group["cprop_method"] != "relative"
        )

    def _class_entries(self) -> dict[str, Any]:
        return {"decoupled_weight_decay": self._decoupled}

    def _state_spec(self, group: dict[str, Any]) -> dict[str, tuple[Kind, bool]]:
        spec = super()._state_spec(group)
        # CProp's own v is optional where Adam's exp_avg_sq can serve as it (decided when the
        # state was created), required where it cannot.
        spec[_second_key(group["cprop_method"])] = ("param", not self._shares_v(group))
        spec.update(
            exp_avg=("param", True),
            exp_avg_sq=("param", True),
            max_exp_avg_sq=("param", bool(group["amsgrad"])),
        )
        return spec

    def _init_state(self, group: dict[str, Any], param: Tensor) -> None:
        state = self.state[param]
        if "step" not in state:
            _init_cprop_state(state, param, group["cprop_method"], share_v=self._shares_v(group))
            state["exp_avg"] = _zeros_stat(param)
            state["exp_avg_sq"] = _zeros_stat(param)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])

    def _step_group(
        self, group: dict[str, Any], params: list[Tensor], found_finite: Tensor
    ) -> None:
        key = _second_key(group["cprop_method"])
        state_of = self.state
        states = [state_of[p] for p in params]
        # parameters whose v is shared and those with their own v go in separate calls
        own = [key in st for st in states]
        for shared in (True, False):
            pick = [i for i, o in enumerate(own) if o != shared]
            if len(pick) == len(params):
                self._run(group, params, states, found_finite, None if shared else key)
            elif pick:
                ps, sts = [params[i] for i in pick], [states[i] for i in pick]
                self._run(group, ps, sts, found_finite, None if shared else key)

    def _run(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        states: list[dict[str, Any]],
        found_finite: Tensor,
        key: str | None,
    ) -> None:
        beta1, beta2 = group["betas"]
        # Note [FSDP2]: CProp is elementwise, so it runs on this rank's shards
        cprop_adam(
            shards(params),
            shards([p.grad for p in params]),
            shards([st["exp_avg"] for st in states]),
            shards([st["exp_avg_sq"] for st in states]),
            shards([st["max_exp_avg_sq"] for st in states]) if group["amsgrad"] else [],
            shards([st["cprop_exp_avg"] for st in states]),
            None if key is None else shards([st[key] for st in states]),
            [st["step"] for st in states],
            found_finite=found_finite,
            amsgrad=group["amsgrad"],
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            lr_multiplier=group["lr_multiplier"],
            **cprop_kwargs(_cprop_hyper(group)),
            foreach=_use_foreach(group, params),
            fused=_use_fused(group),
        )


class CPropAdamW(CPropAdam):
    """AdamW (decoupled weight decay, default 1e-2) with CProp's per-element scale.

    As :class:`CPropAdam` with ``d = -lr * weight_decay * p - lr / (1-beta1^t) * m / denom``;
    Adam always sees the raw gradient, so CProp's ``v`` is shared whenever
    ``betas[1] == cprop_beta``. Matches ``CProp(torch.optim.AdamW(...))`` up to rounding.

    Examples:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ss.CPropAdamW(model.parameters(), lr=3e-3, cprop_c=1.0)
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> opt.step()
        >>> opt.state[model.weight]["step"]
        tensor(1.)
    """

    _owner = "CPropAdamW"
    _decoupled = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        cprop_beta: float = 0.999,
        cprop_c: float = 1.0,
        cprop_eps: float = 1e-8,
        cdf: str = "normal",
        method: str = "conformity",
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        cprop = _CPropHyper(cprop_beta, cprop_c, cprop_eps, cdf, method)
        self._init_adam(params, lr, betas, eps, weight_decay, amsgrad, cprop, foreach, fused)


for _cls in (CPropSGD, CPropAdam):
    _cls.__doc__ = (_cls.__doc__ or "").replace("    <CPROP_ARGS>\n", _CPROP_ARGS_DOC.lstrip("\n"))
