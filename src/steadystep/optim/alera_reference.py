"""A plain restatement of ALeRA and Ag-Adam, one unit and one equation at a time.

Schoenauer Sebag, Schoenauer & Sebag, "Stochastic Gradient Descent: Going As Fast As Possible
But Not Faster", Algorithm 1 without the greyed Page-Hinkley lines (ALeRA), its parameter-wise
version of Appendix B (SPALeRA's ALeRA part) and Ag-Adam (section 3), as steadystep implements
them (docs/decisions.md; the authors' Lua code is the tie-breaker). Readability over speed: no
foreach, no kernels, no masking tricks. :class:`~steadystep.ALeRA` and
:class:`~steadystep.AgAdam` (their per-tensor, foreach and fused paths) must give the same
numbers to rounding; tests/test_alera.py and tests/test_agadam.py hold them to it.

Per step ``t`` and unit ``u`` (the elements that share a learning rate, see ``granularity``),
with ``d = g + weight_decay * theta`` the gradient of the objective (Ag-Adam: the raw ``g``):

.. code-block:: text

    t    <- t + 1                                  (the unit's own count)
    r    <- (1 - alpha) r + alpha d / ||d_u||      (Algorithm 1, line 13; only the decay
                                                    where ||d_u|| <= norm_eps)
    E_t  <- alpha / (2 - alpha) (1 - (1 - alpha)^(2t))             (eq. 4, at this t)
    eta  <- eta exp(C (||r_u||^2 - E_t) / (alpha / sqrt(n_u)))     (line 14)
    theta <- theta - lr eta d                                       (line 15)

and for ``granularity="param"`` (Algorithm 2) ``r`` is normalised by the global norm and every
element ``i`` of the ``D`` has its own rate, ``eta_i <- eta_i exp(C (r_i^2 - E_t / D) /
(alpha / D))``. Ag-Adam takes Adam's step with rate ``lr eta`` instead of line 15.

Symbols and arguments: ``alpha`` (memory rate) is ``alpha``, ``C`` is ``C``, ``eta_0`` is
``lr``; ``eta / eta_0`` (the multiplier, 1 at first) is ``group["lr_multiplier"]``
(``"global"``: group 0's, ``"group"``: each group's) or ``state[p]["lr_multiplier"]``
(``"tensor"``: 0-d, ``"param"``: shaped like ``p``); ``r`` is ``state[p]["relaxed_path"]``;
``t`` is ``group["step"]`` (``"tensor"``: ``state[p]["step"]``); ``n_u`` is the number of
elements of the unit.

Where steadystep departs from the printed algorithm (docs/decisions.md):

* the reference std is ``alpha / sqrt(n)`` and ``E_t`` is eq. 4 at the current ``t`` (not the
  limits ``mu``, ``sigma(d)`` of eq. 5 as printed), as in the authors' code;
* the exponent and the multiplier are clipped (:func:`steadystep.agnostic.apply_log_change`),
  so a rate never reaches inf or 0;
* weight decay enters ``d`` once, for ``r`` and the update alike; Ag-Adam has none;
* the units: ``"global"`` (one rate), ``"group"`` (one per param group: the paper's layers
  with ``ss.layer_groups``), ``"tensor"`` (one per tensor, counting its own steps) and
  ``"param"``; parameters whose ``grad`` is None are left out of the step and their unit;
* a step where any ``d`` element is NaN or inf, or any raw gradient element is above
  :func:`~steadystep._kernels.gradient_limit`, changes nothing but ``skipped_steps``;
* statistics are at least float32 (``promote_types(dtype, float32)``).

Examples:
    >>> import torch
    >>> p = torch.zeros(3, requires_grad=True)
    >>> opt = PlainALeRA([p], lr=0.1, alpha=0.5, C=0.1)
    >>> p.grad = torch.ones(3)
    >>> opt.step()
    >>> round(float(opt.param_groups[0]["lr_multiplier"]), 6)  # ||r||^2 = E_1: no change
    1.0
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor

from steadystep._kernels import gradient_limit, stats_dtype
from steadystep._validation import check_choice
from steadystep.agnostic import apply_log_change, random_walk_mean
from steadystep.optim.agadam import AgAdam
from steadystep.optim.alera import ALeRA

__all__ = [
    "GRANULARITIES",
    "PlainALeRA",
    "PlainAgAdam",
    "log_rate_change",
    "public_arguments",
    "relaxed_path",
]

GRANULARITIES = ("global", "group", "tensor", "param")


def relaxed_path(r: Tensor, d: Tensor, norm: Tensor, *, alpha: float, norm_eps: float) -> Tensor:
    """Line 13: ``(1 - alpha) r + alpha d / ||d_u||``; ``(1 - alpha) r`` where the unit's
    gradient has no direction (``||d_u|| <= norm_eps``)."""
    if norm > norm_eps:
        return (1 - alpha) * r + alpha * d / norm
    return (1 - alpha) * r


def log_rate_change(r_sq: Tensor, t: int, *, alpha: float, C: float, n: int) -> Tensor:
    """Line 14's exponent: ``C (||r_u||^2 - E_t) / (alpha / sqrt(n))``, ``E_t`` of eq. 4."""
    E_t = random_walk_mean(alpha, t)
    return C * (r_sq - E_t) / (alpha / math.sqrt(n))


def public_arguments(cls: type, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Every argument of the call ``cls(*args, **kwargs)``, by name, with ``cls``'s defaults
    for those not given (a TypeError, as the call's, for an argument ``cls`` does not take):
    each twin takes the arguments and defaults of the class it restates."""
    bound = inspect.signature(cls).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


class PlainALeRA:
    """:class:`~steadystep.ALeRA`: SGD whose learning rates follow the agnostic rule.

    It takes :class:`~steadystep.ALeRA`'s arguments, with its defaults (:func:`public_arguments`;
    ``foreach`` and ``fused`` choose nothing here: the twin has one path). ``params`` are
    tensors or param groups (dicts with ``"params"`` and optionally ``"lr"`` and
    ``"weight_decay"``); state lives where :class:`~steadystep.ALeRA` keeps it
    (``param_groups[i]["lr_multiplier"]``, ``["step"]``, ``state[p]``), and
    ``skipped_steps`` counts the steps skipped for a non-finite gradient.
    """

    restates: type = ALeRA  # the class whose arguments and defaults this twin takes

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        # lr, alpha, C, granularity, norm_eps, weight_decay (Ag-Adam: none, so 0), ...
        hyper = self.hyper = public_arguments(self.restates, params, *args, **kwargs)
        lr, weight_decay = hyper["lr"], hyper.get("weight_decay", 0.0)
        params = list(hyper.pop("params"))
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict[str, Any]] = []
        for group in groups:
            members = list(group["params"])
            dtype = torch.float32
            for p in members:
                dtype = torch.promote_types(dtype, p.dtype)
            self.param_groups.append(
                {
                    "params": members,
                    "lr": group.get("lr", lr),
                    "weight_decay": group.get("weight_decay", weight_decay),
                    "lr_multiplier": torch.ones((), dtype=dtype),  # eta / eta_0
                    "step": 0,
                }
            )
        self.alpha, self.C, self.norm_eps = hyper["alpha"], hyper["C"], hyper["norm_eps"]
        self.granularity = check_choice("granularity", hyper["granularity"], GRANULARITIES)
        self.state: dict[Tensor, dict[str, Any]] = {}
        self.skipped_steps = 0

    def _new_state(self, p: Tensor) -> dict[str, Any]:
        dtype = stats_dtype(p.dtype)
        state: dict[str, Any] = {"relaxed_path": torch.zeros_like(p, dtype=dtype)}
        if self.granularity == "tensor":
            state["lr_multiplier"] = torch.ones((), dtype=dtype)
            state["step"] = 0
        elif self.granularity == "param":
            state["lr_multiplier"] = torch.ones_like(p, dtype=dtype)
        return state

    def _gradient(self, p: Tensor, weight_decay: float) -> Tensor:
        """``d = g + weight_decay * theta``, in the statistics' dtype."""
        dtype = self.state[p]["relaxed_path"].dtype
        return p.grad.to(dtype) + weight_decay * p.to(dtype)

    def _units(self, members: list[list[Tensor]]) -> list[tuple[list[Tensor], int | None]]:
        """``(parameters, group)`` of each unit: the group whose ``step`` and
        ``lr_multiplier`` the unit uses (None for ``"tensor"``: the tensor's own)."""
        active = [gi for gi, ps in enumerate(members) if ps]
        everything = [p for ps in members for p in ps]
        if self.granularity == "global":
            return [(everything, 0)]
        if self.granularity == "param":
            # one normalisation for everything; t is the count of the first group with a gradient
            return [(everything, active[0])]
        if self.granularity == "group":
            return [(members[gi], gi) for gi in active]
        return [([p], None) for p in everything]

    @torch.no_grad()
    def step(self) -> None:
        """One step: the relaxed paths, the rates, then the parameters (line 13, 14, 15)."""
        members = [[p for p in g["params"] if p.grad is not None] for g in self.param_groups]
        params = [p for ps in members for p in ps]
        if not params:
            return
        d: dict[Tensor, Tensor] = {}
        rate_group: dict[Tensor, dict[str, Any]] = {}
        for group, ps in zip(self.param_groups, members, strict=True):
            for p in ps:
                self.state.setdefault(p, self._new_state(p))
                d[p] = self._gradient(p, group["weight_decay"])
                rate_group[p] = group
        within_limit = all(
            bool((p.grad.abs() <= gradient_limit(stats_dtype(p.grad.dtype))).all()) for p in params
        )
        if not (within_limit and all(bool(torch.isfinite(d[p]).all()) for p in params)):
            self.skipped_steps += 1
            return

        # the step counts t: every group's for "global", the groups with a gradient otherwise
        for gi, group in enumerate(self.param_groups):
            if self.granularity == "global" or members[gi]:
                group["step"] += 1
        rates: dict[Tensor, Tensor] = {}  # eta / eta_0 of each parameter, after line 14
        for unit, gi in self._units(members):
            if gi is None:  # "tensor"
                self.state[unit[0]]["step"] += 1
                t = self.state[unit[0]]["step"]
            else:
                t = self.param_groups[gi]["step"]
            norm = torch.sqrt(sum(torch.sum(d[p] ** 2) for p in unit))
            for p in unit:
                state = self.state[p]
                state["relaxed_path"] = relaxed_path(
                    state["relaxed_path"], d[p], norm, alpha=self.alpha, norm_eps=self.norm_eps
                )
            n = sum(p.numel() for p in unit)
            if self.granularity == "param":
                # Algorithm 2: per element, mean E_t / D and std alpha / D (D = n)
                E_t = random_walk_mean(self.alpha, t)
                for p in unit:
                    r = self.state[p]["relaxed_path"]
                    log_change = self.C * (r**2 - E_t / n) / (self.alpha / n)
                    self.state[p]["lr_multiplier"] = apply_log_change(
                        self.state[p]["lr_multiplier"], log_change
                    )
                    rates[p] = self.state[p]["lr_multiplier"]
                continue
            r_sq = sum(torch.sum(self.state[p]["relaxed_path"] ** 2) for p in unit)
            log_change = log_rate_change(r_sq, t, alpha=self.alpha, C=self.C, n=n)
            owner = self.state[unit[0]] if gi is None else self.param_groups[gi]
            owner["lr_multiplier"] = apply_log_change(owner["lr_multiplier"], log_change)
            for p in unit:
                rates[p] = owner["lr_multiplier"]
        if self.granularity == "global":  # every group holds the one global rate
            for group in self.param_groups[1:]:
                group["lr_multiplier"] = self.param_groups[0]["lr_multiplier"].clone()
        elif self.granularity in ("tensor", "param"):  # times the group's factor (1 here)
            rates = {p: rates[p] * rate_group[p]["lr_multiplier"] for p in params}

        for p in params:
            self._update(p, d[p], rate_group[p]["lr"] * rates[p])

    def _update(self, p: Tensor, d: Tensor, lr: Tensor) -> None:
        """Line 15: ``theta <- theta - lr eta d`` (one rounding to the parameter's dtype)."""
        p.copy_(p.to(d.dtype) - lr * d)


class PlainAgAdam(PlainALeRA):
    """:class:`~steadystep.AgAdam`: Adam whose learning rate follows the agnostic rule.

    The rates adapt from the raw gradient exactly as in :class:`PlainALeRA` (no weight decay),
    then Adam's step is taken at ``lr eta``:

    .. code-block:: text

        m1 <- beta1 m1 + (1 - beta1) g,   m2 <- beta2 m2 + (1 - beta2) g^2
        theta <- theta - lr eta (m1 / (1 - beta1^k)) / (sqrt(m2 / (1 - beta2^k)) + eps)

    with ``m1, m2`` in ``state[p]["exp_avg"], ["exp_avg_sq"]`` and ``k = state[p]["step"]``,
    the steps this parameter took (as torch.optim.Adam counts them; ``E_t`` keeps the unit's
    ``t``, Note [two step counts] of :mod:`steadystep.optim.agadam`). It takes
    :class:`~steadystep.AgAdam`'s arguments, with its defaults.
    """

    restates = AgAdam

    def __init__(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(params, *args, **kwargs)
        self.betas, self.eps = tuple(self.hyper["betas"]), self.hyper["eps"]

    def _new_state(self, p: Tensor) -> dict[str, Any]:
        state = super()._new_state(p)
        state["exp_avg"] = torch.zeros_like(state["relaxed_path"])
        state["exp_avg_sq"] = torch.zeros_like(state["relaxed_path"])
        state["step"] = 0  # for "tensor" the same count as the unit's
        return state

    def _update(self, p: Tensor, d: Tensor, lr: Tensor) -> None:
        beta1, beta2 = self.betas
        state = self.state[p]
        if self.granularity != "tensor":  # for "tensor" the unit's count is this count
            state["step"] += 1
        k = state["step"]
        state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * d
        state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * d**2
        m_hat = state["exp_avg"] / (1 - beta1**k)
        v_hat = state["exp_avg_sq"] / (1 - beta2**k)
        p.copy_(p.to(d.dtype) - lr * m_hat / (torch.sqrt(v_hat) + self.eps))
