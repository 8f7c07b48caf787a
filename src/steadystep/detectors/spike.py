"""steadystep's spike detector: a rolling z-score that starts early and is not blinded by spikes.

The rule of :class:`~steadystep.RollingZScore` (OLMo-core's), with three changes that
``benchmarks/bench_spikes.py`` motivates (``docs/detectors.md``). For each watched signal (the
loss, and the global gradient norm when given), with ``W_t`` the last ``window`` stored values:

.. math::
    \\mu_t = \\operatorname{mean}(W_t), \\quad
    s_t = \\max\\big(\\operatorname{std}(W_t),\\ 10^{-3}|\\mu_t|\\big), \\quad
    \\tau_t = \\begin{cases} \\mu_t + \\sigma s_t & n_t + 1 \\ge \\text{warmup} \\\\
        m_t + (f - 1)|m_t|,\\ m_t = \\min W_t & \\text{before (the loss only; } +\\infty
        \\text{ for the first value)}\\end{cases}\\\\
    \\text{alarm}_t = x_t > \\tau_t, \\qquad W_{t+1} = W_t \\cup \\{\\min(x_t, \\tau_t)\\}

with ``n_t`` the values seen since the last reset and ``f`` the ``warmup_factor``.

1. A short warm-up (8 values, not ``max(20, window // 2)``): catastrophes are most common early,
   at the largest learning rates, and a decaying loss's window is wide then (its trend inflates
   the standard deviation), so testing early costs no false alarms on the benchmark's runs.
   During the warm-up a loss above ``warmup_factor`` (10) times the smallest loss so far alarms
   (the gradient norm is not tested then): a run that diverges from its first steps (a learning
   rate far too high) is stopped before its exploding losses fill the window, which would hide
   the divergence from a z-score. 10, not 3: early losses can jump 2-4x and come back by
   themselves, and halving the learning rate for such a bump costs more than it saves.
2. A value above the threshold enters the window clipped to the threshold (winsorized). An
   accepted spike would inflate the window's standard deviation for ``window`` steps and hide
   the next fault behind it; a clipped one raises it only slightly, and a lasting rise of the
   level still moves the window (each clipped value pulls the mean and the spread up), so the
   test cannot alarm forever on a new plateau.
3. The scale has a floor of ``1e-3 |mean|``: a window of identical values (std 0) would
   otherwise alarm on any increase, however small, and keep alarming (the clipped value would
   equal the mean).

A non-finite loss or gradient norm is an alarm that leaves the windows untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from steadystep._kernels.decision import WindowSettings, settings
from steadystep._validation import check_positive
from steadystep.detectors.rolling import WindowPair, _check_int

__all__ = ["SCALE_FLOOR", "SpikeDetector", "clipped_window_test"]

SCALE_FLOOR = 1e-3  # the scale is at least this fraction of |mean|


def clipped_window_test(
    window: torch.Tensor,
    count: torch.Tensor,
    x: torch.Tensor,
    *,
    sigma: float,
    warmup: int,
    warmup_factor: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(change, window with min(x, threshold) stored, threshold)`` (pure).

    ``window`` is a ring buffer whose first ``min(count, len(window))`` slots hold the last
    stored values. In the warm-up the threshold is ``m + (warmup_factor - 1) |m|`` with ``m``
    the smallest stored value (+inf for the first value, or when ``warmup_factor`` is None).
    """
    size = window.numel()
    n = count.clamp(max=size)
    filled = torch.arange(size, device=window.device) < n
    nf = n.to(window.dtype)
    mean = torch.where(filled, window, 0.0).sum() / nf
    std = (torch.where(filled, window - mean, 0.0).square().sum() / (nf - 1)).sqrt()
    scale = torch.maximum(std, SCALE_FLOOR * mean.abs())
    early = torch.full_like(mean, torch.inf)
    if warmup_factor is not None:
        low = torch.where(filled, window, torch.inf).min()
        early = torch.where(count > 0, low + (warmup_factor - 1.0) * low.abs(), early)
    threshold = torch.where(count >= warmup - 1, mean + sigma * scale, early)
    change = ~(x <= threshold)  # NaN-aware (a NaN threshold alarms)
    stored = torch.minimum(x, threshold)
    return change, window.index_copy(0, (count % size).reshape(1), stored.reshape(1)), threshold


class SpikeDetector(WindowPair):
    """Alarm when the loss or the gradient norm jumps above ``mean + sigma * std`` of its
    recent window; steadystep's default detector (see the module docstring for the rule).

    Args:
        window: values in each rolling window (default 128), a ring buffer on the device.
        sigma: threshold in standard deviations (default 10.0, chosen by
            ``benchmarks/bench_spikes.py``: ``docs/detectors.md``).
        warmup: values (the current one included) before the z-test starts, counted since the
            last reset (default 8; >= 3).
        warmup_factor: in the warm-up, a loss alarms above ``warmup_factor`` times the smallest
            loss seen so far (``m + (warmup_factor - 1) |m|`` for a negative one; default 10.0;
            > 1). The gradient norm is not tested in the warm-up (it moves a lot at the start).
        dtype, device: of the statistics (default float32, CPU; they move to the loss's
            device at the first :meth:`update`).

    ``needs_grad_norm`` is True: a :class:`~steadystep.CatastropheGuard` computes the global
    gradient norm once per step and passes it; without ``grad_norm`` the loss alone is tested.
    Nothing depends on the dataset or batch size.

    Examples:
        >>> import torch, steadystep as ss
        >>> det = ss.SpikeDetector(warmup=4)
        >>> losses = (2.0, 1.8, 1.7, 1.5, 1.45, 1.4, 9.0, 1.35)
        >>> [bool(det.update(torch.tensor(x))) for x in losses]
        [False, False, False, False, False, False, True, False]
    """

    _HPARAMS = ("window", "sigma", "warmup", "warmup_factor")

    def __init__(
        self,
        window: int = 128,
        sigma: float = 10.0,
        warmup: int = 8,
        warmup_factor: float = 10.0,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        hp = self._check_hparams(
            {"window": window, "sigma": sigma, "warmup": warmup, "warmup_factor": warmup_factor}
        )
        for key, value in hp.items():
            setattr(self, key, value)
        super().__init__(dtype=dtype, device=device)

    def _check_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        factor = check_positive("warmup_factor", hparams["warmup_factor"])
        if not factor > 1.0:
            raise ValueError(f"warmup_factor must be > 1, got warmup_factor={factor}")
        return {
            "window": _check_int("window", hparams["window"], 2),
            "sigma": check_positive("sigma", hparams["sigma"]),
            "warmup": _check_int("warmup", hparams["warmup"], 3),
            "warmup_factor": factor,
        }

    def _test(
        self, signal: str, window: torch.Tensor, count: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        # the gradient norm is not tested in the warm-up
        factor = self.warmup_factor if signal == "loss" else None
        return clipped_window_test(
            window, count, x, sigma=self.sigma, warmup=self.warmup, warmup_factor=factor
        )

    def _kernel_hyper(self) -> WindowSettings | None:
        if type(self) is not SpikeDetector:  # a subclass may change any hook of the shell
            return None
        size = self.loss_window.numel()  # the tensors' size: the kernel indexes them
        hp = (self.sigma, self.warmup_factor, SCALE_FLOOR, size, self.warmup, True)
        return settings(WindowSettings, *hp)

    def stats(self) -> dict[str, torch.Tensor]:
        """0-d tensors: the threshold each signal's next value is tested against, the counts,
        alarms."""
        out = {}
        for name, count, (threshold,) in self._signal_stats():
            out.update({f"{name}_threshold": threshold, f"{name}_count": count})
        return {**out, "alarms": self.alarms}
