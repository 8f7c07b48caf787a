"""How much each experiment runs at each ``--scale``: plain data, importable without torch.

The ``steadystep`` command reads it for its help (the scales and the seeds each experiment runs
at each) before it imports anything heavy; each experiment's ``plan`` reads its own table from
here (``running.SCALES`` of :mod:`steadystep.experiments.alrc`, ``.salera`` and ``.cprop``).

Examples:
    >>> TABLES["alrc"]["tiny"]["seeds"]
    1
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ALRC",
    "CPROP",
    "CPROP_OPTIMIZERS",
    "SALERA",
    "SCALES",
    "SCALE_HELP",
    "TABLES",
]

SCALES = ("tiny", "demo", "quick", "paper")
# What each scale is for, in the command's help.
SCALE_HELP = {
    "tiny": "seconds: a smoke test of the whole pipeline (what the test-suite runs); its "
    "numbers and verdicts mean nothing",
    "demo": "one to three minutes per experiment on a 2-core CPU",
    "quick": "a larger grid, minutes to a few hours per experiment on a 2-core CPU",
    "paper": "the paper's grid, iterations and model sizes (days to years on a CPU: use a GPU "
    "and --data-dir with the paper's dataset)",
}

# ALRC (steadystep.experiments.alrc)
# scale -> (steps, batch sizes, thresholds, losses, width, seeds, final-window fraction, dataset)
ALRC: dict[str, dict[str, Any]] = {
    "tiny": dict(steps=6, batch_sizes=(1, 4), thresholds=("3", "inf"), width=1 / 16, seeds=1),
    "demo": dict(steps=1000, batch_sizes=(1,), thresholds=("3", "inf"), width=1 / 8, seeds=3),
    "quick": dict(
        steps=1500, batch_sizes=(1, 4, 16), thresholds=("2", "3", "4", "inf"), width=1 / 8, seeds=2
    ),
    "paper": dict(
        steps=100_000,
        batch_sizes=(1, 4, 16, 64),
        thresholds=("2", "3", "4", "inf"),
        width=1.0,
        seeds=10,
    ),
}

# SALeRA (steadystep.experiments.salera); its hyperparameter grids are in its running module.
SALERA: dict[str, dict[str, Any]] = {
    "tiny": dict(models=("M2",), epochs=2, early=1, seeds=1, n_train=200, evals=2),
    # 20 epochs everywhere but tiny: the paper's failure criterion is the test error at 20.
    "demo": dict(models=("M2",), epochs=20, early=5, seeds=2, n_train=None, evals=2),
    "quick": dict(
        models=("M0", "M2", "M2b", "M4"), epochs=20, early=5, seeds=2, n_train=None, evals=4
    ),
    "paper": dict(
        models=("M0", "M2", "M2b", "M4"), epochs=20, early=5, seeds=5, n_train=None, evals=4
    ),
}

# CProp (steadystep.experiments.cprop)
CPROP_OPTIMIZERS = ("SGD", "Adam", "RMSprop", "AMSGrad")
_CPROP_GRID: dict[str, Any] = dict(
    models=("FC", "CNN"),
    optimizers=CPROP_OPTIMIZERS,
    seeds=3,
    n_train=None,
    lr_factors=(1 / 3, 1.0, 3.0, 9.0),
    sweep=(3.0, 9.0, 27.0),
)
CPROP: dict[str, dict[str, Any]] = {
    "tiny": dict(
        models=("FC",),
        optimizers=("SGD", "Adam"),
        epochs=1,
        seeds=1,
        n_train=320,
        evals=2,
        lr_factors=(1.0, 3.0),
        sweep=(3.0,),
    ),
    "demo": dict(
        models=("FC",),
        optimizers=("SGD", "Adam"),
        epochs=4,
        seeds=3,
        n_train=None,
        evals=2,
        lr_factors=(1.0, 3.0, 9.0),
        sweep=(3.0, 9.0, 27.0),
    ),
    # quick and paper: the paper's whole grid, paper with its 20 epochs
    "quick": dict(_CPROP_GRID, epochs=10, evals=2),
    "paper": dict(_CPROP_GRID, epochs=20, evals=4),
}

TABLES = {"alrc": ALRC, "salera": SALERA, "cprop": CPROP}
