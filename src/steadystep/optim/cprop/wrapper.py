"""CProp around any optimizer: scale what the base optimizer's step changed, per element."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from steadystep._tensors import shards
from steadystep._validation import check_loss, check_optional_bool
from steadystep.checkpoint import (
    CLASS_KEY,
    check_class,
    check_groups,
    check_optimizer_state,
    check_param_state,
    check_same,
)
from steadystep.compose.order import Composable, check_wrappable
from steadystep.compose.wrapper import OptimizerWrapper
from steadystep.optim.cprop._math import (
    _check_hyper,
    _cprop_hyper,
    _CPropHyper,
    _second_key,
    _stats_dtype,
)
from steadystep.optim.cprop._state import (
    _call_closure,
    _collect,
    _cprop_state_spec,
    _default_foreach,
    _group_stats,
    _init_cprop_state,
    _param_index_map,
    _scales,
    _states_by_param,
    _validate_group,
)
from steadystep.optim.cprop.functional import cprop_after_, cprop_before_

__all__ = ["CProp"]

# The wrapper's own keys of its state_dict; the rest is the base optimizer's.
_OWN_KEYS = ("cprop_state", CLASS_KEY, "base_class")


class CProp(OptimizerWrapper, Composable):
    """Wrap any ``torch.optim.Optimizer`` and scale its update per element by CProp.

    Each step: the raw gradients update CProp's statistics, the base optimizer steps at its full
    rate, and the change it made is scaled, ``p <- p_old + s * (p_new - p_old)`` (computed as
    ``torch.lerp(p_old, p_new, s)``, exactly ``p_new`` where ``s == 1``). The base optimizer's
    own state evolves as it would without CProp. See :mod:`steadystep.optim.cprop` for ``s``.

    Args:
        optimizer: the base optimizer (SGD, Adam, AdamW, RMSprop, Adagrad, NAdam, your own).
        beta (float): horizon of CProp's EMAs, in [0, 1) (default: 0.999).
        c (float): overconfidence coefficient > 0; ``c = inf`` gives ``s = 1`` everywhere, i.e.
            bitwise the bare optimizer (default: 1.0).
        eps (float): floor of the standard error, >= 0 (default: 1e-8).
        cdf (str): ``"normal"``, ``"bft"``, ``"bfo"`` or ``"logistic"`` (default: "normal").
        method (str): ``"conformity"``, ``"relative"`` or ``"moment"`` (default: "conformity").
        fused (bool, optional): CProp's own work as two multi-tensor kernel calls per param
            group (statistics and snapshot before the base step, scale after it; Note [Fused
            path] in :mod:`steadystep.optim.cprop.functional`). None (default): wherever the
            kernels take the tensors, else eager ops; True: fused or an error; False: eager.

    These are defaults: they are stored in every param group of the base optimizer as
    ``cprop_beta``, ``cprop_c``, ``cprop_eps``, ``cprop_cdf``, ``cprop_method`` (a group that
    already has one keeps it), so they checkpoint with the groups and can differ per group.

    ``param_groups``, ``state`` (the base's), ``defaults``, ``add_param_group`` and
    ``zero_grad`` delegate to the base. CProp's own per-parameter state (``step``,
    ``cprop_exp_avg``, ``cprop_exp_avg_sq`` or ``cprop_exp_avg_abs``; fp32 for bf16/fp16
    parameters) is in :attr:`cprop_state` and in ``state_dict()``, as ``"cprop/<name>"`` in
    each parameter's ``state`` entry next to the base's (Note [flat checkpoints] of
    :mod:`steadystep.compose.wrapper`). Step hooks registered on the wrapper run around the
    whole CProp step (they see the scaled parameters); hooks on the base run inside it.

    Extra memory: CProp's two statistics per parameter, plus one copy of the parameters while a
    step runs (the snapshot ``p_old``).

    CProp goes *inside* a :class:`~steadystep.CatastropheGuard`, never around one:
    ``CatastropheGuard(CProp(base))``. Around a guard (or SALeRA, SPALeRA) or around another
    CProp (a wrapper or a native class) it raises a ValueError at construction that names the
    right order; :func:`~steadystep.stabilize` composes the pieces for you.

    A non-finite gradient leaves CProp's statistics unchanged and restores the parameters to
    their values before the step (decided on the device); the base optimizer's own state still
    sees that gradient; guarding it is :class:`CatastropheGuard`'s job (or use the native
    classes, whose whole state is protected).

    Examples:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = ss.CProp(torch.optim.AdamW(model.parameters(), lr=3e-3), beta=0.999, c=1.0)
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> opt.step()
        >>> opt.cprop_state[model.weight]["step"]
        tensor(1.)
    """

    composition_role = "cprop"  # Note [the order of the composition]

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        beta: float = 0.999,
        c: float = 1.0,
        eps: float = 1e-8,
        cdf: str = "normal",
        method: str = "conformity",
        fused: bool | None = None,
    ) -> None:
        super().__init__(optimizer)
        # Note [the order of the composition] (compose/order.py): no guard, no CProp inside
        check_wrappable("CProp", optimizer)
        _check_hyper(beta, c, eps, cdf, method, prefix="")
        self.fused = check_optional_bool("fused", fused)
        self.cprop_defaults = _CPropHyper(beta, c, eps, cdf, method).group_entries()
        self.cprop_state: dict[Tensor, dict[str, Tensor]] = {}
        for group in self.optimizer.param_groups:
            self._set_group_defaults(group)

    def __repr__(self) -> str:
        return f"CProp({self.optimizer!r}, {self.cprop_defaults})"

    def _set_group_defaults(self, group: dict[str, Any]) -> None:
        for key, value in self.cprop_defaults.items():
            group.setdefault(key, value)
        _validate_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer; it gets CProp's defaults unless it sets its own."""
        self.optimizer.add_param_group(param_group)
        self._set_group_defaults(self.optimizer.param_groups[-1])

    # -- checkpoints -----------------------------------------------------------------------

    checkpoint_key = "cprop"  # Note [flat checkpoints] (steadystep.compose.wrapper)

    def _split_checkpoint(
        self, nested: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[str, Any]]:
        """CProp's statistics per parameter (``state[i]["cprop/<name>"]`` when flat), its
        class tags in its part of ``param_groups[0]``."""
        inner = dict(nested)
        per_param = inner.pop("cprop_state")
        own = {k: inner.pop(k) for k in (CLASS_KEY, "base_class") if k in inner}
        return inner, per_param, own

    def _join_checkpoint(
        self, inner: dict[str, Any], per_param: dict[int, dict[str, Any]], own: dict[str, Any]
    ) -> dict[str, Any]:
        # keyed by the ids the groups list (FQNs when DCP rebuilt the dict), as the base's state
        ids = [i for group in inner["param_groups"] for i in group["params"]]
        return {**inner, **own, "cprop_state": {ids[i]: st for i, st in per_param.items()}}

    def _wrapped_state_dict(self) -> dict[str, Any]:
        """The base's ``state_dict()`` plus ``"cprop_state"``: {param index: CProp state}, and
        the class tags ``"class": "CProp"`` and ``"base_class"`` (the base's class name)."""
        out = dict(self.optimizer.state_dict())
        params = _param_index_map(self.param_groups)
        out["cprop_state"] = {
            i: dict(self.cprop_state[p]) for i, p in enumerate(params) if p in self.cprop_state
        }
        out[CLASS_KEY] = "CProp"
        out["base_class"] = type(self.optimizer).__name__
        return out

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checks of :meth:`load_state_dict`, without loading (:mod:`steadystep.checkpoint`):
        the class tags, CProp's part (keys, shapes, dtypes, finite values) and the base's part
        (its own ``check_state_dict``, else finite statistics)."""
        if self._is_flat(state_dict):  # Note [flat checkpoints]: as state_dict() writes it
            state_dict = self._nested_state_dict(state_dict)
        if not isinstance(state_dict, dict) or "cprop_state" not in state_dict:
            raise ValueError(
                "state_dict has no 'cprop_state': it was not saved from a CProp wrapper; load "
                "it into the base optimizer (CProp(...).optimizer.load_state_dict) instead"
            )
        check_class(state_dict, owner="CProp", expected="CProp", required=("param_groups",))
        base = type(self.optimizer).__name__
        check_same("base_class", state_dict.get("base_class"), base, owner="CProp")
        groups, keys = self.param_groups, tuple(self.cprop_defaults)
        saved = check_groups(state_dict["param_groups"], groups, owner="CProp", required=keys)
        check_param_state(
            state_dict["cprop_state"],
            saved,
            _cprop_state_spec,
            owner="CProp",
            what="cprop_state",
            dtype=lambda key, p: torch.float32 if key == "step" else _stats_dtype(p),
        )
        base_part = {k: v for k, v in state_dict.items() if k not in _OWN_KEYS}
        check_optimizer_state(self.optimizer, base_part, owner="CProp")

    def _load_wrapped_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (the base's part through the base's own loader), after
        checking all of it (:meth:`check_state_dict`)."""
        self.check_state_dict(state_dict)
        cprop_saved = state_dict["cprop_state"]
        self.optimizer.load_state_dict({k: v for k, v in state_dict.items() if k not in _OWN_KEYS})
        params = _param_index_map(self.param_groups)
        groups = state_dict["param_groups"]
        self.cprop_state = _states_by_param(cprop_saved, params, "cprop_state", groups)
        for group in self.param_groups:
            self._set_group_defaults(group)

    # -- the step --------------------------------------------------------------------------

    def stats(self) -> dict[str, Tensor]:
        """Telemetry as 0-d tensors, no host sync (see :meth:`CPropSGD.stats`)."""
        return _group_stats(self.param_groups, lambda p: self.cprop_state.get(p))

    def scales(self) -> dict[Tensor, Tensor]:
        """``{parameter: s}``, CProp's per-element scales (see :meth:`CPropSGD.scales`).

        Examples:
            >>> model = torch.nn.Linear(3, 1)
            >>> opt = ss.CProp(torch.optim.SGD(model.parameters(), lr=0.1))
            >>> model(torch.randn(8, 3)).pow(2).mean().backward()
            >>> opt.step()
            >>> opt.scales()[model.bias]
            tensor([1.])
        """
        return {p: s for _, p, s in _scales(self.param_groups, lambda p: self.cprop_state.get(p))}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Tensor | None = None) -> Any:
        """Update CProp's statistics, step the base optimizer, scale what it changed.

        With a ``closure``, CProp evaluates it once to read the gradients; the base receives a
        closure whose first call returns that loss and later calls (e.g. L-BFGS line search)
        re-evaluate. ``loss`` is accepted for API uniformity and unused.
        """
        check_loss("CProp.step", loss)
        out = _call_closure(closure)
        base_closure = None
        if closure is not None:
            pending = [out]

            def base_closure() -> Any:
                if pending:
                    return pending.pop()
                with torch.enable_grad():
                    return closure()

        work, found_finite = _collect(self.param_groups, "CProp", self._init_state)
        # before the base steps: CProp's statistics and the snapshot p_old, per group fused
        # (one kernel call) where the kernels take it, else eager; statistics are read before
        # the base steps, so a base that writes into p.grad (torch's never do) cannot change them
        snapshots = [
            cprop_before_(
                shards(params),
                shards([p.grad for p in params]),
                *self._statistics(group, params),
                found_finite=found_finite,
                cprop=_cprop_hyper(group),
                foreach=_default_foreach(params),
                fused=self.fused,
            )
            if params
            else (False, [])
            for group, params in work
        ]

        base_out = self.optimizer.step(base_closure) if base_closure else self.optimizer.step()
        if out is None:
            out = base_out

        for (group, params), (fused, olds) in zip(work, snapshots, strict=True):
            if params:
                cprop_after_(
                    shards(params),
                    olds,
                    *self._statistics(group, params),
                    found_finite=found_finite,
                    cprop=_cprop_hyper(group),
                    foreach=_default_foreach(params),
                    fused=fused,
                )
        return out

    def _init_state(self, group: dict[str, Any], param: Tensor) -> None:
        if param not in self.cprop_state:
            self.cprop_state[param] = {}
            _init_cprop_state(self.cprop_state[param], param, group["cprop_method"], False)

    def _statistics(
        self, group: dict[str, Any], params: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """CProp's ``m``, ``v`` (this rank's shards, Note [FSDP2]) and step counts."""
        states = [self.cprop_state[p] for p in params]
        key = _second_key(group["cprop_method"])
        return (
            shards([st["cprop_exp_avg"] for st in states]),
            shards([st[key] for st in states]),
            [st["step"] for st in states],
        )
