"""The guard's fused rollback: restore the parameters from a snapshot, or refresh it, in one call
(the C kernel in kernels_rollback.c, the Triton one in :mod:`._triton_rollback`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from steadystep._kernels import _cpu
from steadystep._kernels._common import (
    backend,
    check_flag,
    int64s,
    pointers,
    threads,
    triton,
)

__all__ = ["rollback_"]


def rollback_(
    params: Sequence[Tensor],
    snapshots: Sequence[Tensor],
    alarm: Tensor,
    *,
    hold: Tensor | None = None,
) -> bool:
    """The guard's masked rollback in one call: ``p <- snapshot`` where ``alarm`` (0-d bool),
    else ``snapshot <- p`` unless ``hold`` (0-d bool: a step that takes no update, so the
    snapshot keeps what the next alarm must restore); bitwise copies of any dtype. False when
    unsupported."""
    if not params:
        return True
    kind = backend(params, snapshots, dtypes="any")
    if kind is None:
        return False
    sizes = [p.nbytes for p in params]
    if any(p.dtype is not s.dtype for p, s in zip(params, snapshots, strict=True)) or sizes != [
        s.nbytes for s in snapshots
    ]:
        return False
    alarm = check_flag(alarm, params[0].device, "alarm")
    if hold is not None:
        hold = check_flag(hold, params[0].device, "hold")
    if kind == "cuda":
        triton().rollback(params, snapshots, alarm, hold)
        return True
    lib = _cpu.library({"SS_PARAM": 0})
    if lib is None:
        return False
    nbytes = int64s(sizes)
    lib.ss_rollback(
        len(params),
        pointers(params),
        pointers(snapshots),
        nbytes,
        alarm.data_ptr(),
        None if hold is None else hold.data_ptr(),
        threads(),
    )
    return True
