"""Fault-injection soak: every steadystep optimizer and the main compositions, on a small model,
under seeded random faults: non-finite and huge gradients, loss spikes, NaN losses, and resume,
over a long run.

Faults, drawn per step from a seeded schedule (at most one per step, none in the first steps):

* ``"nonfinite"``: a NaN, +inf or -inf element in one gradient; and, for the guarded cases, a
  loss spike (the watched loss set to 1e6, wherever the detector has an observation to compare
  it with) or a NaN loss (for ALRC + SALeRA a NaN per-sample loss before ALRC, so that the
  gradients are NaN too);
* ``"huge"``: one gradient element of magnitude 1e20 to 1e30 (finite; above 2**63 the
  optimizers' contract is to skip the step, as for a non-finite gradient).

Checked after every step: no NaN or inf in the parameters or in any tensor of the optimizer's
(and ALRC's) ``state_dict()`` (except the two records that hold a loss as seen: the guard's
alarm history and the detector's ``last_loss``); a step with a bad gradient is a bitwise no-op
(parameters and every piece of state as before, the rollback snapshot and the detector included,
except the counters that count it); a NaN loss is an alarm, and so is a spike. At the end the
counters equal the injected events (``skipped_steps``, ``nonfinite_grads``, per-parameter and
per-group step counts), and a resume at a random step (``state_dict`` -> ``torch.save`` ->
``torch.load(weights_only=True)`` -> fresh objects) ends bitwise equal to the uninterrupted run.

Length: about 2,000 steps per case would take minutes on a 2-core CPU shared with the rest of
the suite, so each case runs ``STEPS`` = 300 steps (plus the resumed tail) with a high fault
rate instead: about 18 bad gradients per case and, for the guarded ones, about 15 loss faults.
Each optimizer runs its default path on CPU: the fused C kernels wherever a C compiler is
present (as in CI), else the per-tensor reference.
``CProp(torch.optim.Adam)`` is soaked inside a guard: alone, its contract leaves the base
optimizer's own moments to see a bad gradient (protecting them is the guard's job).
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import steadystep as ss

pytestmark = pytest.mark.slow

STEPS = 300
WARMUP = 3  # no fault before: the detector and the statistics have something to hold
GRAD_RATE = 0.06
LOSS_RATE = 0.05
SPIKE_LOSS = 1e6
RECORDS = ("history_loss", "last_loss")  # hold losses as seen, NaN included (not state)


@dataclasses.dataclass(frozen=True)
class Case:
    make: Callable[[torch.nn.Module], Any]
    guarded: bool = False  # watches the loss (a CatastropheGuard)
    alrc: bool = False  # ALRC clips the per-sample losses first
    counts_skips: bool = False  # stats()["skipped_steps"] counts skipped steps (ALeRA, AgAdam)
    counts_guard: bool = False  # stats()["nonfinite_grads"] (a guard around a third party)


def _alera(granularity: str) -> Case:
    return Case(
        lambda m: ss.ALeRA(ss.layer_groups(m), lr=0.05, C=1e-3, granularity=granularity),
        counts_skips=True,
    )


CASES: dict[str, Case] = {
    "CPropSGD": Case(
        lambda m: ss.CPropSGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    ),
    "CPropAdam": Case(
        lambda m: ss.CPropAdam(m.parameters(), lr=1e-2, weight_decay=1e-3, amsgrad=True)
    ),
    "CPropAdamW": Case(lambda m: ss.CPropAdamW(m.parameters(), lr=1e-2, cprop_beta=0.99)),
    **{f"ALeRA({g})": _alera(g) for g in ("global", "group", "tensor", "param")},
    "AgAdam": Case(lambda m: ss.AgAdam(ss.layer_groups(m), lr=1e-2, C=1e-3), counts_skips=True),
    # The guarded cases count alarms against the injected spikes and NaN losses, so they run
    # the paper's Page-Hinkley test, whose alarms are exactly those (tests/test_detectors.py
    # and the spike benchmark cover the default detector's decisions).
    "SALeRA": Case(
        lambda m: ss.SALeRA(ss.layer_groups(m), lr=0.05, C=1e-3, rho=0.01),
        guarded=True,
        counts_skips=True,
    ),
    "SPALeRA": Case(
        lambda m: ss.SPALeRA(m.parameters(), lr=0.05, C=1e-4, rho=0.01),
        guarded=True,
        counts_skips=True,
    ),
    "guard(AdamW)": Case(
        lambda m: ss.CatastropheGuard(torch.optim.AdamW(m.parameters(), lr=1e-2), _ph()),
        guarded=True,
        counts_guard=True,
    ),
    "guard(CPropAdamW)": Case(
        lambda m: ss.CatastropheGuard(ss.CPropAdamW(m.parameters(), lr=1e-2), _ph()),
        guarded=True,
    ),
    "ALRC+SALeRA": Case(
        lambda m: ss.SALeRA(ss.layer_groups(m), lr=0.05, C=1e-3, rho=0.01),
        guarded=True,
        alrc=True,
        counts_skips=True,
    ),
    "guard(CProp(Adam))": Case(
        lambda m: ss.CatastropheGuard(ss.CProp(torch.optim.Adam(m.parameters(), lr=1e-2)), _ph()),
        guarded=True,
        counts_guard=True,
    ),
}


def _params(names: list[str]) -> list[Any]:
    """Each case with huge finite gradient elements (1e20..1e30: above the gradient limit of
    Note [huge gradients] in steadystep._kernels, so skipped like NaN) and with NaN/inf."""
    out = []
    for name in names:
        out.append(pytest.param(name, "huge", id=f"{name}-huge"))
        out.append(pytest.param(name, "nonfinite", id=f"{name}-nonfinite"))
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(10_000 + t)
    x = torch.randn(16, 4, generator=gen)
    return x, torch.stack([x[:, 0] * x[:, 1], x[:, 2] - x[:, 3]], 1)


@dataclasses.dataclass(frozen=True)
class Event:
    kind: str  # "grad", "spike" or "nan_loss"
    value: float = 0.0  # the gradient element written
    tensor: int = 0  # which parameter
    draw: float = 0.0  # where in it (a fraction of its size)


def _ph() -> ss.PageHinkleyPaper:
    return ss.PageHinkleyPaper(ph_lambda=0.1, rho=0.01)


def _schedule(name: str, faults: str, guarded: bool) -> dict[int, Event]:
    rng = random.Random(f"{name}/{faults}")
    events: dict[int, Event] = {}
    for t in range(WARMUP, STEPS):
        u = rng.random()
        if u < GRAD_RATE:
            if faults == "huge":
                value = rng.choice((-1.0, 1.0)) * 10.0 ** rng.uniform(20.0, 30.0)
            else:
                value = rng.choice((math.nan, math.inf, -math.inf))
            events[t] = Event("grad", value, rng.randrange(4), rng.random())
        elif guarded and faults == "nonfinite" and u < GRAD_RATE + LOSS_RATE:
            events[t] = Event(rng.choice(("spike", "nan_loss")))
    return events


@dataclasses.dataclass
class Run:
    model: torch.nn.Module
    opt: Any
    alrc: ss.ALRC | None


def _build(case: Case) -> Run:
    model = _model()
    return Run(model, case.make(model), ss.ALRC(beta1=0.9, beta2=0.9) if case.alrc else None)


def _one_step(run: Run, case: Case, t: int, event: Event | None) -> Event | None:
    """One training step with ``event`` injected; returns the event as injected (a spike is
    dropped where the detector has just restarted: the first observation after a reset is its
    new baseline and never alarms, so a spike there would be absorbed, by design)."""
    if event is not None and event.kind == "spike" and int(run.opt.detector.count) == 0:
        event = None
    x, y = _batch(t)
    per_sample = (run.model(x) - y).pow(2).mean(1)
    if event is not None and event.kind == "nan_loss" and run.alrc is not None:
        per_sample = per_sample.clone()
        per_sample[0] = math.nan  # a NaN sample: ALRC keeps it out, the loss and grads are NaN
    loss = (run.alrc(per_sample) if run.alrc is not None else per_sample).mean()
    run.opt.zero_grad()
    loss.backward()
    watched = loss.detach()
    if event is not None and event.kind == "grad":
        p = list(run.model.parameters())[event.tensor]
        flat = p.grad.view(-1)
        flat[int(event.draw * flat.numel())] = event.value
    elif event is not None and event.kind == "spike":
        watched = torch.full_like(watched, SPIKE_LOSS)
    elif event is not None and event.kind == "nan_loss":
        watched = torch.full_like(watched, math.nan)
    run.opt.step(loss=watched)
    return event


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _leaves(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _leaves(value, f"{path}/{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, obj


def _state(run: Run) -> dict[str, Any]:
    out = {"opt": run.opt.state_dict()}
    if run.alrc is not None:
        out["alrc"] = dict(run.alrc.state_dict())
    return out


def _assert_finite(run: Run, t: int) -> None:
    for i, p in enumerate(run.model.parameters()):
        assert torch.isfinite(p).all(), f"step {t}: parameter {i} is not finite"
    for path, value in _leaves(_state(run)):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            if path.rsplit("/", 1)[-1] in RECORDS:
                continue
            assert torch.isfinite(value).all(), f"step {t}: {path} is not finite"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and torch.equal(a.nan_to_num(), b.nan_to_num())
            and torch.equal(a.isnan(), b.isnan())
        )
    return a == b


# What a skipped step may change: the counters that count it (checked separately).
_COUNTERS = ("skipped_steps", "nonfinite_grads", "steps", "calls")


def _assert_no_op(before: dict[str, Any], after: dict[str, Any], t: int) -> None:
    left, right = dict(_leaves(before)), dict(_leaves(after))
    assert left.keys() == right.keys(), f"step {t}"
    for path, value in left.items():
        if path.rsplit("/", 1)[-1] in _COUNTERS:
            continue
        assert _same(value, right[path]), f"step {t}: a skipped step changed {path}"


def _guard_of(opt: Any) -> ss.CatastropheGuard | None:
    if isinstance(opt, ss.CatastropheGuard):
        return opt
    return getattr(opt, "guard", None)


def _counter(run: Run, key: str) -> int:
    return int(run.opt.stats()[key])


def _soak(name: str, faults: str) -> None:
    case = CASES[name]
    events = _schedule(name, faults, case.guarded)
    resume_at = random.Random(f"resume/{name}/{faults}").randrange(STEPS // 4, 3 * STEPS // 4)
    run = _build(case)
    saved = io.BytesIO()
    n_grad = n_alarm_steps = 0
    for t in range(STEPS):
        if t == resume_at:
            full = {"model": run.model.state_dict(), **_state(run)}
            torch.save(full, saved)
        event = events.get(t)
        before = None
        if event is not None and event.kind == "grad":
            before = copy.deepcopy(
                {"params": [p.detach().clone() for p in run.model.parameters()], **_state(run)}
            )
            before.pop("alrc", None)  # ALRC saw a finite batch: its moments move
        alarms = _counter(run, "alarms") if case.guarded else 0
        skipped = _counter(run, "skipped_steps") if case.counts_skips else 0
        event = _one_step(run, case, t, event)
        _assert_finite(run, t)
        if before is not None:
            n_grad += 1
            after = {"params": [p.detach() for p in run.model.parameters()], **_state(run)}
            after.pop("alrc", None)
            _assert_no_op(before, after, t)
            if case.counts_skips:
                assert _counter(run, "skipped_steps") == skipped + 1, f"step {t}"
            if case.guarded:
                assert _counter(run, "alarms") == alarms, f"step {t}: a skipped step alarmed"
        elif event is not None:  # a spike or a NaN loss: an alarm
            assert _counter(run, "alarms") == alarms + 1, f"step {t}: {event.kind}"
        if case.guarded and _counter(run, "alarms") > alarms:
            n_alarm_steps += 1

    # The counters equal the injected events.
    if case.counts_skips:
        assert _counter(run, "skipped_steps") == n_grad
    if case.counts_guard:
        assert _counter(run, "nonfinite_grads") == n_grad
    # Steps taken: every per-parameter count (CProp's, Adam's, ALeRA's per tensor) and
    # ALeRA's group counts advance only on them.
    taken = STEPS - n_grad - n_alarm_steps
    guard = _guard_of(run.opt)
    if guard is not None and guard.rollback == "full":
        # a full rollback restores the optimizer's state, step counts included (Note [full
        # rollback]): each rollback takes back the update before it
        taken -= int(guard.rollbacks)
    inner = getattr(run.opt, "optimizer", run.opt)
    counts = [st["step"] for st in run.opt.state.values() if "step" in st]
    counts += [st["step"] for st in getattr(inner, "cprop_state", {}).values()]
    if case.counts_skips:
        counts += [group["step"] for group in run.opt.param_groups]
    assert counts and {int(c) for c in counts} == {taken}
    assert n_grad >= 5 and (not case.guarded or faults == "huge" or n_alarm_steps >= 5)

    # Resume at a random step: bitwise the uninterrupted run.
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)
    fresh = _build(case)
    fresh.model.load_state_dict(loaded["model"])
    fresh.opt.load_state_dict(loaded["opt"])
    if fresh.alrc is not None:
        fresh.alrc.load_state_dict(loaded["alrc"])
    for t in range(resume_at, STEPS):
        _one_step(fresh, case, t, events.get(t))
    for a, b in zip(run.model.parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(a, b)
    left, right = dict(_leaves(_state(run))), dict(_leaves(_state(fresh)))
    assert left.keys() == right.keys()
    for path, value in left.items():
        assert _same(value, right[path]), f"resume at {resume_at}: {path}"


@pytest.mark.parametrize(("name", "faults"), _params(list(CASES)))
def test_soak(name: str, faults: str) -> None:
    _soak(name, faults)
