"""Compiled elementwise kernels for optimizers: a cache of torch.compile'd functions and a
launcher that runs one over every tensor of a param group, small tensors batched together.

A kernel is a pure function of its tensors (parameter, gradient, state), a row of per-tensor
coefficients (0-d values that change every step, e.g. bias corrections, so that a scheduler
never triggers a recompile) and the step's ``found_finite`` flag; it writes its results into
some of its tensor arguments. Structural choices are keyword-only static arguments.
``steadystep.optim.cprop`` uses it for its fused paths (Note [Fused path] there).
"""

from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from steadystep._tensors import PARALLEL_NUMEL

__all__ = ["launch"]

_COMPILED: dict[str, Callable[..., None]] = {}
# Large tensors compile per numel (see _compiled); dynamo's default limit of 8 variants per
# function would be hit by any real model.
_RECOMPILE_LIMIT = 512


def _compiled(name: str, fn: Callable[..., None], numel: int) -> Callable[..., None]:
    """The compiled ``fn`` for a tensor of ``numel`` elements.

    Large tensors get a static-shape kernel (one compile per numel; inductor only parallelises a
    CPU loop whose length it knows), small ones share one dynamic-shape kernel (a single thread
    is right for them, and models with many small tensors compile once). Every numel of a
    static kernel gets its own code object, since dynamo keeps its cache on the code object and
    tries the guards of its entries one after another: a call then checks one entry, not one per
    shape in the model.
    """
    dynamic = numel < PARALLEL_NUMEL
    variant = "dynamic" if dynamic else f"static_{numel}"
    key = f"{name}:{variant}"
    if key not in _COMPILED:
        code = fn.__code__.replace(co_name=f"{fn.__name__}_{variant}")
        twin = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)
        twin.__kwdefaults__ = fn.__kwdefaults__
        _COMPILED[key] = torch.compile(
            twin, dynamic=dynamic, fullgraph=True, options=_inductor_options()
        )
    return _COMPILED[key]


def _inductor_options() -> dict[str, Any]:
    """Let the C++ compiler contract ``a * b + c`` into fused multiply-adds on CPU.

    Optimizer kernels on CPU are compute-bound (CProp's: erf, two square roots, three divisions
    per element) and most of their arithmetic is EMAs and polynomials, i.e. multiply-adds:
    contraction makes CProp's step about 10% faster and each of them exact before rounding.
    Triton contracts by default; torch versions without the setting keep their default.
    """
    import torch._inductor.config as inductor_config  # imported by torch.compile anyway

    if hasattr(inductor_config.cpp, "enable_floating_point_contract_flag"):
        return {"cpp.enable_floating_point_contract_flag": "fast"}
    return {}


def _recompile_limit() -> dict[str, int]:
    """Dynamo's per-function compile limit raised to _RECOMPILE_LIMIT, under the name this torch
    uses (``cache_size_limit`` before torch 2.6)."""
    name = (
        "recompile_limit"
        if hasattr(torch._dynamo.config, "recompile_limit")
        else "cache_size_limit"
    )
    return {name: _RECOMPILE_LIMIT}


# Note [Batching small tensors]
#   Calling a compiled function costs tens of microseconds of guards and wrappers, which for a
#   bias or a norm weight is far more than its arithmetic; a transformer has a hundred such
#   tensors. Tensors below PARALLEL_NUMEL elements therefore go through the kernel together:
#   their flat views are concatenated, each element reads its tensor's coefficient row through
#   an index (``rows``), and what the kernel wrote is copied back. The copies move a few bytes
#   per small tensor. The arithmetic is the per-tensor call's; the C++ compiler may contract
#   it into multiply-adds differently, so results agree to rounding (tested), not bitwise.

_BATCH_NUMEL = PARALLEL_NUMEL  # tests set it to 0 to compare batches with single calls
_ROWS_CACHE: OrderedDict[tuple[Any, ...], Tensor] = OrderedDict()


def launch(
    name: str,
    fn: Callable[..., None],
    calls: list[tuple[Tensor | None, ...]],
    coefs: Tensor,
    found_finite: Tensor,
    *,
    writes: tuple[int, ...],
    **static: Any,
) -> None:
    """The compiled ``fn`` over every tensor of a group.

    ``calls`` holds each tensor's elementwise arguments, its flat parameter first (whose length
    picks the kernel, see :func:`_compiled`); ``coefs`` their coefficient rows; ``writes`` the
    positions of the arguments ``fn`` writes. ``fn`` is called as ``fn(*call, row,
    found_finite, **static)`` for one tensor and ``fn(*joined, coefs, found_finite, rows,
    **static)`` for a batch, where ``rows`` maps each element to its coefficient row. Small
    tensors run as one batch (Note [Batching small tensors]), the others one call each.
    """
    batches: dict[tuple[torch.dtype, ...], list[int]] = {}
    alone: list[int] = []
    for i, args in enumerate(calls):
        if args[0].numel() < _BATCH_NUMEL and all(
            a is None or (a.dim() == 1 and a.is_contiguous()) for a in args
        ):
            batches.setdefault(tuple(a.dtype for a in args if a is not None), []).append(i)
        else:
            alone.append(i)
    with torch._dynamo.config.patch(**_recompile_limit()):
        for idx in batches.values():
            if len(idx) == 1:
                alone += idx
            else:
                _launch_batch(
                    name, fn, [calls[i] for i in idx], idx, coefs, found_finite, writes, static
                )
        for i in alone:
            row = coefs[i].clone()  # no storage offset: it would specialise the kernel
            _compiled(name, fn, calls[i][0].numel())(*calls[i], row, found_finite, **static)


def _element_rows(positions: list[int], sizes: list[int], device: torch.device) -> Tensor:
    """The coefficient row of every element of a batch (cached: a model's layout is fixed)."""
    key = (device, tuple(positions), tuple(sizes))
    rows = _ROWS_CACHE.get(key)
    if rows is None:
        # built on the host and copied once; later steps find it here (no per-step transfer)
        rows = torch.repeat_interleave(torch.tensor(positions), torch.tensor(sizes)).to(device)
        _ROWS_CACHE[key] = rows
        if len(_ROWS_CACHE) > 64:
            _ROWS_CACHE.popitem(last=False)
    return rows


def _launch_batch(
    name: str,
    fn: Callable[..., None],
    calls: list[tuple[Tensor | None, ...]],
    positions: list[int],
    coefs: Tensor,
    found_finite: Tensor,
    writes: tuple[int, ...],
    static: dict[str, Any],
) -> None:
    """One call of ``fn`` over the concatenation of small tensors (Note [Batching small
    tensors])."""
    sizes = [args[0].numel() for args in calls]
    columns = list(zip(*calls, strict=True))
    joined = [None if column[0] is None else torch.cat(column) for column in columns]
    rows = _element_rows(positions, sizes, joined[0].device)
    _compiled(f"{name}_batch", fn, sum(sizes))(*joined, coefs, found_finite, rows, **static)
    for j in writes:
        if joined[j] is not None:
            torch._foreach_copy_(list(columns[j]), list(joined[j].split(sizes)))
