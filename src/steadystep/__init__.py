"""steadystep: training as fast as possible, but not faster.

Three published methods as one toolkit for PyTorch:

* :class:`ALRC` clips each loss to ``mu1 + n_sigma * sigma`` of its running moments.
* The agnostic learning-rate family (ALeRA, Ag-Adam, SALeRA, SPALeRA) with a catastrophe guard
  that rolls back one step and cuts the learning rate; its detectors (the paper's Page-Hinkley
  test and the rules used in practice, side by side) are in :mod:`steadystep.detectors`.
* :class:`CProp` scales any optimizer's update by the confidence that past gradients agree.

:func:`stabilize` composes the three around any optimizer, in the one order that works.

Note [lazy exports]
    ``import steadystep`` imports neither torch nor any submodule: each public name is imported
    from its module on first use (PEP 562 ``__getattr__``), and so is a submodule reached as an
    attribute (``steadystep.optim``). The ``steadystep`` command imports this package to answer
    ``--help`` and ``--version``, which need no torch (seconds to import); ``ss.ALRC``,
    ``from steadystep import ALRC`` and ``from steadystep import *`` work as with eager imports.
    The ``TYPE_CHECKING`` block below is the same table for type checkers and the API reference.

    One name needs care: the import system binds a submodule, once loaded, as an attribute of its
    package, so a first ``import steadystep.stabilize`` (by anyone) would hide the function
    :func:`stabilize` behind its module. The package's module type (``_Package``) binds the
    public object of that name instead, as the eager ``from ... import`` did.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (Note [lazy exports])
_EXPORTS = {
    "ALRC": "steadystep.alrc",
    "alrc_clip": "steadystep.alrc",
    "PageHinkley": "steadystep.detectors",
    "PageHinkleyPaper": "steadystep.detectors",
    "EWMRatio": "steadystep.detectors",
    "RollingZScore": "steadystep.detectors",
    "SpikeDetector": "steadystep.detectors",
    "ZClipDetector": "steadystep.detectors",
    "layer_groups": "steadystep.groups",
    "CatastropheGuard": "steadystep.guard",
    "TrainingDiverged": "steadystep.guard",
    "AgAdam": "steadystep.optim",
    "ALeRA": "steadystep.optim",
    "CProp": "steadystep.optim.cprop",
    "CPropAdam": "steadystep.optim.cprop",
    "CPropAdamW": "steadystep.optim.cprop",
    "CPropSGD": "steadystep.optim.cprop",
    "SALeRA": "steadystep.salera",
    "SPALeRA": "steadystep.salera",
    "Stabilized": "steadystep.stabilize",
    "stabilize": "steadystep.stabilize",
    "Monitor": "steadystep.telemetry",
    "SkippableIterable": "steadystep.data",
    "SkippableSampler": "steadystep.data",
    "Escalation": "steadystep.escalation",
}

if TYPE_CHECKING:
    from steadystep import agnostic
    from steadystep.alrc import ALRC, alrc_clip
    from steadystep.data import SkippableIterable, SkippableSampler
    from steadystep.detectors import (
        EWMRatio,
        PageHinkley,
        PageHinkleyPaper,
        RollingZScore,
        SpikeDetector,
        ZClipDetector,
    )
    from steadystep.escalation import Escalation
    from steadystep.groups import layer_groups
    from steadystep.guard import CatastropheGuard, TrainingDiverged
    from steadystep.optim import AgAdam, ALeRA
    from steadystep.optim.cprop import CProp, CPropAdam, CPropAdamW, CPropSGD
    from steadystep.salera import SALeRA, SPALeRA
    from steadystep.stabilize import Stabilized, stabilize
    from steadystep.telemetry import Monitor

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
    "Escalation",
    "Monitor",
    "PageHinkley",
    "PageHinkleyPaper",
    "RollingZScore",
    "SALeRA",
    "SPALeRA",
    "SkippableIterable",
    "SkippableSampler",
    "SpikeDetector",
    "Stabilized",
    "TrainingDiverged",
    "ZClipDetector",
    "agnostic",
    "alrc_clip",
    "layer_groups",
    "stabilize",
]


def __getattr__(name: str) -> Any:
    """A public name or a submodule, imported on first use (Note [lazy exports])."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups do not come here
        return value
    if not name.startswith("__"):
        try:  # a submodule: the import binds it as an attribute of this package
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # a dependency of the submodule is missing
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(ModuleType):
    """This package's module type: a public name keeps its object when the import system binds
    the submodule of the same name (``steadystep.stabilize``; Note [lazy exports])."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
