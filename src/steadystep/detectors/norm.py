"""The global gradient norm a detector watches, computed once per step on the device."""

from __future__ import annotations

import torch

from steadystep._tensors import gradient_stats

__all__ = ["global_grad_norm"]


def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``sqrt(sum_i ||g_i||^2)`` over every gradient, as a 0-d float64 tensor (no host sync).

    Accumulated in float64, so finite gradients up to float32's largest value do not overflow
    the norm; one pass over the gradients where the fused kernels take them
    (:func:`steadystep._tensors.gradient_stats`, which also gives the finiteness flag). FSDP2
    (DTensor) gradients contribute the squares of this rank's shards, summed over ranks in one
    all-reduce; other gradients (DDP's are already averaged) count as they are. A NaN or inf
    anywhere makes the norm non-finite. An empty list gives 0.

    Examples:
        >>> import torch
        >>> from steadystep.detectors import global_grad_norm
        >>> float(global_grad_norm([torch.tensor([3.0]), torch.tensor([[4.0]])]))
        5.0
    """
    return gradient_stats(grads)[1]
