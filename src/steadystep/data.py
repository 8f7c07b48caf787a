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

For an iterable of batches (an ``IterableDataset`` that yields batches, a DataLoader over one)
:class:`SkippableIterable` does the same by dropping the batches of the windows as they come.

Note [batches drawn ahead]
    A DataLoader's workers and a framework's prefetching draw batches before the training loop
    takes them (Lightning draws one batch ahead, accelerate's DataLoaderShard one, each worker
    ``prefetch_factor``). ``position`` counts the batches *drawn*: a window that starts there
    skips what has not been drawn yet, and the batches already in flight are trained on (they
    cannot be called back). A checkpoint must hold the position of the batches *trained on*,
    else the resumed run never trains the ones that were in flight. So the training loop calls
    :meth:`~SkippableSampler.mark_consumed` each time it takes a batch (the integrations do:
    ``steadystep.integrations.lightning.DataPosition``, ``SteadystepTrainer``); from the first
    call on, :meth:`~SkippableSampler.state_dict` saves the position of the oldest batch drawn
    and not yet taken, which the resumed run draws again. A loop that takes every batch as soon
    as it is drawn (a DataLoader with ``num_workers=0`` in a plain ``for`` loop) needs no call.

Use it as a DataLoader's ``batch_sampler``::

    sampler = ss.SkippableSampler(len(dataset), batch_size=32, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler)
    ...
    sampler.skip(1200, 1400)   # never train on these 200 global batches
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import Sampler

from steadystep._validation import check_count

__all__ = ["SkippableIterable", "SkippableSampler"]

_FORMAT = 1
_AHEAD = 4096  # batches drawn and not yet taken that are remembered (Note [batches drawn ahead])
T = TypeVar("T")


class _SkipWindows:
    """What both skippable sources share: the windows of global batches to skip, the position,
    and the batches drawn ahead of the training loop (Note [batches drawn ahead])."""

    position: int
    windows: list[tuple[int, int]]

    def _init_windows(self) -> None:
        self.position = 0
        self.windows = []
        self._ahead: deque[Any] = deque(maxlen=_AHEAD)  # what resumes at each drawn batch
        self._tracking = False

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

    def mark_consumed(self) -> None:
        """The training loop took the oldest batch drawn and not yet taken (Note [batches drawn
        ahead]): from now on a checkpoint resumes at the batches not yet taken."""
        if not self._ahead:
            raise RuntimeError(
                f"{type(self).__name__}.mark_consumed: every batch drawn was marked consumed "
                "already (call it once per batch the training loop takes)"
            )
        self._ahead.popleft()
        self._tracking = True

    def _resume_point(self, here: Any) -> Any:
        """What a checkpoint resumes at: the oldest batch drawn and not taken, else ``here``."""
        return self._ahead[0] if self._tracking and self._ahead else here

    def _checked(self, state_dict: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checks of :meth:`load_state_dict`, nothing loaded."""
        self._checked(state_dict)

    def _check_format(self, state_dict: Any) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("format") != _FORMAT:
            found = state_dict.get("format") if isinstance(state_dict, dict) else state_dict
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: expected format {_FORMAT}, found {found!r}"
            )

    @staticmethod
    def _check_windows(owner: str, windows: Any) -> list[tuple[int, int]]:
        if not isinstance(windows, list) or not all(
            isinstance(w, (list, tuple))
            and len(w) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in w)
            and 0 <= w[0] <= w[1]
            for w in windows
        ):
            raise ValueError(
                f"{owner}.load_state_dict: 'windows' must be a list of [start, stop] "
                f"pairs with 0 <= start <= stop, found {windows!r}"
            )
        return [(int(a), int(b)) for a, b in windows]


class SkippableSampler(_SkipWindows, Sampler[list[int]]):
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
    continues the epoch it was in. With workers or a framework that prefetches, call
    :meth:`mark_consumed` per batch trained on (Note [batches drawn ahead]).

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
        if isinstance(dataset_size, Sampler):  # Lightning injecting a DistributedSampler
            raise TypeError(
                "SkippableSampler takes dataset_size, not a sampler: it shards every global "
                "batch over the ranks itself; in Lightning set "
                "Trainer(use_distributed_sampler=False)"
            )
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
        self._init_windows()

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
                    self._ahead.append(index)
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
            "position": self._resume_point(self.position),
            "windows": [list(w) for w in self.windows],
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dataset_size": self.dataset_size,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
        }

    def _checked(self, state_dict: Any) -> tuple[int, list[tuple[int, int]]]:
        self._check_format(state_dict)
        for key in ("seed", "shuffle", "dataset_size", "batch_size", "world_size", "drop_last"):
            if state_dict.get(key) != getattr(self, key):
                raise ValueError(
                    f"SkippableSampler.load_state_dict: {key} differs: the checkpoint has "
                    f"{state_dict.get(key)!r}, this sampler {getattr(self, key)!r} (the order "
                    "of the batches would not be the saved run's)"
                )
        position = check_count("position", state_dict.get("position"), low=0)
        return position, self._check_windows("SkippableSampler", state_dict.get("windows"))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the next batch drawn is the one the saved run would have drawn next. A
        checkpoint of another order (seed, shuffle, sizes, ranks) is refused, nothing loaded."""
        self.position, self.windows = self._checked(state_dict)
        self._ahead.clear()

    def __repr__(self) -> str:
        return (
            f"SkippableSampler(dataset_size={self.dataset_size}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, seed={self.seed}, position={self.position}, "
            f"windows={self.windows})"
        )


class SkippableIterable(_SkipWindows, Generic[T]):
    """Batches from an iterable of batches, with windows of global batches that are dropped
    (Note [skipping data]): for data a sampler cannot index (an ``IterableDataset`` yielding
    batches, a ``DataLoader`` over one, a stream).

    Args:
        iterable: re-iterable batches: each ``iter(iterable)`` is one pass (an "epoch"); an
            infinite one is a single pass. Not an iterator (a generator cannot be restarted).

    ``position`` counts the global batches drawn over all passes (skipped ones included),
    ``epoch`` the passes begun before the current one and ``offset`` the batches drawn in it.
    Iterating continues the pass in progress, or begins the next one (calling
    ``iterable.set_epoch(epoch)`` first when it has that method); a skipped batch is still
    drawn from ``iterable`` (its loading is not saved), then dropped.

    Resuming (:meth:`load_state_dict`) draws and discards ``offset`` batches of a fresh pass
    over ``iterable``: that gives the saved run's next batch **only if the iterable is
    deterministic**: its pass ``epoch`` yields the same batches in the same order in a fresh
    process (a seeded shuffle, e.g. by ``set_epoch``; no unseeded worker randomness), and it
    costs the loading of ``offset`` batches. Under ``torch.distributed`` each rank wraps its
    own share of the stream; every rank skips the same global batch indices, so the shares
    must advance in step (one batch per rank per step).

    Examples:
        >>> batches = ss.SkippableIterable([[0, 1], [2, 3], [4, 5], [6, 7]])
        >>> batches.skip(1, 3)
        >>> list(batches)  # pass 0: the global batches 0-3
        [[0, 1], [6, 7]]
        >>> list(batches)  # pass 1: 4-7
        [[0, 1], [2, 3], [4, 5], [6, 7]]
        >>> batches.position, batches.epoch
        (8, 2)
    """

    def __init__(self, iterable: Iterable[T]) -> None:
        if isinstance(iterable, Iterator) or not callable(getattr(iterable, "__iter__", None)):
            raise TypeError(
                "iterable must be re-iterable (a DataLoader, an IterableDataset, a list): each "
                "iter() a new pass, so that a resume can replay one; got "
                f"{type(iterable).__name__}"
            )
        self.iterable = iterable
        self._init_windows()
        self.epoch = 0
        self.offset = 0
        self._live: Iterator[T] | None = None  # the pass in progress

    def _begin(self) -> Iterator[T]:
        """A fresh pass ``epoch``, fast-forwarded past its first ``offset`` batches."""
        set_epoch = getattr(self.iterable, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(self.epoch)
        it = iter(self.iterable)
        for k in range(self.offset):
            try:
                next(it)
            except StopIteration:
                raise RuntimeError(
                    f"SkippableIterable: pass {self.epoch} of the iterable ended after {k} "
                    f"batches while fast-forwarding to batch {self.offset}: the iterable is not "
                    "the checkpoint's, or not deterministic"
                ) from None
        return it

    def __iter__(self) -> Iterator[T]:
        if self._live is None:
            self._live = self._begin()
        live = self._live
        for batch in live:
            index = self.position
            resume_at = (index, self.epoch, self.offset)
            self.position += 1
            self.offset += 1
            if self.skipped(index):
                continue
            self._ahead.append(resume_at)
            yield batch
        if self._live is live:  # the pass ended (a load in between started another)
            self.epoch += 1
            self.offset = 0
            self._live = None

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position (global, and in its pass) and the skip windows."""
        position, epoch, offset = self._resume_point((self.position, self.epoch, self.offset))
        return {
            "format": _FORMAT,
            "position": position,
            "epoch": epoch,
            "offset": offset,
            "windows": [list(w) for w in self.windows],
        }

    def _checked(self, state_dict: Any) -> tuple[int, int, int, list[tuple[int, int]]]:
        self._check_format(state_dict)
        position = check_count("position", state_dict.get("position"), low=0)
        epoch = check_count("epoch", state_dict.get("epoch"), low=0)
        offset = check_count("offset", state_dict.get("offset"), low=0)
        if offset > position:
            raise ValueError(
                f"SkippableIterable.load_state_dict: offset must be <= position, got "
                f"offset={offset}, position={position}"
            )
        windows = self._check_windows("SkippableIterable", state_dict.get("windows"))
        return position, epoch, offset, windows

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume: the next pass is fast-forwarded to the saved run's next batch (the class
        docstring says when that is the same batch)."""
        self.position, self.epoch, self.offset, self.windows = self._checked(state_dict)
        self._ahead.clear()
        self._live = None

    def __repr__(self) -> str:
        return (
            f"SkippableIterable({type(self.iterable).__name__}, position={self.position}, "
            f"epoch={self.epoch}, offset={self.offset}, windows={self.windows})"
        )
