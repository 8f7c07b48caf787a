"""ALRC: against a plain-Python restatement of Algorithm 1 / the authors' code, gradients,
spikes, validation, state round trips, edge losses, non-finite batches and torch.compile."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch

import steadystep as ss
from steadystep.alrc import alrc_clip, alrc_moment_update


def reference_alrc(batches, *, n_sigma, beta1, beta2, mu1, mu2, eps, update, warmup=False):
    """Algorithm 1 line by line with Python floats; the authors' code's update of the moments
    with the clipped loss when update == "clipped". mu1 None: first batch initialises. warmup:
    the moments are the plain average of the k observations so far (the initial moments count
    as one) while 1 / (k + 1) > 1 - beta, then the paper's moving average."""
    initialized = mu1 is not None
    k = int(initialized)  # observations in the moments
    outputs, moments = [], []
    for batch in batches:
        if initialized:
            sigma = math.sqrt(max(mu2 - mu1**2, 0.0) + eps)
            l_max = mu1 + n_sigma * sigma
            out = [l_max if (loss > l_max and loss > 0) else loss for loss in batch]
        else:
            out = list(batch)
        x = out if update == "clipped" else batch
        mean = sum(x) / len(x)
        mean_sq = sum(v * v for v in x) / len(x)
        if initialized:
            w1 = max(1 - beta1, 1 / (k + 1)) if warmup else 1 - beta1
            w2 = max(1 - beta2, 1 / (k + 1)) if warmup else 1 - beta2
            mu1 = (1 - w1) * mu1 + w1 * mean
            mu2 = (1 - w2) * mu2 + w2 * mean_sq
        else:
            mu1, mu2, initialized = mean, mean_sq + mean * mean, True
        k += 1
        outputs.append(out)
        moments.append((mu1, mu2))
    return outputs, moments


def spiky_batches(steps, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        losses = torch.rand(batch, generator=g, dtype=torch.float64) + 0.5
        if t % 37 == 36:
            losses[0] *= 25.0  # a spike on one sample
        if t % 53 == 52:
            losses *= 8.0  # a bad batch
        out.append(losses)
    return out


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("update", ["clipped", "raw"])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("inits", [(None, None), (2.0, 9.0)])
def test_matches_reference_algorithm(update, batch, inits, warmup):
    mu1, mu2 = inits
    kwargs = dict(n_sigma=3.0, beta1=0.99, beta2=0.995, eps=1e-8, update=update, warmup=warmup)
    batches = spiky_batches(200, batch)
    module = ss.ALRC(mu1_init=mu1, mu2_init=mu2, **kwargs).double()
    ref_out, ref_moments = reference_alrc([b.tolist() for b in batches], mu1=mu1, mu2=mu2, **kwargs)
    n_clipped = 0
    for t, losses in enumerate(batches):
        # batch 1 is fed as a scalar loss: the scalar path must match too
        inp = losses.reshape(()) if batch == 1 else losses
        out = module(inp)
        assert out.shape == inp.shape
        torch.testing.assert_close(
            out.reshape(-1), torch.tensor(ref_out[t], dtype=torch.float64), rtol=1e-12, atol=0
        )
        torch.testing.assert_close(
            torch.stack([module.mu1, module.mu2]),
            torch.tensor(ref_moments[t], dtype=torch.float64),
            rtol=1e-12,
            atol=0,
        )
        n_clipped += int((out.reshape(-1) != losses).sum())
    assert n_clipped > 0, "the spiky sequence must exercise clipping"
    assert int(module.clipped_total) == n_clipped


def test_gradient_is_threshold_over_loss_for_clipped_elements():
    alrc = ss.ALRC(mu1_init=1.0, mu2_init=1.5).double()
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0.0, 0.1, 5.0, -0.2, 7.0, 0.3], dtype=torch.float64)
    raw = (w - target) ** 2 + 0.5
    threshold = alrc.stats()["threshold"]
    out = alrc(raw)
    clipped = raw.detach() > threshold
    assert clipped.any() and (~clipped).any()
    (g_out,) = torch.autograd.grad(out.sum(), w, retain_graph=True)
    g_raw = torch.autograd.grad(raw.sum(), w)[0]
    expected = torch.where(clipped, g_raw * threshold / raw.detach(), g_raw)
    torch.testing.assert_close(g_out, expected, rtol=1e-14, atol=0)
    # forward value of clipped elements is the threshold exactly
    assert torch.equal(out.detach()[clipped], threshold.expand(int(clipped.sum())))
    assert torch.equal(out.detach()[~clipped], raw.detach()[~clipped])


def test_unclipped_gradients_untouched_bitwise():
    alrc = ss.ALRC()
    x = torch.rand(32, requires_grad=True)
    (g,) = torch.autograd.grad(alrc(x * 3.0).sum(), x)
    assert torch.equal(g, torch.full_like(x, 3.0))


def test_zero_loss_element_gives_no_nan_gradient():
    alrc = ss.ALRC(mu1_init=0.1, mu2_init=0.02)
    x = torch.tensor([0.0, 0.0, 10.0], requires_grad=True)
    out = alrc(x**2)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(g).all()
    assert g[0] == 0 and g[1] == 0


@pytest.mark.parametrize("per_sample", [False, True])
def test_spike_after_warmup_clipped_exactly_then(per_sample):
    torch.manual_seed(0)
    alrc = ss.ALRC()
    shape = (8,) if per_sample else ()
    history = []
    for step in range(40):
        losses = torch.rand(shape) + 1.0
        if step == 20:
            losses = losses * 10.0
        alrc(losses)
        history.append(float(alrc.clipped_fraction))
    assert history[20] == 1.0
    assert all(f == 0.0 for i, f in enumerate(history) if i != 20)


def test_per_element_losses_keep_shape_and_use_mean_of_all_elements():
    alrc = ss.ALRC().double()
    losses = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    out = alrc(losses)
    assert out.shape == losses.shape
    mean = losses.mean()
    torch.testing.assert_close(alrc.mu1, mean, rtol=1e-15, atol=0)
    torch.testing.assert_close(alrc.mu2, (losses**2).mean() + mean**2, rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_sigma": 0.0}, "n_sigma"),
        ({"n_sigma": -1.0}, "n_sigma"),
        ({"n_sigma": math.nan}, "n_sigma"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta1": -0.1}, "beta1"),
        ({"beta1": math.nan}, "beta1"),
        ({"beta2": 1.5}, "beta2"),
        ({"beta2": math.inf}, "beta2"),
        ({"eps": -1e-8}, "eps"),
        ({"eps": math.nan}, "eps"),
        ({"eps": math.inf}, "eps"),
        ({"update": "both"}, "update"),
        ({"n_sigma_lower": 0.0}, "n_sigma_lower"),
        ({"n_sigma_lower": math.nan}, "n_sigma_lower"),
        ({"shift": math.inf}, "shift"),
        ({"shift": math.nan}, "shift"),
        ({"mu1_init": 1.0}, "mu1_init"),
        ({"mu2_init": 1.0}, "mu1_init"),
        ({"mu1_init": 2.0, "mu2_init": 4.0}, "mu2_init"),
        ({"mu1_init": 2.0, "mu2_init": 3.0}, "mu2_init"),
        ({"mu1_init": math.nan, "mu2_init": 3.0}, "mu1_init"),
        ({"mu1_init": 1.0, "mu2_init": math.inf}, "mu2_init"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ss.ALRC(**kwargs)


def test_non_tensor_loss_rejected():
    with pytest.raises(TypeError, match="floating-point loss"):
        ss.ALRC()(torch.tensor([1, 2]))


def _run(alrc, batches):
    outs = []
    for b in batches:
        outs.append(alrc(b))
    return outs


@pytest.mark.parametrize("k", [1, 10, 36])  # before init is done, mid-run, just before a spike
def test_state_dict_round_trip_continues_bitwise(k):
    batches = [b.float() for b in spiky_batches(80, 8, seed=3)]
    full = ss.ALRC(beta1=0.9, beta2=0.9)
    full_out = _run(full, batches)

    first = ss.ALRC(beta1=0.9, beta2=0.9)
    _run(first, batches[:k])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = ss.ALRC(beta1=0.9, beta2=0.9)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    rest = _run(resumed, batches[k:])
    for a, b in zip(full_out[k:], rest, strict=True):
        assert torch.equal(a, b)
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_deepcopy_and_pickle_keep_state():
    alrc = ss.ALRC()
    _run(alrc, spiky_batches(10, 4))
    for clone in (copy.deepcopy(alrc), pickle.loads(pickle.dumps(alrc))):
        for name, value in alrc.state_dict().items():
            assert torch.equal(value, clone.state_dict()[name])
        assert clone.n_sigma == alrc.n_sigma and clone.update == alrc.update


@pytest.mark.parametrize("value", [0.0, 1e-30, 1e6, 0.37])
@pytest.mark.parametrize("shape", [(), (16,)])
def test_edge_and_constant_losses_no_nan_no_false_clipping(value, shape):
    alrc = ss.ALRC()
    x = torch.full(shape, value, requires_grad=True)
    for _ in range(300):
        out = alrc(x)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(out.detach(), x.detach())
        assert torch.equal(g, torch.ones_like(g))
    stats = alrc.stats()
    assert all(torch.isfinite(v).all() for k, v in stats.items() if k != "threshold")
    assert torch.isfinite(stats["threshold"])
    assert int(alrc.clipped_total) == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_batch_leaves_moments_bitwise_unchanged(bad):
    batches = spiky_batches(30, 8, seed=1)
    clean, dirty = ss.ALRC(), ss.ALRC()
    _run(clean, [b.float() for b in batches[:15]])
    _run(dirty, [b.float() for b in batches[:15]])
    before = {k: v.clone() for k, v in dirty.state_dict().items()}
    poisoned = batches[15].float().clone()
    poisoned[3] = bad
    out = dirty(poisoned)
    for name in ("mu1", "mu2", "initialized", "num_updates"):
        assert torch.equal(dirty.state_dict()[name], before[name]), name
    assert torch.isfinite(out[torch.arange(8) != 3]).all()
    assert out[3].item() == bad or (math.isnan(bad) and math.isnan(out[3].item()))
    # the next clean steps equal a run that never saw the bad batch
    for b in batches[16:]:
        assert torch.equal(clean(b.float()), dirty(b.float()))
    assert torch.equal(clean.mu1, dirty.mu1) and torch.equal(clean.mu2, dirty.mu2)


def test_first_batch_non_finite_does_not_initialise():
    alrc = ss.ALRC()
    alrc(torch.tensor([math.nan, 1.0]))
    assert not bool(alrc.initialized)
    assert math.isinf(float(alrc.stats()["threshold"]))
    alrc(torch.tensor([1.0, 3.0]))
    assert bool(alrc.initialized) and float(alrc.mu1) == 2.0


def test_eval_is_identity_and_does_not_update():
    alrc = ss.ALRC(mu1_init=1.0, mu2_init=1.1)
    alrc.eval()
    x = torch.tensor([100.0, 0.5])
    assert alrc(x) is x
    assert float(alrc.mu1) == 1.0 and int(alrc.num_updates) == 0


def test_lower_clipping_is_opt_in_and_scales_up():
    base = ss.ALRC(mu1_init=10.0, mu2_init=101.0)  # sigma ~ 1
    lower = ss.ALRC(mu1_init=10.0, mu2_init=101.0, n_sigma_lower=2.0)
    x = torch.tensor([5.0, 10.0, 11.0], requires_grad=True)
    assert torch.equal(base(x).detach(), x.detach())
    bound = 10.0 - 2.0 * math.sqrt(1.0 + 1e-8)
    assert float(lower.stats()["lower"]) == pytest.approx(bound, rel=1e-6)
    out = lower(x)
    assert out[0].item() == pytest.approx(bound, rel=1e-6)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g[0].item() == pytest.approx(bound / 5.0, rel=1e-6)
    assert torch.equal(g[1:], torch.ones(2))


def test_non_positive_shifted_losses_never_scaled():
    alrc = ss.ALRC(mu1_init=-5.0, mu2_init=26.0)  # sigma = 1, threshold = -5 + 3 = -2
    x = torch.tensor([-1.0, 0.0, 3.0], requires_grad=True)
    out = alrc(x)
    # -1 and 0 are above the threshold but <= 0: never scaled; 3 > 0 is above it too, but a
    # bound <= 0 would scale its gradient by -2/3 and reverse it: not scaled either.
    assert torch.equal(out.detach(), x.detach())
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, torch.ones(3))


def test_negative_threshold_never_reverses_a_gradient():
    """Moments learnt on negative shifted losses, then a positive one: gradient sign kept."""
    alrc = ss.ALRC(beta1=0.9, beta2=0.9, shift=1.0)
    for _ in range(30):
        alrc(torch.full((4,), -3.0))  # shifted -2: moments negative, threshold < 0
    assert float(alrc.stats()["threshold"]) + 1.0 < 0
    x = torch.tensor([-0.5], requires_grad=True)  # shifted +0.5 > threshold
    (g,) = torch.autograd.grad(alrc(x).sum(), x)
    assert g.item() == 1.0


def test_shift_moves_the_statistics_and_the_threshold():
    alrc = ss.ALRC(mu1_init=1.0, mu2_init=1.25, shift=10.0).double()  # on L + 10
    # sigma = 0.5 -> threshold 2.5 in shifted units, -7.5 in loss units
    x = torch.tensor([-9.5, -5.0], dtype=torch.float64, requires_grad=True)
    out = alrc(x)
    assert out[0].item() == -9.5
    assert out[1].item() == pytest.approx(2.5 - 10.0, abs=1e-7)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g[1].item() == pytest.approx((1.0 + 3 * math.sqrt(0.25 + 1e-8)) / 5.0, rel=1e-12)


def test_infinite_n_sigma_never_clips_but_tracks():
    alrc = ss.ALRC(n_sigma=math.inf)
    for v in [1.0, 1.0, 1e9, 1.0]:
        out = alrc(torch.tensor(v))
        assert out.item() == v
    assert int(alrc.clipped_total) == 0 and int(alrc.num_updates) == 4


def test_bf16_loss_keeps_fp32_moments():
    alrc = ss.ALRC()
    out = alrc(torch.rand(8, dtype=torch.bfloat16) + 1)
    assert out.dtype == torch.bfloat16 and alrc.mu1.dtype == torch.float32


def test_forward_sequence_needs_no_host_read(monkeypatch):
    """Every decision is a tensor: forward never converts a tensor to a Python value."""
    alrc = ss.ALRC()
    calls = []
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=original, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    for _ in range(5):
        alrc(torch.rand(4) + 1).mean()
    alrc.stats()
    monkeypatch.undo()
    assert calls == []


def test_functional_clip_reports_mask_and_bound():
    loss = torch.tensor([1.0, 10.0, -3.0, math.nan])
    out, scaled, bound = alrc_clip(loss, torch.tensor(4.0))
    assert scaled.tolist() == [False, True, False, False]
    assert out[:3].tolist() == [1.0, 4.0, -3.0] and math.isnan(out[3])
    assert bound[:3].tolist() == [1.0, 4.0, -3.0]


def test_compiled_loss_fn_fullgraph_no_recompiles():
    torch._dynamo.reset()
    alrc = ss.ALRC(beta1=0.9, beta2=0.9)
    eager = ss.ALRC(beta1=0.9, beta2=0.9)
    w = torch.nn.Parameter(torch.randn(4))
    x = torch.randn(6, 4)

    def loss_fn(module, w, x, scale):
        per_sample = ((x @ w) * scale) ** 2 + 0.1
        return module(per_sample).mean()

    compiled = torch.compile(loss_fn, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(6):
            scale = torch.tensor(20.0 if step == 4 else 1.0)  # a spike that clips
            got = compiled(alrc, w, x, scale)
            want = loss_fn(eager, w, x, scale)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
            (gw,) = torch.autograd.grad(got, w)
            (ew,) = torch.autograd.grad(want, w)
            torch.testing.assert_close(gw, ew, rtol=1e-5, atol=1e-7)
    assert float(alrc.clipped_total) > 0
    torch.testing.assert_close(alrc.mu1, eager.mu1)


# -- Edges that mutation testing (tools/mutation.py) found untested ------------------------------


def test_fresh_module_state_and_repr():
    alrc = ss.ALRC()
    stats = alrc.stats()
    for name in ("mu1", "mu2", "clipped_fraction", "clipped_total", "num_updates"):
        assert stats[name].item() == 0, name
    assert stats["threshold"].item() == math.inf  # nothing is clipped before the first batch
    assert torch.equal(stats["sigma"], torch.tensor(1e-8).sqrt())  # sqrt(eps), eps = 1e-8
    assert repr(alrc) == "ALRC(n_sigma=3.0, beta1=0.999, beta2=0.999)"
    every = ss.ALRC(update="raw", n_sigma_lower=2.0, shift=1.0)
    assert repr(every) == (
        "ALRC(n_sigma=3.0, beta1=0.999, beta2=0.999, update='raw', n_sigma_lower=2.0, shift=1.0)"
    )
    assert every.stats()["lower"].item() == -math.inf


@pytest.mark.parametrize("update", ["clipped", "raw"])
@pytest.mark.parametrize("shift", [1.0, -0.75])
def test_shift_is_clipping_the_shifted_loss(update, shift):
    """ALRC(shift=s) on L is ALRC() on L + s, minus s: the same moments, masks and gradients."""
    kwargs = dict(beta1=0.9, beta2=0.9, update=update, n_sigma_lower=1.0)
    shifted = ss.ALRC(shift=shift, **kwargs).double()
    plain = ss.ALRC(**kwargs).double()
    for losses in spiky_batches(60, 8, seed=5):
        x = losses.clone().requires_grad_(True)
        out = shifted(x)
        ref = plain(x + shift)
        torch.testing.assert_close(out + shift, ref, rtol=0, atol=1e-12)
        (g,) = torch.autograd.grad(out.sum(), x)
        (g_ref,) = torch.autograd.grad(ref.sum(), x)
        assert torch.equal(g, g_ref)
        assert torch.equal(shifted.mu1, plain.mu1) and torch.equal(shifted.mu2, plain.mu2)
        s, p = shifted.stats(), plain.stats()
        assert torch.equal(s["threshold"], p["threshold"] - shift)
        assert torch.equal(s["lower"], p["lower"] - shift)
    assert int(shifted.clipped_total) == int(plain.clipped_total) > 0


def test_lower_bound_is_n_sigma_lower_standard_deviations_below_the_mean():
    # sigma = 2 (not 1): lower = 10 - 2 * 2 = 6 raises 5 and leaves 7 alone.
    alrc = ss.ALRC(mu1_init=10.0, mu2_init=104.0, n_sigma_lower=2.0).double()
    bound = 10.0 - 2.0 * math.sqrt(4.0 + 1e-8)
    assert alrc.stats()["lower"].item() == pytest.approx(bound, rel=1e-12)
    x = torch.tensor([5.0, 7.0, 10.0], dtype=torch.float64, requires_grad=True)
    out = alrc(x)
    assert out[0].item() == pytest.approx(bound, rel=1e-12)
    assert torch.equal(out[1:].detach(), x[1:].detach())
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g[0].item() == pytest.approx(bound / 5.0, rel=1e-12)


def test_infinite_n_sigma_lower_never_raises_a_loss():
    alrc = ss.ALRC(mu1_init=10.0, mu2_init=101.0, n_sigma_lower=math.inf)
    assert alrc.stats()["lower"].item() == -math.inf
    x = torch.tensor([1e-3, 5.0, 10.0], requires_grad=True)
    out = alrc(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out.detach(), x.detach()) and torch.equal(g, torch.ones(3))
    assert int(alrc.clipped_total) == 0


def test_bounds_are_strict_and_never_scale_by_zero_or_infinity():
    # a loss exactly at a bound is not scaled (Algorithm 1 clips L > L_max)
    loss = torch.tensor([4.0, 2.0])
    out, scaled, _ = alrc_clip(loss, torch.tensor(4.0), torch.tensor(2.0))
    assert not scaled.any() and torch.equal(out, loss)
    # losses and bounds below 1 clip like any others
    x = torch.tensor([0.9, 0.05, 0.3])
    out, scaled, _ = alrc_clip(x, torch.tensor(0.5), torch.tensor(0.1))
    assert scaled.tolist() == [True, True, False]
    torch.testing.assert_close(out, torch.tensor([0.5, 0.1, 0.3]), rtol=0, atol=0)
    # a zero loss is not raised to a positive lower bound (scale 0.5 / 0 = inf); a threshold of 0
    # does not scale a positive loss by 0 (that would drop the sample)
    for loss, threshold, lower in ((0.0, 5.0, 0.5), (1.0, 0.0, None)):
        x = torch.tensor([loss], requires_grad=True)
        low = None if lower is None else torch.tensor(lower)
        out, scaled, _ = alrc_clip(x, torch.tensor(threshold), low)
        (g,) = torch.autograd.grad(out.sum(), x)
        assert not scaled.any() and torch.equal(out.detach(), x.detach())
        assert torch.equal(g, torch.ones(1))


@pytest.mark.parametrize("update", ["clipped", "raw"])
def test_finite_batch_whose_mean_square_overflows_is_not_a_statistic(update):
    """1e20 is finite in float32 but its square is not: the batch must not enter the moments."""
    alrc = ss.ALRC(update=update)
    big = torch.full((4,), 1e20)
    before = {k: v.clone() for k, v in alrc.state_dict().items()}
    assert torch.equal(alrc(big), big)  # not initialised yet: nothing is clipped
    for name in ("mu1", "mu2", "initialized", "num_updates"):
        assert torch.equal(alrc.state_dict()[name], before[name]), name
    alrc(torch.tensor([1.0, 3.0]))
    assert bool(alrc.initialized) and alrc.mu1.item() == 2.0
    if update == "raw":  # the raw losses feed the moments even once clipping is active
        before = {k: v.clone() for k, v in alrc.state_dict().items()}
        alrc(big)
        for name in ("mu1", "mu2", "num_updates"):
            assert torch.equal(alrc.state_dict()[name], before[name]), name
    # the functional update: a finite mean with an infinite mean square changes nothing
    mu1, mu2, init = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(True)
    new = alrc_moment_update(
        mu1, mu2, init, torch.tensor(1e20), torch.tensor(math.inf), beta1=0.9, beta2=0.9
    )
    assert torch.equal(torch.stack(new[:2]), torch.stack([mu1, mu2])) and bool(new[2])


def test_empty_loss_passes_through_and_changes_nothing():
    alrc = ss.ALRC(mu1_init=1.0, mu2_init=2.0)
    before = {k: v.clone() for k, v in alrc.state_dict().items()}
    out = alrc(torch.empty(0))
    assert out.shape == (0,)
    for name, value in alrc.state_dict().items():
        assert torch.equal(value, before[name]), name  # clipped_fraction 0, not 0 / 0


# -- Warm-up (the default) against the paper's constant decay ------------------------------------


@pytest.mark.parametrize("warmup", [1, 0, "yes", None, 1.0])
def test_warmup_must_be_a_bool(warmup):
    with pytest.raises(TypeError, match=f"warmup must be True or False, got warmup={warmup!r}"):
        ss.ALRC(warmup=warmup)


def test_repr_names_the_papers_decay():
    assert repr(ss.ALRC(warmup=False)) == (
        "ALRC(n_sigma=3.0, beta1=0.999, beta2=0.999, warmup=False)"
    )


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("inits", [(None, None), (3.0, 12.0)])
@pytest.mark.parametrize("k", [1, 7, 40])  # just after the first batch, early, mid-warm-up
def test_state_dict_resume_mid_warmup_bitwise(warmup, inits, k):
    mu1, mu2 = inits
    batches = [b.float() for b in spiky_batches(90, 8, seed=5)]
    batches[k + 3] = batches[k + 3].clone()
    batches[k + 3][0] = math.nan  # a skipped batch after the resume point
    kwargs = dict(mu1_init=mu1, mu2_init=mu2, warmup=warmup)
    full = ss.ALRC(**kwargs)
    full_out = _run(full, batches)
    first = ss.ALRC(**kwargs)
    _run(first, batches[:k])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = ss.ALRC(**kwargs)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    rest = _run(resumed, batches[k:])
    for a, b in zip(full_out[k:], rest, strict=True):  # bitwise, the NaN element included
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for name, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    assert int(full.num_updates) == len(batches) - 1  # the NaN batch is not an observation


def decaying_losses(steps, batch, *, seed=0, start=2.0, scale=60.0, noise=0.2):
    """Per-sample losses of a run whose loss falls as start * exp(-t / scale), +-noise relative."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in range(steps):
        level = start * math.exp(-t / scale)
        out.append(level * (1.0 + noise * (2.0 * torch.rand(batch, generator=gen) - 1.0)))
    return out


def test_warmup_clips_an_early_corrupted_batch_the_papers_setting_does_not():
    steps, spike_at, factor = 100, 80, 10.0
    batches = decaying_losses(steps, 16, seed=11)
    batches[spike_at] = batches[spike_at] * factor  # a corrupted batch: 10x the current losses
    outs = {}
    for warmup in (True, False):
        alrc = ss.ALRC(warmup=warmup)
        outs[warmup] = _run(alrc, batches)
        threshold_after = float(alrc.stats()["threshold"])
        assert math.isfinite(threshold_after)
    raw = batches[spike_at]
    # The paper's threshold still holds most of the first batch's overestimate: no clipping.
    assert torch.equal(outs[False][spike_at], raw)
    # The warm-up's follows the loss: every element of the corrupted batch is clipped to one
    # value (the threshold) below the smallest raw one.
    clipped = outs[True][spike_at]
    assert bool((clipped == clipped[0]).all())
    assert float(clipped.max()) < float(raw.min())
    # Clean batches are left alone by both, in every step.
    for warmup in (True, False):
        for t in range(steps):
            if t != spike_at:
                assert torch.equal(outs[warmup][t], batches[t]), (warmup, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_after_warmup_the_update_is_the_papers_bitwise(dtype):
    beta = 0.99  # the warm-up ends when 1 / (k + 1) <= 1 - beta: 99 observations in
    batches = [b.to(dtype) for b in spiky_batches(160, 8, seed=2)]
    warm = ss.ALRC(beta1=beta, beta2=beta).to(dtype)
    _run(warm, batches[:99])
    paper = ss.ALRC(beta1=beta, beta2=beta, warmup=False).to(dtype)
    paper.load_state_dict(warm.state_dict())
    for b in batches[99:]:
        assert torch.equal(warm(b), paper(b))
        for name, value in warm.state_dict().items():
            assert torch.equal(value, paper.state_dict()[name]), name
    assert int(paper.clipped_total) > 0, "the sequence must exercise clipping"


def test_moment_update_weight_switches_at_one_over_one_minus_beta():
    mu1, mu2 = torch.tensor(2.0), torch.tensor(6.0)
    mean, mean_sq = torch.tensor(1.0), torch.tensor(1.5)
    args = (mu1, mu2, torch.tensor(True), mean, mean_sq)
    paper = alrc_moment_update(*args, beta1=0.99, beta2=0.99)
    for k, same in [(1, False), (98, False), (99, True), (100, True), (10**6, True)]:
        warm = alrc_moment_update(*args, beta1=0.99, beta2=0.99, observations=torch.tensor(k))
        assert all(torch.equal(a, b) for a, b in zip(warm, paper, strict=True)) == same, k
        if not same:  # the plain average: the k observations held and this one
            expected = (k * mu1 + mean) / (k + 1)
            torch.testing.assert_close(warm[0], expected, rtol=1e-6, atol=0)


# -- the moments a skipped step takes back, and the load checks (survivors of make mutation) -----


def test_restore_moments_puts_back_the_saved_statistics_only_where_told():
    alrc = ss.ALRC()
    alrc(torch.tensor([1.0, 2.0, 3.0]))
    saved = alrc.moments()
    assert set(saved) >= {"mu1", "mu2"}
    before = {k: v.clone() for k, v in saved.items()}
    alrc(torch.tensor([5.0, 6.0, 7.0]))
    after = {k: v.clone() for k, v in alrc.moments().items()}
    assert not torch.equal(after["mu1"], before["mu1"])
    alrc.restore_moments_(saved, torch.tensor(False))
    assert all(torch.equal(v, after[k]) for k, v in alrc.moments().items())
    alrc.restore_moments_(saved, torch.tensor(True))
    assert all(torch.equal(v, before[k]) for k, v in alrc.moments().items())


@pytest.mark.parametrize("name", ["mu2", "num_updates"])
def test_a_negative_second_moment_or_count_is_refused_on_load(name):
    alrc = ss.ALRC()
    alrc(torch.tensor([1.0, 2.0]))
    saved = alrc.state_dict()
    saved[name] = -saved[name].abs() - 1
    with pytest.raises(ValueError, match=name):
        ss.ALRC().load_state_dict(saved)


def test_a_negative_first_moment_loads():
    """The mean of the losses may be negative (a log-likelihood); only mu2 and counts may not."""
    alrc = ss.ALRC()
    alrc(torch.tensor([-3.0, -2.0]))
    saved = alrc.state_dict()
    assert float(saved["mu1"]) < 0
    fresh = ss.ALRC()
    fresh.load_state_dict(saved)
    assert torch.equal(fresh.mu1, saved["mu1"])


def test_a_wrong_dtype_in_a_saved_buffer_is_refused_and_a_non_tensor_left_to_torch():
    saved = ss.ALRC().state_dict()
    with pytest.raises(ValueError, match="mu1"):
        ss.ALRC().load_state_dict({**saved, "mu1": saved["mu1"].double()})
    with pytest.raises(RuntimeError):  # not a tensor: nn.Module's own report
        ss.ALRC().load_state_dict({**saved, "mu1": 1.0})
