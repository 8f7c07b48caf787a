"""steadystep: training as fast as possible, but not faster.

Three published methods as one toolkit for PyTorch:

* :class:`ALRC` clips each loss to ``mu1 + n_sigma * sigma`` of its running moments.
* The agnostic learning-rate family (ALeRA, Ag-Adam, SALeRA, SPALeRA) with a Page-Hinkley
  catastrophe guard that rolls back one step and cuts the learning rate.
* :class:`CProp` scales any optimizer's update by the confidence that past gradients agree.
"""

from steadystep.alrc import ALRC, alrc_clip
from steadystep.telemetry import Monitor

__version__ = "0.1.0"

__all__ = [
    "ALRC",
    "Monitor",
    "alrc_clip",
]
