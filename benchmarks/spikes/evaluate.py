"""Open-loop evaluation of a detector on recorded traces (the plain-Python references).

For one detector (a factory of fresh plain detectors) and one run trace, the detector reads the
clean trace step by step; every alarm there is a false alarm. Before the clean observation of a
fault step ``s``, a copy of the detector reads that fault's forked observations instead; the
fault is *caught* when the copy alarms at an offset in ``[early, show]`` (on the step whose loss
shows the fault, or for a gradient explosion already on the exploded gradient, before the
update), and *caught late* when it first alarms within ``post`` steps after ``show``. The
*delay* is the first alarm's offset from ``show`` (-1: before the bad update was applied).
Only faults that pass the jump rule (``FaultTrace.counted``) are scored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spikes.runs import RunTrace

__all__ = ["Score", "score_run"]


@dataclass
class Score:
    clean_steps: int = 0
    false_alarms: int = 0
    faults: int = 0
    caught: int = 0
    caught_late: int = 0
    delays: list[int] = field(default_factory=list)
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind: [counted, caught]

    def add(self, other: Score) -> Score:
        out = Score(
            self.clean_steps + other.clean_steps,
            self.false_alarms + other.false_alarms,
            self.faults + other.faults,
            self.caught + other.caught,
            self.caught_late + other.caught_late,
            self.delays + other.delays,
            {k: list(v) for k, v in self.by_kind.items()},
        )
        for kind, (n, c) in other.by_kind.items():
            row = out.by_kind.setdefault(kind, [0, 0])
            row[0] += n
            row[1] += c
        return out

    @property
    def catch_rate(self) -> float:
        return self.caught / self.faults if self.faults else float("nan")

    @property
    def fa_per_1000(self) -> float:
        return 1000.0 * self.false_alarms / self.clean_steps if self.clean_steps else float("nan")

    def summary(self) -> dict[str, Any]:
        caught_delays = [d for d in self.delays if d <= 0]
        late = [d for d in self.delays if d > 0]
        return {
            "clean_steps": self.clean_steps,
            "false_alarms": self.false_alarms,
            "fa_per_1000": self.fa_per_1000,
            "faults": self.faults,
            "caught": self.caught,
            "catch_rate": self.catch_rate,
            "caught_late": self.caught_late,
            "early_catches": sum(d < 0 for d in caught_delays),
            "mean_late_delay": sum(late) / len(late) if late else None,
            "by_kind": {
                k: {"faults": n, "caught": c} for k, (n, c) in sorted(self.by_kind.items())
            },
        }


def score_run(make: Callable[[], Any], trace: RunTrace) -> Score:
    """Score a detector (``make()`` gives a fresh plain detector) on one recorded run."""
    detector = make()
    watch_norm = detector.needs_grad_norm
    faults = {f.step: f for f in trace.faults}
    score = Score(clean_steps=len(trace.losses))
    for step, (loss, norm) in enumerate(zip(trace.losses, trace.grad_norms, strict=True)):
        fault = faults.get(step)
        if fault is not None and fault.counted:
            fork = detector.copy()
            alarms = [
                fork.update(x, g if watch_norm else None)
                for x, g in zip(fault.losses, fault.grad_norms, strict=True)
            ]
            hit = next((i for i in range(fault.early, len(alarms)) if alarms[i]), None)
            caught = hit is not None and hit <= fault.show
            score.faults += 1
            score.caught += caught
            score.caught_late += hit is not None and hit > fault.show
            if hit is not None:
                score.delays.append(hit - fault.show)
            row = score.by_kind.setdefault(fault.kind, [0, 0])
            row[0] += 1
            row[1] += caught
        score.false_alarms += detector.update(loss, norm if watch_norm else None)
    return score
