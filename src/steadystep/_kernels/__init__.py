"""steadystep's fused multi-tensor kernels: one call per step for a whole parameter list.

Each function takes tensor lists and hyperparameters like the functional cores in
:mod:`steadystep.optim` and does the same arithmetic in one kernel call per list, instead of
one op (or one compiled call) per tensor: on CPU the C library of :mod:`._cpu` (Note [CPU
kernels]), on CUDA the Triton kernels of :mod:`._triton` (Note [Triton kernels]). Each returns
False, having touched nothing, when it cannot take the tensors (another device, a dtype without
a kernel, non-contiguous memory, no C compiler or no Triton, ``STEADYSTEP_FUSED=0``); the
caller then takes its reference or foreach path, or raises :class:`FusedUnsupportedError` where
``fused=True`` was asked for. Host work per call is building pointer
arrays, O(number of tensors) in Python, and no read of any tensor's value.

Note [huge gradients]
    Second-moment statistics hold ``g**2``; a finite gradient whose square overflows would put
    inf (then NaN) into them. Every steadystep optimizer therefore treats a gradient element
    above :func:`gradient_limit` (``2**63`` ~ 9.2e18 for float32 statistics, ``2**511`` for
    float64) like a non-finite one and skips the step: squares and their EMA sums stay a factor
    3 or more below the largest finite value. Fused and reference paths apply the same rule.
"""

from steadystep._kernels._common import (
    CDF_CONSTANT,
    FusedUnsupportedError,
    enabled,
    grad_stats,
    gradient_limit,
    grads_ok,
    stats_dtype,
)
from steadystep._kernels.alera import alera_
from steadystep._kernels.cprop import adam_, sgd_, wrapper_pass_
from steadystep._kernels.rollback import rollback_

__all__ = [
    "CDF_CONSTANT",
    "FusedUnsupportedError",
    "adam_",
    "alera_",
    "enabled",
    "grad_stats",
    "gradient_limit",
    "grads_ok",
    "rollback_",
    "sgd_",
    "stats_dtype",
    "wrapper_pass_",
]
