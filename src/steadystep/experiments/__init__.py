"""Reproductions of the three papers, run by the ``steadystep`` command.

``get_experiment(name)`` returns an experiment's module; each module defines ``name``, ``title``,
``requires`` (the public steadystep names it uses), ``plan``, ``run``, ``summarize``,
``figures``, ``markdown`` and ``terminal`` (see :class:`~steadystep.experiments.runner.Experiment`).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXPERIMENTS", "get_experiment", "missing_api"]

EXPERIMENTS = ("alrc", "salera", "cprop")


def get_experiment(name: str) -> ModuleType:
    """The experiment module called ``name`` (imported on first use)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {EXPERIMENTS}, got {name!r}")
    return importlib.import_module(f"steadystep.experiments.{name}")


def missing_api(name: str) -> list[str]:
    """Public steadystep names that experiment ``name`` needs but this install lacks."""
    try:
        import steadystep
    except ImportError as e:  # the package itself is broken: name the cause
        return [f"steadystep ({e})"]
    return [n for n in get_experiment(name).requires if not hasattr(steadystep, n)]
