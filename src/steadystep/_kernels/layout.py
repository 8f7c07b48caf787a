"""The hyperparameter rows the kernels read, named once (Note [hyperparameter layout]).

Note [hyperparameter layout]
    A kernel call hands its hyperparameters over as one row: the C kernels read it as a struct
    (``hyper_t`` of kernels_cprop.c, ``alera_hyper_t`` of kernels_alera.c), :mod:`._cpu` builds
    that struct with ctypes, and the Triton kernels load the columns of a float64 device row.
    The field lists below are the one description of those rows: the ctypes structs are made
    from them, the Triton kernels name each column by its field (:func:`column`), and
    tests/test_kernels.py checks that the C structs declare the same fields in the same order.
    A field added here and not in the C struct (or the other way round) fails that test rather
    than shifting every later column.
"""

from __future__ import annotations

import math

__all__ = [
    "ALERA_HYPER_FIELDS",
    "CPROP_HYPER_FIELDS",
    "column",
    "cprop_hyper_row",
]

# hyper_t: CProp's native steps and the wrapper's passes (every field a double)
CPROP_HYPER_FIELDS: tuple[str, ...] = (
    "lr",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "cprop_beta",
    "cprop_c",
    "cprop_eps",
    "cdf_constant",
    "momentum",
    "dampening",
)

# alera_hyper_t: ALeRA / Ag-Adam's step, (name, C type)
ALERA_HYPER_FIELDS: tuple[tuple[str, str], ...] = (
    ("alpha", "double"),
    ("C", "double"),
    ("norm_eps", "double"),
    ("limit", "double"),
    ("stats_max", "double"),
    ("stats_tiny", "double"),
    ("log_bound", "double"),
    ("total_numel", "double"),  # D: the elements of "param" granularity's one unit
    ("beta1", "double"),  # Ag-Adam's
    ("beta2", "double"),
    ("eps", "double"),
    ("param_wise", "int"),
    ("adam", "int"),
    ("advance_adam_steps", "int"),  # 0 when Adam's step counts are among the counters
)


def column(name: str) -> int:
    """The column of ``name`` in the CProp hyperparameter row."""
    return CPROP_HYPER_FIELDS.index(name)


def cprop_hyper_row(
    *,
    cdf_constant: float,
    lr: float = 0.0,
    beta1: float = 0.0,
    beta2: float = 0.0,
    eps: float = 0.0,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    cprop_beta: float,
    cprop_c: float,
    cprop_eps: float,
) -> tuple[float, ...]:
    """The row of :data:`CPROP_HYPER_FIELDS` (floats); fields a step does not use are 0, and
    ``cprop_c = inf`` (no scaling, chosen at compile time) is stored as 1."""
    values = {
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "eps": eps,
        "weight_decay": weight_decay,
        "cprop_beta": cprop_beta,
        "cprop_c": 1.0 if math.isinf(cprop_c) else cprop_c,
        "cprop_eps": cprop_eps,
        "cdf_constant": cdf_constant,
        "momentum": momentum,
        "dampening": dampening,
    }
    return tuple(float(values[name]) for name in CPROP_HYPER_FIELDS)
