"""Ag-Adam: Adam when C = 0, the reference twin otherwise, faults and inputs."""

from __future__ import annotations

import io
import math

import pytest
import torch

import steadystep as ss
from steadystep.optim.alera_reference import PlainAgAdam

SHAPES = [(3, 2), (3,), (1, 3)]


def make(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in SHAPES]
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    grads = [
        [
            b + 0.3 * torch.randn(s, generator=gen, dtype=dtype)
            for b, s in zip(base, SHAPES, strict=True)
        ]
        for _ in range(25)
    ]
    return params, grads


def run(opt, params, grads_seq):
    for grads in grads_seq:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("fused", [False, True], ids=["loop", "fused"])
def test_c_zero_is_adam(fused):
    params, grads = make()
    ref = [p.detach().clone().requires_grad_() for p in params]
    run(ss.AgAdam(params, lr=0.01, C=0.0, fused=fused), params, grads)
    run(torch.optim.Adam(ref, lr=0.01, foreach=False), ref, grads)
    for a, b in zip(params, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fused", [False, True], ids=["loop", "fused"])
def test_matches_the_reference_twin_with_one_group(fused):
    """One param group with granularity "group": the whole model is one unit, as in the twin
    of steadystep.optim.alera_reference (every granularity and path: test_alera.py)."""
    params, grads = make()
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    hyper = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, alpha=0.05, C=0.01)
    twin = PlainAgAdam(twin_params, **hyper)
    run(twin, twin_params, grads)
    opt = ss.AgAdam(params, **hyper, fused=fused)
    run(opt, params, grads)
    mult = twin.param_groups[0]["lr_multiplier"].item()
    assert opt.param_groups[0]["lr_multiplier"].item() == pytest.approx(mult, rel=1e-12)
    assert abs(math.log(mult)) > 0.05  # the rate really moved
    for p, ref in zip(params, twin_params, strict=True):
        torch.testing.assert_close(p.detach(), ref.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("granularity", ["global", "group", "tensor", "param"])
def test_nonfinite_gradient_changes_nothing_and_resume_is_bitwise(granularity):
    params, grads = make()
    opt = ss.AgAdam(
        [{"params": params[:2]}, {"params": params[2:]}],
        lr=0.01,
        alpha=0.05,
        C=0.01,
        granularity=granularity,
    )
    run(opt, params, grads[:3])
    snapshot = opt.state_dict()
    before = io.BytesIO()
    torch.save({"p": [p.detach() for p in params], "o": snapshot}, before)
    bad = [g.clone() for g in grads[3]]
    bad[0][1, 1] = math.nan
    run(opt, params, [bad])
    # Nothing changed, bit for bit, but the telemetry counter of skipped steps.
    assert [int(g["skipped_steps"]) for g in opt.param_groups] == [1, 1]
    after_state = opt.state_dict()
    for group in after_state["param_groups"]:
        group["skipped_steps"] = group["skipped_steps"] - 1
    after = io.BytesIO()
    torch.save({"p": [p.detach() for p in params], "o": after_state}, after)
    assert before.getvalue() == after.getvalue()
    before.seek(0)
    saved = torch.load(before, weights_only=True)
    params2 = [p.clone().requires_grad_() for p in saved["p"]]
    opt2 = ss.AgAdam(
        [{"params": params2[:2]}, {"params": params2[2:]}],
        lr=0.01,
        alpha=0.05,
        C=0.01,
        granularity=granularity,
    )
    opt2.load_state_dict(saved["o"])
    run(opt, params, grads[4:10])
    run(opt2, params2, grads[4:10])
    assert all(torch.equal(a, b) for a, b in zip(params, params2, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"betas": (1.0, 0.999)}, "betas"),
        ({"betas": (0.9, math.nan)}, "betas"),
        ({"eps": 0.0}, "eps"),
        ({"alpha": 0.0}, "alpha"),
        ({"C": -1.0}, "C"),
        ({"granularity": "layer"}, "granularity"),
    ],
)
def test_invalid_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ss.AgAdam([torch.zeros(2, requires_grad=True)], **kwargs)


def test_stats_report_effective_lr_and_skipped_steps():
    params, grads = make()
    opt = ss.AgAdam([{"params": params[:2]}, {"params": params[2:]}], lr=0.01, C=0.01)
    bad = [g.clone() for g in grads[1]]
    bad[2][0, 0] = math.inf
    run(opt, params, [grads[0], bad, grads[2]])
    stats = opt.stats()
    assert list(stats) == ["skipped_steps", "group0.lr", "group1.lr"]
    assert int(stats["skipped_steps"]) == 1
    for gi, group in enumerate(opt.param_groups):
        assert torch.equal(stats[f"group{gi}.lr"], group["lr_multiplier"] * 0.01)
        assert group["lr_multiplier"].item() != 1.0


@pytest.mark.parametrize("fused", [False, True], ids=["loop", "fused"])
def test_c_zero_is_adam_with_late_and_missing_gradients(fused):
    # Parameter 1 gets its first gradient at step 5, parameter 2 has none on odd steps: Adam's
    # bias correction must count each parameter's own steps, not the group's.
    params, grads = make()
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = ss.AgAdam(params, lr=0.01, C=0.0, fused=fused)
    ref_opt = torch.optim.Adam(ref, lr=0.01, foreach=False)
    for step, step_grads in enumerate(grads):
        for ps in (params, ref):
            for i, (p, g) in enumerate(zip(ps, step_grads, strict=True)):
                missing = (i == 1 and step < 5) or (i == 2 and step % 2 == 1)
                p.grad = None if missing else g.clone()
        opt.step()
        ref_opt.step()
    for a, b in zip(params, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert [float(opt.state[p]["step"]) for p in params] == [25.0, 20.0, 13.0]


@pytest.mark.parametrize("wd", [0.01, math.nan])
def test_weight_decay_in_a_param_group_is_rejected(wd):
    # Ag-Adam adapts from the raw gradient: an L2 term from a group would silently enter both
    # the agnostic statistics and Adam's moments.
    p = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match="weight_decay"):
        ss.AgAdam([{"params": [p], "weight_decay": wd}], lr=0.01)
    opt = ss.AgAdam([p], lr=0.01)
    with pytest.raises(ValueError, match="weight_decay"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "weight_decay": wd})
    assert len(opt.param_groups) == 1
    ss.AgAdam([{"params": [p], "weight_decay": 0.0}], lr=0.01)  # 0 is accepted


def test_invalid_granularity_message_names_the_rule():
    with pytest.raises(ValueError, match=r"granularity must be one of .* got granularity='layer'"):
        ss.AgAdam([torch.zeros(2, requires_grad=True)], granularity="layer")
