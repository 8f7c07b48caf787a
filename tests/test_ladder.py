"""The guard's answers (Note [the ladder]) and its learning-rate scale (Note [the learning-rate
scale]): a bad batch is skipped, a bad update rolled back (parameters, optimizer state and
buffers, bitwise) and cut, a change of level accepted; the cut rides on top of any scheduler,
for every base, recovers after calm steps, and still ends a diverging run under a scheduler and
under torch.compile; every rank decides alike."""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import steadystep as ss
from steadystep._guard_decision import decide_step, reference_step
from steadystep.ladder import NORMAL, PlainLadder, decide, rescale
from tests.dispatch import CountOps

# -- the functional core against its plain restatement ---------------------------------------


@pytest.mark.parametrize("response", ["ladder", "rollback"])
@pytest.mark.parametrize("seed", range(4))
def test_decide_and_rescale_follow_the_plain_ladder(response, seed):
    """Random alarm sequences (bursts of 1-4 alarms, some non-finite, calm stretches long
    enough to recover): the tensor core takes the plain restatement's actions and scale, step
    by step."""
    rng = random.Random(seed)
    plain = PlainLadder(lr_factor=0.5, recover_every=5, response=response, accept_after=3)
    phase = torch.zeros((), dtype=torch.int64)
    waited = torch.zeros((), dtype=torch.int64)
    calm = torch.zeros((), dtype=torch.int64)
    scale = torch.ones((), dtype=torch.float64)
    episode = torch.ones((), dtype=torch.float64)
    for _ in range(300):
        alarm = rng.random() < 0.25
        finite = rng.random() < 0.8
        want = plain.step(alarm, finite)
        a, f = torch.tensor(alarm), torch.tensor(finite)
        d = decide(a, f, phase, waited, response=response, accept_after=3)
        factor, episode, calm = rescale(
            d,
            starts=a & (phase == NORMAL),
            lr_scale=scale,
            episode_scale=episode,
            calm=calm,
            lr_factor=0.5,
            recover_every=5,
        )
        got = {k: bool(getattr(d, k)) for k in ("update", "rollback", "cut", "accept")}
        assert got == want
        scale = scale * factor
        phase, waited = d.phase, d.waited
        assert float(scale) == plain.scale and int(phase) == plain.phase
        assert int(waited) == plain.waited


# -- a small task --------------------------------------------------------------------------------

STEPS = 160
DATA = torch.Generator().manual_seed(0)
X_ALL = torch.randn(512, 12, generator=DATA)
W_A, W_B = torch.randn(12, 4, generator=DATA), torch.randn(12, 4, generator=DATA)


def _labels(x: torch.Tensor, task: int) -> torch.Tensor:
    return (x @ (W_A if task == 0 else W_B)).argmax(dim=1)


def _mlp(seed: int = 0, batchnorm: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Linear(12, 32)]
    if batchnorm:
        layers.append(torch.nn.BatchNorm1d(32))
    layers += [torch.nn.ReLU(), torch.nn.Linear(32, 4)]
    return torch.nn.Sequential(*layers)


def _batch(step: int, task: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, len(X_ALL), (32,), generator=g)
    x = X_ALL[idx]
    return x, _labels(x, task)


def _full_loss(model: torch.nn.Module, task: int) -> float:
    model.eval()
    with torch.no_grad():
        loss = float(F.cross_entropy(model(X_ALL), _labels(X_ALL, task)))
    model.train()
    return loss


def _train(
    model: torch.nn.Module,
    opt: Any,
    steps: range,
    *,
    task_at: Callable[[int], int] = lambda s: 0,
    corrupt: Callable[[int], float] = lambda s: 1.0,
    scheduler: Any = None,
) -> None:
    for step in steps:
        x, y = _batch(step, task_at(step))
        loss = F.cross_entropy(model(x), y) * corrupt(step)
        opt.zero_grad()
        loss.backward()
        if isinstance(opt, ss.CatastropheGuard):
            opt.step(loss=loss.detach())
        else:
            opt.step()
        if scheduler is not None:
            scheduler.step()


def _guard_state(guard: ss.CatastropheGuard) -> dict[str, torch.Tensor]:
    names = ("phase", "waited", "lr_scale", "episode_scale", "calm", "alarms", "rollbacks")
    names += ("skips", "level_shifts", "steps", "history_step", "history_loss")
    return {name: getattr(guard, name) for name in names}


@pytest.mark.parametrize("loss_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"response": "rollback", "recover_every": None},
        {"backtrack": False, "accept_after": 1, "recover_every": 3},
        {"lr_factor": 0.3, "accept_after": 2, "recover_every": 4},
    ],
    ids=["defaults", "rollback", "no-backtrack", "short"],
)
def test_the_cpu_ladder_kernel_decides_like_the_torch_reference(settings, loss_dtype):
    """Note [the ladder kernel]: random alarms (bursts, non-finite losses, skipped non-finite
    gradients, calm stretches that give cuts back, more than 64 alarms so the history ring
    wraps): the kernel's decision, factor and the guard state it writes equal the torch
    reference's bitwise, and the kernel dispatches no torch operation."""
    settings = {"recover_every": 5, **settings}
    rng = random.Random(len(settings))
    model = torch.nn.Linear(2, 1)
    fast = ss.CatastropheGuard(torch.optim.SGD(model.parameters(), lr=0.1), **settings)
    slow = copy.deepcopy(fast)
    for det in (fast.detector, slow.detector):
        det.last_loss = det.last_loss.to(loss_dtype)
    for step in range(600):
        burst = step % 40 < 6
        alarm = torch.tensor(rng.random() < (0.8 if burst else 0.03))
        bad_grads = torch.tensor(rng.random() < 0.05)
        value = math.nan if rng.random() < 0.05 else rng.uniform(0.1, 3.0) * 10 ** (step % 7)
        observed = torch.tensor(value, dtype=loss_dtype)
        fast.detector.last_loss.fill_(value)
        slow.detector.last_loss.fill_(value)
        with CountOps() as ops:
            got = decide_step(fast, alarm, observed, bad_grads)
        if step:  # past the first step's scratch tensors
            assert ops.count == 0
        want = reference_step(slow, alarm, observed, bad_grads, slow.detector.last_loss)
        (decision, factor, revert), (ref_decision, ref_factor, ref_revert) = got, want
        for name in ("update", "rollback", "cut", "accept"):
            assert torch.equal(getattr(decision, name), getattr(ref_decision, name)), (step, name)
        assert torch.equal(factor, ref_factor) and torch.equal(revert, ref_revert), step
        for name, value in _guard_state(fast).items():
            torch.testing.assert_close(
                value, getattr(slow, name), rtol=0, atol=0, equal_nan=True, msg=(step, name)
            )
    stats = fast.stats()
    assert int(stats["alarms"]) > 64 and int(stats["level_shifts"]) + int(stats["rollbacks"]) > 0


def test_a_task_switch_is_accepted_as_a_change_of_level():
    """A learnable task switch (the labels change and the loss jumps): the guard ends within
    1.1x of the unguarded run's loss, with the switch counted as a level shift and the rate
    back at its schedule."""
    switch = 60

    def task_at(step: int) -> int:
        return 0 if step < switch else 1

    plain_model = _mlp()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2)
    _train(plain_model, plain, range(STEPS), task_at=task_at)
    model = _mlp()
    opt = ss.CatastropheGuard(torch.optim.AdamW(model.parameters(), lr=1e-2))
    _train(model, opt, range(STEPS), task_at=task_at)
    stats = opt.stats()
    assert int(stats["alarms"]) >= 1 and int(stats["level_shifts"]) >= 1
    assert float(stats["lr_scale"]) == 1.0
    assert _full_loss(model, 1) <= 1.1 * _full_loss(plain_model, 1)


def test_a_bad_batch_is_skipped_without_a_cut():
    """One corrupted batch: the first rung skips it; nothing is rolled back or cut, and the
    weights are those of the step before (the batch never reached them)."""
    model = _mlp()
    opt = ss.CatastropheGuard(torch.optim.AdamW(model.parameters(), lr=1e-2))
    _train(model, opt, range(40))
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, range(40, 41), corrupt=lambda s: 1e3)
    stats = opt.stats()
    assert int(stats["skips"]) == 1 and int(stats["rollbacks"]) == 0
    assert float(stats["lr_scale"]) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _bases() -> dict[str, Callable[[Any], Any]]:
    return {
        "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, fused=True),
        "SGD momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
        "CPropAdamW": lambda ps: ss.CPropAdamW(ps, lr=1e-2),
        "CProp(AdamW)": lambda ps: ss.CProp(torch.optim.AdamW(ps, lr=1e-2)),
        "ALeRA": lambda ps: ss.ALeRA(ps, lr=1e-2),
        "AgAdam": lambda ps: ss.AgAdam(ps, lr=1e-2),
    }


def _state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = []
    for p in (p for g in optimizer.param_groups for p in g["params"]):
        state = optimizer.state.get(p, {})
        out += [state[k].clone() for k in sorted(state) if isinstance(state[k], torch.Tensor)]
    return out


@pytest.mark.parametrize("name", ["AdamW", "AdamW fused", "SGD momentum", "CPropAdamW"])
def test_a_rollback_restores_parameters_optimizer_state_and_buffers_bitwise(name):
    """Two alarms in a row after a normal step: the second rolls back to the snapshot taken
    before that normal step's update: the parameters, every tensor of the optimizer's state
    (moments, step counts, CProp's statistics) and the model's BatchNorm buffers (as that
    step's forward left them), bitwise."""
    model = _mlp(batchnorm=True)
    opt = ss.CatastropheGuard(_bases()[name](model.parameters()), model=model)
    _train(model, opt, range(30))
    params = [p.detach().clone() for p in model.parameters()]
    state = _state_tensors(opt.optimizer)
    seen: list[list[torch.Tensor]] = []
    hook = opt.register_step_pre_hook(lambda *a: seen.append([b.clone() for b in model.buffers()]))
    _train(model, opt, range(30, 31))  # a normal update: this is what the rollback undoes
    hook.remove()
    buffers = seen[0]
    _train(model, opt, range(31, 33), corrupt=lambda s: 1e3)
    assert int(opt.stats()["rollbacks"]) == 1 and float(opt.stats()["lr_scale"]) == 0.5
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    after = _state_tensors(opt.optimizer)
    assert len(after) == len(state) and all(map(torch.equal, state, after))
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))


def test_rollback_params_keeps_the_optimizer_state():
    """``rollback="params"``: the cheaper mode restores the parameters only."""
    model = _mlp()
    opt = ss.CatastropheGuard(torch.optim.AdamW(model.parameters(), lr=1e-2), rollback="params")
    _train(model, opt, range(30))
    _train(model, opt, range(30, 31))
    state = _state_tensors(opt.optimizer)
    _train(model, opt, range(31, 33), corrupt=lambda s: 1e3)
    assert int(opt.stats()["rollbacks"]) == 1
    assert all(map(torch.equal, state, _state_tensors(opt.optimizer)))


def test_full_rollback_takes_the_bad_gradient_out_of_the_momentum():
    """SGD momentum 0.9, one gradient x1e3 that reaches the weights (the detector watches the
    loss only, so it sees the damage one step later): restoring the momentum with the weights
    ends near the clean run; a parameters-only rollback replays the bad gradient."""
    clean_model = _mlp()
    clean = torch.optim.SGD(clean_model.parameters(), lr=0.05, momentum=0.9)
    _train(clean_model, clean, range(STEPS))
    finals = {}
    for rollback in ("full", "params"):
        model = _mlp()
        opt = ss.CatastropheGuard(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            ss.PageHinkley(ph_lambda=0.5, rho=0.1),
            rollback=rollback,
        )
        for step in range(STEPS):
            x, y = _batch(step, 0)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if step == 50:
                for p in model.parameters():
                    p.grad.mul_(1e3)
            opt.step(loss=loss.detach())
        finals[rollback] = _full_loss(model, 0)
    assert finals["full"] <= 1.5 * _full_loss(clean_model, 0)
    assert finals["full"] < finals["params"]


SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + 0.01 * s)),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=2e-2, total_steps=200),
    "warm restarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=20),
}


def _applied_rates(opt: ss.CatastropheGuard, step_of: Callable[[], int]) -> dict[int, float]:
    """The rate the inner step applies at each step that runs it, read inside it (a step
    pre-hook on the wrapped optimizer): ``lr`` times the group's ``lr_multiplier`` for
    steadystep's optimizers."""
    seen: dict[int, float] = {}

    def hook(o: Any, args: Any, kwargs: Any) -> None:
        group = o.param_groups[0]
        seen[step_of()] = float(group["lr"]) * float(group.get("lr_multiplier", 1.0))

    target = opt.optimizer
    target = getattr(target, "optimizer", target)  # the CProp wrapper steps its base
    target.register_step_pre_hook(hook)
    return seen


@pytest.mark.parametrize("sched", list(SCHEDULERS))
@pytest.mark.parametrize("name", ["AdamW", "AdamW fused", "CPropAdamW", "CProp(AdamW)"])
def test_the_cut_rides_on_top_of_every_scheduler(name, sched):
    """A scheduler that rewrites ``group["lr"]`` every step cannot erase the guard's cut: the
    applied rate is the scheduled one times ``lr_scale`` at every step after the cut, and
    ``lr_scale`` is exactly applied / scheduled."""
    model = _mlp()
    opt = ss.CatastropheGuard(_bases()[name](model.parameters()), recover_every=None)
    scheduler = SCHEDULERS[sched](opt)
    scheduled: list[float] = []
    applied = _applied_rates(opt, lambda: len(scheduled) - 1)
    for step in range(60):
        scheduled.append(float(opt.param_groups[0]["lr"]))
        _train(model, opt, range(step, step + 1), corrupt=lambda s: 1e3 if s in (30, 31) else 1.0)
        scheduler.step()
    assert int(opt.stats()["rollbacks"]) == 1 and float(opt.lr_scale) == 0.5
    ratios = {step: rate / scheduled[step] for step, rate in applied.items() if scheduled[step]}
    assert all(ratios[s] == pytest.approx(1.0, rel=1e-12) for s in range(30) if s in ratios)
    after = [ratios[s] for s in range(32, 60) if s in ratios]
    assert len(after) >= 20 and all(r == pytest.approx(0.5, rel=1e-12) for r in after)
    stats = opt.stats()
    assert float(stats["lr"]) == pytest.approx(0.5 * float(opt.param_groups[0]["lr"]), rel=1e-6)


@pytest.mark.parametrize("name", ["ALeRA", "AgAdam"])
def test_the_cut_reaches_the_alera_family_under_a_scheduler(name):
    """ALeRA and AgAdam adapt their own multipliers; the guard's cut multiplies them (their
    ``lr_multiplier``) exactly once, and a scheduler rewriting ``lr`` leaves it."""
    model = _mlp()
    opt = ss.CatastropheGuard(_bases()[name](model.parameters()), recover_every=None)
    scheduler = SCHEDULERS["LambdaLR"](opt)
    before = None
    for step in range(40):
        if step == 31:
            before = [g["lr_multiplier"].clone() for g in opt.param_groups]
        _train(model, opt, range(step, step + 1), corrupt=lambda s: 1e3 if s in (30, 31) else 1.0)
        if step == 31:
            after = [g["lr_multiplier"].clone() for g in opt.param_groups]
        scheduler.step()
    assert int(opt.stats()["rollbacks"]) == 1 and float(opt.lr_scale) == 0.5
    assert all(torch.equal(b * 0.5, a) for a, b in zip(after, before, strict=True))


def test_calm_steps_give_the_cut_back():
    """After ``recover_every`` calm steps one cut is undone, up to a scale of 1."""
    model = _mlp()
    opt = ss.CatastropheGuard(torch.optim.AdamW(model.parameters(), lr=1e-2), recover_every=10)
    _train(model, opt, range(30))
    _train(model, opt, range(30, 32), corrupt=lambda s: 1e3)
    assert float(opt.lr_scale) == 0.5
    _train(model, opt, range(32, 41))
    assert float(opt.lr_scale) == 0.5  # 9 calm steps
    _train(model, opt, range(41, 42))
    assert float(opt.lr_scale) == 1.0
    _train(model, opt, range(42, 80))
    assert float(opt.lr_scale) == 1.0


def _nan_forever(opt: ss.CatastropheGuard, model: torch.nn.Module, step_fn: Callable) -> int:
    """Feed a NaN loss at every step until the guard raises; return the step it raised at."""
    for step in range(200):
        x, y = _batch(step, 0)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        try:
            step_fn(loss=torch.tensor(math.nan))
        except ss.TrainingDiverged as e:
            assert "non-finite loss" in str(e)
            return step
    raise AssertionError("never raised TrainingDiverged")


@pytest.mark.parametrize("path", ["host", "device"])
def test_training_diverged_fires_under_a_scheduler(path):
    """A scheduler that rewrites ``lr`` every step no longer hides the cuts: persistent NaN
    losses cut the scale until the applied rate is below ``min_lr``."""
    model = _mlp()
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=path == "device")
    opt = ss.CatastropheGuard(base, min_lr=1e-4, check_every=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def step(loss: torch.Tensor) -> None:
        opt.step(loss=loss)
        scheduler.step()

    assert _nan_forever(opt, model, step) < 20


def test_training_diverged_fires_under_torch_compile():
    """``torch.compile(opt.step)``: the host's bookkeeping runs outside the compiled graph, so
    the call count moves and the ``min_lr`` check still raises."""
    model = _mlp()
    opt = ss.CatastropheGuard(
        ss.CPropAdamW(model.parameters(), lr=1e-2), min_lr=1e-4, check_every=2
    )
    compiled = torch.compile(opt.step, backend="eager")
    assert _nan_forever(opt, model, compiled) < 30
    assert opt._calls > 0


def test_one_nan_sample_is_masked_not_a_catastrophe():
    """A NaN in a single sample's loss (a bad label): ``clip`` masks it out of the batch and
    counts it; the guard sees the finite samples' mean, nothing is cut."""
    model = _mlp()
    opt = ss.stabilize(torch.optim.AdamW(model.parameters(), lr=1e-2), cprop=False)
    for step in range(40):
        x, y = _batch(step, 0)
        per_sample = F.cross_entropy(model(x), y, reduction="none")
        if step == 25:
            per_sample = per_sample * torch.where(torch.arange(32) == 3, math.nan, 1.0)
        loss = opt.clip(per_sample).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    stats = opt.stats()
    assert int(stats["clip/nonfinite_losses"]) == 1 and int(stats["guard/alarms"]) == 0
    assert float(stats["guard/lr_scale"]) == 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_state_dict_resumes_mid_episode_bitwise():
    """A checkpoint taken between the ladder's rungs (after a skip) resumes bitwise: the phase,
    the calm count and the episode's scale are in the state_dict."""
    model = _mlp()
    opt = ss.CatastropheGuard(torch.optim.AdamW(model.parameters(), lr=1e-2), recover_every=7)
    corrupt = {30: 1e3, 31: 1e3, 50: 1e3}.get
    _train(model, opt, range(51), corrupt=lambda s: corrupt(s, 1.0))
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    assert int(saved["opt"]["param_groups"][0]["guard"]["guard"]["phase"]) == 1  # flat layout
    _train(model, opt, range(51, 90), corrupt=lambda s: corrupt(s, 1.0))
    model2 = _mlp(seed=3)
    model2.load_state_dict(saved["model"])
    opt2 = ss.CatastropheGuard(torch.optim.AdamW(model2.parameters(), lr=1e-2), recover_every=7)
    opt2.load_state_dict(saved["opt"])
    _train(model2, opt2, range(51, 90), corrupt=lambda s: corrupt(s, 1.0))
    assert all(map(torch.equal, model.parameters(), model2.parameters()))
    for key, value in opt.stats().items():
        assert torch.equal(value, opt2.stats()[key]), key


def test_an_accepted_level_returns_the_scale_of_before_its_episode_not_of_the_run():
    """A cut from an earlier episode stays (recover_every=None); a later change of level,
    accepted, undoes that episode's cut only: the scale returns to 0.5, not 1."""
    model = _mlp()
    opt = ss.CatastropheGuard(torch.optim.AdamW(model.parameters(), lr=1e-2), recover_every=None)
    _train(model, opt, range(40))
    _train(model, opt, range(40, 42), corrupt=lambda s: 1e3)  # skip, then roll back and cut
    assert float(opt.lr_scale) == 0.5
    _train(model, opt, range(42, 60))  # calm again: the cut stays
    _train(model, opt, range(60, 80), task_at=lambda s: 1)  # a new level, accepted
    assert int(opt.level_shifts) == 1
    assert float(opt.lr_scale) == 0.5
