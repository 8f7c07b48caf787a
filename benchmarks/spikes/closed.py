"""Closed-loop cases of the spike benchmark: the guard's ladder against faults and events.

Each case trains one task for ``steps`` steps with a :class:`~steadystep.CatastropheGuard`
that really answers its alarms (Note [the ladder] in ``steadystep/ladder.py``), and logs the
guard's counters after every step, so each alarm, skip, rollback and accepted change of level
is placed on the step that raised it.

Faults (``CLOSED_KINDS``): the four kinds of ``faults.py`` and

* ``nan_sample``: one sample's loss in the batch of step ``s`` is NaN (so the batch mean and
  every gradient are NaN). The right answer: skip that step, no lasting cut.
* ``corrupt_run``: the batches of ``n`` consecutive steps (``n`` in 2-5) are corrupted
  (alternately labels shuffled and inputs x100; the LM's tokens shuffled and random).

Events (``EVENTS``), from the middle of the run to its end:

* ``noise``: benign, a data-distribution step: Gaussian noise of half the inputs' standard
  deviation added to every input (the LM: 10% of the input tokens replaced at random). The
  right answer: no alarm, or a recovered one (the rate back at its full value by the end).
* ``switch``: a learnable task switch: the labels are permuted (the LM: the characters, in
  inputs and targets). The ladder should accept the new level.

An event run is compared with the unguarded run through the same event, both evaluated on the
data after the event.

*Caught*: an alarm on a step in ``[s + early, s + last]``, where ``last`` is the offset of the
last step that shows the fault (``show``; the last corrupted batch of a ``corrupt_run``).
*Counted*: the fault passes the jump rule (``runs.JUMP_FACTOR``) on a fork of the run taken
without a guard from the fault step to ``last``. A fault's *window* runs from ``s`` to
``last + post``; alarms outside every window are false alarms.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import statistics
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from spikes.faults import EARLY, KINDS, SHOW, corrupt
from spikes.runs import JUMP_FACTOR, JUMP_WINDOW
from spikes.tasks import SEQ, VOCAB, Task

__all__ = [
    "CLOSED_KINDS",
    "EVENTS",
    "Event",
    "Fault",
    "closed_run",
    "event_plan",
    "kind_plan",
    "score_faults",
]

CLOSED_KINDS = (*KINDS, "nan_sample", "corrupt_run")
EVENTS = ("noise", "switch")
COUNTERS = ("alarms", "skips", "rollbacks", "level_shifts")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    magnitude: float  # lr factor, gradient factor, corruption variant, or run length

    @property
    def length(self) -> int:
        return int(self.magnitude) if self.kind == "corrupt_run" else 1

    @property
    def early(self) -> int:
        return EARLY.get(self.kind, 0)

    @property
    def last(self) -> int:
        """Offset of the last step whose loss shows the fault."""
        return SHOW.get(self.kind, 0) + self.length - 1


@dataclass(frozen=True)
class Event:
    kind: str  # "noise" or "switch"
    step: int  # from this step to the end of the run


def kind_plan(kind: str, steps: int, per: int, seed: int, first: int = 10) -> list[Fault]:
    """``per`` faults of ``kind`` at seeded steps in ``[first, steps - steps // 4)``, at least
    ``steps // (2 * per + 2)`` apart (the last quarter of the run is left for recovery)."""
    rng = random.Random(seed)
    hi, gap = steps - steps // 4, max(12, steps // (2 * per + 2))
    for _ in range(10_000):
        where = sorted(rng.sample(range(first, hi), per))
        if all(b - a >= gap for a, b in itertools.pairwise(where)):
            break
    else:
        raise ValueError(f"{per} faults {gap} apart do not fit in [{first}, {hi})")
    out = []
    for j, s in enumerate(where):
        if kind == "bad_update":
            magnitude = 10 ** rng.uniform(1, 3)
        elif kind == "grad_explosion":
            magnitude = 10 ** rng.uniform(2, 4)
        elif kind == "corrupt_batch":
            magnitude = float(j % 2)
        elif kind == "corrupt_run":
            magnitude = float(2 + (j + seed) % 4)  # 2-5 batches in a row
        else:
            magnitude = math.nan
        out.append(Fault(kind, s, magnitude))
    return out


def event_plan(kind: str, steps: int) -> Event:
    return Event(kind, steps // 2)


def _apply_event(task: Task, x, y, event: Event | None, step: int):
    if event is None or step < event.step:
        return x, y
    gen = torch.Generator().manual_seed(7919 + step)
    if event.kind == "noise":
        if task.y is None:  # 10% of the input tokens replaced at random
            hit = torch.rand(x.shape, generator=gen) < 0.1
            return torch.where(hit, torch.randint(0, len(VOCAB), x.shape, generator=gen), x), y
        return x + 0.5 * task.x.std() * torch.randn(x.shape, generator=gen), y
    if event.kind == "switch":
        if task.y is None:  # the characters relabelled, inputs and targets alike
            perm = torch.roll(torch.arange(len(VOCAB)), 5)
            return perm[x], perm[y]
        return x, (y + 3) % 10  # a derangement of the 10 classes
    raise ValueError(f"unknown event {event.kind!r}")


def _loss(task: Task, model, x, y, nan_sample: bool) -> torch.Tensor:
    out = model(x)
    if task.y is None:
        per = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
        per = per.view(y.shape).mean(1)
    else:
        per = F.cross_entropy(out, y, reduction="none")
    if nan_sample:
        per = torch.cat([per[:1] * math.nan, per[1:]])
    return per.mean()


def step_once(
    task: Task,
    model,
    opt,
    step: int,
    fault: Fault | None,
    event: Event | None,
    *,
    guarded: bool,
) -> float:
    """One training step; ``fault`` is the fault active at ``step`` (or None)."""
    x, y = _apply_event(task, *task.batch(step), event, step)
    kind = fault.kind if fault is not None else None
    if kind in ("corrupt_batch", "corrupt_run"):
        variant = fault.magnitude if kind == "corrupt_batch" else float(step % 2)
        x, y = corrupt(x, y, variant, language_model=task.y is None, vocab=len(VOCAB), seed=step)
    loss = _loss(task, model, x, y, kind == "nan_sample")
    if kind == "nan_loss":
        loss = loss * math.nan
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if kind == "grad_explosion":
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(fault.magnitude)
    scale = fault.magnitude if kind == "bad_update" else 1.0
    for group in opt.param_groups:
        group["lr"] *= scale
    if guarded:
        opt.step(loss=loss.detach())
    else:
        opt.step()
    for group in opt.param_groups:
        group["lr"] /= scale
    return float(loss.detach())


def eval_after(task: Task, model, event: Event | None, n: int = 1024) -> float:
    """Mean loss on the fixed evaluation set (``runs.eval_loss``'s), through the event."""
    with torch.no_grad():
        if task.y is None:
            starts = torch.arange(0, 64) * (task.n_examples // 64)
            window = task.x[starts.unsqueeze(1) + torch.arange(SEQ + 1)]
            x, y = window[:, :-1], window[:, 1:]
        else:
            x, y = task.x[:n], task.y[:n]
        if event is not None:
            x, y = _apply_event(task, x, y, Event(event.kind, 0), 10**9)
        return float(_loss(task, model, x, y, False))


def _jump(task: Task, model, opt, fault: Fault, losses: list[float], event) -> bool:
    """The jump rule on an unguarded fork from the fault step to its last showing step."""
    fork_model, fork_opt = copy.deepcopy((model, opt))
    shown = []
    for t in range(fault.step, fault.step + fault.last + 1):
        active = fault if t < fault.step + fault.length else None
        shown.append(step_once(task, fork_model, fork_opt, t, active, event, guarded=False))
    reference = statistics.median(losses[-JUMP_WINDOW:])
    tail = shown[SHOW.get(fault.kind, 0) :]
    return any(not math.isfinite(v) or v > JUMP_FACTOR * reference for v in tail)


def closed_run(
    task: Task,
    steps: int,
    faults: list[Fault],
    event: Event | None = None,
    make_guard=None,
) -> dict:
    """Train ``steps`` steps with ``faults`` and ``event``; ``make_guard(optimizer, model)``
    wraps the optimizer (None: unguarded). Returns the final evaluation loss, the losses, the
    guard's counters after every step and, per fault, whether it passes the jump rule."""
    model = task.model()
    opt = task.make_optimizer(model.parameters())
    guard = None if make_guard is None else make_guard(opt, model)
    active = {f.step + i: f for f in faults for i in range(f.length)}
    starts = {f.step: f for f in faults}
    losses: list[float] = []
    log: dict[str, list[float]] = {k: [] for k in (*COUNTERS, "lr_scale")}
    counted = {}
    for step in range(steps):
        if step in starts and losses:
            counted[step] = _jump(task, model, opt, starts[step], losses, event)
        loss = step_once(
            task, model, guard or opt, step, active.get(step), event, guarded=guard is not None
        )
        losses.append(loss)
        if guard is not None:
            stats = guard.stats(include_optimizer=False)
            for key in log:
                log[key].append(float(stats[key]))
    final = eval_after(task, model, event)
    out = {"final_loss": final if math.isfinite(final) else math.nan, "counted": counted}
    if guard is not None:
        out["log"] = {k: v if k == "lr_scale" else [int(x) for x in v] for k, v in log.items()}
    return out


def _increments(series: list[int]) -> list[int]:
    """Per-step increments of a cumulative counter."""
    return [b - a for a, b in zip([0, *series[:-1]], series, strict=True)]


def score_faults(run: dict, faults: list[Fault], post: int) -> dict:
    """Per fault: counted, caught, caught late, and the alarms, skips, rollbacks and level
    shifts in its window; and the run's false alarms (alarms outside every window)."""
    log = run["log"]
    inc = {k: _increments(log[k]) for k in COUNTERS}
    steps = len(log["alarms"])
    windows = set()
    rows = []
    for f in faults:
        lo, hi = f.step, min(steps, f.step + f.last + post + 1)
        windows.update(range(lo, hi))
        hits = [t for t in range(f.step + f.early, hi) if inc["alarms"][t]]
        rows.append(
            {
                "kind": f.kind,
                "step": f.step,
                "magnitude": f.magnitude,
                "counted": bool(run["counted"].get(f.step, True)),
                "caught": any(t <= f.step + f.last for t in hits),
                "late": bool(hits) and all(t > f.step + f.last for t in hits),
                **{k: sum(inc[k][lo:hi]) for k in COUNTERS},
            }
        )
    false = sum(inc["alarms"][t] for t in range(steps) if t not in windows)
    return {
        "faults": rows,
        "clean_steps": steps - len(windows),
        "false_alarms": false,
        "totals": {k: log[k][-1] for k in COUNTERS},
        "lr_scale": log["lr_scale"][-1],
        "min_lr_scale": min(log["lr_scale"]),
        "final_loss": run["final_loss"],
    }
