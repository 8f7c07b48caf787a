r"""Adaptive learning rate clipping (ALRC) of loss spikes.

Ede & Beanland, "Adaptive Learning Rate Clipping Stabilizes Learning" (2020), Algorithm 1, with the
authors' ``alrc.py`` as the tie-breaker. For each loss element :math:`L` (a scalar loss, one loss
per sample, or one per pixel):

.. math::

    \sigma &= \sqrt{\max(\mu_2 - \mu_1^2, 0) + \epsilon}, \qquad
    L_{\max} = \mu_1 + n\,\sigma \\
    \tilde L &= \begin{cases}
        L \cdot \operatorname{sg}(L_{\max} / L) & L > L_{\max} \\ L & \text{otherwise}\end{cases} \\
    \mu_1 &\leftarrow \mu_1 + w_1\,(\overline{x} - \mu_1), \qquad
    \mu_2 \leftarrow \mu_2 + w_2\,(\overline{x^2} - \mu_2), \qquad
    w_i = \max\!\left(1 - \beta_i, \tfrac{1}{k + 1}\right)

where :math:`\operatorname{sg}` stops the gradient, the threshold uses the moments *before* this
step's update, and :math:`x = \operatorname{sg}(\tilde L)` (``update="clipped"``, the authors' code)
or :math:`x = \operatorname{sg}(L)` (``update="raw"``, Algorithm 1 as printed); the bars are means
over all elements; :math:`k` is the number of observations the moments already hold (the initial
estimate counts as one). Symbols map to arguments as :math:`n` = ``n_sigma``,
:math:`\beta_{1,2}` = ``beta1``/``beta2``, :math:`\epsilon` = ``eps``, and the initial
:math:`\mu_{1,2}` = ``mu1_init``/``mu2_init``.

Note [warm-up: where the default departs from the paper]
    Algorithm 1 decays with the constant weight :math:`w_i = 1 - \beta_i` (``warmup=False``). The
    initial moments are a deliberate overestimate (the authors: overestimate, never
    underestimate), and with :math:`\beta = 0.999` a fraction :math:`\beta^t` of it is still there
    after :math:`t` steps: two thirds after 400 steps, when a training loss has typically fallen
    several-fold, so the threshold stays several times above the loss and a corrupted batch early
    in a run is clipped only when it is far out, and then less. With ``warmup=True`` (default)
    the moments are the plain average of the observations so far, the initial estimate counting
    as one, until :math:`1/(k+1)` falls below :math:`1 - \beta_i`; from then on the update is
    Algorithm 1's, bit for bit. The overestimate's weight falls as :math:`1/(k+1)` instead of
    :math:`\beta^k`, so the threshold comes down with the loss from the first steps, and it
    still never rests on one or two batches alone. ``docs/alrc.md`` has the benchmark behind
    this choice.

Note [why a stop-gradient scale and not a clamp]
    ``clamp(L, max=L_max)`` would zero the gradient of a clipped element: the sample is thrown
    away. ALRC keeps its direction and scales its magnitude by ``L_max / L``, which is an adaptive
    learning rate for that element. The forward value equals ``L_max`` exactly; we build it as
    ``L_max + (L - sg(L)) * sg(L_max / L)`` so the value is exact in floating point and the
    gradient is ``L_max / L`` times the raw one.

Note [no host sync]
    Every decision (clip or not, first batch or not, finite batch or not) is a tensor applied with
    ``torch.where``; the moments are updated in place. Nothing in ``forward`` reads a value on the
    host, so the module is free on CUDA and traces under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from steadystep._distributed import all_reduce_sum, is_distributed, world_size
from steadystep._validation import (
    check_choice,
    check_finite,
    check_nonnegative,
    check_positive,
    check_unit_interval,
)
from steadystep.checkpoint import check_dtype
from steadystep.checkpoint import check_finite as check_finite_state

__all__ = ["ALRC", "alrc_bounds", "alrc_clip", "alrc_moment_update"]

_UPDATES = ("clipped", "raw")
# What a skipped step must leave as it was (clipped_fraction describes the last call only).
_MOMENTS = ("mu1", "mu2", "initialized", "num_updates", "clipped_total")


def alrc_bounds(
    mu1: Tensor,
    mu2: Tensor,
    *,
    n_sigma: float,
    eps: float,
    n_sigma_lower: float | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Return ``(threshold, sigma, lower)`` from the running moments (``lower`` only if asked).

    ``n_sigma = inf`` gives an infinite threshold (no clipping) even where ``sigma`` is 0.
    """
    sigma = torch.sqrt(torch.clamp_min(mu2 - mu1 * mu1, 0.0) + eps)
    if math.isinf(n_sigma):
        threshold = torch.full_like(mu1, math.inf)
    else:
        threshold = mu1 + n_sigma * sigma
    lower = None
    if n_sigma_lower is not None:
        lower = (
            torch.full_like(mu1, -math.inf)
            if math.isinf(n_sigma_lower)
            else mu1 - n_sigma_lower * sigma
        )
    return threshold, sigma, lower


def alrc_clip(
    loss: Tensor,
    threshold: Tensor,
    lower: Tensor | None = None,
    *,
    active: Tensor | bool = True,
    shift: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clip loss elements to ``[lower, threshold]`` by a stop-gradient scale.

    The bounds are in units of the shifted loss ``z = loss + shift``; elements with ``z <= 0`` are
    never scaled, nor is anything by a bound ``<= 0`` (the scale ``bound / z`` would flip or blow
    up the gradient), nor non-finite elements, nor anything while ``active`` is False.

    Returns:
        ``(out, scaled, bound)``: ``out`` has the shape and dtype of ``loss``; ``scaled`` is the
        boolean mask of scaled elements; ``bound`` is the value (in shifted units) each scaled
        element was set to (``z`` elsewhere, detached), i.e. the clipped shifted loss.

    Examples:
        >>> loss = torch.tensor([1.0, 10.0], requires_grad=True)
        >>> out, scaled, _ = alrc_clip(loss, torch.tensor(4.0))
        >>> out.detach(), scaled
        (tensor([1., 4.]), tensor([False,  True]))
    """
    z = loss + shift if shift != 0.0 else loss
    zd = z.detach()
    thr = threshold.to(loss.dtype)
    # Non-finite elements pass through unscaled: inf * sg(thr / inf) would make a NaN gradient.
    eligible = (zd > 0) & torch.isfinite(zd) & active
    # A bound <= 0 would make the scale bound / z <= 0 and reverse the element's gradient.
    upper = eligible & (zd > thr) & (thr > 0)
    bound = torch.where(upper, thr, zd)
    scaled = upper
    if lower is not None:
        low = lower.to(loss.dtype)
        below = eligible & (zd < low) & ~upper
        bound = torch.where(below, low, bound)
        scaled = upper | below
    # Safe denominator: unscaled elements (zeros, negatives, NaN) never divide.
    factor = torch.where(scaled, bound / torch.where(scaled, zd, torch.ones_like(zd)), 1.0)
    clipped = (bound - shift) + (z - zd) * factor
    return torch.where(scaled, clipped, loss), scaled, bound


def alrc_moment_update(
    mu1: Tensor,
    mu2: Tensor,
    initialized: Tensor,
    batch_mean: Tensor,
    batch_mean_sq: Tensor,
    *,
    beta1: float,
    beta2: float,
    observations: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One moment update from the batch statistics ``mean(x)`` and ``mean(x**2)``.

    .. math::

        \mu_i \leftarrow \mu_i + w_i\,(s_i - \mu_i), \qquad
        w_i = \max\!\left(1 - \beta_i, \tfrac{1}{k + 1}\right)

    with :math:`s_1 = ` ``batch_mean``, :math:`s_2 = ` ``batch_mean_sq`` and :math:`k` =
    ``observations``, the number of observations the moments hold (the initial estimate counts as
    one): the plain average of all observations until it would weigh the newest less than
    :math:`1 - \beta_i`, then the exponential moving average. ``observations=None`` (the default
    here) gives :math:`w_i = 1 - \beta_i` from the start, Algorithm 1's update.

    A non-finite batch leaves everything unchanged. Before initialisation, the first finite batch
    sets ``mu1 = mean(x)`` and ``mu2 = mean(x**2) + mean(x)**2`` (so ``sigma >= |mu1|``: a
    deliberate overestimate, the threshold starts at ``(1 + n_sigma)`` times the first loss or
    more, and the averages decay it to the true value, as the authors advise).

    Returns the new ``(mu1, mu2, initialized)``.

    Examples:
        >>> one = torch.tensor(1.0)
        >>> mu1, mu2, _ = alrc_moment_update(
        ...     torch.tensor(4.0), torch.tensor(20.0), torch.tensor(True), one, one,
        ...     beta1=0.999, beta2=0.999, observations=torch.tensor(1))
        >>> mu1, mu2  # the average of the initial estimate and the batch
        (tensor(2.5000), tensor(10.5000))
    """
    finite = torch.isfinite(batch_mean) & torch.isfinite(batch_mean_sq)
    # lerp(mu, x, w) = (1 - w) * mu + w * x, written as mu + w * (x - mu) so a constant loss
    # sequence keeps mu1 exactly at the constant (no false clipping from rounding).
    if observations is None:
        ema1 = torch.lerp(mu1, batch_mean, 1.0 - beta1)
        ema2 = torch.lerp(mu2, batch_mean_sq, 1.0 - beta2)
    else:
        # Note [warm-up: where the default departs from the paper]. Once 1 / (k + 1) < 1 - beta
        # the clamp returns 1 - beta itself and lerp gives what the constant weight gives, bit for
        # bit. A scalar weight is applied in float32 at least (lerp's opmath), so a tensor weight
        # is too: in bfloat16 it would round 1 - beta and the two updates would differ.
        dtype = torch.promote_types(mu1.dtype, torch.float32)
        fresh = torch.reciprocal(observations.to(dtype) + 1.0)
        ema1 = torch.lerp(
            mu1.to(dtype), batch_mean.to(dtype), torch.clamp_min(fresh, 1.0 - beta1)
        ).to(mu1.dtype)
        ema2 = torch.lerp(
            mu2.to(dtype), batch_mean_sq.to(dtype), torch.clamp_min(fresh, 1.0 - beta2)
        ).to(mu2.dtype)
    new1 = torch.where(initialized, ema1, batch_mean)
    new2 = torch.where(initialized, ema2, batch_mean_sq + batch_mean * batch_mean)
    return (
        torch.where(finite, new1, mu1),
        torch.where(finite, new2, mu2),
        initialized | finite,
    )


class ALRC(nn.Module):
    r"""Adaptive learning rate clipping: limit each loss to ``mu1 + n_sigma * sigma``.

    Apply it to the unreduced loss, then reduce::

        alrc = ALRC()
        loss = alrc(F.mse_loss(pred, target, reduction="none")).mean()

    Any shape in, same shape out: a scalar, per-sample losses ``[B]`` or per-element losses
    ``[B, C, H, W]``; the moments are updated with means over all elements. In ``eval()`` mode it is
    the identity, so reported validation losses stay raw. The moments are buffers: ``.to(device)``,
    ``state_dict()`` and checkpoints carry them. Under ``torch.distributed`` the batch statistics
    are averaged over ranks (one all-reduce of three scalars per call), so every rank holds the
    same moments and clips alike.

    Args:
        n_sigma: clip to this many running standard deviations above the running mean
            (default 3; ``float("inf")`` disables clipping but keeps the statistics).
        beta1, beta2: decay rates of the running first and second raw moments (default 0.999).
        mu1_init, mu2_init: initial moments, both or neither; must satisfy
            ``mu2_init > mu1_init**2``. Left as None (default), the first finite training batch
            initialises them as an overestimate (``mu1 = mean(L)``, ``mu2 = mean(L**2) +
            mean(L)**2``, i.e. ``sigma >= mu1``) and is not clipped.
        warmup: True (default): the moments are the plain average of the batches seen so far,
            the initial moments counting as one batch, until ``1 / (k + 1)`` falls below
            ``1 - beta`` (``k`` batches in; 999 for 0.999), then the moving averages of the paper.
            The initial overestimate then fades as ``1 / k``, not as ``beta**k``, and the threshold
            comes down with the loss from the first steps of a run. False: Algorithm 1's
            constant decay from the start (the paper's behaviour; with 0.999, two thirds of the
            overestimate remain after 400 steps). See ``docs/alrc.md`` for the benchmark.
        eps: added to the variance under the square root (default 1e-8).
        update: ``"clipped"`` (default, the authors' code) updates the moments with the clipped
            losses; ``"raw"`` (Algorithm 1 as printed) with the raw ones.
        n_sigma_lower: if given, also raise losses below ``mu1 - n_sigma_lower * sigma`` to that
            bound by the same stop-gradient scale (the paper's discussion; off by default).
        shift: a constant added to the loss before clipping, for losses that can be negative
            (the paper's suggestion). Moments and bounds are of ``L + shift``; shifted losses
            ``<= 0`` are never scaled.

    Non-finite losses never enter the moments: a batch whose mean or mean square is not finite
    leaves them bitwise unchanged (its elements pass through unclipped).

    Examples:
        >>> alrc = ALRC(n_sigma=3.0)
        >>> for step in range(30):
        ...     loss = alrc(torch.rand(8) + 1.0).mean()
        >>> spike = alrc(torch.full((8,), 50.0))
        >>> bool(spike.max() < 50.0), float(alrc.stats()["clipped_fraction"])
        (True, 1.0)
    """

    mu1: Tensor
    mu2: Tensor
    initialized: Tensor
    num_updates: Tensor
    clipped_total: Tensor
    clipped_fraction: Tensor

    def __init__(
        self,
        n_sigma: float = 3.0,
        beta1: float = 0.999,
        beta2: float = 0.999,
        mu1_init: float | None = None,
        mu2_init: float | None = None,
        eps: float = 1e-8,
        update: str = "clipped",
        n_sigma_lower: float | None = None,
        shift: float = 0.0,
        warmup: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(warmup, bool):
            raise TypeError(f"warmup must be True or False, got warmup={warmup!r}")
        self.warmup = warmup
        self.n_sigma = check_positive("n_sigma", n_sigma, allow_inf=True)
        self.beta1 = check_unit_interval("beta1", beta1)
        self.beta2 = check_unit_interval("beta2", beta2)
        self.eps = check_nonnegative("eps", eps)
        self.update = check_choice("update", update, _UPDATES)
        self.n_sigma_lower = (
            None
            if n_sigma_lower is None
            else check_positive("n_sigma_lower", n_sigma_lower, allow_inf=True)
        )
        self.shift = check_finite("shift", shift)
        if (mu1_init is None) != (mu2_init is None):
            raise ValueError(
                "mu1_init and mu2_init must be given together or both left as None, got "
                f"mu1_init={mu1_init}, mu2_init={mu2_init}"
            )
        initialized = mu1_init is not None
        # Given initial moments count as one observation (warmup); a first batch that initialises
        # them is counted by num_updates like every later one.
        self._prior_observations = int(initialized)
        if mu1_init is not None and mu2_init is not None:
            m1 = check_finite("mu1_init", mu1_init)
            m2 = check_finite("mu2_init", mu2_init)
            if not (m2 > m1 * m1):
                raise ValueError(
                    "mu2_init must be greater than mu1_init**2 (a positive variance), got "
                    f"mu1_init={mu1_init}, mu2_init={mu2_init}"
                )
        else:
            m1 = m2 = 0.0
        self.register_buffer("mu1", torch.tensor(m1))
        self.register_buffer("mu2", torch.tensor(m2))
        self.register_buffer("initialized", torch.tensor(initialized))
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("clipped_total", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("clipped_fraction", torch.tensor(0.0))

    def extra_repr(self) -> str:
        parts = [f"n_sigma={self.n_sigma}", f"beta1={self.beta1}", f"beta2={self.beta2}"]
        if self.update != "clipped":
            parts.append(f"update={self.update!r}")
        if self.n_sigma_lower is not None:
            parts.append(f"n_sigma_lower={self.n_sigma_lower}")
        if self.shift != 0.0:
            parts.append(f"shift={self.shift}")
        if not self.warmup:
            parts.append("warmup=False")
        return ", ".join(parts)

    def _bounds(self) -> tuple[Tensor, Tensor, Tensor | None]:
        return alrc_bounds(
            self.mu1,
            self.mu2,
            n_sigma=self.n_sigma,
            eps=self.eps,
            n_sigma_lower=self.n_sigma_lower,
        )

    def forward(self, loss: Tensor) -> Tensor:
        """Clip ``loss`` (any shape) and, in training mode, update the running moments."""
        if not isinstance(loss, Tensor) or not loss.is_floating_point():
            raise TypeError(
                f"ALRC expects a floating-point loss tensor, got {type(loss).__name__}"
                + (f" of dtype {loss.dtype}" if isinstance(loss, Tensor) else "")
            )
        if not self.training:
            return loss
        threshold, _, lower = self._bounds()
        out, scaled, bound = alrc_clip(
            loss, threshold, lower, active=self.initialized, shift=self.shift
        )
        with torch.no_grad():
            stat_dtype = self.mu1.dtype
            if self.update == "clipped":
                x = bound.to(stat_dtype)
            else:
                x = loss.detach().to(stat_dtype) + self.shift
            batch = torch.stack([x.mean(), (x * x).mean()])
            # An inf loss clipped to the threshold is still a non-finite loss: judge the raw batch.
            batch = torch.where(torch.isfinite(loss.detach()).all(), batch, math.nan)
            if is_distributed():
                # Note [ALRC under DDP]: a rank with a non-finite batch contributes zeros and a
                # flag; any flag makes every rank skip the update, so the moments stay equal.
                finite = torch.isfinite(batch).all()
                packed = torch.cat([torch.where(finite, batch, 0.0), (~finite).to(batch)[None]])
                packed = all_reduce_sum(packed)
                batch = torch.where(packed[2] > 0, math.nan, packed[:2] / world_size())
            mu1, mu2, initialized = alrc_moment_update(
                self.mu1,
                self.mu2,
                self.initialized,
                batch[0],
                batch[1],
                beta1=self.beta1,
                beta2=self.beta2,
                observations=self.num_updates + self._prior_observations if self.warmup else None,
            )
            updated = torch.isfinite(batch).all()
            n_scaled = scaled.sum()
            # Note [rebind, don't mutate]: the moments feed the saved scale of this call's
            # backward. An in-place update lets torch.compile's partitioner recompute that scale
            # in backward from the *updated* buffer (a wrong gradient on clipping steps), so new
            # values are bound as new buffer tensors and the old ones stay intact.
            self.mu1 = mu1
            self.mu2 = mu2
            self.initialized = initialized
            self.num_updates = self.num_updates + updated.to(self.num_updates.dtype)
            self.clipped_total = self.clipped_total + n_scaled
            self.clipped_fraction = (n_scaled / max(scaled.numel(), 1)).to(self.clipped_fraction)
        return out

    def moments(self) -> dict[str, Tensor]:
        """The running statistics as they are now (the tensors themselves: a training call
        binds new ones, Note [rebind, don't mutate], so these keep their values), for
        :meth:`restore_moments_` when the step they led to is skipped."""
        return {name: getattr(self, name) for name in _MOMENTS}

    @torch.no_grad()
    def restore_moments_(self, saved: Mapping[str, Tensor], where: Tensor) -> None:
        """Put back the statistics of :meth:`moments` where ``where`` (a 0-d bool tensor) is
        True, on the device (no host read): the losses of a step that was skipped (a non-finite
        gradient) are not observations, as :class:`~steadystep.integrations.amp.skip_aware`
        does for a step GradScaler skipped."""
        for name, old in saved.items():
            current = getattr(self, name)
            setattr(self, name, torch.where(where.to(current.device), old, current))

    def check_state_dict(self, state_dict: Mapping[str, Any], prefix: str = "") -> None:
        """The checks a load runs before it changes anything (Note [what a load checks] of
        :mod:`steadystep.checkpoint`): each saved buffer (under ``prefix``) has the buffer's
        dtype, is finite, and the second moment and the counts are not negative. A NaN mean
        would turn clipping off for good (no loss compares above a NaN threshold)."""
        for name, buffer in self._buffers.items():
            value = state_dict.get(prefix + name)
            if not isinstance(value, Tensor) or buffer is None:
                continue  # missing or unexpected keys: nn.Module's own report
            where = f"{prefix + name!r}"
            check_dtype(value, buffer.dtype, owner="ALRC", where=where)
            nonnegative = name in ("mu2", "num_updates", "clipped_total", "clipped_fraction")
            check_finite_state(value, owner="ALRC", where=where, nonnegative=nonnegative)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # checked first, also when ALRC is a submodule of the model being loaded
        self.check_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        """Device-side statistics as 0-d tensors (no host sync).

        ``threshold`` and ``sigma`` are those the next training call will use (``threshold`` in
        loss units, i.e. minus ``shift``; ``inf`` before initialisation); ``clipped_fraction`` is
        the fraction of elements scaled by the last training call and ``clipped_total`` the count
        since construction; ``num_updates`` counts moment updates (non-finite batches excluded).
        """
        threshold, sigma, lower = self._bounds()
        threshold = torch.where(self.initialized, threshold - self.shift, math.inf)
        out = {
            "threshold": threshold,
            "sigma": sigma,
            "mu1": self.mu1.clone(),
            "mu2": self.mu2.clone(),
            "clipped_fraction": self.clipped_fraction.clone(),
            "clipped_total": self.clipped_total.clone(),
            "num_updates": self.num_updates.clone(),
        }
        if lower is not None:
            out["lower"] = torch.where(self.initialized, lower - self.shift, -math.inf)
        return out
