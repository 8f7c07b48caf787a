"""A rough estimate of the compute of a planned run, for the warning the command prints before
``--scale paper`` starts on a CPU.

.. math::

    \\text{flops} = \\text{steps} \\times F_{\\text{train}}(\\text{batch})
        + \\text{evaluated examples} \\times F_{\\text{forward}}(1),
    \\qquad \\text{seconds} \\approx \\frac{\\text{flops}}{R \\cdot \\text{threads}}

where :math:`F` counts the multiply-adds (x2) of the convolutions and matrix products of one
forward (and backward) pass of the run's model, by :class:`torch.utils.flop_counter.FlopCounterMode`
on the meta device (no memory, no arithmetic), and :math:`R` =
:data:`CPU_FLOPS_PER_THREAD`. Elementwise work, data handling and the optimizer's own step are
left out, and small models run far below :math:`R`, so the estimate is a lower bound for them
and good to a factor of about 3 for the paper's models; it says whether a run takes minutes,
days or years, not more.

Examples:
    >>> from steadystep.experiments.estimate import describe_seconds, model_flops
    >>> from steadystep.experiments.models import build_classifier
    >>> model_flops(("M0", 4), lambda: build_classifier("M0", (1, 2), 3), (1, 2), 4, True)
    96
    >>> describe_seconds(5400.0)
    '1.5 hours'
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["CPU_FLOPS_PER_THREAD", "describe_seconds", "model_flops"]

# What one thread of torch 2.13 reached on the paper's models (training steps of the ALRC network
# at width 1, SALeRA's M2/M4 on MNIST-sized inputs, CProp's CNN) on the 2-core x86 VM this project
# is developed on: 16-32 GFLOP/s; small models (the demo's) run at 2-10.
CPU_FLOPS_PER_THREAD = 2e10

_CACHE: dict[Hashable, int] = {}


def model_flops(
    key: Hashable,
    make: Callable[[], torch.nn.Module],
    input_shape: Sequence[int],
    batch: int,
    backward: bool,
) -> int:
    """FLOPs of one forward (and, with ``backward``, backward) pass of ``make()`` on a batch of
    ``batch`` inputs of ``input_shape``, counted on the meta device; cached under
    ``(key, input_shape, batch, backward)``."""
    cache_key = (key, tuple(input_shape), batch, backward)
    if cache_key not in _CACHE:
        with torch.device("meta"):
            model = make().train(backward)  # eval mode: BatchNorm takes a batch of one
            x = torch.empty(batch, *input_shape)
            with FlopCounterMode(display=False) as counter:
                out = model(x)
                if backward:
                    out.float().sum().backward()
        _CACHE[cache_key] = int(counter.get_total_flops())
    return _CACHE[cache_key]


def describe_seconds(seconds: float) -> str:
    """``seconds`` in the largest unit that keeps the number >= 1 (minutes to years)."""
    value, unit = max(seconds / 60, 1.0), "minutes"
    for name, size in (("hours", 3600), ("days", 86400), ("years", 365 * 86400)):
        if seconds >= size:
            value, unit = seconds / size, name
    return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
