"""The multi-tensor kernels for CUDA, in Triton (same arithmetic as the C kernels, ``kernels_*.c``).

Note [Triton kernels]
    One launch covers every tensor of a list: a cached *block table* names, for each program,
    the tensor it works on and the first element of its block; cached *pointer tables* (int64
    device tensors of data pointers, rebuilt only when a pointer changes) give each program its
    tensor's memory. Every decision is read on the device: a kernel returns at once when the
    step is skipped (``found_finite`` of :func:`grads_ok` is False), and the per-tensor
    coefficients (bias
    corrections of the tensor's own step count) are computed per program in float64 from the
    step count and a float64 hyperparameter row, so neither a scheduler's new lr nor a guard's
    LR cut recompiles anything or copies anything to the device. A step is then: check the
    gradients (a flag, the check, a comparison), the update, advance the step counts; five
    launches whatever the number of tensors. Tests run these kernels on the CPU under
    ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from steadystep._kernels.dtypes import stats_dtype

__all__ = [
    "BLOCK",
    "NUM_WARPS",
    "TL_DTYPE",
    "advance",
    "all_aligned",
    "block_start",
    "block_table",
    "cached",
    "elementwise",
    "gather",
    "grad_stats",
    "hyper_row",
    "launch",
    "launch_shape",
    "ld",
    "pointer",
    "pointer_table",
    "pointer_tables",
    "program_block",
    "scatter",
    "st",
    "static_config",
    "to_device",
    "to_param",
    "whole_or_partial",
]

BLOCK = 1024  # elements per program of the elementwise kernels (benchmarks/bench_gpu.py)
NUM_WARPS = 4

_TABLES: OrderedDict[tuple, Any] = OrderedDict()
_TABLE_LIMIT = 256


def launch_shape() -> tuple[int, int]:
    """``(BLOCK, num_warps)`` of the elementwise kernels: elements per program and warps per
    program (``STEADYSTEP_TRITON_BLOCK`` / ``STEADYSTEP_TRITON_WARPS`` override them, for
    tuning on a new device)."""
    block = int(os.environ.get("STEADYSTEP_TRITON_BLOCK", BLOCK))
    warps = int(os.environ.get("STEADYSTEP_TRITON_WARPS", NUM_WARPS))
    return block, warps


def cached(key: tuple, make) -> Any:
    """A table made by ``make()`` once per ``key`` (an LRU of the last 256)."""
    table = _TABLES.get(key)
    if table is None:
        table = make()
        _TABLES[key] = table
        if len(_TABLES) > _TABLE_LIMIT:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def to_device(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a tensor on ``device``: through pinned host memory and an asynchronous
    copy, so a table made while a step runs (new gradient pointers after ``zero_grad``, a new
    learning rate) never synchronises the host with the device."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    host = torch.tensor(values, dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)


def pointer_tables(
    lists: Sequence[Sequence[Tensor | None]], device: torch.device
) -> tuple[list[Tensor], bool]:
    """The data pointers of each list of tensors (0 for None) as int64 device tensors, and
    whether every tensor starts at a 16-byte boundary (then the kernels may load and store
    vectors, Note [Triton kernels]). One ``data_ptr`` read per tensor."""
    tables, aligned = [], True
    for tensors in lists:
        ptrs = tuple(0 if t is None else t.data_ptr() for t in tensors)
        table, ok = cached(
            ("ptr", device, ptrs),
            lambda ptrs=ptrs: (
                to_device(ptrs, torch.int64, device),
                all(p % 16 == 0 for p in ptrs),
            ),
        )
        tables.append(table)
        aligned = aligned and ok
    return tables, aligned


def pointer_table(tensors: Sequence[Tensor | None], device: torch.device) -> Tensor:
    """The data pointers of ``tensors`` (0 for None) as an int64 device tensor."""
    return pointer_tables([tensors], device)[0][0]


def block_table(
    numels: tuple[int, ...], device: torch.device, block: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(tensor index, first element) of every block of ``block`` elements, and the numels, as
    device tensors."""

    def make() -> tuple[Tensor, Tensor, Tensor]:
        index = [i for i, n in enumerate(numels) for _ in range(0, n, block)]
        start = [s for n in numels for s in range(0, n, block)]
        return (
            to_device(index, torch.int32, device),
            to_device(start, torch.int64, device),
            to_device(numels, torch.int64, device),
        )

    return cached(("blocks", device, numels, block), make)


def hyper_row(values: tuple[float, ...], device: torch.device) -> Tensor:
    """The hyperparameters as a float64 device row (cached: changes only with the values)."""
    return cached(("hyper", device, values), lambda: to_device(values, torch.float64, device))


def launch(
    kernel: Any,
    numels: tuple[int, ...],
    device: torch.device,
    *tables: Tensor,
    found_finite: Tensor,
    hyper: Tensor,
    aligned: bool,
    **constexprs: Any,
) -> None:
    """``kernel`` over every element of the tensors of ``numels``: one program per block, its
    arguments the pointer/coefficient ``tables``, then the block table, ``found_finite`` and
    the hyperparameter row; ``aligned``: every tensor starts at a 16-byte boundary."""
    block, warps = launch_shape()
    index, start, numel_t = block_table(numels, device, block)
    if index.numel() == 0:
        return
    kernel[(index.numel(),)](
        *tables,
        index,
        start,
        numel_t,
        found_finite,
        hyper,
        **constexprs,
        ALIGNED=aligned,
        BLOCK=block,
        num_warps=warps,
    )


def elementwise(
    kernel: Any,
    lists: dict[str, Sequence[Tensor | None] | None],
    found_finite: Tensor,
    hyper: Tensor,
    *tables: Tensor,
    **constexprs: Any,
) -> None:
    """:func:`launch` ``kernel`` over the tensor lists of ``lists`` (all but ``state_steps``, in
    order, None for an absent list) then ``tables``, with the parameters' and statistics'
    dtypes as ``PDTYPE`` and ``SDTYPE``."""
    params = lists["params"]
    device = params[0].device
    none = [None] * len(params)
    arrays = [none if ts is None else ts for key, ts in lists.items() if key != "state_steps"]
    pointers, aligned = pointer_tables(arrays, device)
    dtype = params[0].dtype
    launch(
        kernel,
        tuple(p.numel() for p in params),
        device,
        *pointers,
        *tables,
        found_finite=found_finite,
        hyper=hyper,
        aligned=aligned,
        PDTYPE=TL_DTYPE[dtype],
        SDTYPE=TL_DTYPE[stats_dtype(dtype)],
        **constexprs,
    )


def static_config(config: dict[str, int]) -> dict[str, int]:
    """The ``SS_*`` choices of a C configuration as the Triton kernels' constexpr arguments (the
    parameter dtype is ``PDTYPE``)."""
    return {k.removeprefix("SS_"): v for k, v in config.items() if k != "SS_PARAM"}


TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16}


def all_aligned(*lists: Sequence[Tensor | None]) -> bool:
    """Does every tensor start at a 16-byte boundary? Then the kernels may load and store
    vectors (Note [Triton kernels])."""
    return all(t is None or t.data_ptr() % 16 == 0 for ts in lists for t in ts)


@triton.jit
def pointer(ptrs, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s data pointer from a pointer table; with ``ALIGNED`` (checked on the host)
    rounded to its own value in a form that tells the compiler it is a multiple of 16 bytes."""
    address = tl.load(ptrs + t)
    if ALIGNED:
        address = address // 16 * 16
    return address.to(tl.pointer_type(DTYPE))


@triton.jit
def block_start(starts, pid, BLOCK: tl.constexpr):
    """The first element of program ``pid``'s block, a multiple of ``BLOCK`` (so written)."""
    return tl.load(starts + pid) // BLOCK * BLOCK


@triton.jit
def program_block(block_tensor, block_starts, numels, BLOCK: tl.constexpr):
    """``(t, offs, mask, whole)`` of this program: its tensor ``t`` (block table), the offsets
    of its elements in that tensor, which of them exist, and whether all do (then the body may
    run unmasked, Note [Triton kernels])."""
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = block_start(block_starts, pid, BLOCK)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    return t, offs, offs < n, start + BLOCK <= n


@triton.jit
def whole_or_partial(BODY: tl.constexpr, args, flags, whole):
    """``BODY(*args, *flags, EVEN)`` with ``EVEN`` a compile-time copy of ``whole`` (of
    :func:`program_block`): a whole block runs the unmasked body, whose loads and stores may be
    vectors; only a tensor's last, partial block pays for the mask. ``flags``: the body's
    constexpr arguments before ``EVEN``."""
    if whole:
        BODY(*args, *flags, True)
    else:
        BODY(*args, *flags, False)


@triton.jit
def ld(ptr, offs, mask, EVEN: tl.constexpr):
    """A block of elements; a whole block (``EVEN``) is loaded without a mask, which lets the
    compiler use vector loads."""
    if EVEN:
        return tl.load(ptr + offs)
    else:
        return tl.load(ptr + offs, mask=mask, other=0)


@triton.jit
def st(ptr, offs, value, mask, EVEN: tl.constexpr):
    """Store a block of elements (see :func:`ld`)."""
    if EVEN:
        tl.store(ptr + offs, value)
    else:
        tl.store(ptr + offs, value, mask=mask)


@triton.jit
def to_param(x, PDTYPE: tl.constexpr):
    """``x`` (statistics dtype) as the parameter dtype; bfloat16 rounds to nearest even in
    integer arithmetic, so compiled kernels and the interpreter round alike."""
    if PDTYPE == tl.bfloat16:
        u = x.to(tl.float32).to(tl.int32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(PDTYPE)


@triton.jit
def _check_body(g_ptr, offs, mask, partial, pid, flag, limit, EVEN: tl.constexpr):
    g = ld(g_ptr, offs, mask, EVEN).to(tl.float64)
    tl.store(partial + pid, tl.sum(g * g, axis=0))
    bad = tl.max((~(tl.abs(g) <= limit)).to(tl.int32), axis=0)  # NaN compares False: bad
    if bad > 0:
        tl.atomic_max(flag, 1)


@triton.jit
def _check_kernel(
    g_ptrs,
    block_tensor,
    block_starts,
    numels,
    flag,
    partial,
    limit_ptr,
    PDTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, offs, mask, whole = program_block(block_tensor, block_starts, numels, BLOCK)
    pid = tl.program_id(0)
    g_ptr = pointer(g_ptrs, t, PDTYPE, ALIGNED)
    limit = tl.load(limit_ptr)  # float64: 2**511 does not fit a float32 argument
    whole_or_partial(_check_body, (g_ptr, offs, mask, partial, pid, flag, limit), (), whole)


def grad_stats(grads: Sequence[Tensor], limit: float) -> tuple[Tensor, Tensor]:
    """(every gradient element finite with ``|g| <= limit``, float64 sum of squares), from one
    launch per dtype plus the sum of the per-block partial sums (a fixed order: deterministic)."""
    device = grads[0].device
    flag = torch.zeros((), dtype=torch.int32, device=device)
    sums = []
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for dtype, gs in by_dtype.items():
        block, warps = launch_shape()
        index, start, numels = block_table(tuple(g.numel() for g in gs), device, block)
        partial = torch.zeros(max(index.numel(), 1), dtype=torch.float64, device=device)
        if index.numel():
            (table,), aligned = pointer_tables([gs], device)
            _check_kernel[(index.numel(),)](
                table,
                index,
                start,
                numels,
                flag,
                partial,
                hyper_row((limit,), device),
                PDTYPE=TL_DTYPE[dtype],
                ALIGNED=aligned,
                BLOCK=block,
                num_warps=warps,
            )
        sums.append(partial.sum())
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
    return flag == 0, total


@triton.jit
def _advance_kernel(step_ptrs, n, found_finite, BLOCK_T: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = offs < n
    ok = (tl.load(found_finite) != 0).to(tl.float32)
    ptrs = tl.load(step_ptrs + offs, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, step + ok, mask=mask)


def advance(steps: Sequence[Tensor], found_finite: Tensor) -> None:
    """Every step count + 1 where ``found_finite``, in one launch."""
    device = steps[0].device
    n = len(steps)
    _advance_kernel[(triton.cdiv(n, 1024),)](
        pointer_table(steps, device), n, found_finite, BLOCK_T=1024
    )


# ---------------------------------------------------------------------------------------------
# 0-d scalars scattered over many tensors (step counts, multipliers), through pointer tables
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gather_kernel(ptrs, n, out, DTYPE: tl.constexpr, BLOCK_T: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = offs < n
    src = tl.load(ptrs + offs, mask=mask, other=0).to(tl.pointer_type(DTYPE))
    tl.store(out + offs, tl.load(src, mask=mask, other=0.0).to(tl.float64), mask=mask)


@triton.jit
def _scatter_kernel(ptrs, n, values, DTYPE: tl.constexpr, BLOCK_T: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    mask = offs < n
    dst = tl.load(ptrs + offs, mask=mask, other=0).to(tl.pointer_type(DTYPE))
    tl.store(dst, tl.load(values + offs, mask=mask, other=0.0).to(DTYPE), mask=mask)


def gather(scalars: Sequence[Tensor], device: torch.device) -> Tensor:
    """The values of 0-d tensors (one dtype) as a float64 vector, in one launch."""
    n = len(scalars)
    out = torch.empty(n, dtype=torch.float64, device=device)
    if n:
        _gather_kernel[(triton.cdiv(n, 1024),)](
            pointer_table(scalars, device),
            n,
            out,
            DTYPE=TL_DTYPE[scalars[0].dtype],
            BLOCK_T=1024,
        )
    return out


def scatter(scalars: Sequence[Tensor], values: Tensor) -> None:
    """Write ``values[i]`` (float64) into the 0-d tensor ``scalars[i]``, in one launch."""
    n = len(scalars)
    if n:
        _scatter_kernel[(triton.cdiv(n, 1024),)](
            pointer_table(scalars, values.device),
            n,
            values.contiguous(),
            DTYPE=TL_DTYPE[scalars[0].dtype],
            BLOCK_T=1024,
        )
