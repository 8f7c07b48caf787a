"""The dtypes the kernels keep statistics in, and the gradients they accept: a leaf module the
Python launchers, the Triton kernels and the optimizers all import."""

from __future__ import annotations

import math

import torch

__all__ = ["gradient_limit", "stats_dtype"]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of statistics kept for parameters of ``dtype``: float32 for 16-bit floats (a
    multiplier step of ``exp(3e-6)`` or an EMA increment vanishes in bfloat16)."""
    if dtype is torch.float32 or dtype is torch.bfloat16 or dtype is torch.float16:
        return torch.float32  # without a dispatch: this runs for every tensor list every step
    return torch.promote_types(dtype, torch.float32)


def gradient_limit(dtype: torch.dtype) -> float:
    """The largest gradient magnitude a step accepts for statistics of ``dtype`` (Note [huge
    gradients]): ``2**(max_exponent // 2 - 1)``."""
    max_exponent = math.frexp(torch.finfo(dtype).max)[1]  # 128 for float32, 1024 for float64
    return 2.0 ** (max_exponent // 2 - 1)
