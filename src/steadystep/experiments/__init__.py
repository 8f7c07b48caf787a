"""Reproductions of the three papers, run by the ``steadystep`` command.

``EXPERIMENTS`` names them, in the order ``steadystep demo`` runs them; ``get_experiment(name)``
returns an experiment's package, which implements
:class:`~steadystep.experiments.runner.Experiment` (``name``, ``title``, ``requires`` (the public
steadystep names it uses), ``plan``, ``prepare``, ``flops`` (a rough compute estimate of one
run), ``run``, ``summarize``, ``figures``, ``markdown`` and ``terminal``), running in its
``running`` module and reporting in its ``reporting`` module. ``SUMMARIES`` says in one line
what each runs and ``default_seeds`` how many seeds it runs at each scale, for the command's
help.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXPERIMENTS", "SUMMARIES", "default_seeds", "get_experiment", "missing_api"]

EXPERIMENTS = ("alrc", "salera", "cprop")
SUMMARIES = {
    "alrc": "2x supersampling, squared/quartic errors, thresholds 2/3/4/inf by batch size.",
    "salera": "NAG/Adagrad/Adam/Ag-Adam/ALeRA/SALeRA/SPALeRA on models M0/M2/M2b/M4.",
    "cprop": "SGD/Adam/RMSprop/AMSGrad with and without CProp, FC and CNN, scale histogram, c "
    "sweep.",
}


def get_experiment(name: str) -> ModuleType:
    """The experiment package called ``name`` (imported on first use)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {EXPERIMENTS}, got {name!r}")
    return importlib.import_module(f"steadystep.experiments.{name}")


def default_seeds(name: str, scale: str) -> int:
    """The number of seeds experiment ``name`` runs at ``scale`` when ``--seeds`` is not given
    (read from :mod:`steadystep.experiments.scales`, the table its ``plan`` uses; no torch).

    Examples:
        >>> default_seeds("alrc", "demo")
        3
    """
    from steadystep.experiments.scales import TABLES

    return int(TABLES[name][scale]["seeds"])


def missing_api(name: str) -> list[str]:
    """Public steadystep names that experiment ``name`` needs but this install lacks."""
    try:
        import steadystep
    except ImportError as e:  # the package itself is broken: name the cause
        return [f"steadystep ({e})"]
    return [n for n in get_experiment(name).requires if not hasattr(steadystep, n)]
