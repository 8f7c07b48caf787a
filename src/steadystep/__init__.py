"""steadystep: training as fast as possible, but not faster.

Three published methods as one toolkit for PyTorch:

* :class:`ALRC` clips each loss to ``mu1 + n_sigma * sigma`` of its running moments.
* The agnostic learning-rate family (ALeRA, Ag-Adam, SALeRA, SPALeRA) with a catastrophe guard
  that rolls back one step and cuts the learning rate; its detectors (the paper's Page-Hinkley
  test and the rules used in practice, side by side) are in :mod:`steadystep.detectors`.
* :class:`CProp` scales any optimizer's update by the confidence that past gradients agree.

:func:`stabilize` composes the three around any optimizer, in the one order that works.
"""

from steadystep import agnostic
from steadystep.alrc import ALRC, alrc_clip
from steadystep.detectors import EWMRatio, RollingZScore, SpikeDetector, ZClipDetector
from steadystep.detectors.page_hinkley import PageHinkley, PageHinkleyPaper
from steadystep.groups import layer_groups
from steadystep.guard import CatastropheGuard, TrainingDiverged
from steadystep.optim import AgAdam, ALeRA
from steadystep.optim.cprop import CProp, CPropAdam, CPropAdamW, CPropSGD
from steadystep.salera import SALeRA, SPALeRA
from steadystep.stabilize import Stabilized, stabilize
from steadystep.telemetry import Monitor

__version__ = "0.1.0"

__all__ = [
    "ALRC",
    "ALeRA",
    "AgAdam",
    "CProp",
    "CPropAdam",
    "CPropAdamW",
    "CPropSGD",
    "CatastropheGuard",
    "EWMRatio",
    "Monitor",
    "PageHinkley",
    "PageHinkleyPaper",
    "RollingZScore",
    "SALeRA",
    "SPALeRA",
    "SpikeDetector",
    "Stabilized",
    "TrainingDiverged",
    "ZClipDetector",
    "agnostic",
    "alrc_clip",
    "layer_groups",
    "stabilize",
]
