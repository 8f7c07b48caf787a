"""Tensor plumbing any optimizer can use: FSDP2 shards, flat views, finiteness, norms.

Under ``torch.distributed.fsdp.fully_shard`` parameters, gradients and the state created
``zeros_like`` them are DTensors. Elementwise math runs on this rank's shard
(:func:`local_tensor`: an alias, so in-place ops write the DTensor); only reductions that decide
something for every rank (a norm, "every gradient is finite") need the other ranks, in one
all-reduce of a small tensor (:mod:`steadystep._distributed`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from steadystep._distributed import all_ranks, all_reduce_sum

try:  # FSDP2 parameters are DTensors (torch >= 2.4)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = None

__all__ = [
    "PARALLEL_NUMEL",
    "DTensor",
    "clone_tensors",
    "flat",
    "flat_shards",
    "full_max",
    "grads_finite",
    "is_sharded",
    "local_tensor",
    "reduce_square_norms",
    "shards",
    "stored_real_values",
]

# Tensors below this many elements are handled together rather than one by one (one reduction
# here; one compiled-kernel call in steadystep.optim._compile); above it, a CPU loop gets all
# threads.
PARALLEL_NUMEL = 1 << 16


def clone_tensors(entries: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``entries`` whose tensors are clones (e.g. a param group in a state_dict, so
    the saved 0-d multipliers and counts do not change with later steps)."""
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in entries.items()}


def local_tensor(t: Tensor) -> Tensor:
    """The shard this rank holds of a DTensor (an alias: in-place ops write the DTensor), else
    ``t`` itself."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def shards(tensors: list[Any]) -> list[Any]:
    """This rank's shards of FSDP2 DTensors (aliases: in-place ops write the DTensor); other
    tensors and None as they are."""
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


def is_sharded(t: Tensor) -> bool:
    """Is ``t`` a DTensor split across ranks? Its norms then need a sum over the shards.

    Only FSDP2's layout, one mesh dimension over every rank, is supported: summing over the
    whole world would double count a tensor replicated along another mesh dimension (HSDP).
    """
    if DTensor is None or not isinstance(t, DTensor):
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
    return top.full_tensor() if DTensor is not None and isinstance(top, DTensor) else top


def stored_real_values(t: Tensor) -> Tensor:
    """The real, strided tensor whose elements are the numbers ``t`` stores: the values of a
    sparse tensor (COO: uncoalesced entries included, so no sort), seen as real where complex
    (``torch.view_as_real``: real and imaginary parts); ``t`` itself otherwise. An alias, no copy:
    what :func:`grads_finite` needs to check the gradients of any optimizer torch supports.

    Example:
        >>> g = torch.tensor([1.0, 0.0, float("inf"), 0.0]).to_sparse()
        >>> stored_real_values(g)
        tensor([1., inf])
    """
    if t.layout == torch.sparse_coo:
        t = t._values()
    elif t.layout != torch.strided:  # CSR, CSC, BSR, BSC
        t = t.values()
    return torch.view_as_real(t) if t.is_complex() else t


def grads_finite(grads: list[Tensor]) -> Tensor:
    """0-d bool tensor: every element of every gradient is finite (no host sync).

    A tensor is finite exactly when its smallest and largest elements are: ``aminmax``
    propagates NaN and returns -inf / inf where they occur. One reduction per tensor, exact for
    every dtype (a sum would overflow on large finite values), and no slower than a sum.
    Empty tensors are finite and are skipped (``aminmax`` has no identity).

    DTensor gradients (FSDP2) are read on this rank's shards. Under ``torch.distributed`` (more
    than one rank) the flag is combined over ranks in one all-reduce of a 0-d tensor, so every
    rank decides alike: a shard's NaN under FSDP2, and a NaN that reaches one rank's ``p.grad``
    after DDP's all-reduce (a gradient hook, a clip, a bit flip), make every rank skip. Every
    rank must therefore call it at the same point of each step (every optimizer step does).

    Example:
        >>> grads_finite([torch.ones(3), torch.tensor([1.0, float("nan")])])
        tensor(False)
    """
    local = shards(grads)
    extremes: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    small: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in local:
        if g.numel() >= PARALLEL_NUMEL:
            extremes.setdefault((g.device, g.dtype), []).extend(torch.aminmax(g))
        elif g.numel():
            small.setdefault((g.device, g.dtype), []).append(g.reshape(-1))
    for key, gs in small.items():  # one reduction over all small tensors (a few bytes each)
        extremes.setdefault(key, []).extend(torch.aminmax(torch.cat(gs) if len(gs) > 1 else gs[0]))
    flags = [torch.stack(values).isfinite().all() for values in extremes.values()]
    if not flags:
        device = local[0].device if local else torch.device("cpu")
        found_finite = torch.ones((), dtype=torch.bool, device=device)
    else:
        found_finite = flags[0] if len(flags) == 1 else torch.stack(flags).all()
    return all_ranks(found_finite)  # the same decision on every rank
