"""SkipAwareScheduler without the optional frameworks: importable from steadystep alone (and
still from steadystep.integrations.transformers), and stepping a plain loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import steadystep as ss
from steadystep.integrations.scheduler import SkipAwareScheduler

SRC = Path(__file__).resolve().parents[1] / "src"


def test_importable_without_transformers_or_lightning():
    code = (
        "import sys\n"
        "sys.modules.update(transformers=None, lightning=None, accelerate=None)\n"
        "from steadystep.integrations.scheduler import SkipAwareScheduler\n"
        "assert 'transformers' not in sys.modules or sys.modules['transformers'] is None\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(SRC)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_does_not_advance_on_a_skipped_step_in_a_plain_loop():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ss.stabilize(torch.optim.SGD([p], lr=1.0), alrc=False, guard={"check_every": 1000})
    sched = SkipAwareScheduler(torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9), opt)
    for loss in (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1e6):
        p.grad = torch.ones(2)
        opt.step(loss=torch.tensor(loss))
        sched.step()
    assert int(opt.stats()["guard/alarms"]) == 1
    assert sched.skipped_steps == 1 and sched.last_epoch == 8
