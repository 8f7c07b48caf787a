"""SkippableSampler (Note [skipping data]): deterministic batches, skip windows, resume from a
checkpoint in a fresh object drawing the same batches, every rank skipping the same global
batches, and bad input named."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import steadystep as ss
from steadystep.data import SkippableSampler
from tests.dist_utils import run_distributed


def _draw(sampler: SkippableSampler, epochs: int) -> list[list[int]]:
    return [batch for _ in range(epochs) for batch in sampler]


def test_every_sample_once_per_epoch_in_a_seeded_order():
    sampler = SkippableSampler(50, batch_size=8, seed=3)
    first, second = list(sampler), list(sampler)
    assert sorted(i for b in first for i in b) == list(range(50))
    assert sorted(i for b in second for i in b) == list(range(50))
    assert first != second  # a new order per epoch
    again = SkippableSampler(50, batch_size=8, seed=3)
    assert list(again) == first and list(again) == second  # a function of (seed, epoch)
    assert [len(b) for b in first] == [8] * 6 + [2]
    dropped = SkippableSampler(50, batch_size=8, seed=3, drop_last=True)
    assert [len(b) for b in dropped] == [8] * 6


def test_skip_windows_remove_global_batches_across_epochs():
    plain = _draw(SkippableSampler(40, batch_size=10, seed=1), 3)  # 4 batches per epoch
    sampler = SkippableSampler(40, batch_size=10, seed=1)
    sampler.skip(2, 5)  # the last two of epoch 0 and the first of epoch 1
    sampler.skip(11, 11)  # an empty window changes nothing
    kept = _draw(sampler, 3)
    assert kept == [b for i, b in enumerate(plain) if not 2 <= i < 5]
    assert sampler.position == 12 and sampler.epoch == 3


def test_a_window_added_mid_epoch_applies_to_the_batches_not_yet_drawn():
    sampler = SkippableSampler(40, batch_size=10, shuffle=False)
    it = iter(sampler)
    assert next(it) == list(range(10))
    sampler.skip(0, 3)  # batch 0 was drawn already: only 1 and 2 are skipped
    assert list(it) == [list(range(30, 40))]


def test_a_dataloader_resumed_from_a_checkpoint_draws_what_the_whole_run_draws():
    data = TensorDataset(torch.arange(100).float())
    whole_sampler = SkippableSampler(len(data), batch_size=7, seed=5)
    whole_sampler.skip(3, 6)
    whole = [x.tolist() for _ in range(3) for (x,) in DataLoader(data, batch_sampler=whole_sampler)]

    sampler = SkippableSampler(len(data), batch_size=7, seed=5)
    sampler.skip(3, 6)
    seen = []
    for (x,) in DataLoader(data, batch_sampler=sampler):
        seen.append(x.tolist())
        if len(seen) == 4:
            saved = sampler.state_dict()
            break
    fresh = SkippableSampler(len(data), batch_size=7, seed=5)
    fresh.load_state_dict(torch.load(_roundtrip(saved), weights_only=True))
    seen = seen[:4]
    while len(seen) < len(whole):
        seen += [x.tolist() for (x,) in DataLoader(data, batch_sampler=fresh)]
    assert seen == whole


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_load_refuses_another_order_and_changes_nothing():
    sampler = SkippableSampler(30, batch_size=5, seed=0)
    list(sampler)
    saved = sampler.state_dict()
    other = SkippableSampler(30, batch_size=5, seed=1)
    with pytest.raises(ValueError, match=r"seed differs: the checkpoint has 0, this sampler 1"):
        other.load_state_dict(saved)
    assert other.position == 0
    with pytest.raises(ValueError, match="expected format 1, found 99"):
        sampler.load_state_dict({**saved, "format": 99})
    with pytest.raises(ValueError, match="'windows' must be a list"):
        sampler.load_state_dict({**saved, "windows": [[5, 2]]})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"dataset_size": 0, "batch_size": 2},
            "dataset_size must be an int >= 1, got dataset_size=0",
        ),
        ({"dataset_size": 10, "batch_size": 2.0}, "batch_size must be an int >= 1"),
        ({"dataset_size": 10, "batch_size": True}, "batch_size must be an int >= 1"),
        ({"dataset_size": 10, "batch_size": 2, "seed": -1}, "seed must be an int >= 0"),
        (
            {"dataset_size": 10, "batch_size": 2, "rank": 2, "world_size": 2},
            "rank must be < world_size",
        ),
        ({"dataset_size": 3, "batch_size": 4, "drop_last": True}, "leaves no batch"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SkippableSampler(**kwargs)


def test_skip_refuses_a_reversed_window():
    with pytest.raises(ValueError, match="stop must be >= start, got start=5, stop=2"):
        SkippableSampler(10, batch_size=2).skip(5, 2)


def test_it_is_exported():
    assert ss.SkippableSampler is SkippableSampler


def _ranks(rank: int, world: int) -> list[list[int]]:
    sampler = SkippableSampler(64, batch_size=4, seed=2)  # rank and world from the process group
    sampler.skip(1, 3)
    return [batch for _ in range(2) for batch in sampler]


def test_every_rank_skips_the_same_global_batches():
    """Two gloo ranks: each takes its share of every global batch, the shares of one global
    batch are disjoint and together the whole global batch, and both ranks skip the same ones."""
    per_rank = run_distributed(_ranks, world=2)
    single = _draw(SkippableSampler(64, batch_size=8, seed=2), 2)
    kept = [b for i, b in enumerate(single) if not 1 <= i < 3]
    assert len(per_rank[0]) == len(per_rank[1]) == len(kept)
    for a, b, whole in zip(per_rank[0], per_rank[1], kept, strict=True):
        assert not set(a) & set(b) and sorted(a + b) == sorted(whole)
