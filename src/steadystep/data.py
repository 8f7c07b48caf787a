"""Batches that can be skipped: a deterministic, resumable batch sampler with a skip list.

Note [skipping data]
    A stretch of bad data (corrupted shards, a broken augmentation, mislabeled files) is what
    large runs have answered by hand: restart from a checkpoint some steps back and skip the
    batches that caused the trouble (PaLM skipped 200-500 batches around each spike; metaseq has
    a ``skip_batches`` option). :class:`SkippableSampler` makes that a call: ``skip(start, stop)``
    removes the *global* batches ``start <= b < stop`` from the run, where the global batch index
    counts every batch the run draws, over epochs, from 0. The order of the batches is a function
    of ``(seed, epoch)`` alone, and the skip list and the position are in :meth:`state_dict`, so a
    run restarted from a checkpoint draws and skips exactly the batches the uninterrupted run
    would. Under ``torch.distributed`` each rank takes its share of every global batch (the
    global batch is ``batch_size * world_size`` samples), so every rank skips the same global
    batches.

Use it as a DataLoader's ``batch_sampler``::

    sampler = ss.SkippableSampler(len(dataset), batch_size=32, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)
    ...
    sampler.skip(1200, 1400)   # never train on these 200 global batches
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

from steadystep._validation import check_count

__all__ = ["SkippableSampler"]

_FORMAT = 1


class SkippableSampler(Sampler[list[int]]):
    """Batches of dataset indices, shuffled per epoch from ``(seed, epoch)``, with windows of
    global batches that are never drawn (Note [skipping data]).

    Args:
        dataset_size: the number of samples (``len(dataset)``).
        batch_size: samples per batch on each rank.
        shuffle: a new order every epoch (default True); False keeps the dataset's order.
        seed: the seed of the orders (default 0).
        drop_last: drop the last, incomplete global batch of an epoch (default False).
        rank, world_size: this rank and the number of ranks (default: from
            ``torch.distributed`` when it is initialized, else 0 and 1).

    ``position`` is the global index of the next batch; iterating starts where the last
    iteration (or the loaded checkpoint) left off, so a DataLoader built on a resumed sampler
    continues the epoch it was in.

    Examples:
        >>> sampler = ss.SkippableSampler(10, batch_size=2, shuffle=False)
        >>> sampler.skip(1, 3)
        >>> len(sampler)  # batches left in this epoch
        3
        >>> [batch for batch in sampler]
        [[0, 1], [6, 7], [8, 9]]
        >>> sampler.position, sampler.epoch
        (5, 1)
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.dataset_size = check_count("dataset_size", dataset_size, low=1)
        self.batch_size = check_count("batch_size", batch_size, low=1)
        if not isinstance(shuffle, bool) or not isinstance(drop_last, bool):
            raise TypeError(
                f"shuffle and drop_last must be bools, got shuffle={shuffle!r}, "
                f"drop_last={drop_last!r}"
            )
        self.seed = check_count("seed", seed, low=0)
        dist = torch.distributed
        ready = dist.is_available() and dist.is_initialized()
        if world_size is None:
            world_size = dist.get_world_size() if ready else 1
        if rank is None:
            rank = dist.get_rank() if ready else 0
        self.world_size = check_count("world_size", world_size, low=1)
        self.rank = check_count("rank", rank, low=0)
        if self.rank >= self.world_size:
            raise ValueError(
                f"rank must be < world_size, got rank={self.rank}, world_size={self.world_size}"
            )
        self.shuffle, self.drop_last = shuffle, drop_last
        global_batch = self.batch_size * self.world_size
        whole, rest = divmod(self.dataset_size, global_batch)
        self.batches_per_epoch = whole + (1 if rest and not drop_last else 0)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"drop_last=True leaves no batch: dataset_size={dataset_size} < batch_size * "
                f"world_size={global_batch}"
            )
        self.position = 0
        self.windows: list[tuple[int, int]] = []

    # -- skipping ----------------------------------------------------------------------------
    def skip(self, start: int, stop: int) -> None:
        """Never draw the global batches ``start <= b < stop`` (windows may overlap, lie in the
        past or the future; batches already drawn are not undrawn)."""
        start = check_count("start", start, low=0)
        stop = check_count("stop", stop, low=0)
        if stop < start:
            raise ValueError(f"stop must be >= start, got start={start}, stop={stop}")
        if stop > start:
            self.windows.append((start, stop))

    def skipped(self, index: int) -> bool:
        """Is the global batch ``index`` in a skip window?"""
        return any(start <= index < stop for start, stop in self.windows)

    # -- the batches -------------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=g).tolist()

    def _batch(self, order: list[int], k: int) -> list[int]:
        """This rank's share of the epoch's ``k``-th global batch (ranks take interleaved
        samples of it, as DistributedSampler does; a short last batch may leave a rank
        fewer)."""
        global_batch = self.batch_size * self.world_size
        chunk = order[k * global_batch : (k + 1) * global_batch]
        return chunk[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            epoch, k = divmod(self.position, self.batches_per_epoch)
            order = self._order(epoch)
            index = self.position
            self.position += 1
            if not self.skipped(index):
                batch = self._batch(order, k)
                if batch:
                    yield batch
            if k == self.batches_per_epoch - 1:
                return  # the end of an epoch: a DataLoader's `for` loop ends here

    def __len__(self) -> int:
        """The batches left in the current epoch (skipped ones excluded)."""
        epoch, k = divmod(self.position, self.batches_per_epoch)
        first = epoch * self.batches_per_epoch
        return (
            sum(not self.skipped(b) for b in range(first + k, first + self.batches_per_epoch))
            or self.batches_per_epoch
        )

    @property
    def epoch(self) -> int:
        return self.position // self.batches_per_epoch

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position, the skip windows and the settings that fix the order."""
        return {
            "format": _FORMAT,
            "position": self.position,
            "windows": [list(w) for w in self.windows],
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset_size": self.dataset_size,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the next batch drawn is the one the saved run would have drawn next. A
        checkpoint of another order (seed, shuffle, sizes, ranks) is refused, nothing loaded."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != _FORMAT:
            found = state_dict.get("format") if isinstance(state_dict, dict) else state_dict
            raise ValueError(
                f"SkippableSampler.load_state_dict: expected format {_FORMAT}, found {found!r}"
            )
        for key in ("seed", "shuffle", "dataset_size", "batch_size", "world_size", "drop_last"):
            if state_dict.get(key) != getattr(self, key):
                raise ValueError(
                    f"SkippableSampler.load_state_dict: {key} differs: the checkpoint has "
                    f"{state_dict.get(key)!r}, this sampler {getattr(self, key)!r} (the order "
                    "of the batches would not be the saved run's)"
                )
        position = check_count("position", state_dict.get("position"), low=0)
        windows = state_dict.get("windows")
        if not isinstance(windows, list) or not all(
            isinstance(w, (list, tuple)) and len(w) == 2 and 0 <= w[0] <= w[1] for w in windows
        ):
            raise ValueError(
                "SkippableSampler.load_state_dict: 'windows' must be a list of [start, stop] "
                f"pairs with 0 <= start <= stop, found {windows!r}"
            )
        self.position = position
        self.windows = [(int(a), int(b)) for a, b in windows]

    def __repr__(self) -> str:
        return (
            f"SkippableSampler(dataset_size={self.dataset_size}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, position={self.position}, "
            f"windows={self.windows})"
        )
