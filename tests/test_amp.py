"""Mixed precision: a step that torch.amp.GradScaler skips is a step steadystep skips (ALRC's
moments, CProp's statistics, the guard's detector and counters all bitwise unchanged), and bf16
autocast trains with fp32 statistics."""

from __future__ import annotations

import copy

import pytest
import torch

import steadystep as ss
from steadystep.integrations.amp import skip_aware

SKIP = 4


def _stabilize(*args, **kwargs):
    """ss.stabilize with ALRC on (opt-in since the clean-run benchmark): these tests exercise
    ALRC inside the composition; a test of the defaults calls ss.stabilize itself."""
    return ss.stabilize(*args, **{"alrc": True, **kwargs})


class _InfGrad(torch.autograd.Function):
    """Identity forward, inf backward: a finite loss whose (scaled) gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _snapshot(alrc, opt):
    return copy.deepcopy((alrc.state_dict(), opt.state_dict()))


def _assert_same(a, b):
    def walk(x, y):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y) or (x.isnan().all() and y.isnan().all())
        elif isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                walk(x[k], y[k])
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y)
            for u, v in zip(x, y, strict=True):
                walk(u, v)
        else:
            assert x == y

    walk(a, b)


OPTIMIZERS = {
    "cpropadamw": lambda m: ss.CPropAdamW(m.parameters(), lr=1e-2),
    "cprop": lambda m: ss.CProp(torch.optim.SGD(m.parameters(), lr=1e-2)),
    "salera": lambda m: ss.SALeRA(ss.layer_groups(m), lr=0.05),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_scaler_skipped_step_updates_no_statistic(name):
    model = _model()
    alrc = ss.ALRC(beta1=0.9, beta2=0.9)
    opt = OPTIMIZERS[name](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    g = torch.Generator().manual_seed(1)
    for step in range(SKIP + 3):
        x = torch.randn(16, 4, generator=g)
        y = x.sum(dim=1, keepdim=True)
        if step == SKIP:
            before = _snapshot(alrc, opt)
            params_before = [p.detach().clone() for p in model.parameters()]
        with skip_aware(scaler, alrc) as guard:
            out = model(x)
            if step == SKIP:
                out = _InfGrad.apply(out)
            loss = alrc((out - y).pow(2).squeeze(1)).mean()
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt, loss=loss.detach()) if name == "salera" else scaler.step(opt)
            scaler.update()
        if step == SKIP:
            assert bool(guard.skipped)
            _assert_same(_snapshot(alrc, opt), before)
            for p, q in zip(model.parameters(), params_before, strict=True):
                assert torch.equal(p, q)
        elif step > 0:
            assert not bool(guard.skipped)
    assert int(alrc.num_updates) == SKIP + 2  # every iteration but the skipped one
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_without_skip_aware_alrc_would_count_the_skipped_batch():
    # the reason skip_aware exists: ALRC updates its moments in the forward pass
    model, alrc = _model(), ss.ALRC()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    loss = alrc(_InfGrad.apply(model(torch.randn(8, 4))).pow(2).squeeze(1)).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert int(alrc.num_updates) == 1  # counted although the step was skipped


def test_disabled_scaler_is_a_no_op():
    alrc = ss.ALRC()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    with skip_aware(scaler, alrc) as guard:
        alrc(torch.rand(4) + 1.0)
    assert guard.skipped is None and int(alrc.num_updates) == 1


@pytest.mark.parametrize("name", ["cpropadamw", "salera"])
def test_bf16_autocast_trains_with_fp32_statistics(name):
    model = _model()
    alrc = ss.ALRC()
    opt = OPTIMIZERS[name](model)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) * 0.5
    losses = []
    for _ in range(30):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16
            loss = alrc((out.float() - y).pow(2).squeeze(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())
        losses.append(float(loss))
    assert alrc.mu1.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_skip_aware_takes_a_stabilized_optimizer():
    # the recipe under a GradScaler: skip_aware(scaler, opt) reaches opt's ALRC, and the raw
    # loss that opt.clip() remembered for a skipped step does not reach the next step's guard
    model = _model()
    opt = _stabilize(torch.optim.AdamW(model.parameters(), lr=1e-2), cprop=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    g = torch.Generator().manual_seed(1)
    for step in range(SKIP + 3):
        x = torch.randn(16, 4, generator=g)
        y = x.sum(dim=1, keepdim=True)
        if step == SKIP:
            before = copy.deepcopy(opt.state_dict())
            params_before = [p.detach().clone() for p in model.parameters()]
        with skip_aware(scaler, opt) as guard:
            out = model(x)
            if step == SKIP:
                out = _InfGrad.apply(out)
            per_sample = (out - y).pow(2).squeeze(1)
            loss = opt.clip(per_sample).mean()
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if step == SKIP:
            assert bool(guard.skipped)
            _assert_same(opt.state_dict(), before)
            for p, q in zip(model.parameters(), params_before, strict=True):
                assert torch.equal(p, q)
        if step == SKIP + 1:  # the guard watched this batch's raw loss alone
            assert float(opt.guard.detector.last_loss) == pytest.approx(
                float(per_sample.detach().mean()), rel=1e-6
            )
    stats = opt.stats()
    assert int(stats["alrc/num_updates"]) == SKIP + 2 and int(stats["guard/steps"]) == SKIP + 2
