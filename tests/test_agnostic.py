"""The random-walk reference of ALeRA: eq. (4) and (5) against a Monte Carlo simulation."""

from __future__ import annotations

import math

import pytest
import torch

from steadystep.agnostic import (
    apply_log_change,
    apply_log_change_,
    log_lr_change,
    random_walk_mean,
    random_walk_variance,
    random_walk_variance_limit,
    reference_std,
)

ALPHA = 0.1
TIMES = (1, 10, 1000)


def printed_eq5(alpha: float, t: float, d: float) -> float:
    """Eq. (5) exactly as the paper prints it (factor 2, exponents t and t - 1)."""
    a = alpha
    return (
        2
        * a**2
        * (1 - a) ** 2
        / (d * (2 - a) ** 2 * ((1 - a) ** 2 + 1))
        * (1 - (1 - a) ** t)
        * (1 - (1 - a) ** (t - 1))
    )


# Walks observed at t = 1000 start at t = 1000 - HORIZON from r = 0: what they omit weighs
# (1 - alpha)^(2 * HORIZON) < 1e-18 of ||r_t||^2, far below the Monte Carlo tolerance.
HORIZON = 200


def simulate(d: int, n_walks: int, seed: int) -> dict[int, torch.Tensor]:
    """||r_t||^2 of ``n_walks`` relaxed walks of uniform random unit vectors, at each t in TIMES."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for t in TIMES:
        r = torch.zeros(n_walks, d)
        for _ in range(min(t, HORIZON)):
            u = torch.randn(n_walks, d, generator=gen)
            u /= u.norm(dim=1, keepdim=True)
            r.mul_(1 - ALPHA).add_(u, alpha=ALPHA)
        out[t] = r.double().square().sum(dim=1)
    return out


@pytest.fixture(scope="module", params=[(10, 10000), (1000, 300)], ids=["d10", "d1000"])
def walks(request):
    d, n_walks = request.param
    return d, simulate(d, n_walks, seed=d)


@pytest.mark.parametrize("t", TIMES)
def test_mean_and_variance_match_monte_carlo(walks, t):
    # Tolerance: 5 standard errors of the Monte Carlo estimate, plus float32 round-off.
    d, samples = walks
    x = samples[t]
    n = x.numel()
    mean, var = x.mean().item(), x.var(unbiased=True).item()
    se_mean = math.sqrt(var / n)
    centred4 = (x - x.mean()).pow(4).mean().item()
    se_var = math.sqrt(max(centred4 - var**2, 0.0) / n)
    assert abs(mean - random_walk_mean(ALPHA, t)) <= 5 * se_mean + 1e-8
    assert abs(var - random_walk_variance(ALPHA, t, d)) <= 5 * se_var + 1e-12
    if t > 1:
        # The printed eq. (5) is off (Note [eq. 5 as printed]); the simulation tells them apart.
        assert abs(var - printed_eq5(ALPHA, t, d)) > 5 * se_var


def test_closed_forms():
    assert random_walk_mean(0.01, 1) == pytest.approx(0.01**2, rel=1e-12)
    assert random_walk_mean(0.01, 0) == 0.0
    assert random_walk_variance(0.01, 1, 50) == 0.0
    limit = random_walk_variance_limit(0.01, 50)
    assert random_walk_variance(0.01, 10**5, 50) == pytest.approx(limit, rel=1e-12)
    assert limit == pytest.approx(0.01**2 / (2 * 50), rel=0.02)
    assert reference_std(0.01, 100) == pytest.approx(0.001, rel=1e-15)
    t = torch.tensor(7.0, dtype=torch.float64)
    assert random_walk_mean(0.3, t).item() == pytest.approx(random_walk_mean(0.3, 7), rel=1e-15)


def test_log_lr_change_sign_and_scale():
    step = torch.tensor(1000.0)
    mean = random_walk_mean(0.01, 1000)
    at_mean = log_lr_change(
        torch.tensor(mean, dtype=torch.float64), step, alpha=0.01, C=1.0, numel=4
    )
    assert abs(at_mean.item()) < 1e-12
    above = log_lr_change(torch.tensor(mean + 0.01), step, alpha=0.01, C=3e-6, numel=100.0)
    assert above.item() == pytest.approx(3e-6 * 0.01 / (0.01 / 10), rel=1e-5)
    below = log_lr_change(torch.tensor(0.0), step, alpha=0.01, C=3e-6, numel=100.0)
    assert below.item() < 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_log_change_never_inf_nor_zero(dtype):
    m = torch.ones((), dtype=dtype)
    info = torch.finfo(dtype)
    up = apply_log_change(m, torch.tensor(1e9, dtype=dtype))
    down = apply_log_change(m, torch.tensor(-1e9, dtype=dtype))
    assert torch.isfinite(up) and up.item() > 1e37
    assert apply_log_change(up, torch.tensor(1e9, dtype=dtype)).item() == info.max
    assert down.item() == info.tiny
    big = torch.full((), info.max / 2, dtype=dtype)
    assert torch.isfinite(apply_log_change(big, torch.tensor(80.0, dtype=dtype)))
    assert torch.equal(apply_log_change(m, torch.zeros((), dtype=dtype)), m)


def test_reference_std_of_a_tensor_numel():
    std = reference_std(0.01, torch.tensor(100.0, dtype=torch.float64))
    assert isinstance(std, torch.Tensor) and std.item() == pytest.approx(0.001, rel=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_change_moves_the_multiplier_by_at_most_exp_of_log_max_minus_one(dtype):
    # The exponent is clipped to +-(log(max) - 1), so its exp is finite: from the smallest
    # multiplier a huge exponent gives tiny * max / e (a bounded step), not the largest value.
    info = torch.finfo(dtype)
    bound = math.log(info.max) - 1.0
    factor = torch.exp(torch.tensor(bound, dtype=dtype))
    assert torch.isfinite(factor)
    tiny = torch.full((), info.tiny, dtype=dtype)
    up = apply_log_change(tiny, torch.tensor(1e9, dtype=dtype))
    assert torch.equal(up, tiny * factor) and 1.0 < up.item() < 2.0
    big = torch.full((), info.max, dtype=dtype)
    down = apply_log_change(big, torch.tensor(-1e9, dtype=dtype))
    assert torch.equal(down, big * torch.exp(torch.tensor(-bound, dtype=dtype)))
    assert 2.0 < down.item() < 3.0  # max / (max / e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_place_log_change_and_its_take_step_gate(dtype):
    m = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    change = torch.tensor([0.5, 1e9, -1e9], dtype=dtype)
    want = apply_log_change(m, change)
    for take_step in (None, torch.tensor(True)):
        got = m.clone()
        assert apply_log_change_(got, change.clone(), take_step) is got  # in place, returned
        assert torch.equal(got, want)
    kept = m.clone()
    apply_log_change_(kept, change.clone(), torch.tensor(False))
    assert torch.equal(kept, m)  # a step not taken leaves the multiplier bitwise unchanged
