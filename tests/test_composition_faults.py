"""Faults through the composition (issue 20, item 4): a skipped step is counted on every path
and leaves ALRC's moments as they were; global optimizer step hooks fire once per user step;
SparseAdam with CProp is refused at construction; bad constructor arguments name the
argument, the value and the rule."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import steadystep as ss


def _stabilize(*args, **kwargs):
    """ss.stabilize with ALRC on (opt-in since the clean-run benchmark): these tests exercise
    ALRC inside the composition; a test of the defaults calls ss.stabilize itself."""
    return ss.stabilize(*args, **{"alrc": True, **kwargs})


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _step(model: torch.nn.Module, opt: ss.Stabilized, t: int, *, poison: bool = False) -> None:
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(t))
    per_sample = (model(x) - x.sum(1, keepdim=True)).pow(2).squeeze(1)
    loss = opt.clip(per_sample).mean()
    opt.zero_grad()
    loss.backward()
    if poison:
        model[0].weight.grad[0, 0] = math.inf
    opt.step()


def _alrc_state(alrc: ss.ALRC) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in alrc.state_dict().items() if k != "clipped_fraction"}


@pytest.mark.parametrize(
    "make",
    [
        lambda m: _stabilize(torch.optim.AdamW(m.parameters(), lr=1e-2)),
        lambda m: _stabilize(torch.optim.AdamW(m.parameters(), lr=1e-2), cprop=False),
        lambda m: _stabilize(torch.optim.SGD(m.parameters(), lr=1e-2), native=False),
    ],
    ids=["native", "torch-fused-or-host", "wrapper"],
)
def test_a_step_skipped_for_a_nonfinite_gradient_leaves_alrcs_moments(make):
    model = _model()
    opt = make(model)
    for t in range(4):
        _step(model, opt, t)
    before = _alrc_state(opt.alrc)
    _step(model, opt, 4, poison=True)
    after = _alrc_state(opt.alrc)
    assert all(torch.equal(before[k], after[k]) for k in before), (before, after)
    _step(model, opt, 5)  # a clean step moves them again
    assert not torch.equal(before["num_updates"], opt.alrc.num_updates)


def test_native_cprop_counts_its_skipped_steps():
    model = _model()
    opt = ss.CPropAdamW(model.parameters(), lr=1e-2)
    assert int(opt.stats()["skipped_steps"]) == 0
    for poison in [False, True, False, True]:
        model.zero_grad()
        model(torch.randn(4, 3)).pow(2).mean().backward()
        if poison:
            model[2].bias.grad.fill_(math.nan)
        opt.step()
    assert int(opt.stats()["skipped_steps"]) == 2
    fresh = ss.CPropAdamW(model.parameters(), lr=1e-2)
    fresh.load_state_dict(opt.state_dict())
    assert int(fresh.stats()["skipped_steps"]) == 2


def test_the_default_composition_reports_a_skipped_step():
    model = _model()
    opt = _stabilize(torch.optim.AdamW(model.parameters(), lr=1e-2), cprop=True)
    _step(model, opt, 0)
    _step(model, opt, 1, poison=True)
    stats = opt.stats()
    assert int(stats["cprop/skipped_steps"]) + int(stats["guard/nonfinite_grads"]) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda m: _stabilize(torch.optim.AdamW(m.parameters(), lr=1e-2)),
        lambda m: _stabilize(torch.optim.SGD(m.parameters(), lr=1e-2), native=False),
        lambda m: _stabilize(torch.optim.SGD(m.parameters(), lr=1e-2), cprop=False),
        lambda m: _stabilize(torch.optim.SGD(m.parameters(), lr=1e-2), guard=False),
        lambda m: ss.CatastropheGuard(torch.optim.SGD(m.parameters(), lr=1e-2)),
        lambda m: ss.CProp(torch.optim.SGD(m.parameters(), lr=1e-2)),
    ],
    ids=["native", "wrapper", "no-cprop", "no-guard", "guard", "cprop"],
)
def test_global_step_hooks_fire_once_per_user_step(make):
    model = _model()
    opt = make(model)
    calls: list[str] = []
    pre = register_optimizer_step_pre_hook(lambda o, a, k: calls.append("pre"))
    post = register_optimizer_step_post_hook(lambda o, a, k: calls.append("post"))
    try:
        for t in range(2):
            x = torch.randn(8, 3, generator=torch.Generator().manual_seed(t))
            loss = (model(x) - 1).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())
    finally:
        pre.remove()
        post.remove()
    assert calls == ["pre", "post"] * 2


def test_instance_hooks_on_the_inner_optimizer_still_run_once_per_step():
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=1e-2)
    calls: list[str] = []
    base.register_step_post_hook(lambda o, a, k: calls.append("base"))
    opt = ss.CatastropheGuard(ss.CProp(base))
    model(torch.randn(2, 3)).sum().backward()
    opt.step(loss=torch.tensor(1.0))
    assert calls == ["base"]


def test_stabilize_refuses_sparse_adam_with_cprop_and_names_the_way_out():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    with pytest.raises(ValueError, match=r"SparseAdam.*cprop=False"):
        _stabilize(torch.optim.SparseAdam(list(emb.parameters()), lr=1e-2), cprop=True)
    opt = _stabilize(torch.optim.SparseAdam(list(emb.parameters()), lr=1e-2), cprop=False)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step(loss=torch.tensor(1.0))


def _params() -> list[torch.Tensor]:
    return list(_model().parameters())


BAD_ARGS = [
    # (constructor, argument, value, error type)
    (lambda v: ss.CPropAdamW(_params(), betas=v), "betas", 0.9, TypeError),
    (lambda v: ss.CPropAdamW(_params(), betas=v), "betas", None, TypeError),
    (lambda v: ss.AgAdam(_params(), betas=v), "betas", 0.9, TypeError),
    (lambda v: ss.AgAdam(_params(), betas=v), "betas", (0.9, 0.99, 0.5), ValueError),
    (lambda v: ss.CPropAdamW(_params(), amsgrad=v), "amsgrad", "yes", TypeError),
    (lambda v: ss.CPropAdam(_params(), amsgrad=v), "amsgrad", None, TypeError),
    (lambda v: ss.CPropSGD(_params(), momentum=0.9, nesterov=v), "nesterov", 1, TypeError),
    (lambda v: ss.CPropAdamW(_params(), foreach=v), "foreach", "x", TypeError),
    (lambda v: ss.CPropSGD(_params(), fused=v), "fused", 1, TypeError),
    (lambda v: ss.CProp(torch.optim.SGD(_params(), lr=0.1), fused=v), "fused", "x", TypeError),
    (lambda v: ss.ALeRA(_params(), lr=0.1, foreach=v), "foreach", 0, TypeError),
    (lambda v: ss.ALeRA(_params(), lr=0.1, fused=v), "fused", [1], TypeError),
    (lambda v: ss.AgAdam(_params(), fused=v), "fused", "x", TypeError),
    (
        lambda v: ss.CatastropheGuard(torch.optim.SGD(_params(), lr=0.1), snapshot_device=v),
        "snapshot_device",
        "x",
        ValueError,
    ),
    (
        lambda v: ss.CatastropheGuard(torch.optim.SGD(_params(), lr=0.1), snapshot_device=v),
        "snapshot_device",
        1.5,
        TypeError,
    ),
    (
        lambda v: ss.CatastropheGuard(torch.optim.SGD(_params(), lr=0.1), detector=v),
        "detector",
        "spike",
        TypeError,
    ),
]


@pytest.mark.parametrize(
    ("make", "name", "value", "error"),
    BAD_ARGS,
    ids=[f"{i}-{name}={value!r}" for i, (_, name, value, _) in enumerate(BAD_ARGS)],
)
def test_a_bad_constructor_argument_names_itself_and_its_value(make, name, value, error):
    with pytest.raises(
        error,
        match=rf"{name}.*{name}={value!r}".replace("[", r"\[")
        .replace("(", r"\(")
        .replace(")", r"\)"),
    ):
        make(value)
