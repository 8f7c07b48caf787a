"""Run a function on N real processes with the gloo backend (CPU), for multi-process tests."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, fn: Callable, args: tuple, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        import torch

        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        # every rank done before the group is torn down: a rank that tears down while the
        # other still has collective work in flight can abort in gloo's teardown
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world: int = 2, args: tuple = ()) -> list[Any]:
    """Spawn ``world`` processes running ``fn(rank, world, *args)``; return their results by rank.

    ``fn`` must be importable (module level) and return something ``torch.save`` can write.
    """
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.start_processes(
            _worker,
            args=(world, init_file, fn, args, tmp),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return [
            torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)
        ]
