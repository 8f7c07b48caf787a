"""ALRC in the first few hundred steps: are corrupted batches clipped from early on, and is clean
training left alone?

One command, embedded data, about a minute on one CPU core::

    python benchmarks/bench_alrc_early.py        # writes benchmarks/results/alrc_early.json

Three tasks with decaying losses, AdamW (lr 1e-3, batch 32), per-sample losses through ALRC and
then their mean (what ``ss.stabilize`` does):

* ``mnist1d_mlp`` and ``digits_cnn``: the spike benchmark's classifiers (``spikes/tasks.py``);
  a corrupted batch has its labels shuffled or its inputs x100, alternately
  (``spikes/faults.py``).
* ``regression_mlp``: an MLP 16-64-64-1 fitting a fixed random teacher network plus noise (4,000
  generated examples); a corrupted batch has its targets shuffled or x100, alternately.

Each task and seed is trained for ``--steps`` steps (400) with ``--faults`` corrupted batches
(16) at seeded steps from step 5 on, and once without faults, under three arms: no ALRC,
``ALRC(warmup=False)`` (the paper's constant decay from the first step) and ``ALRC()`` (the
default, moments averaged while they warm up). Per arm: the share of corrupted batches that had
an element clipped (all of them, those before step 100, and those whose loss spiked above twice
the running loss) and, over the clipped ones, the median clipped batch loss over the raw one;
the share of clean samples, and of clean batches, clipped in the fault-free runs; the threshold
over the running loss (the mean of the previous 10 clean batch losses) at steps 50 and 200; the
test loss at the end, with and without faults, over the test loss of the fault-free run without
ALRC. ``tools/render_docs.py`` renders the table in ``docs/alrc.md`` from the JSON.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import steadystep as ss  # noqa: E402
from common import machine_info, write_result  # noqa: E402
from spikes.faults import corrupt, plan_faults  # noqa: E402
from spikes.tasks import DigitsCNN, Task  # noqa: E402
from steadystep.experiments.datasets import load_classification  # noqa: E402

TASKS = ("mnist1d_mlp", "digits_cnn", "regression_mlp")
# None: no ALRC. The two ALRC arms differ in the warm-up only (defaults otherwise).
ARMS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "paper": {"warmup": False},
    "default": {},
}
ARM_LABEL = {"none": "no ALRC", "paper": "ALRC(warmup=False)", "default": "ALRC()"}
PROBES = (50, 200)
RUNNING = 10  # clean batches in the running loss a threshold is compared with
EARLY = 100  # corrupted batches before this step are also counted on their own
SPIKE = 2.0  # a corrupted batch "spikes" when its loss exceeds this times the running loss
FIRST_FAULT = 5
LR = 1e-3


def _regression(seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """5,000 examples of a fixed random tanh teacher 16-32-1 plus noise (std 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5000, 16, generator=gen)
    w1 = torch.randn(16, 32, generator=gen) / 4.0
    w2 = torch.randn(32, 1, generator=gen) / math.sqrt(32)
    y = (torch.tanh(x @ w1) @ w2).squeeze(1) * 2.0 + 0.1 * torch.randn(5000, generator=gen)
    return x, y


def make_task(name: str, seed: int) -> tuple[Task, torch.Tensor, torch.Tensor]:
    """The task ``name`` (AdamW) and its test inputs and targets."""
    if name == "mnist1d_mlp":
        data = load_classification("mnist1d")
        x = data.x_train.flatten(1)
        mean, std = x.mean(0), x.std(0)
        x_test = (data.x_test.flatten(1) - mean) / std

        def mlp() -> nn.Module:
            return nn.Sequential(
                nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
            )

        task = Task(name, "adamw", LR, mlp, (x - mean) / std, data.y_train, len(x), seed)
        return task, x_test, data.y_test
    if name == "digits_cnn":
        data = load_classification("digits")
        n = len(data.x_train)
        task = Task(name, "adamw", LR, DigitsCNN, data.x_train, data.y_train, n, seed)
        return task, data.x_test, data.y_test
    if name == "regression_mlp":
        x, y = _regression()

        def regressor() -> nn.Module:
            return nn.Sequential(
                nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1)
            )

        task = Task(name, "adamw", LR, regressor, x[:4000], y[:4000], 4000, seed)
        return task, x[4000:], y[4000:]
    raise ValueError(f"task must be one of {TASKS}, got task={name!r}")


def per_sample_loss(task: Task, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if task.name == "regression_mlp":
        return (out.squeeze(-1) - y).square()
    return F.cross_entropy(out, y, reduction="none")


def corrupt_batch(
    task: Task, x: torch.Tensor, y: torch.Tensor, variant: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if task.name != "regression_mlp":
        return corrupt(x, y, variant, language_model=False, vocab=0, seed=seed)
    if variant == 0.0:  # targets shuffled within the batch
        gen = torch.Generator().manual_seed(seed)
        return x, y[torch.randperm(len(y), generator=gen)]
    return x, y * 100.0  # targets x100 (a unit glitch)


def train(
    task: Task,
    test: tuple[torch.Tensor, torch.Tensor],
    arm: dict[str, Any] | None,
    faults: dict[int, float],
    steps: int,
) -> dict[str, Any]:
    """One run; per step the raw and clipped batch loss and the samples clipped."""
    model = task.model()
    opt = task.make_optimizer(model.parameters())
    alrc = None if arm is None else ss.ALRC(**arm)
    raw, clipped, n_clipped, thresholds = [], [], [], {}
    for step in range(steps):
        x, y = task.batch(step)
        if step in faults:
            x, y = corrupt_batch(task, x, y, faults[step], seed=task.seed * 7919 + step)
        if alrc is not None and step in PROBES:
            thresholds[step] = float(alrc.stats()["threshold"])
        losses = per_sample_loss(task, model, x, y)
        out = losses if alrc is None else alrc(losses)
        loss = out.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        raw.append(losses.detach().mean())
        clipped.append(loss.detach())
        n_clipped.append(torch.tensor(0) if alrc is None else alrc.clipped_total.clone())
    model.eval()
    with torch.no_grad():
        test_loss = float(per_sample_loss(task, model, *test).mean())
    total = torch.stack(n_clipped)
    return {
        "raw": torch.stack(raw).tolist(),
        "clipped": torch.stack(clipped).tolist(),
        "samples_clipped": torch.diff(total, prepend=total.new_zeros(1)).tolist(),
        "thresholds": thresholds,
        "test_loss": test_loss,
    }


def running_loss(run: dict[str, Any], step: int, faulty: set[int]) -> float:
    """Mean raw loss of the last ``RUNNING`` clean batches before ``step``."""
    clean = [run["raw"][s] for s in range(step) if s not in faulty][-RUNNING:]
    return sum(clean) / len(clean)


def summarize(
    runs: dict[tuple[str, bool], list[dict[str, Any]]],
    faults: list[dict[int, float]],
    batch: int,
) -> dict[str, Any]:
    """Per arm: clipping of corrupted and clean batches, thresholds and final test losses."""
    baseline = [r["test_loss"] for r in runs[("none", False)]]
    out: dict[str, Any] = {}
    for arm in ARMS:
        faulty_runs, clean_runs = runs[(arm, True)], runs[(arm, False)]
        hit, ratios, n_corrupt = 0, [], 0
        early = early_hit = spikes = spikes_hit = 0
        clean_batches = clean_batches_hit = clean_samples = clean_samples_hit = 0
        for run, plan in zip(faulty_runs, faults, strict=True):
            for step in plan:
                clipped = run["samples_clipped"][step] > 0
                n_corrupt += 1
                hit += clipped
                if clipped:
                    ratios.append(run["clipped"][step] / run["raw"][step])
                if step < EARLY:
                    early += 1
                    early_hit += clipped
                if run["raw"][step] > SPIKE * running_loss(run, step, set(plan)):
                    spikes += 1
                    spikes_hit += clipped
        for run in clean_runs:
            clean_batches += len(run["samples_clipped"])
            clean_batches_hit += sum(n > 0 for n in run["samples_clipped"])
            clean_samples += batch * len(run["samples_clipped"])
            clean_samples_hit += sum(run["samples_clipped"])
        entry: dict[str, Any] = {
            "corrupted_batches": n_corrupt,
            "corrupted_clipped": hit / n_corrupt,
            "corrupted_early": early,
            "corrupted_early_clipped": early_hit / max(early, 1),
            "spikes": spikes,
            "spikes_clipped": spikes_hit / max(spikes, 1),
            "corrupted_clipped_over_raw_median": statistics.median(ratios) if ratios else None,
            "clean_batches_clipped": clean_batches_hit / clean_batches,
            "clean_samples_clipped": clean_samples_hit / clean_samples,
            "test_loss_faults": [r["test_loss"] for r in faulty_runs],
            "test_loss_clean": [r["test_loss"] for r in clean_runs],
            "test_loss_faults_vs_baseline": statistics.mean(
                r["test_loss"] / b for r, b in zip(faulty_runs, baseline, strict=True)
            ),
            "test_loss_clean_vs_baseline": statistics.mean(
                r["test_loss"] / b for r, b in zip(clean_runs, baseline, strict=True)
            ),
        }
        if ARMS[arm] is not None:
            entry["threshold_over_running_loss"] = {
                str(p): statistics.mean(
                    r["thresholds"][p] / running_loss(r, p, set(plan))
                    for r, plan in zip(faulty_runs, faults, strict=True)
                )
                for p in PROBES
            }
            entry["threshold_at"] = {
                str(p): [r["thresholds"][p] for r in faulty_runs] for p in PROBES
            }
            entry["running_loss_at"] = {
                str(p): [
                    running_loss(r, p, set(plan))
                    for r, plan in zip(faulty_runs, faults, strict=True)
                ]
                for p in PROBES
            }
        out[arm] = entry
    out["baseline_test_loss"] = baseline
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results"), help="JSON results directory")
    parser.add_argument("--steps", type=int, default=400, help="training steps per run (400)")
    parser.add_argument("--faults", type=int, default=16, help="corrupted batches per run (16)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per task (3)")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    args = parser.parse_args(argv)
    if args.steps <= max(PROBES):
        parser.error(f"--steps must exceed {max(PROBES)}, got {args.steps}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for name in args.tasks:
        runs: dict[tuple[str, bool], list[dict[str, Any]]] = {
            (arm, f): [] for arm in ARMS for f in (True, False)
        }
        plans = []
        for seed in range(args.seeds):
            task, *test = make_task(name, seed)
            specs = plan_faults(
                args.steps, {"corrupt_batch": args.faults}, 10_000 + seed, first=FIRST_FAULT
            )
            plan = {f.step: f.magnitude for f in specs}
            plans.append(plan)
            for arm, settings in ARMS.items():
                for faulty in (True, False):
                    run = train(task, tuple(test), settings, plan if faulty else {}, args.steps)
                    runs[(arm, faulty)].append(run)
        results[name] = summarize(runs, plans, task.batch_size)
        print(f"{name}: done at {time.perf_counter() - start:.0f} s", flush=True)
    payload = {
        "benchmark": "alrc_early",
        "machine": machine_info(torch.device("cpu")),
        "settings": {
            "steps": args.steps,
            "faults_per_run": args.faults,
            "first_fault": FIRST_FAULT,
            "seeds": args.seeds,
            "optimizer": f"AdamW lr {LR}",
            "batch": 32,
            "probes": list(PROBES),
            "running_loss_batches": RUNNING,
            "early_steps": EARLY,
            "spike_factor": SPIKE,
            "tasks": list(args.tasks),
            "arms": [[arm, ARM_LABEL[arm]] for arm in ARMS],  # a list: the JSON sorts dict keys
        },
        "command": "python benchmarks/bench_alrc_early.py",
        "seconds": time.perf_counter() - start,
        "tasks": results,
    }
    path = write_result(args.out, "alrc_early", payload)
    for name, res in results.items():
        for arm in ARMS:
            e = res[arm]
            thr = e.get("threshold_over_running_loss", {})
            print(
                f"{name:15s} {ARM_LABEL[arm]:20s} corrupted clipped {e['corrupted_clipped']:.2f} "
                f"early {e['corrupted_early_clipped']:.2f} spikes {e['spikes_clipped']:.2f} "
                f"(x{e['corrupted_clipped_over_raw_median'] or 1:.3f}) clean samples "
                f"{e['clean_samples_clipped']:.4f} batches {e['clean_batches_clipped']:.3f} "
                f"thr/loss {thr} test faults {e['test_loss_faults_vs_baseline']:.3f} "
                f"clean {e['test_loss_clean_vs_baseline']:.3f}"
            )
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
