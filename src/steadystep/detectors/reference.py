"""Plain-Python restatements of every detector (floats and lists, one observation at a time).

Each follows its rule line by line, for reading and for tests: the tensor detectors must take
the same decisions and hold the same statistics (to rounding) on any sequence. They are also
fast enough on the host to sweep thresholds over recorded loss traces
(``benchmarks/bench_spikes.py`` does). ``update(loss, grad_norm=None) -> bool``; a non-finite
loss or gradient norm is an alarm that changes nothing, as in the tensor detectors.
"""

from __future__ import annotations

import copy
import math
from collections import deque

__all__ = [
    "PlainEWMRatio",
    "PlainPageHinkley",
    "PlainRollingZScore",
    "PlainSpikeDetector",
    "PlainZClip",
]


def _finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


class _Plain:
    needs_grad_norm = False

    def copy(self):
        return copy.deepcopy(self)


class PlainPageHinkley(_Plain):
    """:class:`~steadystep.PageHinkleyPaper`: Page-Hinkley on the relaxed loss."""

    def __init__(self, ph_lambda: float = 0.1, rho: float = 0.01) -> None:
        self.ph_lambda, self.rho = ph_lambda, rho
        self.delta: float | None = None
        self.n = 0
        self.relaxed = self.mean = self.U = self.U_min = 0.0

    def update(self, loss: float, grad_norm: float | None = None) -> bool:
        if not math.isfinite(loss):
            return True
        if self.delta is None:
            self.delta = self.ph_lambda * abs(loss)
        self.n += 1
        w = max(1.0 / self.n, self.rho)
        self.relaxed = self.relaxed + w * (loss - self.relaxed)
        self.mean = self.mean + (self.relaxed - self.mean) / self.n
        self.U = self.U + (self.relaxed - self.mean)
        self.U_min = min(self.U_min, self.U)
        alarm = self.n > 1 and self.U - self.U_min > self.delta
        if alarm:
            self.n = 0
            self.relaxed = self.mean = self.U = self.U_min = 0.0
        return alarm


class _Window:
    """One signal of the rolling z-score: the last ``size`` values and a count."""

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.count = 0

    def test(self, x: float, sigma: float, warmup: int) -> bool:
        alarm = False
        if self.count + 1 >= warmup:
            n = len(self.values)
            mean = sum(self.values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / (n - 1))
            alarm = x - mean > sigma * std
        self.values.append(x)
        self.count += 1
        return alarm


class PlainRollingZScore(_Plain):
    """:class:`~steadystep.RollingZScore`: OLMo-core's skip-step rule."""

    needs_grad_norm = True

    def __init__(self, window: int = 128, sigma: float = 6.0, warmup: int | None = None) -> None:
        self.sigma = sigma
        self.warmup = max(20, window // 2) if warmup is None else warmup
        self.loss = _Window(window)
        self.grad_norm = _Window(window)

    def update(self, loss: float, grad_norm: float | None = None) -> bool:
        if not _finite(loss, grad_norm):
            return True
        alarm = self.loss.test(loss, self.sigma, self.warmup)
        if grad_norm is not None:
            alarm = self.grad_norm.test(grad_norm, self.sigma, self.warmup) or alarm
        return alarm


class PlainEWMRatio(_Plain):
    """:class:`~steadystep.EWMRatio`: metaseq's loss to moving-average ratio."""

    def __init__(self, threshold: float = 3.0, span: float = 9.0) -> None:
        self.threshold, self.alpha = threshold, 2.0 / (span + 1.0)
        self.ewm: float | None = None

    def update(self, loss: float, grad_norm: float | None = None) -> bool:
        if not math.isfinite(loss):
            return True
        previous = loss if self.ewm is None else self.ewm
        alarm = loss > self.threshold * previous
        self.ewm = previous if alarm else (1.0 - self.alpha) * previous + self.alpha * loss
        return alarm


class PlainZClip(_Plain):
    """:class:`~steadystep.ZClipDetector`: ZClip's EMA z-score of the gradient norm."""

    needs_grad_norm = True

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        eps: float = 1e-6,
        skip_update_on_alarm: bool = False,
    ) -> None:
        self.alpha, self.z_thresh, self.warmup, self.eps = alpha, z_thresh, warmup, eps
        self.skip_update_on_alarm = skip_update_on_alarm
        self.buffer: list[float] = []
        self.initialized = False
        self.mean = self.var = 0.0

    def update(self, loss: float, grad_norm: float | None = None) -> bool:
        if grad_norm is None:
            raise ValueError("PlainZClip needs grad_norm")
        if not _finite(loss, grad_norm):
            return True
        if not self.initialized:
            self.buffer.append(grad_norm)
            if len(self.buffer) == self.warmup:
                self.mean = sum(self.buffer) / self.warmup
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / self.warmup
                self.initialized = True
            return False
        std = math.sqrt(self.var)
        z = (grad_norm - self.mean) / (std + self.eps)
        alarm = z > self.z_thresh
        if alarm and self.skip_update_on_alarm:
            return True
        x = self.mean + self.z_thresh * std / (z / self.z_thresh) if alarm else grad_norm
        self.mean = self.alpha * self.mean + (1.0 - self.alpha) * x
        self.var = self.alpha * self.var + (1.0 - self.alpha) * (x - self.mean) ** 2
        return alarm


class _ClippedWindow:
    """One signal of the spike detector: the last ``size`` stored (clipped) values."""

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.count = 0

    def test(self, x: float, sigma: float, warmup: int, factor: float | None) -> bool:
        threshold = math.inf
        if self.count + 1 >= warmup:
            n = len(self.values)
            mean = sum(self.values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / (n - 1))
            threshold = mean + sigma * max(std, 1e-3 * abs(mean))
        elif self.count > 0 and factor is not None:
            low = min(self.values)
            threshold = low + (factor - 1.0) * abs(low)
        self.values.append(min(x, threshold))
        self.count += 1
        return x > threshold


class PlainSpikeDetector(_Plain):
    """:class:`~steadystep.SpikeDetector`: the winsorized rolling z-score."""

    needs_grad_norm = True

    def __init__(
        self, window: int = 128, sigma: float = 10.0, warmup: int = 8, warmup_factor: float = 10.0
    ) -> None:
        self.sigma, self.warmup, self.warmup_factor = sigma, warmup, warmup_factor
        self.loss = _ClippedWindow(window)
        self.grad_norm = _ClippedWindow(window)

    def update(self, loss: float, grad_norm: float | None = None) -> bool:
        if not _finite(loss, grad_norm):
            return True
        alarm = self.loss.test(loss, self.sigma, self.warmup, self.warmup_factor)
        if grad_norm is not None:
            alarm = self.grad_norm.test(grad_norm, self.sigma, self.warmup, None) or alarm
        return alarm
