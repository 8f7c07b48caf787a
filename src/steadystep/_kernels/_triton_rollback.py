"""The guard's rollback in Triton (Note [Triton kernels] in :mod:`._triton_common`): bitwise
copies between the parameters and their snapshot, as integer words of each element's size."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from steadystep._kernels._triton_common import (
    block_table,
    cached,
    launch_shape,
    ld,
    pointer,
    pointer_tables,
    program_block,
    st,
    whole_or_partial,
)

__all__ = ["rollback"]


@triton.jit
def _rollback_body(p_ptr, snap_ptr, alarm, hold, offs, mask, EVEN: tl.constexpr):
    if tl.load(alarm) != 0:
        st(p_ptr, offs, ld(snap_ptr, offs, mask, EVEN), mask, EVEN)
    elif tl.load(hold) == 0:
        st(snap_ptr, offs, ld(p_ptr, offs, mask, EVEN), mask, EVEN)


@triton.jit
def _rollback_kernel(
    p_ptrs,
    snap_ptrs,
    block_tensor,
    block_starts,
    numels,
    alarm,
    hold,
    WORD: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, offs, mask, whole = program_block(block_tensor, block_starts, numels, BLOCK)
    p_ptr = pointer(p_ptrs, t, WORD, ALIGNED)
    snap_ptr = pointer(snap_ptrs, t, WORD, ALIGNED)
    whole_or_partial(
        _rollback_body,
        (p_ptr, snap_ptr, alarm, hold, offs, mask),
        (),
        whole,
    )


_WORDS = {1: tl.int8, 2: tl.int16, 4: tl.int32, 8: tl.int64}


def rollback(
    params: Sequence[Tensor], snapshots: Sequence[Tensor], alarm: Tensor, hold: Tensor | None
) -> None:
    """``p <- snapshot`` where ``alarm``, else ``snapshot <- p`` unless ``hold``: bitwise
    copies as integer words of each tensor's element size, one launch per element size."""
    device = params[0].device
    if hold is None:
        hold = cached(("false", device), lambda: torch.zeros((), dtype=torch.bool, device=device))
    block, warps = launch_shape()
    by_size: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        by_size.setdefault(p.element_size(), []).append(i)
    for size, index_list in by_size.items():
        ps = [params[i] for i in index_list]
        snaps = [snapshots[i] for i in index_list]
        index, start, numel_t = block_table(tuple(p.numel() for p in ps), device, block)
        if index.numel() == 0:
            continue
        (p_table, s_table), aligned = pointer_tables([ps, snaps], device)
        _rollback_kernel[(index.numel(),)](
            p_table,
            s_table,
            index,
            start,
            numel_t,
            alarm,
            hold,
            WORD=_WORDS[size],
            ALIGNED=aligned,
            BLOCK=block,
            num_warps=warps,
        )
