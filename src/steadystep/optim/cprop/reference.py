"""A plain restatement of CProp, one parameter and one equation at a time.

Preechakul & Kijsirikul, "CProp: Adaptive Learning Rate Scaling from Past Gradient Conformity"
(2019), Algorithm 1, as steadystep implements it (docs/decisions.md). Readability over speed:
no foreach, no kernels, no masking tricks; each line below is a line of the algorithm. The
classes of :mod:`steadystep.optim.cprop` (their per-tensor, foreach and fused paths) must give
the same numbers to rounding, and tests/test_cprop.py holds them to it. Every element, with
``g`` its raw gradient ``p.grad`` (before any weight decay):

.. code-block:: text

    t     <- t + 1                                            state["step"]
    m_t   <- beta m_{t-1} + (1 - beta) g                      state["cprop_exp_avg"]
    v_t   <- beta v_{t-1} + (1 - beta) g^2                    state["cprop_exp_avg_sq"]
    m_hat <- m_t / (1 - beta^t),  v_hat <- v_t / (1 - beta^t)      (bias correction)
    n_t   <- (1 - beta^t) / (1 - beta)                              (estimated number of items)
    se_t  <- sqrt(max(v_hat - m_hat^2, 0) / (n_t - 1 + eps)) + eps  (standard error)
    p_neg <- Phi(0; m_hat, se_t)                                    (confidence that g < 0)
    s_t   <- min(2 c |p_neg - 1/2|, 1),  s_1 = 1                    (conformity)
    g_hat <- the base optimizer's update (SGD's, Adam's, AdamW's or any optimizer's)
    theta <- theta + s_t * g_hat

Symbols and arguments: ``beta`` (gradient horizon) is ``cprop_beta`` of the native classes
and ``beta`` of :class:`PlainCProp`; ``c`` (overconfidence coefficient) is ``cprop_c`` / ``c``;
``eps`` is ``cprop_eps`` / ``eps``; ``Phi`` is picked by ``cdf``: ``"normal"`` (the paper's
erf), or the logistic approximations ``"bfo"``, ``"bft"`` (the authors' code's default) and
``"logistic"`` (a logistic with the normal's variance).

Where steadystep departs from the printed algorithm (docs/decisions.md):

* ``eps`` is added after the square root of ``se`` (the printed line has it inside);
* ``s_1 = 1`` exactly: at ``t = 1``, ``n_1 - 1 = 0`` would let float noise in
  ``v_hat - m_hat^2`` decide the scale;
* ``method="relative"`` (``s = min(c |m_hat| / (a_hat + eps), 1)``, ``a`` the EMA of ``|g|``,
  kept in ``state["cprop_exp_avg_abs"]``) and ``method="moment"``
  (``s = min(c |m_hat| / (sqrt(v_hat) + eps), 1)``) are the section 2.4 heuristics, written
  with the same bias-corrected EMAs instead of the paper's plain sums;
* ``c = inf`` is the base optimizer (``s = 1``), as the paper's limit says;
* an element with ``m_hat = 0`` has no sign to agree on: ``s = 0`` (with ``eps = 0`` this is
  where ``0 / 0`` would stand); an element whose gradient was always exactly 0 therefore has
  its whole update, decoupled weight decay included, suppressed from ``t = 2`` on;
* a step where any gradient element is NaN, inf or above
  :func:`~steadystep._kernels.gradient_limit` changes nothing: no statistic, no step count,
  no parameter (the wrapper's base optimizer still sees the gradient: protecting its state is
  the guard's job);
* statistics of 16-bit parameters are float32, and each step rounds the parameter once.

The native classes keep one buffer less where CProp's ``v`` equals Adam's ``exp_avg_sq``
(``betas[1] == cprop_beta`` and Adam sees the raw gradient); here each keeps its own, the
numbers are the same.

Examples:
    >>> import torch
    >>> p = torch.nn.Parameter(torch.zeros(2))
    >>> opt = PlainCPropSGD([p], lr=0.1, cprop_beta=0.9)
    >>> p.grad = torch.tensor([1.0, -1.0])
    >>> opt.step()  # s = 1 at t = 1: plain SGD
    >>> p.detach()
    tensor([-0.1000,  0.1000])
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from steadystep._kernels import gradient_limit, stats_dtype
from steadystep._validation import check_choice
from steadystep.optim.cprop import CDFS, METHODS
from steadystep.optim.cprop._state import _adam_defaults, _sgd_defaults

__all__ = [
    "PlainCProp",
    "PlainCPropAdam",
    "PlainCPropAdamW",
    "PlainCPropSGD",
    "adam_update",
    "conformity_scale",
    "new_statistics",
    "sgd_update",
    "step_is_finite",
    "update_statistics",
]


def step_is_finite(grads: list[Tensor]) -> bool:
    """True when every element of every gradient is finite and within the gradient limit
    (``2**63`` for float32 statistics, ``2**511`` for float64: Note [huge gradients] in
    :mod:`steadystep._kernels`); ``NaN <= limit`` is False."""
    return all(
        bool((g.abs() <= gradient_limit(stats_dtype(g.dtype))).all()) for g in grads if g.numel()
    )


def new_statistics(param: Tensor, method: str) -> dict[str, Any]:
    """CProp's state of one parameter before its first step: ``t = 0``, ``m = v = 0``."""
    dtype = stats_dtype(param.dtype)
    second = "cprop_exp_avg_abs" if method == "relative" else "cprop_exp_avg_sq"
    return {
        "step": 0,
        "cprop_exp_avg": torch.zeros_like(param, dtype=dtype),
        second: torch.zeros_like(param, dtype=dtype),
    }


def update_statistics(state: dict[str, Any], g: Tensor, *, beta: float, method: str) -> None:
    """``t <- t + 1``, ``m <- beta m + (1 - beta) g`` and ``v <- beta v + (1 - beta) g^2``
    (for ``method="relative"`` the EMA of ``|g|``); ``g`` is the raw gradient."""
    state["step"] += 1
    state["cprop_exp_avg"] = beta * state["cprop_exp_avg"] + (1 - beta) * g
    if method == "relative":
        state["cprop_exp_avg_abs"] = beta * state["cprop_exp_avg_abs"] + (1 - beta) * g.abs()
    else:
        state["cprop_exp_avg_sq"] = beta * state["cprop_exp_avg_sq"] + (1 - beta) * g**2


def _normal_cdf_at_zero(m_hat: Tensor, se: Tensor, cdf: str) -> Tensor:
    """``Phi(0; m_hat, se)``: the probability that the mean gradient is negative."""
    z = (0 - m_hat) / se
    if cdf == "normal":
        return 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    if cdf == "bfo":  # Bowling et al. (2009), one term
        return torch.sigmoid(1.702 * z)
    if cdf == "bft":  # Bowling et al. (2009), two terms
        return torch.sigmoid(0.07056 * z**3 + 1.5976 * z)
    return torch.sigmoid(z * math.pi / math.sqrt(3))  # "logistic": the normal's variance


def conformity_scale(
    state: dict[str, Any], *, beta: float, c: float, eps: float, cdf: str, method: str
) -> Tensor:
    """The scale ``s_t`` of every element, from the statistics after this step's update."""
    t, m = state["step"], state["cprop_exp_avg"]
    if t == 1 or math.isinf(c):
        return torch.ones_like(m)
    bias_correction = 1 - beta**t
    m_hat = m / bias_correction
    if method == "conformity":
        v_hat = state["cprop_exp_avg_sq"] / bias_correction
        n = bias_correction / (1 - beta)
        se = torch.sqrt(torch.clamp(v_hat - m_hat**2, min=0) / (n - 1 + eps)) + eps
        p_neg = _normal_cdf_at_zero(m_hat, se, cdf)
        s = torch.clamp(2 * c * torch.abs(p_neg - 0.5), max=1)
    elif method == "relative":
        a_hat = state["cprop_exp_avg_abs"] / bias_correction
        s = torch.clamp(c * m_hat.abs() / (a_hat + eps), max=1)
    else:
        v_hat = state["cprop_exp_avg_sq"] / bias_correction
        s = torch.clamp(c * m_hat.abs() / (torch.sqrt(v_hat) + eps), max=1)
    # no mean, no confidence (and no 0 / 0 for an element that never had a gradient, eps = 0)
    return torch.where(m_hat == 0, 0.0, s)


def sgd_update(
    theta: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
) -> Tensor:
    """``g_hat`` of ``torch.optim.SGD``: ``-lr * d`` with ``d = g + weight_decay * theta``
    through the momentum buffer (``state["momentum_buffer"]``, ``d`` itself at first)."""
    d = g + weight_decay * theta
    if momentum != 0:
        buf = state.get("momentum_buffer")
        buf = d.clone() if buf is None else momentum * buf + (1 - dampening) * d
        state["momentum_buffer"] = buf
        d = d + momentum * buf if nesterov else buf
    return -lr * d


def adam_update(
    theta: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    decoupled_weight_decay: bool,
) -> Tensor:
    """``g_hat`` of ``torch.optim.Adam`` (L2 weight decay) or ``AdamW`` (decoupled); Adam's
    ``t`` is CProp's ``state["step"]`` (already advanced)."""
    beta1, beta2 = betas
    t = state["step"]
    d = g if decoupled_weight_decay else g + weight_decay * theta
    state["exp_avg"] = beta1 * state["exp_avg"] + (1 - beta1) * d
    state["exp_avg_sq"] = beta2 * state["exp_avg_sq"] + (1 - beta2) * d**2
    v = state["exp_avg_sq"]
    if amsgrad:
        state["max_exp_avg_sq"] = torch.maximum(state["max_exp_avg_sq"], v)
        v = state["max_exp_avg_sq"]
    m_hat = state["exp_avg"] / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    g_hat = -lr * m_hat / (torch.sqrt(v_hat) + eps)
    if decoupled_weight_decay:
        g_hat = g_hat - lr * weight_decay * theta
    return g_hat


def _settings(beta: float, c: float, eps: float, cdf: str, method: str) -> dict[str, Any]:
    """CProp's hyperparameters as the plain optimizers keep them (``cdf``, ``method`` checked)."""
    return dict(
        beta=beta,
        c=c,
        eps=eps,
        cdf=check_choice("cdf", cdf, CDFS),
        method=check_choice("method", method, METHODS),
    )


class _PlainNative:
    """Algorithm 1 with a built-in base optimizer: ``theta <- theta + s * g_hat``."""

    def __init__(
        self, params: Iterable[Tensor], base: dict[str, Any], cprop: dict[str, Any]
    ) -> None:
        """``base``: the base optimizer's hyperparameters; ``cprop``: CProp's (``_settings``)."""
        self.params: list[Tensor] = list(params)
        self.base = base
        self.cprop = cprop
        self.state: dict[Tensor, dict[str, Any]] = {}

    def _new_state(self, theta: Tensor) -> dict[str, Any]:
        return new_statistics(theta, self.cprop["method"])

    def _update(self, theta: Tensor, g: Tensor, state: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self) -> None:
        """One step over the parameters that have a gradient (none if any is not finite)."""
        params = [p for p in self.params if p.grad is not None]
        if not step_is_finite([p.grad for p in params]):
            return
        for p in params:
            state = self.state.setdefault(p, self._new_state(p))
            dtype = state["cprop_exp_avg"].dtype
            theta, g = p.to(dtype), p.grad.to(dtype)
            update_statistics(state, g, beta=self.cprop["beta"], method=self.cprop["method"])
            s = conformity_scale(state, **self.cprop)
            g_hat = self._update(theta, g, state)
            p.copy_(theta + s * g_hat)  # one rounding to the parameter's dtype


class PlainCPropSGD(_PlainNative):
    """:class:`~steadystep.CPropSGD`: SGD (momentum, dampening, Nesterov, L2 weight decay)."""

    def __init__(
        self,
        params: Iterable[Tensor],
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
    ) -> None:
        base = _sgd_defaults(lr, momentum, dampening, weight_decay, nesterov)
        super().__init__(params, base, _settings(cprop_beta, cprop_c, cprop_eps, cdf, method))

    def _update(self, theta: Tensor, g: Tensor, state: dict[str, Any]) -> Tensor:
        return sgd_update(theta, g, state, **self.base)


class PlainCPropAdam(_PlainNative):
    """:class:`~steadystep.CPropAdam`: Adam (L2 weight decay, AMSGrad)."""

    decoupled_weight_decay = False

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        *,
        cprop_beta: float = 0.999,
        cprop_c: float = 1.0,
        cprop_eps: float = 1e-8,
        cdf: str = "normal",
        method: str = "conformity",
    ) -> None:
        if weight_decay is None:  # the classes' defaults: 0 for Adam, 1e-2 for AdamW
            weight_decay = 1e-2 if self.decoupled_weight_decay else 0.0
        base = _adam_defaults(lr, betas, eps, weight_decay, amsgrad, self.decoupled_weight_decay)
        super().__init__(params, base, _settings(cprop_beta, cprop_c, cprop_eps, cdf, method))

    def _new_state(self, theta: Tensor) -> dict[str, Any]:
        state = super()._new_state(theta)
        state["exp_avg"] = torch.zeros_like(state["cprop_exp_avg"])
        state["exp_avg_sq"] = torch.zeros_like(state["cprop_exp_avg"])
        if self.base["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(state["cprop_exp_avg"])
        return state

    def _update(self, theta: Tensor, g: Tensor, state: dict[str, Any]) -> Tensor:
        return adam_update(theta, g, state, **self.base)


class PlainCPropAdamW(PlainCPropAdam):
    """:class:`~steadystep.CPropAdamW`: AdamW (decoupled weight decay, default 1e-2)."""

    decoupled_weight_decay = True


class PlainCProp:
    """:class:`~steadystep.CProp` around any optimizer: ``theta <- theta_old + s * g_hat``
    with ``g_hat = theta_new - theta_old``, what the base optimizer's step changed.

    The base optimizer steps at its full rate and keeps its own state, as it would without
    CProp; CProp's state is ``cprop_state[p]``. On a step that is not finite the parameters
    are put back (the base optimizer's state keeps what it saw).

    Examples:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> opt = PlainCProp(torch.optim.SGD([p], lr=0.1), beta=0.9)
        >>> p.grad = torch.tensor([1.0, -1.0])
        >>> opt.step()
        >>> p.detach()
        tensor([-0.1000,  0.1000])
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        beta: float = 0.999,
        c: float = 1.0,
        eps: float = 1e-8,
        cdf: str = "normal",
        method: str = "conformity",
    ) -> None:
        self.optimizer = optimizer
        self.cprop = _settings(beta, c, eps, cdf, method)
        self.cprop_state: dict[Tensor, dict[str, Any]] = {}

    @torch.no_grad()
    def step(self) -> None:
        """Statistics from the raw gradients, the base optimizer's step, then the scale."""
        params = [
            p
            for group in self.optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        finite = step_is_finite([p.grad for p in params])
        for p in params:
            state = self.cprop_state.setdefault(p, new_statistics(p, self.cprop["method"]))
            if finite:
                g = p.grad.to(state["cprop_exp_avg"].dtype)
                update_statistics(state, g, beta=self.cprop["beta"], method=self.cprop["method"])
        theta_old = [p.detach().clone() for p in params]
        self.optimizer.step()
        for p, old in zip(params, theta_old, strict=True):
            if not finite:
                p.copy_(old)
                continue
            state = self.cprop_state[p]
            dtype = state["cprop_exp_avg"].dtype
            g_hat = p.to(dtype) - old.to(dtype)
            s = conformity_scale(state, **self.cprop)
            p.copy_(old.to(dtype) + s * g_hat)
