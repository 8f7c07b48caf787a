"""Tensor plumbing any optimizer can use: FSDP2 shards, flat views, finiteness, norms.

Under ``torch.distributed.fsdp.fully_shard`` parameters, gradients and the state created
``zeros_like`` them are DTensors. Elementwise math runs on this rank's shard
(:func:`local_tensor`: an alias, so in-place ops write the DTensor); only reductions that decide
something for every rank (a norm, "every gradient is finite") need the other ranks, in one
all-reduce of a small tensor (:mod:`steadystep._distributed`).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from steadystep import _kernels as kernels
from steadystep._distributed import all_ranks, all_reduce_sum

__all__ = [
    "PARALLEL_NUMEL",
    "clone_tensors",
    "flat",
    "flat_shards",
    "full_max",
    "gradient_stats",
    "grads_finite",
    "is_sharded",
    "local_tensor",
    "reduce_square_norms",
    "scale_all_",
    "sharded_flags",
    "shards",
    "step_lr",
    "stored_real_values",
]

# Gradients below this many elements are reduced together rather than one by one (one reduction
# for all small tensors where the fused kernels do not take them).
PARALLEL_NUMEL = 1 << 16


def clone_tensors(entries: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``entries`` whose tensors are clones (e.g. a param group in a state_dict, so
    the saved 0-d multipliers and counts do not change with later steps)."""
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in entries.items()}


def step_lr(lr: float | Tensor) -> float | Tensor:
    """A group's ``lr`` as a step reads it (Note [tensor hyperparameters] of
    :mod:`steadystep.optim.cprop.functional`): a float as it is; a one-element CPU tensor read
    on the host (host memory, no device sync), so the step is bitwise the float's; one on an
    accelerator as a 0-d tensor, never read on the host. torch.optim accepts any one-element
    shape (``[1]``, ``[1, 1]``); a step broadcasting one would change the parameters' shapes."""
    if not isinstance(lr, Tensor):
        return lr
    if lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    return float(lr) if lr.device.type == "cpu" else lr.detach().reshape(())


def scale_all_(tensors: list[Tensor], factor: Tensor) -> None:
    """``t *= factor`` for every tensor (0-d learning-rate multipliers of many param groups):
    one ``torch._foreach_mul_`` per (device, dtype) with the factor as a tensor (read on the
    device), not one multiplication per tensor."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.device, t.dtype), []).append(t)
    for (device, dtype), ts in by_kind.items():
        torch._foreach_mul_(ts, factor.to(device=device, dtype=dtype))


_PLAIN = (Tensor, torch.nn.Parameter, type(None))


def _is_dtensor(t: object) -> bool:
    """Is ``t`` a DTensor (FSDP2's parameters, gradients and state)?

    ``torch.distributed.tensor`` takes a second or more to import, and no DTensor exists before
    it is imported: the check reads the class from ``sys.modules`` and never imports it.
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and isinstance(t, dtensor)


def local_tensor(t: Tensor) -> Tensor:
    """The shard this rank holds of a DTensor (an alias: in-place ops write the DTensor), else
    ``t`` itself."""
    if type(t) not in _PLAIN and _is_dtensor(t):
        return t.to_local()
    return t


def shards(tensors: list[Any]) -> list[Any]:
    """This rank's shards of FSDP2 DTensors (aliases: in-place ops write the DTensor); other
    tensors and None as they are. (Every step calls it on every state list: plain tensors are
    told apart by their exact type, without an ``isinstance`` per tensor.)"""
    plain = _PLAIN
    if all(type(t) in plain for t in tensors):
        return list(tensors)
    return [local_tensor(t) for t in tensors]


def flat(t: Tensor | None) -> Tensor | None:
    """A plain 1-D view (same storage), so parameters of every shape share compiled code."""
    if t is None:
        return None
    t = t.detach()  # a view autograd does not track: a base step may write the parameter
    return t.view(-1) if t.is_contiguous() else t


def flat_shards(tensors: list[Tensor] | None, n: int) -> list[Tensor | None]:
    """Flat views of this rank's shards (:func:`flat`); ``n`` Nones for a missing list."""
    return [None] * n if tensors is None else [flat(t) for t in shards(tensors)]


def sharded_flags(tensors: list[Any]) -> list[bool]:
    """:func:`is_sharded` of each tensor (plain tensors told apart by their exact type)."""
    if all(type(t) in _PLAIN for t in tensors):
        return [False] * len(tensors)
    return [is_sharded(t) for t in tensors]


def is_sharded(t: Tensor) -> bool:
    """Is ``t`` a DTensor split across ranks? Its norms then need a sum over the shards.

    Only FSDP2's layout, one mesh dimension over every rank, is supported: summing over the
    whole world would double count a tensor replicated along another mesh dimension (HSDP).
    """
    if type(t) in _PLAIN or not _is_dtensor(t):
        return False
    placements = t.placements
    if not any(pl.is_shard() for pl in placements):
        return False
    mesh = t.device_mesh
    if mesh.ndim != 1 or mesh.size() != torch.distributed.get_world_size():
        raise NotImplementedError(
            f"steadystep reduces norms of DTensor parameters over the whole world; got a DTensor "
            f"on a {mesh.ndim}-d mesh of {mesh.size()} ranks with placements {placements}. "
            "Use fully_shard over a 1-d mesh of every rank (FSDP2's default)."
        )
    return True


def reduce_square_norms(norms: list[Tensor], sharded: list[bool]) -> list[Tensor]:
    """Norms of whole tensors from their shards' norms: ``sqrt(sum_ranks ||shard||^2)``, in one
    all-reduce for all sharded tensors; the other norms are returned as they are (bitwise)."""
    index = [i for i, s in enumerate(sharded) if s]
    if not index:
        return norms
    total = all_reduce_sum(torch.stack([norms[i] for i in index]).square())
    out = list(norms)
    for k, i in enumerate(index):
        out[i] = total[k].sqrt()
    return out


def full_max(t: Tensor) -> Tensor:
    """Max over the whole tensor; for a DTensor a max over its shards (a collective)."""
    top = t.max()
    return top.full_tensor() if _is_dtensor(top) else top


def stored_real_values(t: Tensor) -> Tensor:
    """The real, strided tensor whose elements are the numbers ``t`` stores: the values of a
    sparse tensor (COO: uncoalesced entries included, so no sort), seen as real where complex
    (``torch.view_as_real``: real and imaginary parts); ``t`` itself otherwise. An alias, no copy:
    what :func:`grads_finite` needs to check the gradients of any optimizer torch supports.

    Examples:
        >>> g = torch.tensor([1.0, 0.0, float("inf"), 0.0]).to_sparse()
        >>> stored_real_values(g)
        tensor([1., inf])
    """
    layout = t.layout
    if layout is torch.strided:
        return torch.view_as_real(t) if t.is_complex() else t
    if layout == torch.sparse_coo:
        t = t._values()
    elif t.layout != torch.strided:  # CSR, CSC, BSR, BSC
        t = t.values()
    return torch.view_as_real(t) if t.is_complex() else t


def grads_finite(grads: list[Tensor], *, collective: bool = True) -> Tensor:
    """0-d bool tensor: every gradient element is finite and at most
    :func:`~steadystep._kernels.gradient_limit` in magnitude (no host sync).

    The limit (``2**63`` for float32 statistics) keeps squares of gradients finite in the
    statistics that hold them (Note [huge gradients] in :mod:`steadystep._kernels`); a larger
    element skips the step like a NaN. Where the fused kernels take the gradients this is one
    kernel call per dtype; otherwise one ``aminmax`` per tensor (small tensors are reduced
    together), exact at every dtype's limits, with NaN-aware comparisons (``-limit <= min`` and
    ``max <= limit`` are False for NaN).

    DTensor gradients (FSDP2) are read on this rank's shards. Under ``torch.distributed`` (more
    than one rank) the flag is combined over ranks in one all-reduce of a 0-d tensor, so every
    rank decides alike: a shard's NaN under FSDP2, and a NaN that reaches one rank's ``p.grad``
    after DDP's all-reduce (a gradient hook, a clip, a bit flip), make every rank skip. Every
    rank must therefore call it at the same point of each step (every optimizer step does).

    Examples:
        >>> grads_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
        tensor(False)
        >>> grads_finite([torch.tensor([1e20])])  # its square would overflow float32
        tensor(False)
    """
    local = shards(grads)
    stats = kernels.grad_stats(local) if local else None
    found_finite = _grads_within_limit(local) if stats is None else stats[0]
    # the same decision on every rank (``collective=False``: this rank's, for a caller that
    # combines it with flags of its own in one all-reduce)
    return all_ranks(found_finite) if collective else found_finite


def gradient_stats(grads: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(found_finite, norm)``: :func:`grads_finite` and the global L2 norm of the gradients
    (0-d float64, accumulated in float64 so large finite gradients do not overflow it; NaN or
    inf where an element is), from one pass over the gradients where the fused kernels take
    them. FSDP2 shards' squares are summed over ranks (the flag and the sum in one all-reduce).

    Examples:
        >>> ok, norm = gradient_stats([torch.tensor([3.0]), torch.tensor([[4.0]])])
        >>> bool(ok), float(norm)
        (True, 5.0)
    """
    local = shards(grads)
    if not local:
        return torch.ones((), dtype=torch.bool), torch.zeros((), dtype=torch.float64)
    stats = kernels.grad_stats(local)
    if stats is None:
        device = local[0].device
        sums = [g.double().square().sum().to(device) for g in local if g.numel()]
        total = torch.stack(sums).sum() if sums else torch.zeros((), dtype=torch.float64)
        stats = (_grads_within_limit(local), total.to(device))
    found_finite, sumsq = stats
    sharded = sharded_flags(grads)
    if any(sharded):
        # whole (not sharded) gradients are counted once: their squares join rank 0's share
        whole = [g for g, split in zip(local, sharded, strict=True) if not split]
        if whole and torch.distributed.get_rank() != 0:
            sumsq = sumsq - gradient_stats(whole)[1].square()
        both = all_reduce_sum(torch.stack([(~found_finite).to(torch.float64), sumsq]))
        found_finite, sumsq = both[0] == 0, both[1]
    else:
        found_finite = all_ranks(found_finite)  # DDP: each rank holds the whole gradient
    return found_finite, sumsq.sqrt()


def _grads_within_limit(grads: list[Tensor]) -> Tensor:
    """:func:`grads_finite` with one ``aminmax`` per tensor (per batch of small tensors)."""
    extremes: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    small: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        if g.numel() >= PARALLEL_NUMEL:
            extremes.setdefault((g.device, g.dtype), []).extend(torch.aminmax(g))
        elif g.numel():
            small.setdefault((g.device, g.dtype), []).append(g.reshape(-1))
    for key, gs in small.items():  # one reduction over all small tensors (a few bytes each)
        extremes.setdefault(key, []).extend(torch.aminmax(torch.cat(gs) if len(gs) > 1 else gs[0]))
    flags = []
    for (_, dtype), values in extremes.items():
        wide = kernels.stats_dtype(dtype)  # the limit is exact in the statistics' dtype
        limit = kernels.gradient_limit(wide)
        lo, hi = torch.stack(values[0::2]).to(wide), torch.stack(values[1::2]).to(wide)
        flags.append(((lo >= -limit) & (hi <= limit)).all())  # NaN compares False
    if not flags:
        device = grads[0].device if grads else torch.device("cpu")
        return torch.ones((), dtype=torch.bool, device=device)
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()
