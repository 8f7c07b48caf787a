"""What the kernel entry points share: backend choice, support checks, ctypes plumbing."""

from __future__ import annotations

import array
import ctypes
import functools
import math
import os
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import Tensor

from steadystep._kernels import _cpu
from steadystep._kernels.dtypes import gradient_limit, stats_dtype
from steadystep._kernels.layout import cprop_hyper_row

__all__ = [
    "CDF_CONSTANT",
    "PARAM_CODE",
    "FusedUnsupportedError",
    "backend",
    "check_flag",
    "cprop_hyper_values",
    "doubles",
    "enabled",
    "grad_stats",
    "gradient_limit",
    "grads_ok",
    "int64s",
    "lr_multiplier_of",
    "numels",
    "pointers",
    "scale_config",
    "stats_dtype",
    "status",
    "steps_ok",
    "threads",
    "triton",
]

PARAM_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
_STRIDED = torch.strided
_Parameter = torch.nn.Parameter
_METHOD_CODE = {"conformity": 0, "relative": 1, "moment": 2}
_CDF_CODE = {"normal": 0, "bft": 1, "bfo": 2, "logistic": 3}
# x = |m_hat| / se enters erf or tanh scaled by this (folded into the coefficients)
CDF_CONSTANT = {
    "normal": 1.0 / math.sqrt(2.0),
    "bft": 1.0,
    "bfo": 1.702 / 2.0,
    "logistic": math.pi / math.sqrt(3.0) / 2.0,
}


class FusedUnsupportedError(RuntimeError):
    """A step asked for ``fused=True`` whose inputs the fused kernels cannot take: ``owner``
    names the optimizer or function, ``tensors`` the inputs, ``needs`` what else the path needs
    beyond the dtypes, devices and layout every kernel needs."""

    def __init__(self, owner: str, tensors: Sequence[Tensor], needs: str = "") -> None:
        where = sorted({f"{t.device.type} {str(t.dtype).removeprefix('torch.')}" for t in tensors})
        super().__init__(
            f"{owner}(fused=True): the fused kernels cannot take these inputs ({', '.join(where)}"
            "; they need dense contiguous float32/float64/bfloat16 tensors of one dtype on a CPU "
            f"with a C compiler, or on CUDA with Triton{needs}, and STEADYSTEP_FUSED not set to "
            "0). Pass fused=None to fall back to the eager paths."
        )


def enabled() -> bool:
    """False when ``STEADYSTEP_FUSED=0`` is set: every optimizer then takes its eager path."""
    return os.environ.get("STEADYSTEP_FUSED", "1").strip().lower() not in ("0", "false", "no")


@functools.lru_cache(maxsize=1)
def triton() -> SimpleNamespace | None:
    """The Triton entry points, or None where Triton does not import (the eager paths run)."""
    try:
        from steadystep._kernels import (
            _triton_alera,
            _triton_common,
            _triton_cprop,
            _triton_rollback,
            _triton_wrapper,
        )
    except Exception:  # no Triton, or one that does not load
        return None
    return SimpleNamespace(
        grad_stats=_triton_common.grad_stats,
        adam=_triton_cprop.adam,
        sgd=_triton_cprop.sgd,
        wrap_before=_triton_wrapper.wrap_before,
        wrap_after=_triton_wrapper.wrap_after,
        alera=_triton_alera.alera,
        rollback=_triton_rollback.rollback,
    )


def backend(
    *lists: Sequence[Tensor | None],
    stats: Sequence[Sequence[Tensor | None]] = (),
    dtypes: str = "same",
) -> str | None:
    """ "cpu" or "cuda" when every tensor of ``lists`` and ``stats`` is a dense contiguous
    tensor of one device, None entries allowed; else None (the eager paths). ``dtypes``: "same"
    (every tensor of ``lists`` has the first one's dtype, which has a kernel), "kernel" (each
    has some dtype with a kernel) or "any"; every tensor of ``stats`` has the statistics dtype
    of the first one's. Under ``torch.compile`` it is always None: the compiler traces the
    eager path (and fuses it itself) rather than a call it cannot see into.

    One pass, a few attribute reads per tensor: it runs on every step for every tensor, so its
    cost is the host's share of a step (benchmarks/bench_gpu.py)."""
    if _compiling() or not enabled():
        return None
    first = next((t for ts in lists for t in ts if t is not None), None)
    if first is None:
        return None
    device = first.device
    kind = device.type
    if kind == "cuda":
        if triton() is None:
            return None
        index = device.index
    elif kind != "cpu":
        return None
    dtype = first.dtype
    if dtypes != "any" and dtype not in PARAM_CODE:
        return None
    on_cpu = kind == "cpu"
    wanted = ((lists, dtype if dtypes == "same" else None), (stats, stats_dtype(dtype)))
    for group, want in wanted:
        for ts in group:
            for t in ts:
                if t is None:
                    continue
                kind_of = type(t)
                if kind_of is not Tensor and kind_of is not _Parameter:
                    if not isinstance(t, _Parameter):
                        return None
                if t.layout is not _STRIDED or not t.is_contiguous():
                    return None
                if want is not None:
                    if t.dtype is not want:
                        return None
                elif dtypes == "kernel" and t.dtype not in PARAM_CODE:
                    return None
                if not (t.is_cpu if on_cpu else (t.is_cuda and t.get_device() == index)):
                    return None
    return kind


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return torch._dynamo.is_compiling()  # torch < 2.3


def steps_ok(steps: Sequence[Tensor], device: torch.device) -> bool:
    """Every step count a 0-d (or one-element) float32 tensor on ``device``."""
    f32 = torch.float32
    on_cpu = device.type == "cpu"
    index = device.index
    for t in steps:
        if t.dtype is not f32 or t.numel() != 1:
            return False
        if not (t.is_cpu if on_cpu else (t.is_cuda and t.get_device() == index)):
            return False
    return True


def int64s(values: list[int]) -> ctypes.Array:
    """``values`` as a C ``int64_t`` array (built by :mod:`array`, then shared with ctypes)."""
    buffer = array.array("q", values or [0])
    return (ctypes.c_int64 * len(buffer)).from_buffer(buffer)


def pointers(tensors: Sequence[Tensor | None]) -> ctypes.Array:
    return int64s([0 if t is None else t.data_ptr() for t in tensors])


def numels(tensors: Sequence[Tensor]) -> ctypes.Array:
    return int64s([t.numel() for t in tensors])


def doubles(values: Sequence[float]) -> ctypes.Array:
    buffer = array.array("d", values or [0.0])
    return (ctypes.c_double * len(buffer)).from_buffer(buffer)


def threads() -> int:
    return max(1, torch.get_num_threads())


def scale_config(c: float, eps: float, cdf: str, method: str) -> dict[str, int]:
    return {
        "SS_METHOD": _METHOD_CODE[method],
        "SS_CDF": _CDF_CODE[cdf],
        "SS_C_INF": int(math.isinf(c)),
        "SS_C_ONE": int(c == 1),
        "SS_EPS_ZERO": int(eps == 0),
    }


def cprop_hyper_values(
    *, cprop_beta: float, cprop_c: float, cprop_eps: float, cdf: str, method: str, **base: float
) -> tuple[float, ...]:
    """The hyperparameter row both backends read (Note [hyperparameter layout]): CProp's, with
    the cdf's constant folded in, and the base step's ``base`` (by field name)."""
    constant = CDF_CONSTANT[cdf] if method == "conformity" else 1.0
    return cprop_hyper_row(
        cdf_constant=constant, cprop_beta=cprop_beta, cprop_c=cprop_c, cprop_eps=cprop_eps, **base
    )


def lr_multiplier_of(lr_multiplier: Tensor | None, device: torch.device) -> Tensor:
    """The step's 0-d float64 ``lr_multiplier`` on ``device`` (1 when None)."""
    if lr_multiplier is None:
        return torch.ones((), dtype=torch.float64, device=device)
    if lr_multiplier.dtype != torch.float64 or lr_multiplier.device != device:
        raise ValueError(
            f"lr_multiplier must be a 0-d float64 tensor on {device}, got "
            f"{lr_multiplier.dtype} on {lr_multiplier.device}"
        )
    return lr_multiplier


def check_flag(flag: Tensor, device: torch.device, name: str = "found_finite") -> Tensor:
    """``flag`` checked to be a 0-d bool on ``device``, made contiguous (the kernels read it)."""
    if flag.dtype != torch.bool or flag.numel() != 1 or flag.device != device:
        raise ValueError(
            f"{name} must be a 0-d bool tensor on {device}, got {flag.dtype} {tuple(flag.shape)} "
            f"on {flag.device}"
        )
    return flag.contiguous()


def status(code: int, what: str) -> None:
    """Raise for a C kernel's nonzero return code (its work space could not be allocated)."""
    if code != 0:
        raise MemoryError(f"steadystep's fused {what} kernel could not allocate its work space")


# ---------------------------------------------------------------------------------------------
# The gradient check
# ---------------------------------------------------------------------------------------------


def grad_stats(grads: Sequence[Tensor]) -> tuple[Tensor, Tensor] | None:
    """``(found_finite, sum_of_squares)`` of the gradients in one pass, one kernel call per
    dtype: a 0-d bool, every element finite with ``|g| <= gradient_limit(stats_dtype(g.dtype))``
    (Note [huge gradients]), and the 0-d float64 sum of every element's square (NaN or inf where
    an element is). None when the kernels cannot take these tensors."""
    if not grads:
        return None
    kind = backend(grads, dtypes="kernel")
    if kind is None:
        return None
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    flags, sums = [], []
    for dtype, gs in by_dtype.items():
        limit = gradient_limit(stats_dtype(dtype))
        if kind == "cuda":
            ok, sumsq = triton().grad_stats(gs, limit)
        else:
            lib = _cpu.library({"SS_PARAM": PARAM_CODE[dtype]})
            if lib is None:
                return None
            ok = torch.empty((), dtype=torch.bool)
            sumsq = torch.empty((), dtype=torch.float64)
            status(
                lib.ss_grads_ok(
                    len(gs),
                    pointers(gs),
                    numels(gs),
                    limit,
                    ok.data_ptr(),
                    sumsq.data_ptr(),
                    threads(),
                ),
                "gradient check",
            )
        flags.append(ok)
        sums.append(sumsq)
    if len(flags) == 1:
        return flags[0], sums[0]
    return torch.stack(flags).all(), torch.stack(sums).sum()


def grads_ok(grads: Sequence[Tensor]) -> Tensor | None:
    """The ``found_finite`` of :func:`grad_stats`."""
    stats = grad_stats(grads)
    return None if stats is None else stats[0]
