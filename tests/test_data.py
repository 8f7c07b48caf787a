"""SkippableSampler (Note [skipping data]): deterministic batches, skip windows, resume from a
checkpoint in a fresh object drawing the same batches, every rank skipping the same global
batches, and bad input named."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import steadystep as ss
from steadystep.data import SkippableIterable, SkippableSampler
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


# -- mark_consumed: batches drawn ahead of the training loop (Note [batches drawn ahead]) --------


def test_a_checkpoint_resumes_at_the_batches_not_yet_taken():
    """A loop that draws one batch ahead (as Lightning's prefetch does) and marks each batch it
    takes: the checkpoint holds the position of the batch in flight, which the resumed sampler
    draws again; without marks it would be lost."""
    whole = list(SkippableSampler(40, batch_size=4, seed=7))
    sampler = SkippableSampler(40, batch_size=4, seed=7)
    sampler.skip(3, 5)
    it = iter(sampler)
    ahead = next(it)
    taken = []
    for _ in range(3):
        batch, ahead = ahead, next(it)  # the next one is drawn before this one is trained on
        sampler.mark_consumed()
        taken.append(batch)
    assert sampler.position == 6  # drawn: 0, 1, 2, (3, 4 skipped), 5
    saved = sampler.state_dict()
    assert saved["position"] == 5  # batch 5 was drawn, not taken
    fresh = SkippableSampler(40, batch_size=4, seed=7)
    fresh.load_state_dict(saved)
    assert taken + list(fresh) == [b for i, b in enumerate(whole) if not 3 <= i < 5]
    with pytest.raises(RuntimeError, match="every batch drawn was marked consumed"):
        SkippableSampler(40, batch_size=4).mark_consumed()  # nothing drawn


# -- SkippableIterable ---------------------------------------------------------------------------


class _Stream(torch.utils.data.IterableDataset):
    """Batches of a seeded stream, reshuffled by set_epoch: deterministic per pass."""

    def __init__(self, n_batches: int = 6) -> None:
        self.n_batches, self.epoch, self.passes = n_batches, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.passes += 1
        g = torch.Generator().manual_seed(100 + self.epoch)
        for _ in range(self.n_batches):
            yield torch.randn(3, generator=g)


def _values(batches) -> list[list[float]]:
    return [b.tolist() for b in batches]


def test_skippable_iterable_drops_the_windows_over_passes():
    plain = SkippableIterable(_Stream())
    every = [_values(plain) for _ in range(3)]  # 6 batches a pass, one set_epoch each
    assert every[0] != every[1]
    assert plain.position == 18 and plain.epoch == 3 and plain.offset == 0
    batches = SkippableIterable(_Stream())
    batches.skip(4, 8)  # the last two of pass 0 and the first two of pass 1
    kept = [_values(batches) for _ in range(3)]
    assert kept == [every[0][:4], every[1][2:], every[2]]
    assert batches.skipped(7) and not batches.skipped(8)


def test_skippable_iterable_resumes_bitwise_in_a_fresh_object():
    stream = _Stream()
    whole = SkippableIterable(stream)
    whole.skip(2, 3)
    expected = [v for _ in range(3) for v in _values(whole)]

    first = SkippableIterable(_Stream())
    first.skip(2, 3)
    seen = []
    for _ in range(2):  # a whole pass, then 3 batches of the second
        for batch in first:
            seen.append(batch.tolist())
            if len(seen) == 5 + 3:
                break
    saved = torch.load(_roundtrip(first.state_dict()), weights_only=True)
    assert (saved["position"], saved["epoch"], saved["offset"]) == (9, 1, 3)
    again = _Stream()
    resumed = SkippableIterable(again)
    resumed.load_state_dict(saved)
    while len(seen) < len(expected):
        seen += _values(resumed)
    assert seen == expected
    assert again.epoch == 2 and again.passes == 2  # fast-forwarded pass 1, then pass 2


def test_skippable_iterable_continues_a_pass_left_midway():
    batches = SkippableIterable([[1], [2], [3], [4]])
    assert next(iter(batches)) == [1]  # a loop broken after one batch
    assert list(batches) == [[2], [3], [4]] and batches.epoch == 1


def test_skippable_iterable_checkpoints_the_batch_in_flight():
    """Drawn one ahead, marked when taken: the resumed stream redraws the batch in flight,
    across the end of a pass too."""
    data = [[i] for i in range(4)]
    batches = SkippableIterable(data)
    it = iter(batches)
    first = next(it)
    assert first == [0]
    for _ in range(3):
        next(it)
        batches.mark_consumed()
    with pytest.raises(StopIteration):  # the prefetch finds the end of the pass
        next(it)
    assert batches.epoch == 1
    saved = batches.state_dict()
    assert (saved["position"], saved["epoch"], saved["offset"]) == (3, 0, 3)  # [3] in flight
    resumed = SkippableIterable(data)
    resumed.load_state_dict(saved)
    assert list(resumed) == [[3]] and list(resumed) == data


def test_skippable_iterable_refuses_what_it_cannot_replay():
    with pytest.raises(TypeError, match="iterable must be re-iterable"):
        SkippableIterable(iter([[1], [2]]))
    batches = SkippableIterable([[1], [2]])
    state = {"format": 1, "position": 1, "epoch": 0, "offset": 0, "windows": []}
    with pytest.raises(ValueError, match="offset must be <= position"):
        batches.load_state_dict({**state, "offset": 2})
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got epoch=-1"):
        batches.load_state_dict({**state, "epoch": -1})
    with pytest.raises(ValueError, match="stop must be >= start"):
        batches.skip(3, 1)
    batches.load_state_dict({**state, "position": 5, "offset": 5})
    with pytest.raises(RuntimeError, match=r"ended after 2 batches while fast-forwarding to"):
        list(batches)
    assert ss.SkippableIterable is SkippableIterable


def test_skippable_iterable_is_an_escalation_sampler():
    """Duck-typed (skip and position): test_escalation's stretch of bad data (global batches
    200-219, inputs x100), drawn through a SkippableIterable over a plain DataLoader: the
    escalation restores the snapshot from before it and skips the rest of the stretch; the
    iterable's state travels in the guard's state_dict."""
    from tests.test_escalation import FAULT, _data

    torch.set_num_threads(1)
    data, _, _ = _data()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    batches = SkippableIterable(DataLoader(data, batch_size=32))  # 112 batches a pass
    ring = ss.Escalation(every=25, keep=2, sampler=batches)
    guard = ss.CatastropheGuard(
        torch.optim.AdamW(model.parameters(), lr=1e-2), model=model, escalation=ring
    )
    trained = []
    while len(trained) < 300:
        for x, y in batches:
            index = batches.position - 1
            trained.append(index)
            loss = torch.nn.functional.cross_entropy(model(x * 100 if index in FAULT else x), y)
            guard.zero_grad()
            loss.backward()
            guard.step(loss=loss.detach())
            if len(trained) == 300:
                break
    (record,) = ring.history
    assert record["restored_to"] == FAULT[0]
    start, stop = record["skipped"]
    assert start <= FAULT[-1] < stop and batches.windows == [(start, stop)]
    assert not set(trained) & set(range(start, stop)) and trained[-1] == 299 + stop - start
    assert batches.epoch == 2 and int(guard.level_shifts) == 0

    other = SkippableIterable(DataLoader(data, batch_size=32))
    guard_b = ss.CatastropheGuard(
        torch.optim.AdamW(torch.nn.Linear(20, 10).parameters(), lr=1e-2),
        escalation=ss.Escalation(every=25, keep=2, sampler=other),
    )
    with pytest.raises(ValueError):  # another model: refused before the sampler is touched
        guard_b.load_state_dict(guard.state_dict())
    assert other.windows == [] and other.position == 0
    model_c = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    guard_c = ss.CatastropheGuard(
        torch.optim.AdamW(model_c.parameters(), lr=1e-2),
        model=model_c,
        escalation=ss.Escalation(every=25, keep=2, sampler=other),
    )
    guard_c.load_state_dict(guard.state_dict())
    assert other.windows == [(start, stop)] and other.position == batches.position
    assert (other.epoch, other.offset) == (batches.epoch, batches.offset)
