"""The escalation rung (steadystep.escalation, Note [escalation]): a ring of snapshots tens of
steps back, restored when the one-step ladder does not hold, with the data since skipped.

The scenario: a 20-64-10 MLP learns a teacher's labels with AdamW at 1e-2; global batches
200-219 are corrupted (inputs x100, a stretch of bad data). The one-step guard skips, rolls back,
waits ``accept_after`` alarms and then accepts the stretch as a new level and trains on it (its
Adam moments inflated for hundreds of steps); the escalation restores the snapshot from before
step 200 and skips the rest of the stretch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import steadystep as ss
from steadystep.ladder import NORMAL, ROLLED_BACK, Decision

ROOT = Path(__file__).resolve().parents[1]
FAULT = range(200, 220)  # the corrupted global batches
STEPS = 300


def _data() -> tuple[TensorDataset, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 20, generator=g)
    torch.manual_seed(123)
    teacher = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        y = teacher(2 * x).argmax(1)
    return TensorDataset(x[:-512], y[:-512]), x[-512:], y[-512:]


def _setup(
    mode: str, *, seed: int = 0, every: int = 25, **escalation: Any
) -> tuple[torch.nn.Module, Any, ss.SkippableSampler, TensorDataset]:
    torch.set_num_threads(1)  # bitwise across processes
    data, _, _ = _data()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sampler = ss.SkippableSampler(len(data), batch_size=32, seed=seed)
    if mode == "none":
        return model, opt, sampler, data
    if mode == "ladder":
        return model, ss.CatastropheGuard(opt, model=model), sampler, data
    ring = ss.Escalation(every=every, keep=2, sampler=sampler, **escalation)
    return model, ss.CatastropheGuard(opt, model=model, escalation=ring), sampler, data


def _train(
    model: torch.nn.Module,
    opt: Any,
    sampler: ss.SkippableSampler,
    data: TensorDataset,
    start: int,
    stop: int,
    *,
    fault: Any = FAULT,
    scale: float = 100.0,
) -> list[int]:
    """Steps ``start <= step < stop``, one batch each; returns the global batches trained on."""
    drawn = []
    step = start
    while step < stop:
        for x, y in DataLoader(data, batch_sampler=sampler):
            index = sampler.position - 1
            drawn.append(index)
            if index in fault:
                x = x * scale
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if isinstance(opt, ss.CatastropheGuard):
                opt.step(loss=loss.detach())
            else:
                opt.step()
            step += 1
            if step >= stop:
                break
    return drawn


def _val_loss(model: torch.nn.Module) -> float:
    _, x, y = _data()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _final(mode: str, *, fault: Any = FAULT, seed: int = 0) -> tuple[float, Any]:
    model, opt, sampler, data = _setup(mode, seed=seed)
    _train(model, opt, sampler, data, 0, STEPS, fault=fault)
    return _val_loss(model), opt


# -- the promise ---------------------------------------------------------------------------------


def test_a_stretch_of_bad_data_is_recovered_by_escalation_and_not_by_the_one_step_guard():
    clean, _ = _final("none", fault=())
    ladder, one_step = _final("ladder")
    escalated, guard = _final("escalation")
    # the one-step guard accepted the stretch as a level and trained on it
    assert int(one_step.level_shifts) == 1
    assert ladder > 1.05 * clean
    # the escalation went back to the snapshot from before the first bad batch and skipped
    # the rest of the stretch
    (record,) = guard.escalation.history
    assert record["restored_to"] == FAULT[0]
    start, stop = record["skipped"]
    assert start <= FAULT[-1] < stop
    assert int(guard.level_shifts) == 0
    assert escalated <= 1.05 * clean


def test_a_clean_run_with_the_ring_is_bitwise_the_run_without_it():
    """The ring only copies: no alarm, no escalation, the same weights as the one-step guard."""
    model_a, opt_a, sampler_a, data = _setup("ladder")
    _train(model_a, opt_a, sampler_a, data, 0, 120, fault=())
    model_b, opt_b, sampler_b, _ = _setup("escalation")
    _train(model_b, opt_b, sampler_b, data, 0, 120, fault=())
    assert all(map(torch.equal, model_a.parameters(), model_b.parameters()))
    assert sorted(opt_b.escalation.slot_steps) == [75, 100]
    assert opt_b.escalation.history == []


def test_a_change_of_level_is_accepted_after_the_escalation_tested_it():
    """A task switch (every batch from 150 on, x100 and kept): the escalation goes back once,
    finds the loss still high at the old weights on other data, and the ladder accepts."""
    model, opt, sampler, data = _setup("escalation")
    _train(model, opt, sampler, data, 0, 260, fault=range(150, 10**6))
    assert len(opt.escalation.history) == 1
    assert int(opt.level_shifts) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_persistent_nan_raises_training_diverged_with_the_history():
    model, opt, sampler, data = _setup("escalation", max_escalations=2, skip_ahead=3)
    with pytest.raises(ss.TrainingDiverged) as caught:
        _train(model, opt, sampler, data, 0, STEPS, fault=range(120, 10**6), scale=float("nan"))
    history = caught.value.history
    assert len(history) == 3  # two escalations, then the one refused
    assert [h["restored_to"] for h in history[:2]] == [100, 100]
    assert all(h["skipped"][1] - h["skipped"][0] == 3 for h in history[:2])
    assert history[-1]["restored_to"] is None
    assert "2 escalations" in str(caught.value)
    # the keys TrainingDiverged's docstring promises, and no others
    assert all(set(h) == {"step", "loss", "restored_to", "skipped"} for h in history)


# -- the ring ------------------------------------------------------------------------------------


def test_the_ring_keeps_the_newest_slots_and_chooses_the_last_one_before_the_trouble():
    ring = ss.Escalation(every=10, keep=3)
    ring.attach(torch.device("cpu"))
    live = [torch.zeros(3)]
    detector = ss.SpikeDetector()
    for step in (10, 20, 30, 40):
        live[0].fill_(step)
        ring.take(live, detector, step)
    assert sorted(ring.slot_steps) == [20, 30, 40]
    assert ring.slot_steps[ring.choose(35)] == 30
    assert ring.slot_steps[ring.choose(40)] == 40
    assert ring.slot_steps[ring.choose(5)] == 20  # none that early: the oldest
    assert ring.nbytes() == 3 * 3 * 4


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_host_and_disk_rings_recover_as_the_device_ring_does(where, tmp_path):
    device = tmp_path / "ring" if where == "disk" else "cpu"
    model, opt, sampler, data = _setup("escalation", snapshot_device=device)
    _train(model, opt, sampler, data, 0, STEPS)
    _, reference = _final("escalation")
    assert opt.escalation.history == reference.escalation.history
    assert all(map(torch.equal, model.parameters(), reference.optimizer.param_groups[0]["params"]))
    if where == "disk":
        assert sorted(p.name for p in device.iterdir()) == ["slot0-rank0.pt", "slot1-rank0.pt"]
        assert opt.escalation.nbytes() == 0


# -- checkpoints ---------------------------------------------------------------------------------


def test_state_dict_round_trip_keeps_the_ring_and_the_pending_flag():
    """A checkpoint taken between the decision and the restore (the flag posted) resumes with
    the restore still to come."""
    model, opt, sampler, data = _setup("escalation")
    _train(model, opt, sampler, data, 0, 206)  # the decision is at step 205
    saved = opt.state_dict()
    flat = saved["param_groups"][0]["guard"]["guard"]["escalation"]
    assert flat["due"] and flat["slot_steps"] and "sampler" in flat
    model2, opt2, sampler2, _ = _setup("escalation")
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(saved)
    _train(model, opt, sampler, data, 206, 230)
    _train(model2, opt2, sampler2, data, 206, 230)
    assert opt.escalation.history == opt2.escalation.history
    assert all(map(torch.equal, model.parameters(), model2.parameters()))


def test_load_refuses_a_ring_of_another_size():
    _, opt, _, _ = _setup("escalation")
    saved = opt.state_dict()
    model2 = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    other = ss.CatastropheGuard(
        torch.optim.AdamW(model2.parameters(), lr=1e-2), escalation=ss.Escalation(keep=3)
    )
    with pytest.raises(ValueError, match="keep=3"):
        other.load_state_dict(saved)


# -- the decision ----------------------------------------------------------------------------------


def _decision(**flags: bool) -> Decision:
    t = {k: torch.tensor(flags.get(k, False)) for k in ("update", "rollback", "cut", "accept")}
    return Decision(**t, phase=torch.tensor(ROLLED_BACK), waited=torch.tensor(2))


def test_amend_escalates_a_repeated_rollback_and_an_untested_acceptance_only():
    ring = ss.Escalation(within=5)
    ring.attach(torch.device("cpu"))
    ring.take([torch.zeros(1)], ss.SpikeDetector(), 1)
    alarm, phase = torch.tensor(True), torch.tensor(NORMAL)
    first = ring.amend(
        _decision(rollback=True, cut=True), alarm, phase, torch.tensor(10), torch.tensor(1.0)
    )
    assert bool(first.rollback) and not ring._peek()
    late = ring.amend(
        _decision(rollback=True, cut=True), alarm, phase, torch.tensor(16), torch.tensor(1.0)
    )
    assert bool(late.rollback) and not ring._peek()  # 6 > within steps later
    again = ring.amend(
        _decision(rollback=True, cut=True), alarm, phase, torch.tensor(20), torch.tensor(1.0)
    )
    assert ring._peek() and ring.due() and not ring.due()  # read once
    assert not bool(again.rollback | again.cut | again.update | again.accept)
    assert int(again.phase) == ROLLED_BACK and int(again.waited) == 0
    accept = ring.amend(
        _decision(update=True, accept=True), alarm, phase, torch.tensor(25), torch.tensor(1.0)
    )
    assert bool(accept.accept) and not ring._peek()  # this episode was tested already


def test_no_snapshot_yet_means_no_escalation():
    ring = ss.Escalation()
    ring.attach(torch.device("cpu"))
    decision = ring.amend(
        _decision(update=True, accept=True),
        torch.tensor(True),
        torch.tensor(0),
        torch.tensor(3),
        torch.tensor(1.0),
    )
    assert bool(decision.accept) and not ring.due()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every"),
        ({"keep": 1.5}, "keep"),
        ({"skip_ahead": -1}, "skip_ahead"),
        ({"snapshot_device": 3}, "snapshot_device"),
        ({"snapshot_device": "nowhere"}, "snapshot_device"),
        ({"sampler": [1, 2]}, "sampler"),
        ({"max_escalations": 0}, "max_escalations"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ss.Escalation(**kwargs)


def test_stabilize_builds_its_guard_with_the_escalation():
    """ss.stabilize(..., escalation=...) hands the rung to the guard it builds: the stretch of
    bad data is recovered as with CatastropheGuard(..., escalation=...), through clip()."""
    model, _, sampler, data = _setup("none")
    opt = ss.stabilize(
        torch.optim.AdamW(model.parameters(), lr=1e-2),
        model=model,
        escalation=ss.Escalation(every=25, keep=2, sampler=sampler),
    )
    step = 0
    while step < STEPS:
        for x, y in DataLoader(data, batch_sampler=sampler):
            if sampler.position - 1 in FAULT:
                x = x * 100.0
            loss = opt.clip(F.cross_entropy(model(x), y, reduction="none")).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= STEPS:
                break
    assert opt.guard is not None and opt.guard.escalation is not None
    (record,) = opt.guard.escalation.history
    assert record["restored_to"] == FAULT[0]
    assert record["skipped"][0] <= FAULT[-1] < record["skipped"][1]
    assert sampler.windows == [tuple(record["skipped"])]
    clean, _ = _final("none", fault=())
    assert _val_loss(model) <= 1.05 * clean
    # the same through guard={...}
    ring = ss.Escalation()
    settings = ss.stabilize(torch.optim.SGD(model.parameters(), lr=0.1), guard={"escalation": ring})
    assert settings.guard is not None and settings.guard.escalation is ring


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"guard": False}, ValueError, "guard must not be off, got guard=False"),
        ({"guard": {"escalation": ss.Escalation()}}, ValueError, "escalation given twice"),
        ({"escalation": "yes"}, TypeError, "escalation must be an ss.Escalation"),
    ],
)
def test_stabilize_refuses_an_escalation_it_cannot_place(kwargs, error, match):
    model = torch.nn.Linear(2, 1)
    kwargs = {"escalation": ss.Escalation(), **kwargs}
    with pytest.raises(error, match=match):
        ss.stabilize(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    guarded = ss.CatastropheGuard(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already a CatastropheGuard; build it with escalation"):
        ss.stabilize(guarded, escalation=ss.Escalation())


def test_the_guard_refuses_something_else_as_escalation():
    with pytest.raises(TypeError, match="escalation"):
        ss.CatastropheGuard(
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), escalation={"every": 10}
        )


# -- the dropped step ------------------------------------------------------------------------------


def _scripted(make_opt: Any, *, closure_at: int | None = None, jump: int = 20) -> dict[str, Any]:
    """A 4-8-2 model on a fixed batch, its guard fed a scripted loss: 1.0 before step ``jump``,
    then 100.0 for good (a new level). The ladder skips (20), rolls back (21), waits (22-24) and
    would accept at 25: the escalation is decided there and done at 26, the step dropped (with
    ``jump=20``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    opt = make_opt(model)
    after: list[list[torch.Tensor]] = []
    out: dict[str, Any] = {"opt": opt, "after": after}
    for step in range(jump + 7):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        scripted = torch.tensor(1.0 if step < jump else 100.0)
        if step == jump + 5:
            out["scale_before"] = float(opt.lr_scale)
        if step == closure_at:
            out["returned"] = opt.step(lambda: "the closure's result", loss=scripted)
        else:
            out["returned"] = opt.step(loss=scripted)
        after.append([p.detach().clone() for p in model.parameters()])
    out["params"] = [p.detach() for p in model.parameters()]
    return out


def _guard(base: Any, **kwargs: Any) -> Any:
    return lambda model: ss.CatastropheGuard(
        base(model.parameters()), escalation=ss.Escalation(every=5, **kwargs)
    )


@pytest.mark.parametrize(
    "base",
    [lambda ps: torch.optim.AdamW(ps, lr=1e-2), lambda ps: ss.CPropAdamW(ps, lr=1e-2)],
    ids=["AdamW", "CPropAdamW"],
)
def test_the_dropped_step_restores_the_slot_cuts_once_and_restarts_the_episode(base):
    run = _scripted(_guard(base))
    opt, after = run["opt"], run["after"]
    (record,) = opt.escalation.history
    assert (record["step"], record["restored_to"]) == (26, 20)
    assert float(run["returned"]) == 100.0  # the dropped step returns the loss, as any step
    # the weights and the one-step snapshot are the slot's: the weights after 20 steps
    assert all(map(torch.equal, run["params"], after[19]))
    assert all(map(torch.equal, opt.snapshot.param_copies, after[19]))
    assert float(opt.lr_scale) == run["scale_before"] * 0.5
    assert torch.allclose(opt.stats()["lr"], torch.tensor(1e-2 * float(opt.lr_scale)).double())
    assert (int(opt.phase), int(opt.waited), int(opt.calm)) == (2, 0, 0)  # ROLLED_BACK
    assert int(opt.stats()["steps"]) == 27  # the dropped step counts
    assert bool(opt.last_step_skipped)  # ALRC's moments take it back (Stabilized)
    assert int(opt.stats()["escalations"]) == 1


def test_the_dropped_step_returns_the_closures_result():
    run = _scripted(_guard(lambda ps: torch.optim.AdamW(ps, lr=1e-2)), closure_at=26)
    assert len(run["opt"].escalation.history) == 1
    assert run["returned"] == "the closure's result"


def test_an_older_slot_than_the_one_step_snapshot_is_what_is_restored():
    """The loss jumps at step 22: slots at 5, 10, 15, 20 (and 25) when the escalation is done
    at 28; the episode began at 22, so the slot of step 20 (the weights after 20 steps) is
    restored, not the one-step snapshot (the weights after 22)."""
    run = _scripted(_guard(lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9)), jump=22)
    opt, after = run["opt"], run["after"]
    assert opt.escalation.history[0]["restored_to"] == 20
    assert not all(map(torch.equal, after[19], after[21]))
    assert all(map(torch.equal, run["params"], after[19]))
    assert all(map(torch.equal, opt.snapshot.param_copies, after[19]))


def test_the_escalations_cut_is_checked_against_min_lr():
    """The rollback's cut leaves 5e-3 (above min_lr=3e-3), the escalation's 2.5e-3: the dropped
    step raises TrainingDiverged, on the host path too (where only a cut is checked)."""
    make = _guard(lambda ps: torch.optim.AdamW(ps, lr=1e-2))

    def with_min_lr(model: torch.nn.Module) -> Any:
        opt = make(model)
        opt.min_lr = 3e-3
        return opt

    with pytest.raises(ss.TrainingDiverged, match="min_lr"):
        _scripted(with_min_lr)
