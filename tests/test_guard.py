"""CatastropheGuard, SALeRA and SPALeRA: rollback, LR cut, resume, faults, the catastrophe demo."""

from __future__ import annotations

import copy
import io
import math
import pickle
from typing import Any

import pytest
import torch

import steadystep as ss

SPIKE = 5  # scripted losses: calm, then a 10x spike at this step
LOSSES = [1.0] * SPIKE + [10.0] + [1.0] * 6 + [50.0] + [1.0] * 3


def nested(opt, sd=None):
    """The guard's checkpoint in its nested form (``{"optimizer", "guard", "class"}``), from the
    flat ``state_dict()`` (Note [flat checkpoints] of steadystep.compose.wrapper)."""
    return opt._nested_state_dict(opt.state_dict() if sd is None else sd)


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)


def backward(model: torch.nn.Module, step: int) -> None:
    x, y = batch(step)
    model.zero_grad()
    (model(x) - y).pow(2).mean().backward()


def build(kind: str, model: torch.nn.Module, **kwargs) -> ss.CatastropheGuard:
    """A guard around ``kind``; by default with SALeRA's one-step response (every alarm rolls
    the parameters back and cuts, for good), whose mechanics most tests here check; the
    ladder's rungs are tested in tests/test_ladder.py."""
    kwargs = {"response": "rollback", "recover_every": None, "rollback": "params", **kwargs}
    detector = ss.PageHinkley(ph_lambda=0.1, rho=0.5)
    if kind == "salera":
        return ss.CatastropheGuard(
            ss.ALeRA(ss.layer_groups(model), lr=0.05, C=1e-3), detector, **kwargs
        )
    if kind == "spalera":
        base = ss.ALeRA(model.parameters(), lr=0.05, alpha=0.1, C=1e-4, granularity="param")
        return ss.CatastropheGuard(base, detector, **kwargs)
    if kind == "agadam":
        return ss.CatastropheGuard(ss.AgAdam(ss.layer_groups(model), lr=0.01), detector, **kwargs)
    if kind == "adam":
        return ss.CatastropheGuard(
            torch.optim.Adam(model.parameters(), lr=0.01), detector, **kwargs
        )
    if kind == "adam_fused":  # torch's fused Adam: sync-free through its found_inf
        return ss.CatastropheGuard(
            torch.optim.Adam(model.parameters(), lr=0.01, fused=True), detector, **kwargs
        )
    if kind == "adam_tensor_lr":
        base = torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01), foreach=False)
        return ss.CatastropheGuard(base, detector, **kwargs)
    if kind == "cprop":
        base = ss.CProp(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        return ss.CatastropheGuard(base, detector, **kwargs)
    if kind == "cpropadamw":  # a MaskableOptimizer: the sync-free path
        return ss.CatastropheGuard(ss.CPropAdamW(model.parameters(), lr=0.01), detector, **kwargs)
    raise AssertionError(kind)


def lrs(opt: ss.CatastropheGuard) -> list[torch.Tensor]:
    """Every effective-LR factor the guard may cut, as tensors: steadystep's optimizers hold
    the cut in their multipliers; around any other, the applied rate is the scheduled ``lr``
    times the guard's ``lr_scale`` (Note [the learning-rate scale])."""
    if hasattr(opt.optimizer, "scale_lr_"):
        return [g["lr_multiplier"].clone() for g in opt.param_groups]
    return [torch.as_tensor(g["lr"], dtype=torch.float64) * opt.lr_scale for g in opt.param_groups]


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaN equal to NaN (the alarm history starts as NaN)."""
    return a.dtype == b.dtype and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def assert_same_tree(before, after, cut=(), path=()):
    """``before == after`` recursively (tensors bitwise); keys in ``cut`` of a param group are
    compared as ``after == 0.5 * before``."""
    assert type(before) is type(after) or isinstance(before, (int, float)), path
    if isinstance(before, dict):
        assert set(before) == set(after), path
        in_group = "params" in before
        for key, value in before.items():
            if in_group and key in cut:
                assert torch.equal(torch.as_tensor(after[key]), torch.as_tensor(value) * 0.5)
            else:
                assert_same_tree(value, after[key], cut, (*path, key))
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after), path
        for i, (a, b) in enumerate(zip(before, after, strict=True)):
            assert_same_tree(a, b, cut, (*path, i))
    elif isinstance(before, torch.Tensor):
        assert before.dtype == after.dtype and torch.equal(before, after), path
    else:
        assert before == after, path


KINDS = ["salera", "spalera", "agadam", "adam", "adam_tensor_lr", "cprop", "cpropadamw"]


@pytest.mark.parametrize("kind", KINDS)
def test_spike_rolls_back_halves_lr_and_resets_detector(kind):
    model = make_model()
    opt = build(kind, model)
    history = []
    for step in range(SPIKE):
        history.append(params_of(model))
        backward(model, step)
        opt.step(loss=torch.tensor(LOSSES[step]))
        assert int(opt.stats()["alarms"]) == 0
    lr_before = lrs(opt)
    base_state = copy.deepcopy(opt.optimizer.state_dict())
    backward(model, SPIKE)
    opt.step(loss=torch.tensor(LOSSES[SPIKE]))
    stats = opt.stats()
    assert int(stats["alarms"]) == 1 and int(stats["rollbacks"]) == 1
    # Back to the parameters before the last update (the one of step SPIKE - 1), bitwise.
    assert equal(params_of(model), history[SPIKE - 1])
    assert not equal(history[SPIKE - 1], history[SPIKE - 2])  # the rollback undid a real update
    for before, after in zip(lr_before, lrs(opt), strict=True):
        assert torch.equal(after, before * 0.5)
    assert int(opt.detector.count) == 0
    assert opt.detector.threshold.item() == pytest.approx(0.1)
    # No base update this step: the base optimizer's whole state_dict did not move (per-param
    # state, group tensors such as ALeRA's step and skipped count, CProp's statistics), except
    # the cut rates, which are exactly half.
    cut = ("lr_multiplier",) if hasattr(opt.optimizer, "scale_lr_") else ()
    assert_same_tree(base_state, opt.optimizer.state_dict(), cut=cut)
    # Training continues from there.
    backward(model, SPIKE + 1)
    opt.step(loss=torch.tensor(1.0))
    assert not equal(params_of(model), history[SPIKE - 1])


@pytest.mark.parametrize("kind", ["salera", "adam", "cpropadamw"])
def test_backtrack_false_only_skips_and_cuts(kind):
    model = make_model()
    opt = build(kind, model, backtrack=False)
    for step in range(SPIKE):
        backward(model, step)
        opt.step(loss=torch.tensor(LOSSES[step]))
    before, lr_before = params_of(model), lrs(opt)
    backward(model, SPIKE)
    opt.step(loss=torch.tensor(LOSSES[SPIKE]))
    assert equal(params_of(model), before)
    assert all(torch.equal(a, b * 0.5) for a, b in zip(lrs(opt), lr_before, strict=True))
    assert int(opt.stats()["alarms"]) == 1 and int(opt.stats()["rollbacks"]) == 0
    assert opt.snapshots == []


def run_script(opt, model, start, stop):
    for step in range(start, stop):
        backward(model, step)
        opt.step(loss=torch.tensor(LOSSES[step]))


@pytest.mark.parametrize("kind", ["salera", "spalera", "adam", "cpropadamw"])
@pytest.mark.parametrize("save_at", [SPIKE, SPIKE + 1], ids=["before_alarm", "after_alarm"])
def test_state_dict_round_trip_around_an_alarm(kind, save_at):
    model = make_model()
    opt = build(kind, model)
    run_script(opt, model, 0, save_at)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = make_model(seed=123)
    model2.load_state_dict(saved["model"])
    opt2 = build(kind, model2)
    opt2.load_state_dict(saved["opt"])
    run_script(opt, model, save_at, len(LOSSES))
    run_script(opt2, model2, save_at, len(LOSSES))
    assert int(opt.stats()["alarms"]) == 2
    assert equal(params_of(model), params_of(model2))
    for key, value in opt.stats().items():
        assert torch.equal(value, opt2.stats()[key]), key
    assert equal(lrs(opt), lrs(opt2))
    assert equal(opt.snapshots, opt2.snapshots)


@pytest.mark.parametrize("kind", ["salera", "cpropadamw"])
def test_host_and_device_paths_agree_bitwise(kind):
    # snapshot_device="cpu" takes the host path (one read per step); on CPU both must agree.
    runs = []
    for snapshot_device in (None, "cpu"):
        model = make_model()
        opt = build(kind, model, snapshot_device=snapshot_device)
        assert opt._device_side == (snapshot_device is None)
        run_script(opt, model, 0, len(LOSSES))
        runs.append((params_of(model), lrs(opt), opt.stats()))
    assert equal(runs[0][0], runs[1][0]) and equal(runs[0][1], runs[1][1])
    assert int(runs[0][2]["alarms"]) == int(runs[1][2]["alarms"]) == 2


@pytest.mark.parametrize("kind", ["salera", "adam"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_loss_is_an_alarm_that_keeps_detector_statistics(kind, bad):
    model = make_model()
    opt = build(kind, model)
    history = []
    for step in range(3):
        history.append(params_of(model))
        backward(model, step)
        opt.step(loss=torch.tensor(1.0))
    det_before = opt.detector.state_dict()
    backward(model, 3)
    opt.step(loss=torch.tensor(bad))
    assert int(opt.stats()["alarms"]) == 1
    assert equal(params_of(model), history[2])
    det_after = opt.detector.state_dict()
    for key in ("threshold", "count", "relaxed_loss", "mean", "cusum", "cusum_min"):
        assert torch.equal(det_before[key], det_after[key]), key


def test_nan_gradient_under_salera_leaves_alera_state_unchanged():
    model = make_model()
    opt = build("salera", model)
    run_script(opt, model, 0, 3)
    base = opt.optimizer
    before = [t.clone() for g in base.param_groups for t in (g["lr_multiplier"], g["step"])]
    r_before = [base.state[p]["relaxed_path"].clone() for p in model.parameters()]
    p_before = params_of(model)
    backward(model, 3)
    next(model.parameters()).grad[0, 0] = math.nan
    opt.step(loss=torch.tensor(1.0))
    after = [t for g in base.param_groups for t in (g["lr_multiplier"], g["step"])]
    assert equal(before, after)
    assert equal(r_before, [base.state[p]["relaxed_path"] for p in model.parameters()])
    assert equal(p_before, params_of(model))


def test_loss_inputs_and_missing_loss_error():
    model = make_model()
    opt = build("salera", model)
    backward(model, 0)
    with pytest.raises(RuntimeError, match=r"step\(loss=loss.detach\(\)\)"):
        opt.step()
    opt.observe_loss(torch.tensor(1.0, requires_grad=True))
    opt.step()
    x, y = batch(1)

    def closure():
        model.zero_grad()
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.requires_grad and int(opt.detector.observations) == 2
    opt.step(loss=0.5)  # a Python float is accepted
    with pytest.raises(RuntimeError, match="observe_loss"):
        opt.step()


@pytest.mark.parametrize("kind", ["salera", "adam", "cpropadamw"])
def test_min_lr_raises_training_diverged_with_history(kind):
    model = make_model()
    opt = build(kind, model, min_lr=1e-3, check_every=1)
    with pytest.raises(ss.TrainingDiverged, match="min_lr") as info:
        for step in range(40):
            backward(model, step)
            # Every spike alarms: 1, 1, spike, 1, spike, ... (no alarm right after a reset)
            opt.step(loss=torch.tensor(1.0 if step % 2 == 0 or step < 2 else 100.0 * step))
    history = info.value.history
    assert len(history) >= 4 and history[-1]["loss"] > 1.0
    assert [h["step"] for h in history] == sorted(h["step"] for h in history)


def test_guard_delegates_and_composes_with_a_scheduler():
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ss.CatastropheGuard(base)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    backward(model, 0)
    opt.step(loss=torch.tensor(1.0))
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    backward(model, 1)
    opt.step(loss=torch.tensor(1.0))
    assert len(opt.snapshots) == len(list(model.parameters())) + 1
    clone = copy.deepcopy(opt)
    assert int(clone.stats()["steps"]) == 2
    stats = opt.stats()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())


@pytest.mark.parametrize("fused", ["1", "0"], ids=["kernels", "torch"])
def test_device_path_makes_no_host_read(monkeypatch, fused):
    # CPU stand-in for the CUDA sync check: any host read in a steady-state step raises.
    # fused=0: the torch paths (the CUDA path of the detector and the ladder) on the CPU too.
    monkeypatch.setenv("STEADYSTEP_FUSED", fused)
    model = make_model()
    for kind in ("salera", "spalera", "agadam", "cpropadamw", "adam_fused"):
        opt = build(kind, model)
        assert opt._device_side
        backward(model, 0)
        opt.step(loss=torch.tensor(1.0))  # first step: lazy state
        calls = []

        def forbidden(*args, _calls=calls, **kwargs):
            _calls.append(args)
            raise AssertionError("host read in step()")

        with monkeypatch.context() as patch:
            for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
                patch.setattr(torch.Tensor, name, forbidden)
            for step in range(1, 8):
                backward(model, step)
                opt.step(loss=torch.tensor(LOSSES[step]))
        assert calls == []
        assert int(opt.stats()["alarms"]) == 1  # the spike at step 5 was handled on the device


def test_salera_and_spalera_defaults():
    model = make_model()
    sal = ss.SALeRA(ss.layer_groups(model), lr=0.1)
    assert isinstance(sal, ss.CatastropheGuard) and isinstance(sal.optimizer, ss.ALeRA)
    assert sal.optimizer.defaults["alpha"] == 0.01 and sal.optimizer.defaults["C"] == 3e-6
    assert sal.optimizer.granularity == "group" and sal.backtrack and sal.lr_factor == 0.5
    # The default detector is the benchmark's (docs/detectors.md); the paper's is one argument
    # away: ph_lambda or rho (the other takes the paper's value), or detector=.
    assert isinstance(sal.detector, ss.SpikeDetector)
    assert sal.detector.hparams() == ss.SpikeDetector().hparams()
    paper = ss.SALeRA(ss.layer_groups(model), lr=0.1, rho=0.01)
    assert isinstance(paper.detector, ss.PageHinkleyPaper)
    assert (paper.detector.ph_lambda, paper.detector.rho) == (0.1, 0.01)
    assert ss.SALeRA(model.parameters(), lr=0.1, ph_lambda=0.3).detector.rho == 0.01
    given = ss.PageHinkleyPaper(ph_lambda=0.2, rho=0.1)
    assert ss.SPALeRA(model.parameters(), lr=0.1, detector=given).detector is given
    with pytest.raises(ValueError, match="not both"):
        ss.SALeRA(model.parameters(), lr=0.1, rho=0.1, detector=ss.SpikeDetector())
    spa = ss.SPALeRA(model.parameters(), lr=0.1)
    assert spa.optimizer.granularity == "param" and isinstance(spa.detector, ss.SpikeDetector)
    assert spa.optimizer.defaults["alpha"] == 0.1 and spa.optimizer.defaults["C"] == 3e-8


def catastrophe_run(
    kind: str, lr: float = 2.0, steps: int = 60, **salera_kwargs: Any
) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=gen)
    y = torch.tanh(x @ torch.randn(10, 1, generator=gen)) + 0.1 * torch.randn(256, 1, generator=gen)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    elif kind == "alera":
        opt = ss.ALeRA(ss.layer_groups(model), lr=lr)
    else:
        opt = ss.SALeRA(ss.layer_groups(model), lr=lr, **salera_kwargs)
    with torch.no_grad():
        initial = (model(x) - y).pow(2).mean().item()
    batches = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=batches)
        opt.zero_grad()
        loss = (model(x[idx]) - y[idx]).pow(2).mean()
        loss.backward()
        if kind == "sgd":
            opt.step()
        else:
            opt.step(loss=loss.detach())
    with torch.no_grad():
        final = (model(x) - y).pow(2).mean().item()
    return initial, final


def test_catastrophe_demo_salera_recovers_where_sgd_and_alera_diverge():
    for kind in ("sgd", "alera"):
        initial, final = catastrophe_run(kind)
        assert not final < initial, kind  # diverged: inf or nan
    # The paper's detector (Page-Hinkley, rho given), then the default (SpikeDetector: its
    # warm-up test waits for a 10x jump, so the divergence runs a step longer and the
    # recovery, from a worse point, leaves a higher loss after 60 steps).
    initial, final = catastrophe_run("salera", rho=0.01)
    assert final < 0.1 * initial
    initial, final = catastrophe_run("salera")
    assert final < 0.2 * initial


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"lr_factor": 0.0}, ValueError, "lr_factor"),
        ({"lr_factor": 1.5}, ValueError, "lr_factor"),
        ({"lr_factor": math.nan}, ValueError, "lr_factor"),
        ({"min_lr": -1.0}, ValueError, "min_lr"),
        ({"min_lr": math.nan}, ValueError, "min_lr"),
        ({"check_every": 0}, ValueError, "check_every"),
        ({"backtrack": "yes"}, TypeError, "backtrack"),
    ],
)
def test_invalid_hyperparameters(kwargs, error, name):
    model = make_model()
    with pytest.raises(error, match=name):
        ss.CatastropheGuard(torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_invalid_wrapped_and_salera_arguments():
    model = make_model()
    with pytest.raises(TypeError, match="optimizer"):
        ss.CatastropheGuard(object())
    guard = ss.CatastropheGuard(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="already"):
        ss.CatastropheGuard(guard)
    for kwargs, name in (
        ({"ph_lambda": 0.0}, "ph_lambda"),
        ({"rho": 2.0}, "rho"),
        ({"alpha": 1.0}, "alpha"),
    ):
        with pytest.raises(ValueError, match=name):
            ss.SALeRA(model.parameters(), lr=0.1, **kwargs)
    with pytest.raises(ValueError, match="lr"):
        ss.SPALeRA(model.parameters(), lr=-1.0)


@pytest.mark.parametrize("kind", ["salera", "adam"])
def test_observed_loss_wins_over_the_closure_loss(kind):
    # Lightning under gradient accumulation: the closure returns the last micro-batch's loss / k,
    # while observe_loss received the mean over the micro-batches. The detector must see the latter.
    x, y = batch(0)

    def make_closure(model, value):
        def closure():
            model.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            return torch.tensor(value)

        return closure

    for spike_via_observe in (True, False):
        model = make_model()
        opt = build(kind, model)
        for _ in range(SPIKE):
            opt.observe_loss(torch.tensor(1.0))
            assert float(opt.step(make_closure(model, 1.0))) == 1.0
        observed, returned = (10.0, 1.0) if spike_via_observe else (1.0, 10.0)
        opt.observe_loss(torch.tensor(observed))
        out = opt.step(make_closure(model, returned))
        assert float(out) == returned  # step still returns what the closure returned
        assert int(opt.stats()["alarms"]) == int(spike_via_observe)
        # The observed loss was consumed: the next step falls back to the closure's loss.
        opt.step(make_closure(model, 1.0))
        assert int(opt.detector.observations) == SPIKE + 2


def test_loss_keyword_wins_over_observe_loss():
    model = make_model()
    opt = build("salera", model)
    for step in range(SPIKE):
        backward(model, step)
        opt.step(loss=torch.tensor(1.0))
    backward(model, SPIKE)
    opt.observe_loss(torch.tensor(1.0))
    opt.step(loss=torch.tensor(10.0))
    assert int(opt.stats()["alarms"]) == 1
    backward(model, SPIKE + 1)
    with pytest.raises(RuntimeError, match="observe_loss"):
        opt.step()  # the observed loss was dropped by the step that took loss=


def test_stats_merge_the_wrapped_optimizers_stats():
    model = make_model()
    opt = build("salera", model)
    run_script(opt, model, 0, SPIKE + 1)
    stats = opt.stats()
    guard_keys = ["alarms", "rollbacks", "skips", "level_shifts", "steps", "lr_scale"]
    assert list(stats)[:6] == guard_keys and "detector_threshold" in stats
    base = opt.optimizer.stats()
    assert set(base) == {"skipped_steps", "group0.lr", "group1.lr"}
    for key, value in base.items():
        assert torch.equal(stats[key], value), key
    assert float(stats["group0.lr"]) == pytest.approx(0.05 * 0.5, rel=1e-3)  # the cut shows
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())

    class Clashing(torch.optim.SGD):
        def stats(self):
            return {"steps": torch.tensor(7), "mine": torch.tensor(1.0)}

    guard = ss.CatastropheGuard(Clashing(model.parameters(), lr=0.1))
    stats = guard.stats()
    assert int(stats["steps"]) == 0 and int(stats["optimizer.steps"]) == 7
    assert float(stats["mine"]) == 1.0


@pytest.mark.parametrize("kind", ["salera", "spalera"])
def test_masked_rollback_restores_params_that_became_nonfinite(kind):
    model = make_model()
    opt = build(kind, model)
    run_script(opt, model, 0, 3)
    snapshot = [s.clone() for s in opt.snapshots]
    with torch.no_grad():  # the last update blew a parameter up
        first = next(model.parameters())
        first[0, 0] = math.nan
        first[0, 1] = math.inf
    backward(model, 3)
    opt.step(loss=torch.tensor(math.nan))
    assert int(opt.stats()["rollbacks"]) == 1
    assert equal(params_of(model), snapshot)


def guarded_adam(model: torch.nn.Module, via_cprop: bool) -> ss.CatastropheGuard:
    base = torch.optim.Adam(model.parameters(), lr=0.01)
    inner = ss.CProp(base) if via_cprop else base
    return ss.CatastropheGuard(inner, ss.PageHinkley(ph_lambda=0.1, rho=0.5))


@pytest.mark.parametrize("via_cprop", [False, True], ids=["adam", "cprop_adam"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_gradient_with_finite_loss_skips_third_party_step(via_cprop, bad):
    # Reference: the same batches without the bad one.
    ref_model = make_model()
    ref = guarded_adam(ref_model, via_cprop)
    run_script(ref, ref_model, 0, 3)
    run_script(ref, ref_model, 3, 6)

    model = make_model()
    opt = guarded_adam(model, via_cprop)
    run_script(opt, model, 0, 3)
    backward(model, 3)
    next(model.parameters()).grad[0, 0] = bad
    opt.step(loss=torch.tensor(1.0))  # finite loss: not an alarm, no cut, no rollback
    stats = opt.stats()
    assert int(stats["nonfinite_grads"]) == 1 and int(stats["alarms"]) == 0
    assert float(stats["lr_scale"]) == 1.0
    run_script(opt, model, 3, 6)
    assert equal(params_of(model), params_of(ref_model))
    sd, ref_sd = opt.optimizer.state_dict(), ref.optimizer.state_dict()
    for pid, state in ref_sd["state"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sd["state"][pid][key]))
    assert_same_tree(ref.detector.state_dict(), opt.detector.state_dict())


def test_nonfinite_gradient_under_guarded_cpropadamw_is_skipped_by_the_optimizer():
    """A MaskableOptimizer skips a NaN gradient itself, on the device: no alarm, no cut, no
    count in the guard's ``nonfinite_grads`` (the optimizer's ``skipped_steps`` counts it), and
    the run goes on as without the bad batch."""
    ref_model, model = make_model(), make_model()
    ref, opt = build("cpropadamw", ref_model), build("cpropadamw", model)
    assert isinstance(opt.optimizer, ss.optim.MaskableOptimizer) and opt._device_side
    run_script(ref, ref_model, 0, 3)
    run_script(opt, model, 0, 3)
    state = copy.deepcopy(opt.optimizer.state_dict())
    before = params_of(model)
    backward(model, 3)
    next(model.parameters()).grad[0, 0] = math.nan
    opt.step(loss=torch.tensor(1.0))
    stats = opt.stats()
    assert int(stats["nonfinite_grads"]) == 0 and int(stats["alarms"]) == 0
    assert float(stats["lr_scale"]) == 1.0 and int(stats["skipped_steps"]) == 1
    assert equal(params_of(model), before)
    state["param_groups"][0]["skipped_steps"] += 1
    assert_same_tree(state, opt.optimizer.state_dict())
    run_script(ref, ref_model, 3, 6)
    run_script(opt, model, 3, 6)
    assert equal(params_of(model), params_of(ref_model))


def test_guarded_cpropadamw_cut_applies_to_the_step_and_survives_a_scheduler():
    """The cut lives in ``group["lr_multiplier"]``: the steps after an alarm are taken at half
    the rate (as a CPropAdamW at lr / 2, to rounding), and a scheduler that rewrites
    ``group["lr"]`` keeps it; ``max_lr`` is ``lr * lr_multiplier``."""
    model = make_model()
    opt = build("cpropadamw", model)
    run_script(opt, model, 0, SPIKE + 1)  # the alarm at SPIKE
    base = opt.optimizer
    assert float(base.param_groups[0]["lr_multiplier"]) == 0.5
    assert float(base.max_lr()) == pytest.approx(0.005, rel=0, abs=1e-18)
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    half = ss.CPropAdamW(twin.parameters(), lr=0.005)
    half.load_state_dict(base.state_dict())  # the same statistics, then the rate without a cut
    for group in half.param_groups:
        group["lr"], group["lr_multiplier"] = 0.005, torch.ones((), dtype=torch.float64)
    for step in range(SPIKE + 1, SPIKE + 4):
        backward(model, step)
        opt.step(loss=torch.tensor(1.0))
        backward(twin, step)
        half.step()
    for a, b in zip(params_of(model), params_of(twin), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    backward(model, SPIKE + 4)
    opt.step(loss=torch.tensor(1.0))
    sched.step()
    assert base.param_groups[0]["lr"] == 0.01 and float(base.max_lr()) == 0.005


def test_nonfinite_loss_with_nonfinite_gradient_is_still_an_alarm():
    model = make_model()
    opt = guarded_adam(model, via_cprop=False)
    run_script(opt, model, 0, 3)
    backward(model, 3)
    next(model.parameters()).grad[0, 0] = math.nan
    opt.step(loss=torch.tensor(math.nan))
    stats = opt.stats()
    # the ladder's first rung: a skip, no cut (Note [the ladder])
    assert int(stats["alarms"]) == 1 and int(stats["nonfinite_grads"]) == 0
    assert int(stats["skips"]) == 1 and float(stats["lr_scale"]) == 1.0
    backward(model, 4)
    next(model.parameters()).grad[0, 0] = math.nan
    opt.step(loss=torch.tensor(math.nan))  # again: a rollback and a cut
    assert int(opt.stats()["rollbacks"]) == 1 and float(opt.stats()["lr_scale"]) == 0.5


@pytest.mark.parametrize("kind", ["salera", "adam"])
def test_load_state_dict_copies_so_two_guards_from_one_dict_are_independent(kind):
    model = make_model()
    opt = build(kind, model)
    run_script(opt, model, 0, 3)
    sd = opt.state_dict()
    frozen = copy.deepcopy(sd)
    guards = []
    for _ in range(2):
        m = make_model(seed=7)
        m.load_state_dict(model.state_dict())
        g = build(kind, m)
        g.load_state_dict(sd)
        guards.append((g, m))
    run_script(guards[0][0], guards[0][1], 3, 8)  # an alarm at SPIKE included
    assert int(guards[0][0].stats()["alarms"]) == 1
    view, frozen = nested(opt, sd)["guard"], nested(opt, frozen)["guard"]
    for key, value in frozen.items():
        if isinstance(value, torch.Tensor):
            assert same(view[key], value), key  # the dict was not written through
            assert same(getattr(guards[1][0], key), value), key  # nor the other guard
    assert equal(view["snapshots"], frozen["snapshots"])
    assert int(guards[1][0].detector.count) == int(frozen["detector"]["count"])


def test_state_dict_in_memory_is_a_snapshot_of_the_guard():
    # SGD keeps no per-parameter state, so everything that evolves is the guard's: a state_dict
    # kept in memory across later steps (an alarm included) must resume as if saved to disk.
    def build_sgd(m):
        detector = ss.PageHinkley(ph_lambda=0.1, rho=0.5)
        return ss.CatastropheGuard(
            torch.optim.SGD(m.parameters(), lr=0.05), detector, response="rollback"
        )

    model = make_model()
    opt = build_sgd(model)
    run_script(opt, model, 0, SPIKE)
    sd, model_sd = opt.state_dict(), copy.deepcopy(model.state_dict())
    run_script(opt, model, SPIKE, len(LOSSES))
    model2 = make_model(seed=5)
    model2.load_state_dict(model_sd)
    opt2 = build_sgd(model2)
    opt2.load_state_dict(sd)
    run_script(opt2, model2, SPIKE, len(LOSSES))
    assert int(opt.stats()["rollbacks"]) == 2
    assert equal(params_of(model), params_of(model2))
    assert equal(opt.snapshots, opt2.snapshots)


@pytest.mark.parametrize("snapshot_device", [None, "cpu"], ids=["device_path", "host_path"])
def test_step_hooks_on_the_wrapped_optimizer_run_on_both_paths(snapshot_device):
    model = make_model()
    opt = build("salera", model, snapshot_device=snapshot_device)
    calls = []
    opt.optimizer.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    opt.optimizer.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("guard", o)))
    run_script(opt, model, 0, 3)
    assert [c[0] for c in calls] == ["pre", "post", "guard"] * 3
    assert all(o is opt.optimizer for name, o in calls if name != "guard")
    assert all(o is opt for name, o in calls if name == "guard")


def test_guard_runs_its_own_state_dict_hooks():
    model = make_model()
    opt = build("adam", model)
    run_script(opt, model, 0, 2)
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(
        lambda o, sd: {k: v for k, v in sd.items() if k != "extra"}
    )
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1 and seen == ["sd_pre"]
    opt.load_state_dict(sd)
    assert seen == ["sd_pre", "load_post"]


@pytest.mark.parametrize("kind", ["salera", "adam"])
def test_min_lr_check_raises_on_a_nan_learning_rate(kind):
    model = make_model()
    opt = build(kind, model, min_lr=1e-8, check_every=1)
    run_script(opt, model, 0, SPIKE)
    for group in opt.param_groups:  # a rate gone NaN (``nan < min_lr`` is False)
        if kind == "salera":
            group["lr_multiplier"].fill_(math.nan)
        else:
            group["lr"] = math.nan
    with pytest.raises(ss.TrainingDiverged, match="nan"):
        run_script(opt, model, SPIKE, SPIKE + 1)


def test_salera_and_spalera_signatures_show_the_papers_defaults():
    import inspect

    sal = inspect.signature(ss.SALeRA).parameters
    assert (sal["alpha"].default, sal["C"].default, sal["granularity"].default) == (
        0.01,
        3e-6,
        "group",
    )
    spa = inspect.signature(ss.SPALeRA).parameters
    assert (spa["alpha"].default, spa["C"].default) == (0.1, 3e-8)
    assert "granularity" not in spa
    model = make_model()
    with pytest.raises(TypeError, match="granularity"):
        ss.SPALeRA(model.parameters(), lr=0.1, granularity="group")
    assert ss.SALeRA(model.parameters(), lr=0.1, granularity="tensor").optimizer.granularity == (
        "tensor"
    )


@pytest.mark.parametrize("snapshot_device", [None, "cpu"], ids=["sync_free", "host"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("kind", ["salera", "spalera", "agadam", "cpropadamw"])
def test_a_step_skipped_for_a_nonfinite_gradient_leaves_the_detector_bitwise_unchanged(
    kind, bad, snapshot_device
):
    """A MaskableOptimizer skips the step itself; the guard must not let the detector observe
    that step's loss either (the flag is computed on the device and passed as ``skip``), on the
    sync-free path without any host read. The next clean steps match a run without the bad
    batch, detector included."""
    ref_model, model = make_model(), make_model()
    ref = build(kind, ref_model, snapshot_device=snapshot_device)
    opt = build(kind, model, snapshot_device=snapshot_device)
    losses = [1.0, 1.2, 0.9, 5.0, 1.1, 1.0]  # the bad step's loss is a jump: it must not count
    for step in range(3):
        for m, o in ((ref_model, ref), (model, opt)):
            backward(m, step)
            o.step(loss=torch.tensor(losses[step]))
    before = opt.detector.state_dict()
    backward(model, 3)
    next(model.parameters()).grad[0, 0] = bad
    if snapshot_device is None:
        reads = []
        with pytest.MonkeyPatch.context() as patch:
            for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
                patch.setattr(torch.Tensor, name, lambda *a, _r=reads, **k: _r.append(a))
            opt.step(loss=torch.tensor(losses[3]))
        assert reads == []
    else:
        opt.step(loss=torch.tensor(losses[3]))
    assert_same_tree(before, opt.detector.state_dict())
    assert int(opt.stats()["alarms"]) == 0
    for step in range(4, 6):
        for m, o in ((ref_model, ref), (model, opt)):
            backward(m, step)
            o.step(loss=torch.tensor(losses[step]))
    assert_same_tree(ref.detector.state_dict(), opt.detector.state_dict())
    assert equal(params_of(model), params_of(ref_model))


def _sparse_or_complex_case(name: str, seed: int = 0):
    """(parameters, guarded-optimizer factory, loss of step t) for a wrapped optimizer that
    handles sparse gradients or complex parameters itself."""
    torch.manual_seed(seed)
    if name == "complex":
        w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))

        def loss_fn(t: int) -> torch.Tensor:
            x = torch.randn(8, 4, dtype=torch.complex64, generator=torch.Generator().manual_seed(t))
            return (x @ w).abs().pow(2).mean()

        return [w], lambda ps: torch.optim.AdamW(ps, lr=1e-2), loss_fn
    emb = torch.nn.Embedding(10, 3, sparse=True)

    def loss_fn(t: int) -> torch.Tensor:
        idx = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(t))
        return (emb(idx) - 1.0).pow(2).mean()

    make = {
        "sgd_sparse": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        "sparse_adam": lambda ps: torch.optim.SparseAdam(ps, lr=0.05),
    }[name]
    return list(emb.parameters()), make, loss_fn


@pytest.mark.parametrize("name", ["sgd_sparse", "sparse_adam", "complex"])
def test_the_guard_supports_sparse_gradients_and_complex_params_its_optimizer_supports(name):
    """Around torch.optim.SGD with a sparse gradient, SparseAdam and AdamW on complex
    parameters, the guard steps exactly as the bare optimizer, skips a step with a NaN/inf in
    the (sparse) gradient, and a spike rolls the (complex) parameters back bitwise."""
    bare_params, make, bare_loss = _sparse_or_complex_case(name)
    bare = make(bare_params)
    params, _, loss_fn = _sparse_or_complex_case(name)
    opt = ss.CatastropheGuard(
        make(params), ss.PageHinkley(ph_lambda=0.5, rho=0.5), response="rollback"
    )

    def step(o: torch.optim.Optimizer, ps: list, loss_of, t: int, **kwargs) -> None:
        o.zero_grad()
        loss_of(t).backward()
        if kwargs.get("bad") is not None:
            grad = ps[0].grad
            values = grad._values() if grad.is_sparse else torch.view_as_real(grad)
            values.view(-1)[0] = kwargs["bad"]
        if isinstance(o, ss.CatastropheGuard):
            o.step(loss=torch.tensor(kwargs.get("loss", 1.0)))
        elif kwargs.get("bad") is None:
            o.step()

    for t in range(4):
        step(bare, bare_params, bare_loss, t)
        step(opt, params, loss_fn, t)
    assert equal(params_of_list(params), params_of_list(bare_params))
    for bad in (math.nan, math.inf):
        step(opt, params, loss_fn, 4, bad=bad)
    assert int(opt.stats()["nonfinite_grads"]) == 2 and int(opt.stats()["alarms"]) == 0
    assert equal(params_of_list(params), params_of_list(bare_params))
    for t in range(4, 6):
        step(bare, bare_params, bare_loss, t)
        step(opt, params, loss_fn, t)
    assert equal(params_of_list(params), params_of_list(bare_params))
    before = params_of_list(params)
    step(opt, params, loss_fn, 6, loss=100.0)  # a spike: roll back to before the last update
    assert int(opt.stats()["rollbacks"]) == 1
    assert not equal(params_of_list(params), before)
    assert equal(params_of_list(params), opt.snapshots)


def params_of_list(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


LOSS_TAKERS = {
    "SALeRA": lambda m: ss.SALeRA(m.parameters(), lr=0.05),
    "guard(AdamW)": lambda m: ss.CatastropheGuard(torch.optim.AdamW(m.parameters())),
    "ALeRA": lambda m: ss.ALeRA(m.parameters(), lr=0.05),
    "AgAdam": lambda m: ss.AgAdam(m.parameters()),
    "CPropAdamW": lambda m: ss.CPropAdamW(m.parameters()),
    "CPropSGD": lambda m: ss.CPropSGD(m.parameters()),
    "CProp(SGD)": lambda m: ss.CProp(torch.optim.SGD(m.parameters(), lr=0.1)),
}


@pytest.mark.parametrize("bad", ["0.5", [0.5], True, None, 1 + 2j], ids=repr)
@pytest.mark.parametrize("name", list(LOSS_TAKERS))
def test_a_loss_that_is_not_a_real_number_or_tensor_is_a_type_error(name, bad):
    """``step(loss=...)`` (and the guard's ``observe_loss``) take a real number or a real
    tensor; a string, a list, a bool or a complex number is a TypeError naming ``loss``."""
    model = make_model()
    opt = LOSS_TAKERS[name](model)
    backward(model, 0)
    before = params_of(model)
    if bad is None:  # None means "no loss": an error only where one is needed
        if isinstance(opt, ss.CatastropheGuard):
            with pytest.raises(RuntimeError, match="loss"):
                opt.step(loss=bad)
        else:
            opt.step(loss=bad)
        return
    with pytest.raises(TypeError, match=r"loss must be a real number or a tensor, got loss="):
        opt.step(loss=bad)
    with pytest.raises(TypeError, match="loss"):
        opt.step(loss=torch.tensor(1.0 + 2.0j))
    assert equal(params_of(model), before)
    if isinstance(opt, ss.CatastropheGuard):
        with pytest.raises(TypeError, match="loss must be a real number"):
            opt.observe_loss(bad)
    opt.step(loss=0.5)
    opt.step(loss=torch.tensor(0.5))


@pytest.mark.parametrize("rollback", ["kernel", "fallback"])
@pytest.mark.parametrize("kind", ["salera", "spalera", "cpropadamw", "adam", "cprop", "adam_fused"])
def test_a_spike_after_a_skipped_nonfinite_step_rolls_back_the_last_real_update(
    kind, rollback, monkeypatch
):
    """A step skipped for a NaN gradient is no update: it must not move the rollback snapshot
    either. A spike on the next step then undoes the last *real* update, on the sync-free and
    the host path alike (bitwise), and the state after it equals that of a run whose bad
    step never happened. ``fallback``: the per-tensor copies used where the rollback kernel
    cannot take the tensors. The guard counts the skip where it skipped the step itself (a
    third-party optimizer), and the cut in ``lr_scale``."""
    if rollback == "fallback":
        monkeypatch.setattr(ss.snapshot.kernels, "rollback_", lambda *args, **kwargs: False)
    third_party = kind in ("adam", "cprop", "adam_fused")
    runs = []
    for snapshot_device, with_bad_step in ((None, True), ("cpu", True), (None, False)):
        model = make_model()
        opt = build(kind, model, snapshot_device=snapshot_device)
        run_script(opt, model, 0, 4)
        before_update = params_of(model)
        backward(model, 4)
        opt.step(loss=torch.tensor(1.0))  # the last real update
        assert not equal(params_of(model), before_update)
        if with_bad_step:
            backward(model, 5)
            next(model.parameters()).grad[0, 0] = math.nan
            opt.step(loss=torch.tensor(1.0))  # skipped
            assert_same_tree(before_update, opt.snapshots)
        backward(model, 6)
        opt.step(loss=torch.tensor(50.0))  # spike: roll back the last real update
        assert int(opt.stats()["alarms"]) == 1
        assert equal(params_of(model), before_update)
        assert float(opt.stats()["lr_scale"]) == 0.5
        assert int(opt.stats()["nonfinite_grads"]) == int(with_bad_step and third_party)
        runs.append(params_of(model))
    assert equal(runs[0], runs[1]) and equal(runs[0], runs[2])


def test_documented_defaults():
    """lr_factor 0.5, backtrack, min_lr 1e-15, check_every 100 and a SpikeDetector."""
    opt = ss.CatastropheGuard(torch.optim.SGD(make_model().parameters(), lr=0.1))
    assert (opt.lr_factor, opt.backtrack, opt.min_lr, opt.check_every) == (0.5, True, 1e-15, 100)
    assert type(opt.detector) is ss.SpikeDetector and opt.snapshot_device is None
    assert (opt.response, opt.recover_every, opt.rollback, opt.accept_after) == (
        "ladder",
        100,
        "full",
        4,
    )
    assert opt.escalation is None
    # Note [collective decisions]: the guard reduces over ranks; its detector does not again
    assert opt.detector.reduce_over_ranks is False


@pytest.mark.parametrize("bad", [True, 1.5, ["cpu"]])
def test_snapshot_device_must_be_a_device(bad):
    with pytest.raises(TypeError, match="snapshot_device"):
        ss.CatastropheGuard(torch.optim.SGD(make_model().parameters(), lr=0.1), snapshot_device=bad)


@pytest.mark.parametrize("kind", ["adam", "cpropadamw"])
def test_history_holds_only_real_alarms_and_keeps_the_last_64(kind):
    """A fresh guard has no history; each alarm adds its step and loss; past 64 alarms the
    oldest are dropped, the rest stay oldest first."""
    model = make_model()
    opt = build(kind, model, lr_factor=1.0)
    assert opt.history() == []
    for step in range(70):  # a NaN loss is an alarm at every step, the first one included
        backward(model, step)
        opt.step(loss=torch.tensor(math.nan))
        if step == 0:
            history = opt.history()
            assert [h["step"] for h in history] == [0] and math.isnan(history[0]["loss"])
    history = opt.history()
    assert [h["step"] for h in history] == list(range(6, 70))
    assert all(math.isnan(h["loss"]) for h in history)
    assert int(opt.stats()["alarms"]) == 70


def test_training_diverged_pickles_with_its_message_and_history():
    history = [{"step": 3, "loss": 12.5}, {"step": 9, "loss": 40.0}]
    error = pickle.loads(pickle.dumps(ss.TrainingDiverged("lr below min_lr", history)))
    assert type(error) is ss.TrainingDiverged
    assert str(error) == "lr below min_lr" and error.history == history


def test_sync_free_min_lr_check_runs_every_check_every_steps():
    """On the sync-free path ``min_lr`` is checked on the ``check_every``-th step, counting
    from the first: alarms from step 0 on, yet TrainingDiverged only at step 2 of 3."""
    model = make_model()
    opt = build("cpropadamw", model, min_lr=1.0, check_every=3)
    assert opt._device_side
    for step in range(2):
        backward(model, step)
        opt.step(loss=torch.tensor(math.nan))
        assert nested(opt)["guard"]["calls"] == step + 1
    backward(model, 2)
    with pytest.raises(ss.TrainingDiverged, match="min_lr"):
        opt.step(loss=torch.tensor(math.nan))


def test_repr_names_the_optimizer_detector_and_settings():
    inner = torch.optim.SGD(make_model().parameters(), lr=0.1)
    detector = ss.SpikeDetector(window=16)
    opt = ss.CatastropheGuard(inner, detector, lr_factor=0.25, backtrack=False, min_lr=1e-3)
    assert repr(opt) == (
        f"CatastropheGuard({inner!r}, detector={detector!r}, lr_factor=0.25, backtrack=False, "
        "min_lr=0.001, response='ladder', recover_every=100, rollback='full')"
    )


def test_stats_without_the_optimizers():
    model = make_model()
    opt = build("salera", model)
    backward(model, 0)
    opt.step(loss=torch.tensor(1.0))
    assert "skipped_steps" in opt.stats()
    own = opt.stats(include_optimizer=False)
    assert {"alarms", "rollbacks", "steps", "lr_scale", "nonfinite_grads"} <= set(own)
    assert "skipped_steps" not in own and not any(k.startswith("history") for k in own)
    assert all(k.startswith("detector_") for k in set(own) - {*opt._counters(), "lr"})


@pytest.mark.parametrize("kind", ["adam", "cpropadamw"])
def test_a_checkpoint_without_backtrack_snapshots_round_trips(kind):
    """backtrack=False keeps no snapshot: its state_dict (no snapshots) loads."""
    model = make_model()
    opt = build(kind, model, backtrack=False)
    for step in range(3):
        backward(model, step)
        opt.step(loss=torch.tensor(1.0))
    saved = opt.state_dict()
    assert nested(opt, saved)["guard"]["snapshots"] == []
    fresh = build(kind, make_model(), backtrack=False)
    fresh.load_state_dict(saved)
    assert int(fresh.stats()["steps"]) == 3


def test_load_refuses_more_snapshots_than_parameters():
    model = make_model()
    opt = build("adam", model)
    backward(model, 0)
    opt.step(loss=torch.tensor(1.0))
    saved = nested(opt)
    saved["guard"]["snapshots"].append(torch.zeros(1))
    n = len(list(model.parameters()))
    with pytest.raises(ValueError, match=f"holds {n + 1} rollback snapshots.* {n} parameters"):
        build("adam", make_model()).load_state_dict(saved)


@pytest.mark.parametrize("kind", ["adam", "cpropadamw"])
def test_a_checkpoint_from_before_the_counters_loads_them_fresh(kind):
    """A guard checkpoint written before nonfinite_grads, lr_scale and the alarm history
    existed loads with those as a new guard has them: 0, a scale of 1, no alarm history."""
    model = make_model()
    opt = build(kind, model)
    for step in range(3):
        backward(model, step)
        opt.step(loss=torch.tensor(1.0))
    saved = nested(opt)
    for name in ("nonfinite_grads", "lr_scale", "history_step", "history_loss"):
        del saved["guard"][name]
    fresh = build(kind, make_model())
    fresh.load_state_dict(saved)
    assert int(fresh.stats()["steps"]) == 3 and int(fresh.stats()["nonfinite_grads"]) == 0
    assert float(fresh.stats()["lr_scale"]) == 1.0
    assert fresh.history() == []


class _LossOnly:
    """A detector of one's own: ``update(loss)`` only (no ``grad_norm`` or ``skip``)."""

    def __init__(self) -> None:
        self.seen: list[float] = []

    def update(self, loss):
        self.seen.append(float(loss))
        return torch.tensor(float(loss) > 5.0)

    def state_dict(self) -> dict[str, Any]:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = list(state["seen"])

    def stats(self) -> dict[str, torch.Tensor]:
        return {}


@pytest.mark.parametrize("kind", ["adam", "cpropadamw"])
def test_a_detector_of_ones_own_gets_the_loss_alone(kind):
    """A detector with ``update(loss)`` only (no ``needs_grad_norm``, no ``skip``) watches the
    losses and its alarms roll back. A NaN gradient at step 3: on both paths the adapter
    (``ForeignDetector``) restores the detector's state, so it did not see that loss; its class
    name is what the checkpoint records."""
    model = make_model()
    opt = ss.CatastropheGuard(build(kind, model).optimizer, _LossOnly(), response="rollback")
    for step, loss in enumerate(LOSSES):
        backward(model, step)
        if step == 3:
            next(model.parameters()).grad[0, 0] = math.nan
        opt.step(loss=torch.tensor(loss))
    assert opt._device_side == (kind == "cpropadamw")
    assert opt.detector.seen == LOSSES[:3] + LOSSES[4:]
    assert nested(opt)["guard"]["detector_class"] == "_LossOnly"
    assert [h["step"] for h in opt.history()] == [i for i, x in enumerate(LOSSES) if x > 5.0]


@pytest.mark.parametrize("kind", ["adam", "cpropadamw"])
def test_the_default_detector_watches_the_gradient_norm(kind):
    """With an ordinary loss, gradients x1e4 alarm through the global norm the guard passes
    to a detector with ``needs_grad_norm`` (the default SpikeDetector)."""
    model = make_model()
    base = (
        torch.optim.Adam(model.parameters(), lr=0.01)
        if kind == "adam"
        else ss.CPropAdamW(model.parameters(), lr=0.01)
    )
    opt = ss.CatastropheGuard(base, ss.SpikeDetector(warmup=3))
    for step in range(12):
        backward(model, step)
        if step == 10:
            for p in model.parameters():
                p.grad.mul_(1e4)
        opt.step(loss=torch.tensor(1.0))
    assert [h["step"] for h in opt.history()] == [10]


def test_the_host_path_counts_steps_for_a_later_sync_free_resume():
    """The step count is part of the checkpoint on both paths: two steps on the host path
    (``snapshot_device="cpu"``), resumed on the sync-free path with ``check_every=3``, make the
    next step the third, where ``min_lr`` is checked."""
    model = make_model()
    host = build("cpropadamw", model, min_lr=1.0, check_every=3, snapshot_device="cpu")
    assert not host._device_side
    for step in range(2):
        backward(model, step)
        host.step(loss=torch.tensor(1.0))
    saved = host.state_dict()
    assert nested(host, saved)["guard"]["calls"] == 2
    resumed = build("cpropadamw", model, min_lr=1.0, check_every=3)
    resumed.load_state_dict(saved)
    assert resumed._device_side
    backward(model, 2)
    with pytest.raises(ss.TrainingDiverged, match="min_lr"):
        resumed.step(loss=torch.tensor(math.nan))


@pytest.mark.parametrize("kind", ["adam", "cpropadamw", "adam_fused"])
def test_a_gradient_above_the_limit_is_skipped_and_not_observed(kind):
    """A finite gradient element above the limit (1e30 in float32: its square overflows)
    skips the step like a NaN, and the detector does not observe that step, although the
    float64 global norm the detector watches is finite."""
    model = make_model()
    base = build(kind, model).optimizer
    opt = ss.CatastropheGuard(base, ss.SpikeDetector(warmup=3))
    run_script(opt, model, 0, 4)
    before = params_of(model)
    count = int(opt.detector.stats()["loss_count"])
    backward(model, 4)
    next(model.parameters()).grad[0, 0] = 1e30
    opt.step(loss=torch.tensor(1.0))
    assert int(opt.detector.stats()["loss_count"]) == count
    assert int(opt.stats()["alarms"]) == 0 and equal(params_of(model), before)
    assert int(opt.stats()["nonfinite_grads"]) == int(kind != "cpropadamw")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("snapshot_device", [None, "cpu"])
def test_cuda_snapshots_beside_the_params_or_pinned_on_the_host(snapshot_device):
    """Snapshots of CUDA parameters live beside them, or with ``snapshot_device="cpu"`` in
    pinned host memory (asynchronous copies); never pinned on the device."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).cuda()
    opt = ss.CatastropheGuard(
        torch.optim.Adam(model.parameters(), lr=0.01), snapshot_device=snapshot_device
    )
    loss = model(torch.randn(8, 4, device="cuda")).pow(2).mean()
    loss.backward()
    opt.step(loss=loss.detach())
    host = snapshot_device == "cpu"
    for snap in opt.snapshots:
        assert snap.device.type == ("cpu" if host else "cuda") and snap.is_pinned() == host


@pytest.mark.parametrize("kind", ["adam", "cpropadamw"])
def test_min_lr_is_checked_on_alarms_only_and_admits_equality(kind):
    """Host path (``snapshot_device="cpu"``): the spike's cut leaves lr exactly at min_lr,
    which is allowed; a scheduler then lowers lr below it, and a step skipped for a NaN
    gradient (not an alarm) does not check; the next alarm does."""
    model = make_model()
    opt = build(kind, model, min_lr=0.005, snapshot_device="cpu")
    for group in opt.param_groups:
        group["lr"] = 0.01
    run_script(opt, model, 0, SPIKE + 1)  # the spike cuts 0.01 to 0.005 == min_lr
    assert int(opt.stats()["alarms"]) == 1
    for group in opt.param_groups:
        group["lr"] = 1e-4
    backward(model, SPIKE + 1)
    next(model.parameters()).grad[0, 0] = math.nan
    opt.step(loss=torch.tensor(1.0))  # skipped, no alarm: no check
    backward(model, SPIKE + 2)
    with pytest.raises(ss.TrainingDiverged, match="min_lr"):
        opt.step(loss=torch.tensor(math.nan))


def test_min_lr_looks_at_the_largest_rate_and_only_after_an_alarm():
    """Two groups at 0.01 and 1e-5: after a cut the largest (0.005) is above min_lr = 1e-3,
    so no error although the other is below; and with no alarm at all nothing is checked,
    even on the sync-free path with every rate below min_lr from the start."""
    model = make_model()
    base = torch.optim.Adam(
        [
            {"params": model[0].parameters(), "lr": 0.01},
            {"params": model[2].parameters(), "lr": 1e-5},
        ]
    )
    opt = ss.CatastropheGuard(base, ss.PageHinkley(ph_lambda=0.1, rho=0.5), min_lr=1e-3)
    run_script(opt, model, 0, SPIKE + 1)
    assert int(opt.stats()["alarms"]) == 1
    calm_model = make_model()
    calm = build("cpropadamw", calm_model, min_lr=1.0, check_every=1)
    run_script(calm, calm_model, 0, SPIKE)
    assert int(calm.stats()["alarms"]) == 0


@pytest.mark.parametrize("make", [ss.CPropAdamW, ss.CPropSGD], ids=["CPropAdamW", "CPropSGD"])
def test_a_guarded_native_cprop_step_reuses_the_guards_gradient_check(make, monkeypatch):
    """The guard's one pass over the gradients gives the skip flag; the native CProp class
    inside takes it through ``masked_step`` instead of reading every gradient again. Its own
    check still runs when it steps alone, and both runs end bitwise equal."""
    from steadystep.optim.cprop import _state

    calls = []
    own_check = _state.grads_finite

    def counting(grads, **kwargs):
        calls.append(len(grads))
        return own_check(grads, **kwargs)

    monkeypatch.setattr(_state, "grads_finite", counting)

    def run(guarded: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
        inner = make(params, lr=0.01)
        opt = ss.CatastropheGuard(inner) if guarded else inner
        for t in range(4):
            for p in params:
                p.grad = torch.randn(p.shape) * (math.nan if t == 2 else 1.0)
            opt.step(loss=torch.tensor(1.0)) if guarded else opt.step()
        return [p.detach().clone() for p in params]

    guarded = run(True)
    assert calls == []
    alone = run(False)
    assert calls == [2, 2, 2, 2]
    assert all(torch.equal(a, b) for a, b in zip(guarded, alone, strict=True))


def test_a_first_step_at_lr_zero_with_zero_gradients_and_a_loss_is_a_step():
    """Only a step without a loss can be torch.distributed.checkpoint's state-creating step;
    one with a loss is watched and counted like any other."""
    model = make_model()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt = ss.CatastropheGuard(torch.optim.AdamW(model.parameters(), lr=0.0))
    assert opt.step(loss=torch.tensor(1.5)) == torch.tensor(1.5)
    assert int(opt.stats()["steps"]) == 1
    assert float(opt.detector.last_loss) == 1.5


@pytest.mark.parametrize("native", [False, True], ids=["SGD", "CPropSGD-host"])
def test_host_path_checks_min_lr_at_a_cut_only(native):
    """After an alarm that cut nothing (a skipped batch), the schedule's own decay below min_lr
    is not checked on the host path's update steps: only a cut is (the sync-free path checks
    every check_every steps instead)."""

    class Above:  # a detector of one's own: the loss above 100 alarms
        def update(self, loss: torch.Tensor) -> torch.Tensor:
            return torch.as_tensor(loss) > 100

    model = make_model()
    if native:  # a MaskableOptimizer, on the host path through a host snapshot
        base = ss.CPropSGD(model.parameters(), lr=1.0)
        opt = ss.CatastropheGuard(base, Above(), min_lr=0.5, snapshot_device="cpu")
    else:
        opt = ss.CatastropheGuard(torch.optim.SGD(model.parameters(), lr=1.0), Above(), min_lr=0.5)
    assert not opt._device_side
    for step in range(12):
        backward(model, step)
        opt.step(loss=torch.tensor(1.0))
    backward(model, 12)
    opt.step(loss=torch.tensor(1e6))  # the first rung: skipped, no cut
    assert int(opt.skips) == 1 and float(opt.lr_scale) == 1.0
    for group in opt.param_groups:
        group["lr"] = 0.1  # a schedule's decay, below min_lr
    for step in range(13, 20):
        backward(model, step)
        opt.step(loss=torch.tensor(1.0))
    assert int(opt.stats()["steps"]) == 20
