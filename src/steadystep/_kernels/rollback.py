"""The guard's fused rollback: restore the parameters from a snapshot, or refresh it, in one call
(the C kernel in kernels_rollback.c, the Triton one in :mod:`._triton_rollback`).

Note [copy plans]
    A step's rollback call copies between the same two lists every step (the live tensors and
    their copies), and checking each tensor's dtype, device and layout, then building the C
    pointer tables, cost more on the host than a small model's copy itself. A
    :class:`CopyPlan` keeps the checked tables of one pair of lists and reuses them while both
    lists hold the same tensor objects at the same memory (each tensor's data pointer, byte
    count and dtype); anything else (a parameter given new memory with ``p.data = ...``, a resized
    tensor, a new optimizer state after a load, another list) checks and builds them afresh.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from steadystep._kernels import _cpu
from steadystep._kernels._common import (
    _compiling,
    backend,
    check_flag,
    enabled,
    int64s,
    pointers,
    threads,
    triton,
)

__all__ = ["CopyPlan", "rollback_"]


class CopyPlan:
    """The checked C arguments of copies between two tensor lists (Note [copy plans])."""

    def __init__(self) -> None:
        self._lists: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None
        self._memory: list[tuple[int, int, Any]] = []
        self._args: tuple[Any, ...] = ()

    def args(self, dst: Sequence[Tensor], src: Sequence[Tensor]) -> tuple[Any, ...] | None:
        """``(n, dst pointers, src pointers, byte counts)`` as kept for these lists, or None."""
        lists = self._lists
        if lists is None or len(dst) != len(lists[0]) or len(src) != len(lists[1]):
            return None
        if not all(map(operator.is_, dst, lists[0])) or not all(map(operator.is_, src, lists[1])):
            return None
        if [(t.data_ptr(), t.nbytes, t.dtype) for ts in (dst, src) for t in ts] != self._memory:
            return None
        return self._args

    def __deepcopy__(self, memo: dict[int, Any]) -> CopyPlan:
        return CopyPlan()  # a copy's tensors live elsewhere: its plan starts empty

    def __reduce__(self) -> tuple[type[CopyPlan], tuple[()]]:
        return CopyPlan, ()

    def keep(self, dst: Sequence[Tensor], src: Sequence[Tensor], args: tuple[Any, ...]) -> None:
        self._lists = (tuple(dst), tuple(src))
        self._memory = [(t.data_ptr(), t.nbytes, t.dtype) for ts in (dst, src) for t in ts]
        self._args = args


def rollback_(
    params: Sequence[Tensor],
    snapshots: Sequence[Tensor],
    alarm: Tensor,
    *,
    hold: Tensor | None = None,
    plan: CopyPlan | None = None,
) -> bool:
    """The guard's masked rollback in one call: ``p <- snapshot`` where ``alarm`` (0-d bool),
    else ``snapshot <- p`` unless ``hold`` (0-d bool: a step that takes no update, so the
    snapshot keeps what the next alarm must restore); bitwise copies of any dtype. False when
    unsupported. ``plan``: where the lists' checked C arguments are kept between calls (CPU)."""
    if not params:
        return True
    args = None
    if plan is not None and alarm.is_cpu and not _compiling() and enabled():
        args = plan.args(params, snapshots)
    if args is None:
        kind = backend(params, snapshots, dtypes="any")
        if kind is None:
            return False
        sizes = [p.nbytes for p in params]
        if any(p.dtype is not s.dtype for p, s in zip(params, snapshots, strict=True)) or sizes != [
            s.nbytes for s in snapshots
        ]:
            return False
        if kind == "cpu":
            args = (len(params), pointers(params), pointers(snapshots), int64s(sizes))
            if plan is not None:
                plan.keep(params, snapshots, args)
    alarm = check_flag(alarm, params[0].device, "alarm")
    if hold is not None:
        hold = check_flag(hold, params[0].device, "hold")
    if args is None:  # CUDA
        triton().rollback(params, snapshots, alarm, hold)
        return True
    lib = _cpu.library({"SS_PARAM": 0})
    if lib is None:
        return False
    lib.ss_rollback(*args, alarm.data_ptr(), None if hold is None else hold.data_ptr(), threads())
    return True
