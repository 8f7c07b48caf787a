"""The benchmark's units of work, importable by worker processes (one torch thread each)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from spikes.closed import CLOSED_KINDS, Fault, closed_run, event_plan, kind_plan, score_faults
from spikes.detectors import FAMILIES
from spikes.evaluate import Score, score_run
from spikes.faults import KINDS, plan_faults
from spikes.runs import RunTrace, record_run
from spikes.tasks import OPTIMIZERS, TASKS, make_task
from steadystep import CatastropheGuard

__all__ = [
    "any_job",
    "closed_job",
    "event_job",
    "init_worker",
    "kind_job",
    "record_job",
    "sweep_job",
    "timing",
]

_TRACES: dict[str, RunTrace] = {}
FIRST_FAULT = 10  # faults at uniformly random steps from this one on


def init_worker(traces: dict[str, RunTrace] | None = None) -> None:
    torch.set_num_threads(1)
    if traces:
        _TRACES.update(traces)


def run_key(task: str, optimizer: str) -> str:
    return f"{task}/{optimizer}"


def _seed(task: str, optimizer: str, salt: int) -> int:
    return 1000 * salt + 10 * TASKS.index(task) + OPTIMIZERS.index(optimizer)


def record_job(task: str, optimizer: str, steps: int, post: int, eval_at: int) -> RunTrace:
    """The recorded clean run of one task, forked at its planned faults; its evaluation loss
    at ``eval_at`` is the unperturbed final loss of the guarded runs."""
    per = max(1, steps // 100)
    per_kind = {"bad_update": per, "corrupt_batch": per, "grad_explosion": per}
    per_kind["nan_loss"] = max(1, steps // 1000)
    plan = plan_faults(steps, per_kind, seed=_seed(task, optimizer, 1), first=FIRST_FAULT)
    return record_run(make_task(task, optimizer), steps, plan, post, eval_at=eval_at)


def sweep_job(family: str, threshold: float) -> dict[str, Score]:
    """Scores of one detector setting on every recorded run (from the worker's traces)."""
    fam = next(f for f in FAMILIES if f.key == family)
    out = {}
    for key, trace in _TRACES.items():
        rho = trace.batch_size / trace.n_examples  # the paper's rho
        out[key] = score_run(lambda fam=fam, rho=rho: fam.plain(threshold, rho), trace)
    return out


def closed_plan(task: str, optimizer: str, steps: int):
    per = max(1, steps // 400)
    per_kind = {k: per for k in KINDS if k != "nan_loss"} | {"nan_loss": 1}
    return plan_faults(steps, per_kind, seed=_seed(task, optimizer, 2), first=FIRST_FAULT)


def closed_job(
    task: str, optimizer: str, steps: int, variant: str, threshold: float | None, post: int = 4
):
    """A guarded run with faults: ``variant`` is a family key, ``"none"`` (no guard) or
    ``"rollback"`` (SpikeDetector at ``threshold`` with ``response="rollback"``, SALeRA's
    one-step response). (The unperturbed run is the recorded one: ``RunTrace.eval_loss``.)"""
    spec = make_task(task, optimizer)
    plan = [Fault(f.kind, f.step, f.magnitude) for f in closed_plan(task, optimizer, steps)]
    if variant == "none":
        return {"final_loss": closed_run(spec, steps, plan)["final_loss"]}
    fam = next(f for f in FAMILIES if f.key == ("spike" if variant == "rollback" else variant))
    rho = spec.batch_size / spec.n_examples
    response = "rollback" if variant == "rollback" else "ladder"

    # min_lr=0: a run whose alarms drive the rate to 0 goes on (and shows it in its loss).
    def make(opt, model):
        detector = fam.tensor(threshold, rho)
        return CatastropheGuard(opt, detector, min_lr=0.0, response=response, model=model)

    return score_faults(closed_run(spec, steps, plan, make_guard=make), plan, post)


def _default_guard(opt, model):
    """The default guard (SpikeDetector(), the ladder, recover_every=100), with min_lr=0 so
    that a run goes on to its end whatever its alarms do to the rate."""
    return CatastropheGuard(opt, min_lr=0.0, model=model)


def kind_job(task: str, optimizer: str, steps: int, kind: str, per: int, post: int = 4):
    """The default guard against ``per`` faults of one kind (``closed.CLOSED_KINDS``)."""
    seed = _seed(task, optimizer, 3) + 100 * CLOSED_KINDS.index(kind)
    plan = kind_plan(kind, steps, per, seed, first=FIRST_FAULT)
    run = closed_run(make_task(task, optimizer), steps, plan, make_guard=_default_guard)
    return score_faults(run, plan, post)


def event_job(task: str, optimizer: str, steps: int, event: str, guarded: bool):
    """One run through an event (``closed.EVENTS``) from mid-run on, guarded by the default
    guard or not; the losses are evaluated on the data after the event."""
    spec = make_task(task, optimizer)
    ev = event_plan(event, steps)
    run = closed_run(spec, steps, [], ev, make_guard=_default_guard if guarded else None)
    out = {"final_loss": run["final_loss"], "event_step": ev.step}
    if guarded:
        log = run["log"]
        inc = [b - a for a, b in zip([0, *log["alarms"][:-1]], log["alarms"], strict=True)]
        out |= {k: log[k][-1] for k in ("alarms", "skips", "rollbacks", "level_shifts")}
        out["alarms_before_event"] = sum(inc[: ev.step])
        out["alarm_steps_after"] = [t - ev.step for t in range(ev.step, steps) if inc[t]][:20]
        out["lr_scale"] = log["lr_scale"][-1]
        out["min_lr_scale"] = min(log["lr_scale"])
    return out


def timing(operating: dict[str, float], repeats: int = 2000) -> dict[str, Any]:
    """Microseconds per ``update`` of each detector (0-d float32 CPU tensors), and of
    ``global_grad_norm`` on the MNIST-1D MLP's gradients (machine-dependent)."""
    from steadystep.detectors import global_grad_norm

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    losses = (1.0 + 0.1 * torch.rand(repeats, generator=gen)).unbind()
    norms = (1.0 + 0.1 * torch.rand(repeats, generator=gen)).unbind()
    out: dict[str, Any] = {}
    for fam in FAMILIES:
        det = fam.tensor(operating[fam.key], 0.01)
        for x, g in zip(losses[:200], norms[:200], strict=True):  # warm-up: past every warm-up
            det.update(x, grad_norm=g)
        start = time.perf_counter()
        for x, g in zip(losses, norms, strict=True):
            det.update(x, grad_norm=g)
        out[fam.key] = 1e6 * (time.perf_counter() - start) / repeats
    task = make_task("mnist1d_mlp", "adamw")
    model = task.model()
    x, y = task.batch(0)
    task.loss(model, x, y).backward()
    grads = [p.grad for p in model.parameters()]
    global_grad_norm(grads)
    start = time.perf_counter()
    for _ in range(repeats // 4):
        global_grad_norm(grads)
    out["global_grad_norm_mlp"] = 1e6 * (time.perf_counter() - start) / (repeats // 4)
    opt = task.make_optimizer(model.parameters())
    opt.step()
    start = time.perf_counter()
    for _ in range(repeats // 4):
        opt.step()
    out["adamw_step_mlp"] = 1e6 * (time.perf_counter() - start) / (repeats // 4)
    return {k: (round(v, 1) if math.isfinite(v) else v) for k, v in out.items()}


def any_job(name: str, *args):
    """Dispatch to ``closed_job``, ``kind_job`` or ``event_job`` (one pool for all three)."""
    return {"closed": closed_job, "kind": kind_job, "event": event_job}[name](*args)
