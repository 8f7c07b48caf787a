"""The random-walk reference of ALeRA, as pure functions.

ALeRA (Schoenauer Sebag, Schoenauer & Sebag, "Stochastic Gradient Descent: Going As Fast As
Possible But Not Faster", section 2.1) keeps the relaxed path of normalised gradients

.. math::
    r_0 = 0, \\qquad r_t = (1 - \\alpha)\\, r_{t-1} + \\alpha\\, g_t / \\lVert g_t \\rVert

and compares :math:`\\lVert r_t \\rVert^2` with the same recursion driven by independent uniform
random unit vectors :math:`u_t \\in \\mathbb{R}^d`. For that random walk

.. math::
    \\mathbb{E}\\lVert r_t \\rVert^2 = \\frac{\\alpha}{2 - \\alpha}\\,[1 - (1 - \\alpha)^{2t}]
    \\quad \\text{(eq. 4)}

    \\operatorname{Var}\\lVert r_t \\rVert^2 = \\frac{1}{d}\\,
    \\frac{4 \\alpha^2 (1 - \\alpha)^2}{(2 - \\alpha)^2 ((1 - \\alpha)^2 + 1)}\\,
    [1 - (1 - \\alpha)^{2t}]\\,[1 - (1 - \\alpha)^{2(t - 1)}]

Note [eq. 5 as printed]: the paper prints the variance with a factor 2 instead of 4 and exponents
``t`` and ``t - 1`` instead of ``2t`` and ``2(t - 1)``. Writing
``||r_t||^2 = a^2 (sum_l w_l^2 + 2 sum_{l<k} w_l w_k <u_l, u_k>)`` with ``w_l = (1-a)^(t-l)``, the
cross terms are uncorrelated with variance ``1/d`` each, which gives the expression above; the
Monte Carlo test in ``tests/test_agnostic.py`` confirms it and rejects the printed one.

The update itself does not use that variance: following the authors' code (docs/decisions.md), the
reference standard deviation is ``std = alpha / sqrt(d)`` and the learning rate moves by

.. math::
    \\eta \\leftarrow \\eta
        \\exp\\big(C\\, (\\lVert r_t \\rVert^2 - \\mathbb{E}_t) / \\mathrm{std}\\big)

with :math:`\\mathbb{E}_t` the mean of eq. 4 at the current step ``t`` (not its limit).

Examples:
    >>> from steadystep.agnostic import random_walk_mean
    >>> round(random_walk_mean(0.01, 1), 6)  # one unit vector times alpha: alpha**2
    0.0001
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "apply_log_change",
    "apply_log_change_",
    "log_lr_change",
    "random_walk_mean",
    "random_walk_variance",
    "random_walk_variance_limit",
    "reference_std",
]

Number = float | torch.Tensor


def random_walk_mean(alpha: float, step: Number) -> Number:
    """Mean of ``||r_t||^2`` for the random walk, eq. (4): ``alpha/(2-alpha) * (1-(1-alpha)^(2t))``.

    Args:
        alpha: memory rate of the relaxed path, in (0, 1).
        step: ``t >= 0`` (a float or a tensor; a tensor gives a tensor of its dtype).
    """
    return alpha / (2.0 - alpha) * (1.0 - (1.0 - alpha) ** (2 * step))


def random_walk_variance(alpha: float, step: Number, numel: Number) -> Number:
    """Variance of ``||r_t||^2`` for the random walk in ``d = numel`` dimensions (eq. 5, corrected).

    ``4 a^2 (1-a)^2 / (d (2-a)^2 ((1-a)^2+1)) * (1-(1-a)^(2t)) * (1-(1-a)^(2(t-1)))``; zero at
    ``t = 1`` (a single unit vector has a deterministic norm). See Note [eq. 5 as printed].
    """
    q = (1.0 - alpha) ** 2
    factor = 4.0 * alpha**2 * q / ((2.0 - alpha) ** 2 * (q + 1.0))
    return factor / numel * (1.0 - q**step) * (1.0 - q ** (step - 1))


def random_walk_variance_limit(alpha: float, numel: Number) -> Number:
    """``lim_{t->inf}`` of :func:`random_walk_variance`; ``~ alpha^2 / (2 d)`` for small alpha."""
    q = (1.0 - alpha) ** 2
    return 4.0 * alpha**2 * q / ((2.0 - alpha) ** 2 * (q + 1.0)) / numel


def reference_std(alpha: float, numel: Number) -> Number:
    """The standard deviation ALeRA divides by: ``alpha / sqrt(d)`` (the authors' code)."""
    if isinstance(numel, torch.Tensor):
        return alpha / numel.sqrt()
    return alpha / math.sqrt(numel)


def log_lr_change(
    sq_norm: torch.Tensor, step: torch.Tensor, *, alpha: float, C: float, numel: Number
) -> torch.Tensor:
    """The exponent ``C * (||r_t||^2 - E_t) / (alpha / sqrt(d))`` of one ALeRA update.

    ``sq_norm`` is ``||r_t||^2`` of the unit (any shape: per element for SPALeRA, where the
    caller passes ``D * r_i^2`` and ``numel = 1``), ``step`` is ``t >= 1``.
    """
    mean = random_walk_mean(alpha, step.to(sq_norm.dtype))
    return (sq_norm - mean) * (C / reference_std(alpha, numel))


def apply_log_change_(
    multiplier: torch.Tensor, log_change: torch.Tensor, take_step: torch.Tensor | None = None
) -> torch.Tensor:
    """``multiplier *= exp(log_change)`` in place, never inf and never 0; returns ``multiplier``.

    The exponent is clipped to ``[-(log(max) - 1), log(max) - 1]`` of the multiplier's dtype
    before ``exp`` (so its ``exp`` is finite after rounding: one call moves the multiplier by a
    factor of at most ``max / e``) and the product to ``[tiny, max]``: a long run of agreeing
    gradients saturates the multiplier at the largest finite value instead of reaching ``inf``
    (then ``inf * 0 = nan``), and a long run of disagreeing ones cannot reach an exact 0 from
    which it could never grow back. Where ``take_step`` (0-d bool) is False the multiplier is
    unchanged, bitwise: the exponent's range is then ``[0, 0]`` and ``m * exp(0) = m`` exactly,
    with no ``torch.where`` pass. ``log_change`` (a temporary) is overwritten.

    Examples:
        >>> m = apply_log_change_(torch.ones(2), torch.tensor([1e9, -1e9]))
        >>> bool(torch.isfinite(m).all()), bool((m > 0).all())
        (True, True)
    """
    return _apply_log_change(multiplier, log_change, take_step, torch.finfo(multiplier.dtype))


def apply_log_change(multiplier: torch.Tensor, log_change: torch.Tensor) -> torch.Tensor:
    """``multiplier * exp(log_change)``, never inf and never 0 (out of place): the clipping of
    :func:`apply_log_change_`, on a copy (broadcast and promoted as ``multiplier * log_change``).
    """
    shape = torch.broadcast_shapes(multiplier.shape, log_change.shape)
    dtype = torch.result_type(multiplier, log_change)
    out = multiplier.to(dtype).expand(shape).clone()
    return _apply_log_change(out, log_change.clone(), None, torch.finfo(multiplier.dtype))


def _apply_log_change(
    multiplier: torch.Tensor,
    log_change: torch.Tensor,
    take_step: torch.Tensor | None,
    info: torch.finfo,
) -> torch.Tensor:
    bound: float | torch.Tensor = math.log(info.max) - 1.0  # exp(bound) is finite after rounding
    if take_step is not None:
        full = torch.full((), bound, dtype=log_change.dtype, device=take_step.device)
        bound = torch.where(take_step, full, 0.0)
    factor = log_change.clamp_(-bound, bound).exp_()
    return multiplier.mul_(factor).clamp_(info.tiny, info.max)
