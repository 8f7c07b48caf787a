"""Ag-Adam: the agnostic learning-rate multipliers of ALeRA on top of Adam (paper, section 3.1)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from steadystep._tensors import shards
from steadystep._validation import check_betas, check_positive
from steadystep.agnostic import apply_log_change_
from steadystep.checkpoint import Kind
from steadystep.optim._alera_core import Gathered, agnostic_update, param_multipliers
from steadystep.optim.alera import ALeRA

__all__ = ["AgAdam", "agadam"]


def agadam(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    lrs: list[torch.Tensor],
    steps: list[torch.Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    take_step: torch.Tensor,
) -> None:
    """Adam's step with per-parameter learning rates ``lrs`` (already times the multipliers).

    ``grads`` are finite-masked; where ``take_step`` is False moments and parameters stay bitwise
    unchanged (``beta -> 1``, increment and step size -> 0, and the gradient is replaced by 0:
    a finite gradient above the limit of Note [huge gradients] in :mod:`steadystep._kernels`
    would square to inf, and ``inf * 0`` is NaN). ``steps`` (after this step's increment) drive
    the bias corrections.
    """
    for p, g, m, v, lr, t in zip(params, grads, exp_avgs, exp_avg_sqs, lrs, steps, strict=True):
        g = torch.where(take_step, g, 0.0)
        b1 = torch.where(take_step, torch.full_like(t, beta1, dtype=m.dtype), 1.0)
        b2 = torch.where(take_step, torch.full_like(t, beta2, dtype=v.dtype), 1.0)
        m.mul_(b1).addcmul_(g, 1.0 - b1)
        v.mul_(b2).addcmul_(g.square(), 1.0 - b2)
        t_safe = t.clamp(min=1.0).to(m.dtype)  # bias corrections stay > 0 before the first step
        bias_correction1 = 1.0 - beta1**t_safe
        bias_correction2 = 1.0 - beta2**t_safe
        denom = (v.sqrt() / bias_correction2.sqrt()).add_(eps)
        step_size = torch.where(take_step, lr / bias_correction1, 0.0)
        p.addcmul_(m / denom, -step_size)


class AgAdam(ALeRA):
    """Adam whose learning rate is adapted by ALeRA's agnostic rule (the paper's Ag-Adam).

    The relaxed path and the multipliers come from the raw gradient and are updated first,
    exactly as in :class:`~steadystep.ALeRA` (same ``granularity`` choices, same clipping of
    the exponent); then Adam's step is taken with learning rate ``lr * m``:

    .. math::
        m_1 &\\leftarrow \\beta_1 m_1 + (1-\\beta_1) g, \\qquad
        m_2 \\leftarrow \\beta_2 m_2 + (1-\\beta_2) g^2\\\\
        \\theta &\\leftarrow \\theta - \\texttt{lr}\\, m\\,
            \\frac{m_1 / (1-\\beta_1^t)}{\\sqrt{m_2 / (1-\\beta_2^t)} + \\epsilon}

    ``m_1, m_2`` are ``state["exp_avg"], state["exp_avg_sq"]``, ``(beta1, beta2)`` is ``betas``,
    ``epsilon`` is ``eps``, ``t`` is ``state["step"]`` (the finite steps this parameter took,
    as torch.optim.Adam counts them) and ``m`` the multiplier. Note [two step counts]: the
    agnostic rule's reference mean ``E_t`` uses the unit's count ``group["step"]`` instead, as in
    :class:`~steadystep.ALeRA`; a parameter whose gradient starts late (or is None on some
    steps) thus gets Adam's bias correction for its own moments, and with ``C = 0`` Ag-Adam is
    torch.optim.Adam exactly. A non-finite gradient leaves every state and parameter unchanged.

    Args:
        params: parameters or param groups (``ss.layer_groups(model)`` for the paper's layers).
        lr: initial learning rate (default 1e-3).
        betas: Adam's moment decays (default (0.9, 0.999)).
        eps: Adam's denominator term (default 1e-8).
        alpha: memory rate of the relaxed path (default 0.001, the paper's Ag-Adam setting).
        C: adaptation speed (default 3e-6).
        granularity: ``"global" | "group" | "tensor" | "param"`` (default ``"group"``).
        norm_eps: below this gradient norm ``r`` only decays (default 1e-6).
        foreach: ``torch._foreach`` kernels for the agnostic part where the step is not fused
            (default: on CUDA).
        fused: the whole step (relaxed paths, multipliers and Adam's update) as one
            multi-tensor kernel call, as in :class:`~steadystep.ALeRA` (default: None, wherever
            the kernels take the parameters).

    There is no ``weight_decay``: the rates adapt from the raw gradient, and a param group
    that sets ``weight_decay`` is rejected with a ValueError (an L2 term belongs in the loss).

    Examples:
        >>> import torch, steadystep as ss
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = ss.AgAdam(ss.layer_groups(model), lr=1e-3)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step()
    """

    _wide_keys = (*ALeRA._wide_keys, "betas", "eps")
    _checkpoint_class = "AgAdam"

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        alpha: float = 0.001,
        C: float = 3e-6,
        granularity: str = "group",
        norm_eps: float = 1e-6,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        beta1, beta2 = check_betas("betas", betas)
        self._adam_defaults = {"betas": (beta1, beta2), "eps": check_positive("eps", eps)}
        super().__init__(
            params,
            lr,
            alpha=alpha,
            C=C,
            granularity=granularity,
            weight_decay=0.0,
            norm_eps=norm_eps,
            foreach=foreach,
            fused=fused,
        )

    def _base_defaults(self) -> dict[str, Any]:
        return self._adam_defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As :meth:`ALeRA.add_param_group`; a ``weight_decay`` in the group is rejected.

        Ag-Adam adapts its rates from the raw gradient (a decision), and an L2 term in the group
        would have entered both the agnostic statistics and Adam's moments. Use
        ``torch.optim.AdamW``-style decay outside, or an L2 term in the loss.
        """
        wd = param_group.get("weight_decay", 0.0)
        if not (isinstance(wd, (int, float)) and wd == 0.0):
            raise ValueError(
                f"AgAdam does not take weight_decay (its rates adapt from the raw gradient), got "
                f"weight_decay={wd!r} in a param group; add an L2 term to the loss instead"
            )
        super().add_param_group(param_group)

    def _adam_state(
        self, gathered: Gathered
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Adam's moments and step counts of the parameters with a gradient (created on a
        parameter's first step). Note [two step counts]: Adam's bias correction counts the
        steps this parameter's moments have taken (as torch.optim.Adam)."""
        exp_avgs, exp_avg_sqs, adam_steps = [], [], []
        groups, states = self.param_groups, self.state
        for p, gi in zip(gathered.keys, gathered.group_index, strict=True):
            state = states[p]
            if "exp_avg" not in state or "step" not in state:
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(state["relaxed_path"])
                    state["exp_avg_sq"] = torch.zeros_like(state["relaxed_path"])
                if "step" not in state:
                    device = groups[gi]["step"].device
                    state["step"] = torch.zeros((), dtype=torch.float32, device=device)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            adam_steps.append(state["step"])
        return shards(exp_avgs), shards(exp_avg_sqs), adam_steps

    def _state_spec(self, group: dict[str, Any]) -> dict[str, tuple[Kind, bool]]:
        return {
            **super()._state_spec(group),
            "exp_avg": ("param", True),
            "exp_avg_sq": ("param", True),
            "step": ("scalar", True),
        }

    @torch.no_grad()
    def masked_step(
        self, skip: torch.Tensor | None, found_finite: torch.Tensor | None = None
    ) -> None:
        """The step, an exact no-op where ``skip`` (0-d bool) is True (decided on the device);
        ``skip=None`` is :meth:`step`. ``found_finite`` is not needed (as in ALeRA)."""
        gathered = self._gather()
        if not gathered.params:
            return
        fusable = self.defaults.get("fused") is not False
        if fusable and self._fused_step(gathered, skip, self._adam_state(gathered)):
            return
        step = self._layout(gathered, skip)
        hyper = self._hyper()
        args = step._asdict()
        del args["params"], args["multipliers"], args["lrs"]  # for the Adam update below
        for m, change in zip(step.multipliers, agnostic_update(**args, **hyper), strict=True):
            apply_log_change_(m, change, step.take_step)  # as in alera()
        per_param_m = param_multipliers(
            step.units, step.multipliers, len(step.params), param_wise=hyper["param_wise"]
        )
        increment = step.take_step.to(torch.float32)
        exp_avgs, exp_avg_sqs, adam_steps = self._adam_state(gathered)
        if self.granularity != "tensor":  # for "tensor", layout_step counted it already
            for t in adam_steps:
                t.add_(increment)
        beta1, beta2 = self.defaults["betas"]
        agadam(
            step.params,
            step.grads,
            exp_avgs,
            exp_avg_sqs,
            [m * lr for m, lr in zip(per_param_m, step.lrs, strict=True)],
            adam_steps,
            beta1=beta1,
            beta2=beta2,
            eps=self.defaults["eps"],
            take_step=step.take_step,
        )
        self._sync_global()
