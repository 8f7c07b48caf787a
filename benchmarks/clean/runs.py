"""One training run of the clean-run benchmark: a task, an optimizer, a schedule, an arm."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

import steadystep as ss
from clean.arms import ARMS, ArmContext, base_optimizer
from clean.tasks import get_task

__all__ = ["SCHEDULES", "RunSpec", "make_scheduler", "run"]

SCHEDULES = ("warmup_cosine", "constant", "warm_restarts", "onecycle")
WARMUP = 0.05  # share of the steps of linear warm-up
GUARD_KEYS = ("alarms", "skips", "rollbacks", "level_shifts", "lr_scale", "nonfinite_grads")


@dataclass(frozen=True)
class RunSpec:
    task: str
    optimizer: str
    schedule: str
    event: str
    arm: str
    lr: float
    seed: int
    steps: int

    def key(self) -> str:
        return (
            f"{self.task}/{self.optimizer}/{self.schedule}/{self.event}/{self.arm}/"
            f"{self.lr:.6g}/{self.seed}/{self.steps}"
        )


def make_scheduler(name: str, opt, steps: int):
    """The schedule ``name`` on ``opt`` (None: constant). Stepped once per training step."""
    if name == "constant":
        return None
    if name == "warmup_cosine":  # LambdaLR, as transformers' get_cosine_schedule_with_warmup
        warm = max(1, round(WARMUP * steps))

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

        return torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if name == "warm_restarts":  # cycles of 1, 2, 4 sevenths of the run
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            opt, T_0=max(1, steps // 7), T_mult=2
        )
    if name == "onecycle":
        lr = opt.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=float(lr), total_steps=steps + 1, cycle_momentum=False
        )
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


def _effective_lr(opt, guard=None) -> float:
    """The first group's applied rate: a guard's applied rate (scheduled * its scale) when the
    run has one, else ``lr`` times steadystep's ``lr_multiplier``."""
    if guard is not None:
        return float(guard.stats(include_optimizer=False)["lr"])
    group = opt.param_groups[0]
    return float(group["lr"]) * float(group.get("lr_multiplier", 1.0))


def _guard_stats(opt) -> dict[str, float]:
    stats = getattr(opt, "stats", None)
    if not callable(stats):
        return {}
    out = {}
    for key, value in stats().items():
        name = key.rsplit("/", 1)[-1]
        if (name in GUARD_KEYS and not key.startswith(("cprop/", "base/"))) or key in (
            "alrc/clipped_total",
        ):
            out[key.replace("guard/", "")] = float(value)
    return out


def run(spec: RunSpec, event_at: float = 0.5) -> dict[str, Any]:
    """Train ``spec`` and return its final test metric, losses and the guard's counters."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    task = get_task(spec.task)
    model = task.model(spec.seed)
    base = base_optimizer(spec.optimizer, model.parameters(), spec.lr)
    ctx = ArmContext(model, spec.optimizer, spec.lr, task.batch_size, task.n_examples)
    opt = ARMS[spec.arm][0](base, ctx)
    mode = (
        "clip" if isinstance(opt, ss.Stabilized) else "loss" if hasattr(opt, "observe_loss") else ""
    )
    guard = getattr(opt, "guard", None) if mode == "clip" else opt if mode == "loss" else None
    guard_scale = getattr(guard, "lr_scale", None)  # a 0-d tensor the guard updates in place
    # the schedule the run would follow uncut, on a one-parameter shadow optimizer
    shadow = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = make_scheduler(spec.schedule, opt, spec.steps)
        shadow_sched = make_scheduler(spec.schedule, shadow, spec.steps)
    event_step = round(event_at * spec.steps) if spec.event != "none" else spec.steps
    losses: list[float] = []
    cut_steps = guard_cut_steps = 0
    error = None
    try:
        for step in range(spec.steps):
            x, y = task.batch(step, spec.seed, spec.event, event_step)
            per_sample = task.per_sample_loss(model, x, y)
            loss = opt.clip(per_sample).mean() if mode == "clip" else per_sample.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if mode == "loss":
                opt.step(loss=per_sample.detach().mean())
            else:
                opt.step()
            losses.append(float(per_sample.detach().mean()))
            # the learning rate the next step runs at, against the uncut schedule's
            if sched is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sched.step()
                    shadow.step()
                    shadow_sched.step()
            if step + 1 < spec.steps:
                cut_steps += _effective_lr(opt, guard) < 0.999 * _effective_lr(shadow)
                if guard_scale is not None:
                    guard_cut_steps += float(guard_scale) < 1.0
    except ss.TrainingDiverged as exc:
        error = f"TrainingDiverged: {str(exc)[:200]}"
    metric = task.evaluate(model, spec.event)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    tail = losses[-max(1, len(losses) // 20) :]
    return {
        **asdict(spec),
        "metric": metric if math.isfinite(metric) else None,
        "diverged": (not finite) or (not math.isfinite(metric)) or error is not None,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "cut_share": cut_steps / max(1, spec.steps - 1),
        "guard_cut_share": guard_cut_steps / max(1, spec.steps - 1),
        "stats": _guard_stats(opt),
        "error": error,
        "seconds": round(time.perf_counter() - started, 2),
    }
