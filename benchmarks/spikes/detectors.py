"""The detectors the spike benchmark compares, each with the threshold it sweeps.

Every family is a plain-Python reference (``steadystep.detectors.reference``) for the offline
sweep and the matching tensor detector for the guarded runs; only the threshold varies, the
other hyperparameters stay at their public defaults. ``default`` is the setting the rule's
source publishes (None: it publishes none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from steadystep import EWMRatio, PageHinkleyPaper, RollingZScore, SpikeDetector, ZClipDetector
from steadystep.detectors.reference import (
    PlainEWMRatio,
    PlainPageHinkley,
    PlainRollingZScore,
    PlainSpikeDetector,
    PlainZClip,
)

__all__ = ["FAMILIES", "Family"]


@dataclass(frozen=True)
class Family:
    key: str
    label: str  # rule and source, for tables and legends
    threshold: str  # the hyperparameter swept
    grid: tuple[float, ...]
    default: float | None
    plain: Callable[[float, float], Any]  # (threshold, rho) -> plain detector
    tensor: Callable[[float, float], Any]  # (threshold, rho) -> steadystep detector


FAMILIES = (
    Family(
        "page_hinkley",
        "Page-Hinkley, paper (SALeRA)",
        "ph_lambda",
        (0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
        0.1,
        lambda t, rho: PlainPageHinkley(t, rho),
        lambda t, rho: PageHinkleyPaper(ph_lambda=t, rho=rho),
    ),
    Family(
        "rolling_zscore",
        "rolling z-score, loss + grad norm (OLMo-core)",
        "sigma",
        (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0),
        6.0,
        lambda t, rho: PlainRollingZScore(sigma=t),
        lambda t, rho: RollingZScore(sigma=t),
    ),
    Family(
        "ewm_ratio",
        "loss / EWM ratio (metaseq)",
        "threshold",
        (1.5, 2.0, 3.0, 4.0, 6.0, 10.0, 20.0),
        None,
        lambda t, rho: PlainEWMRatio(t),
        lambda t, rho: EWMRatio(threshold=t),
    ),
    Family(
        "zclip",
        "EMA z-score of grad norm (ZClip)",
        "z_thresh",
        (2.5, 3.0, 4.0, 6.0, 8.0, 10.0, 15.0, 20.0, 30.0),
        2.5,
        lambda t, rho: PlainZClip(z_thresh=t),
        lambda t, rho: ZClipDetector(z_thresh=t),
    ),
    Family(
        "spike",
        "SpikeDetector (steadystep)",
        "sigma",
        (3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0),
        None,
        lambda t, rho: PlainSpikeDetector(sigma=t),
        lambda t, rho: SpikeDetector(sigma=t),
    ),
)
