"""Catastrophe detectors for :class:`~steadystep.CatastropheGuard`, side by side.

* :class:`~steadystep.PageHinkleyPaper` (alias :class:`~steadystep.PageHinkley`): the
  Page-Hinkley test exactly as SALeRA's paper publishes it.
* :class:`RollingZScore`: OLMo-core's skip-step rule (loss and gradient norm above mean +
  sigma * std of a rolling window).
* :class:`EWMRatio`: metaseq's loss over its exponentially weighted average.
* :class:`ZClipDetector`: ZClip's EMA z-score of the gradient norm.
* :class:`SpikeDetector`: steadystep's own, a rolling z-score of the loss and the gradient norm
  with a short warm-up and clipped window updates; the default of the guard.

All share one contract (:class:`~steadystep.detectors.protocol.ChangeDetector`, implemented
by the shell :mod:`steadystep.detectors._base`): ``update(loss, *, grad_norm=None,
skip=None)`` returns a 0-d bool alarm without a host sync, a non-finite loss is an alarm that
changes nothing, ``state_dict`` resumes bitwise, and the loss is averaged over ranks under
torch.distributed. :mod:`steadystep.detectors.reference` restates each in plain Python.
"""

from steadystep.detectors._base import Detector
from steadystep.detectors.ewm_ratio import EWMRatio
from steadystep.detectors.norm import global_grad_norm
from steadystep.detectors.page_hinkley import PageHinkley, PageHinkleyPaper
from steadystep.detectors.rolling import RollingZScore
from steadystep.detectors.spike import SpikeDetector
from steadystep.detectors.zclip import ZClipDetector

__all__ = [
    "ChangeDetector",
    "Detector",
    "EWMRatio",
    "PageHinkley",
    "PageHinkleyPaper",
    "RollingZScore",
    "SpikeDetector",
    "ZClipDetector",
    "as_detector",
    "global_grad_norm",
]
