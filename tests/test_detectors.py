"""Every detector against its plain-Python restatement, and the shared contract: no host sync,
bitwise resume, skip and non-finite inputs, argument checks, state_dict validation, the
guard's gradient norm, and agreement across 2 real gloo processes."""

from __future__ import annotations

import copy
import io
import math
import pickle
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import steadystep as ss
from steadystep.detectors import global_grad_norm
from steadystep.detectors import reference as ref
from tests.dispatch import CountOps
from tests.dist_utils import run_distributed

# (tensor detector, plain restatement) factories with small windows, so every phase (warm-up,
# full ring buffer, wrap-around) happens within a short sequence.
PAIRS = {
    "page_hinkley": (
        lambda dt: ss.PageHinkleyPaper(ph_lambda=0.05, rho=0.1, dtype=dt),
        lambda: ref.PlainPageHinkley(0.05, 0.1),
    ),
    "rolling_zscore": (
        lambda dt: ss.RollingZScore(window=16, sigma=3.0, warmup=6, dtype=dt),
        lambda: ref.PlainRollingZScore(16, 3.0, 6),
    ),
    "rolling_zscore_default": (
        lambda dt: ss.RollingZScore(dtype=dt),
        lambda: ref.PlainRollingZScore(),
    ),
    "ewm_ratio": (
        lambda dt: ss.EWMRatio(threshold=1.8, span=5.0, dtype=dt),
        lambda: ref.PlainEWMRatio(1.8, 5.0),
    ),
    "zclip": (
        lambda dt: ss.ZClipDetector(alpha=0.9, z_thresh=2.0, warmup=5, dtype=dt),
        lambda: ref.PlainZClip(0.9, 2.0, 5),
    ),
    "zclip_skip": (
        lambda dt: ss.ZClipDetector(z_thresh=2.0, skip_update_on_alarm=True, dtype=dt),
        lambda: ref.PlainZClip(z_thresh=2.0, skip_update_on_alarm=True),
    ),
    "spike": (
        lambda dt: ss.SpikeDetector(window=16, sigma=3.0, warmup=6, dtype=dt),
        lambda: ref.PlainSpikeDetector(16, 3.0, 6),
    ),
    "spike_default": (lambda dt: ss.SpikeDetector(dtype=dt), lambda: ref.PlainSpikeDetector()),
}
NAMES = sorted(PAIRS)


def sequence(kind: str, n: int = 400, seed: int = 0) -> list[tuple[float, float]]:
    """``(loss, grad norm)`` pairs: a noisy decaying curve, with spikes and non-finite values
    for ``"spiky"``, or with a run that diverges from its first steps for ``"diverging"``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        loss = 2.0 / (1.0 + 0.02 * i) * math.exp(rng.gauss(0.0, 0.2))
        norm = abs(rng.gauss(1.0, 0.3)) / (1.0 + 0.005 * i)
        if kind == "spiky" and rng.random() < 0.06:
            loss *= rng.choice([4.0, 30.0, 1e4])
            norm *= rng.choice([1.0, 50.0])
        if kind == "spiky" and rng.random() < 0.01:
            loss, norm = rng.choice([(math.nan, norm), (math.inf, norm), (loss, math.nan)])
        if kind == "diverging" and i < 12:
            loss, norm = 0.7 * 4.0**i, 1.5 * 3.0**i
        out.append((loss, norm))
    return out


def run_pair(name: str, seq: list[tuple[float, float]]) -> tuple[list[bool], list[bool], object]:
    make, make_ref = PAIRS[name]
    det, plain = make(torch.float64), make_ref()
    alarms, ref_alarms = [], []
    for loss, norm in seq:
        x = torch.tensor(loss, dtype=torch.float64)
        g = torch.tensor(norm, dtype=torch.float64)
        alarms.append(bool(det.update(x, grad_norm=g)))
        ref_alarms.append(plain.update(loss, norm if plain.needs_grad_norm else None))
    return alarms, ref_alarms, det


# --------------------------------------------------------------------------------------------
# Exactness against the plain-Python restatements
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "spiky", "diverging"])
@pytest.mark.parametrize("name", NAMES)
def test_decisions_match_the_plain_restatement(name, kind):
    alarms, ref_alarms, _ = run_pair(name, sequence(kind, seed=NAMES.index(name)))
    assert alarms == ref_alarms
    if kind == "spiky":
        assert any(alarms), "the spiky sequence must exercise alarms"


def test_statistics_match_the_plain_restatement():
    seq = sequence("spiky", seed=7)
    _, _, det = run_pair("ewm_ratio", seq)
    plain = ref.PlainEWMRatio(1.8, 5.0)
    for loss, _ in seq:
        plain.update(loss)
    assert det.ewm.item() == pytest.approx(plain.ewm, rel=1e-12)

    _, _, det = run_pair("zclip", seq)
    plain = ref.PlainZClip(0.9, 2.0, 5)
    for loss, norm in seq:
        plain.update(loss, norm)
    assert det.mean.item() == pytest.approx(plain.mean, rel=1e-12)
    assert det.var.item() == pytest.approx(plain.var, rel=1e-12)

    for name, plain in (
        ("rolling_zscore", ref.PlainRollingZScore(16, 3.0, 6)),
        ("spike", ref.PlainSpikeDetector(16, 3.0, 6)),
    ):
        _, _, det = run_pair(name, seq)
        for loss, norm in seq:
            plain.update(loss, norm)
        for signal in ("loss", "grad_norm"):
            window, count = getattr(det, f"{signal}_window"), getattr(det, f"{signal}_count")
            values = getattr(plain, signal).values
            assert count.item() == getattr(plain, signal).count
            # The ring buffer holds the plain deque's values, rotated by the write position.
            start = count.item() % len(window)
            rotated = torch.cat([window[start:], window[:start]]).tolist()
            assert rotated == pytest.approx(list(values), rel=1e-15)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "losses",
    [[1.0] * 300, [5.0 * 0.99**i for i in range(300)], [0.0] * 50, [1e-30] * 50, [1e6] * 50],
    ids=["constant", "decreasing", "zeros", "tiny", "huge"],
)
def test_constant_or_decreasing_losses_never_alarm(name, losses):
    det = PAIRS[name][0](torch.float32)
    alarms = [bool(det.update(torch.tensor(x), grad_norm=torch.tensor(1.0))) for x in losses]
    assert not any(alarms)
    assert all(torch.isfinite(v).all() for v in det.state_dict().values() if torch.is_tensor(v))


def test_page_hinkley_keeps_its_earlier_name():
    assert ss.PageHinkley is ss.PageHinkleyPaper
    assert (
        repr(ss.PageHinkley(ph_lambda=0.2, rho=0.5)) == "PageHinkleyPaper(ph_lambda=0.2, rho=0.5)"
    )
    assert not ss.PageHinkleyPaper.needs_grad_norm
    assert ss.SpikeDetector.needs_grad_norm and ss.RollingZScore.needs_grad_norm
    assert ss.ZClipDetector.needs_grad_norm and not ss.EWMRatio.needs_grad_norm


def test_spike_detector_stops_a_divergence_from_the_first_steps():
    # Losses x4 per step from the start (a learning rate far too high): a z-score alone would
    # let them fill its window; the warm-up test alarms from 10x the smallest loss on.
    det = ss.SpikeDetector()
    alarms = [bool(det.update(torch.tensor(0.7 * 4.0**i))) for i in range(12)]
    assert alarms == [False, False] + [True] * 10
    olmo = ss.RollingZScore()  # OLMo-core's warm-up: no test before the 64th value
    assert not any(bool(olmo.update(torch.tensor(0.7 * 4.0**i))) for i in range(12))
    # After the warm-up a lasting rise of the level stops alarming (clipped values move the
    # window), where a loss jump is caught.
    det = ss.SpikeDetector(window=32)
    level = [1.0 + 0.01 * (i % 5) for i in range(100)] + [3.0 + 0.01 * (i % 5) for i in range(60)]
    alarms = [bool(det.update(torch.tensor(x))) for x in level]
    assert alarms[100] and not any(alarms[130:])


def test_a_caught_spike_does_not_hide_the_next_one():
    # A 50x spike, then a 3x one 20 steps later: the rolling z-score took the first into its
    # window and misses the second; SpikeDetector stored it clipped and catches both.
    rng = random.Random(0)
    losses = [1.0 + 0.05 * rng.gauss(0.0, 1.0) for _ in range(200)]
    losses[100], losses[120] = 50.0, 3.0
    for det, expected in ((ss.RollingZScore(sigma=10.0), [100]), (ss.SpikeDetector(), [100, 120])):
        alarms = [bool(det.update(torch.tensor(x))) for x in losses]
        assert [i for i, a in enumerate(alarms) if a] == expected, type(det).__name__


def _plain_threshold(signal, sigma: float, warmup: int, factor: float | None) -> float:
    """The threshold ``_ClippedWindow.test`` would test the next value against."""
    values, count = list(signal.values), signal.count
    if count + 1 >= warmup:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return mean + sigma * max(std, 1e-3 * abs(mean))
    if count > 0 and factor is not None:
        return min(values) + (factor - 1.0) * abs(min(values))
    return math.inf


def test_spike_detector_stats_report_the_next_thresholds():
    """``stats()`` gives, at every step, the threshold each signal's next value is tested
    against (warm-up, the loss's warm-up factor, the full window, wrap-around) and the counts."""
    det = ss.SpikeDetector(window=16, sigma=3.0, warmup=6, dtype=torch.float64)
    plain = ref.PlainSpikeDetector(16, 3.0, 6)
    for loss, norm in sequence("spiky", n=60, seed=3):
        stats = det.stats()
        for name, factor in (("loss", 10.0), ("grad_norm", None)):
            signal = getattr(plain, name)
            expected = _plain_threshold(signal, 3.0, 6, factor)
            assert stats[f"{name}_threshold"].item() == pytest.approx(expected, rel=1e-12), name
            assert stats[f"{name}_count"].item() == signal.count, name
        f64 = torch.float64
        det.update(torch.tensor(loss, dtype=f64), grad_norm=torch.tensor(norm, dtype=f64))
        plain.update(loss, norm)
    assert plain.loss.count > 16  # the window wrapped around


@pytest.mark.parametrize("level", [2.0, -2.0])
def test_spike_detector_scale_floor_on_a_flat_window(level):
    """A window of equal values has std 0: the scale is its floor 1e-3 |mean|, so the next
    value alarms just above ``mean + sigma * 1e-3 |mean|`` and not just below it."""
    det = ss.SpikeDetector(window=16, sigma=10.0, warmup=4, dtype=torch.float64)
    for _ in range(8):
        assert not det.update(torch.tensor(level, dtype=torch.float64))
    threshold = level + 10.0 * 1e-3 * abs(level)
    assert det.stats()["loss_threshold"].item() == pytest.approx(threshold, rel=1e-12)
    for x, alarm in ((threshold - 1e-6, False), (threshold + 1e-6, True)):
        assert bool(copy.deepcopy(det).update(torch.tensor(x, dtype=torch.float64))) is alarm


def test_spike_detector_documented_defaults_and_smallest_valid_arguments():
    """The documented defaults (window 128, sigma 10, warm-up 8, warm-up factor 10), and the
    smallest values each rule admits: window 2, warmup 3, any warmup_factor above 1."""
    det = ss.SpikeDetector()
    assert (det.window, det.sigma, det.warmup, det.warmup_factor) == (128, 10.0, 8, 10.0)
    assert det.state_dict()["loss_window"].shape == (128,)
    small = ss.SpikeDetector(window=2, warmup=3, warmup_factor=1.5, dtype=torch.float64)
    assert (small.window, small.warmup, small.warmup_factor) == (2, 3, 1.5)
    plain = ref.PlainSpikeDetector(2, 10.0, 3, 1.5)
    for loss in (1.0, 1.6, 1.4, 1.5, 1.45, 1.48, 9.0, 1.5):
        alarm = bool(small.update(torch.tensor(loss, dtype=torch.float64)))
        assert alarm == plain.update(loss), loss


# --------------------------------------------------------------------------------------------
# No host sync
# --------------------------------------------------------------------------------------------


class _HostReads(TorchDispatchMode):
    """Counts ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``): host syncs on CUDA."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused", ["1", "0"], ids=["kernel", "torch"])
@pytest.mark.parametrize("name", NAMES)
def test_update_reads_nothing_on_the_host(name, fused, monkeypatch):
    # fused=0: the torch path of the window detectors (the CUDA path) on the CPU too
    monkeypatch.setenv("STEADYSTEP_FUSED", fused)
    det = PAIRS[name][0](torch.float32)
    seq = sequence("spiky", n=60, seed=3)
    losses = [torch.tensor(x) for x, _ in seq]
    norms = [torch.tensor(g) for _, g in seq]
    for x, g in zip(losses[:30], norms[:30], strict=True):
        det.update(x, grad_norm=g)
    skip = torch.tensor(False)
    reads = _HostReads()
    with reads:
        for i, (x, g) in enumerate(zip(losses[30:], norms[30:], strict=True)):
            det.update(x, grad_norm=g, skip=skip if i % 2 else None)
        det.stats()
        grads = [torch.randn(3, 4), torch.randn(5)]
        global_grad_norm(grads)
    assert reads.count == 0


WINDOW_NAMES = [n for n in NAMES if n.startswith(("rolling", "spike"))]


def _window_state(det) -> dict[str, torch.Tensor]:
    return {**det._tensors(), **{f"before.{k}": v for k, v in det._before.items()}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "spiky", "diverging"])
@pytest.mark.parametrize("name", WINDOW_NAMES)
def test_the_cpu_kernel_updates_like_the_torch_reference(name, kind, dtype, monkeypatch):
    """Note [the detector kernel]: the window detectors' C update, revert and reset against
    their torch code (``STEADYSTEP_FUSED=0``), on losses of three dtypes, with and without the
    gradient norm and ``skip``: the same alarms and counters, statistics within the order of
    a sum (an ulp), and the kernel's update one dispatched op (its alarm tensor)."""
    fast, slow = PAIRS[name][0](dtype), PAIRS[name][0](dtype)
    rng = random.Random(WINDOW_NAMES.index(name))
    loss_dtypes = (torch.float32, torch.float64, torch.bfloat16)
    alarms = []
    for step, (loss, norm) in enumerate(sequence(kind, n=300, seed=5)):
        x = torch.tensor(loss, dtype=loss_dtypes[step % 3])
        g = None if step % 5 == 0 else torch.tensor(norm, dtype=loss_dtypes[step % 2])
        skip = torch.tensor(rng.random() < 0.1) if step % 2 else None
        mask = torch.tensor(rng.random() < 0.5)
        for det, fused in ((fast, "1"), (slow, "0")):
            monkeypatch.setenv("STEADYSTEP_FUSED", fused)
            with CountOps() as ops:
                alarm = det.update(x, grad_norm=g, skip=skip)
            if fused == "1" and step:  # past the first step's buffers
                assert ops.count == 1
            alarms.append(alarm)
            if step % 7 == 3:
                det.revert(mask)
            if step % 23 == 11:
                det.reset(mask)
        assert torch.equal(alarms[-2], alarms[-1]), step
        a, b = _window_state(fast), _window_state(slow)
        for key, value in a.items():
            if value.is_floating_point():
                torch.testing.assert_close(value, b[key], rtol=1e-6, atol=0, equal_nan=True)
            else:
                assert torch.equal(value, b[key]), (step, key)
    if kind == "spiky":
        assert any(bool(a) for a in alarms)


def test_the_cpu_kernel_takes_only_what_it_can_index_and_the_exact_classes(monkeypatch):
    """The kernel indexes the tensors it is given: a ``window`` setting that disagrees with the
    windows (set by hand), a negative count from a checkpoint, or a subclass that may change
    any hook of the shell take the torch path or its semantics, never memory outside the
    windows."""
    det = ss.SpikeDetector(window=4, warmup=3)
    det.window = 64  # the setting no longer matches the tensors: the kernel reads the tensors
    slow = copy.deepcopy(det)
    for i in range(70):
        x = torch.tensor(1.0 + 0.01 * i)
        monkeypatch.setenv("STEADYSTEP_FUSED", "1")
        a = det.update(x)
        monkeypatch.setenv("STEADYSTEP_FUSED", "0")
        assert torch.equal(a, slow.update(x))
    monkeypatch.setenv("STEADYSTEP_FUSED", "1")
    state = ss.RollingZScore(window=4, warmup=3).state_dict()
    state["loss_count"] = torch.tensor(-3)  # a corrupted checkpoint: torch's remainder, no crash
    fast, ref_ = ss.RollingZScore(window=4, warmup=3), ss.RollingZScore(window=4, warmup=3)
    fast.load_state_dict(state)
    ref_.load_state_dict(state)
    for i in range(6):
        x = torch.tensor(1.0 + i)
        monkeypatch.setenv("STEADYSTEP_FUSED", "1")
        fast.update(x)
        monkeypatch.setenv("STEADYSTEP_FUSED", "0")
        ref_.update(x)
    torch.testing.assert_close(fast.loss_window, ref_.loss_window, rtol=1e-6, atol=0)

    class Zeroless(ss.SpikeDetector):
        def _observes(self, loss):
            return loss != 0

    assert Zeroless()._kernel_hyper() is None and ss.SpikeDetector()._kernel_hyper() is not None


def test_load_state_dict_forgets_the_last_observation():
    """A revert after a load takes back nothing from before the load."""
    det = ss.SpikeDetector(window=8, warmup=3)
    for x in (1.0, 1.1, 0.9, 1.0):
        det.update(torch.tensor(x))
    saved = det.state_dict()
    det.update(torch.tensor(1.2))
    det.load_state_dict(saved)
    det.revert(torch.tensor(True))
    _assert_same_state(saved, det.state_dict())


# --------------------------------------------------------------------------------------------
# State: resume, reset, copies, validation
# --------------------------------------------------------------------------------------------


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if torch.is_tensor(value):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


@pytest.mark.parametrize("name", NAMES)
def test_resume_at_random_steps_is_bitwise(name):
    seq = sequence("spiky", n=120, seed=11)
    make = PAIRS[name][0]
    for k in random.Random(NAMES.index(name)).sample(range(1, 110), 4):
        det = make(torch.float32)
        for x, g in seq[:k]:
            det.update(torch.tensor(x), grad_norm=torch.tensor(g))
        buf = io.BytesIO()
        torch.save(det.state_dict(), buf)
        buf.seek(0)
        resumed = make(torch.float32)
        for x, g in seq[:3]:  # a fresh detector with other statistics, all replaced by the load
            resumed.update(torch.tensor(2 * x), grad_norm=torch.tensor(g))
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        for x, g in seq[k:]:
            a = det.update(torch.tensor(x), grad_norm=torch.tensor(g))
            b = resumed.update(torch.tensor(x), grad_norm=torch.tensor(g))
            assert torch.equal(a, b)
        _assert_same_state(det.state_dict(), resumed.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_copies_step_like_the_original(name):
    seq = sequence("spiky", n=80, seed=5)
    det = PAIRS[name][0](torch.float32)
    for x, g in seq[:40]:
        det.update(torch.tensor(x), grad_norm=torch.tensor(g))
    copies = [copy.deepcopy(det), pickle.loads(pickle.dumps(det))]
    for x, g in seq[40:]:
        alarm = det.update(torch.tensor(x), grad_norm=torch.tensor(g))
        for other in copies:
            assert torch.equal(other.update(torch.tensor(x), grad_norm=torch.tensor(g)), alarm)
    for other in copies:
        _assert_same_state(det.state_dict(), other.state_dict())


@pytest.mark.parametrize("name", [n for n in NAMES if n != "page_hinkley"])
def test_reset_restores_a_fresh_test_and_keeps_the_counters(name):
    make = PAIRS[name][0]
    det = make(torch.float32)
    for x, g in sequence("random", n=40):
        det.update(torch.tensor(x), grad_norm=torch.tensor(g))
    before = det.state_dict()
    det.reset(torch.tensor(False))
    _assert_same_state(before, det.state_dict())
    det.reset(torch.tensor(True))
    fresh = make(torch.float32).state_dict()
    after = det.state_dict()
    for key in det._RESET:
        assert torch.equal(after[key], fresh[key]), key
    assert torch.equal(after["observations"], before["observations"])


def test_load_state_dict_names_what_it_expected_and_found():
    spike = ss.SpikeDetector()
    with pytest.raises(ValueError, match=r"expected a state_dict of SpikeDetector.*RollingZScore"):
        spike.load_state_dict(ss.RollingZScore().state_dict())
    with pytest.raises(ValueError, match=r"of SpikeDetector, found one of 'PageHinkleyPaper'"):
        spike.load_state_dict(ss.PageHinkleyPaper().state_dict())
    with pytest.raises(ValueError, match=r"of SpikeDetector, found one of None"):
        spike.load_state_dict({"window": 128})
    state = spike.state_dict()
    del state["loss_count"]
    with pytest.raises(ValueError, match=r"missing \['loss_count'\]"):
        spike.load_state_dict(state)
    state = ss.SpikeDetector(window=16).state_dict()
    state["loss_window"] = torch.zeros(8)
    with pytest.raises(ValueError, match=r"'loss_window' must be a tensor of shape \(16,\)"):
        spike.load_state_dict(state)
    bad = ss.EWMRatio().state_dict() | {"threshold": 0.5}
    with pytest.raises(ValueError, match="threshold"):
        ss.EWMRatio().load_state_dict(bad)
    with pytest.raises(ValueError, match=r"of PageHinkleyPaper.*SpikeDetector"):
        ss.PageHinkleyPaper().load_state_dict(spike.state_dict())
    # A state_dict of the same class with other hyperparameters is adopted, shapes included.
    small = ss.SpikeDetector(window=16, sigma=3.0)
    small.load_state_dict(ss.SpikeDetector(window=32, sigma=5.0).state_dict())
    assert (small.window, small.sigma, small.loss_window.shape) == (32, 5.0, (32,))


def test_page_hinkley_loads_a_checkpoint_from_before_last_loss():
    ph = ss.PageHinkleyPaper(ph_lambda=0.1, rho=0.5)
    for x in (1.0, 0.9, 0.8):
        ph.update(torch.tensor(x))
    old = ph.state_dict()
    del old["last_loss"]
    other = ss.PageHinkleyPaper()
    other.load_state_dict(old)
    assert torch.equal(other.cusum, ph.cusum) and other.rho == 0.5


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: ss.RollingZScore(window=1), "window"),
        (lambda: ss.RollingZScore(window=8.0), "window"),
        (lambda: ss.RollingZScore(sigma=0.0), "sigma"),
        (lambda: ss.RollingZScore(sigma=math.nan), "sigma"),
        (lambda: ss.RollingZScore(warmup=2), "warmup"),
        (lambda: ss.EWMRatio(threshold=1.0), "threshold"),
        (lambda: ss.EWMRatio(threshold=math.inf), "threshold"),
        (lambda: ss.EWMRatio(span=0.5), "span"),
        (lambda: ss.ZClipDetector(alpha=1.0), "alpha"),
        (lambda: ss.ZClipDetector(z_thresh=-1.0), "z_thresh"),
        (lambda: ss.ZClipDetector(warmup=0), "warmup"),
        (lambda: ss.ZClipDetector(eps=0.0), "eps"),
        (lambda: ss.SpikeDetector(window=True), "window"),
        (lambda: ss.SpikeDetector(sigma=-2.0), "sigma"),
        (lambda: ss.SpikeDetector(warmup=1), "warmup"),
        (lambda: ss.SpikeDetector(warmup_factor=1.0), "warmup_factor"),
        (lambda: ss.SpikeDetector(warmup_factor=math.nan), "warmup_factor"),
        (lambda: ss.SpikeDetector(dtype=torch.int64), "dtype"),
        (lambda: ss.PageHinkleyPaper(ph_lambda=0.0), "ph_lambda"),
    ],
)
def test_bad_hyperparameters_raise_naming_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="skip_update_on_alarm"):
        ss.ZClipDetector(skip_update_on_alarm="yes")
    with pytest.raises(ValueError, match="grad_norm"):
        ss.ZClipDetector().update(torch.tensor(1.0))
    with pytest.raises(ValueError, match="scalar loss"):
        ss.SpikeDetector().update(torch.ones(3))
    with pytest.raises(ValueError, match="scalar grad_norm"):
        ss.SpikeDetector().update(torch.tensor(1.0), grad_norm=torch.ones(2))


# --------------------------------------------------------------------------------------------
# Non-finite inputs and skip
# --------------------------------------------------------------------------------------------


def _warm(name: str) -> object:
    """A detector past its warm-up (RollingZScore's default warm-up is 64 values)."""
    det = PAIRS[name][0](torch.float32)
    for x, g in sequence("random", n=80, seed=2):
        det.update(torch.tensor(x), grad_norm=torch.tensor(g))
    return det


def _statistics(det) -> dict:
    keep = ("observations", "alarms")
    return {k: v for k, v in det.state_dict().items() if k not in keep}


@pytest.mark.parametrize("bad", [(math.nan, 1.0), (math.inf, 1.0), (1.0, math.nan)])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_input_alarms_and_changes_no_statistic(name, bad):
    det = _warm(name)
    if bad[1] != 1.0 and not det.needs_grad_norm:
        pytest.skip("the detector does not watch the gradient norm")
    before = _statistics(det)
    before.pop("last_loss")
    alarms = int(det.alarms)
    assert det.update(torch.tensor(bad[0]), grad_norm=torch.tensor(bad[1]))
    after = _statistics(det)
    after.pop("last_loss")
    _assert_same_state(before, after)
    assert int(det.alarms) == alarms + 1
    # The next clean observation continues as if the bad one had never come.
    twin = _warm(name)
    x, g = torch.tensor(1.0), torch.tensor(0.5)
    assert torch.equal(det.update(x, grad_norm=g), twin.update(x, grad_norm=g))
    assert torch.equal(det.last_loss, twin.last_loss)


@pytest.mark.parametrize("name", NAMES)
def test_skip_is_a_bitwise_no_op_and_a_nan_loss_still_alarms(name):
    det = _warm(name)
    before = det.state_dict()
    for x, g in ((1e3, 1e3), (0.5, 0.5), (1.0, math.nan)):
        alarm = det.update(torch.tensor(x), grad_norm=torch.tensor(g), skip=torch.tensor(True))
        assert not alarm
    _assert_same_state(before, det.state_dict())
    assert det.update(torch.tensor(math.nan), grad_norm=torch.tensor(1.0), skip=torch.tensor(True))
    # skip=False is the plain update.
    twin = _warm(name)
    x, g = torch.tensor(30.0), torch.tensor(30.0)
    assert torch.equal(
        twin.update(x, grad_norm=g), _warm(name).update(x, grad_norm=g, skip=torch.tensor(False))
    )


@pytest.mark.parametrize("name", NAMES)
def test_values_near_the_dtype_max_alarm_and_never_poison_the_state(name):
    det = _warm(name)
    assert det.update(torch.tensor(3e38), grad_norm=torch.tensor(3e38))
    for x, g in sequence("random", n=30, seed=4):
        det.update(torch.tensor(x), grad_norm=torch.tensor(g))
        state = det.state_dict()
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v))


# --------------------------------------------------------------------------------------------
# The gradient norm and the guard
# --------------------------------------------------------------------------------------------


def test_global_grad_norm_accumulates_in_float64():
    # float32 elements whose squares (2^200 ~ 1.6e60) overflow float32, not float64.
    grads = [torch.full((1000,), 2.0**100), torch.full((3, 3), -(2.0**101))]
    expected = math.sqrt(1000 * 2.0**200 + 9 * 2.0**202)
    norm = global_grad_norm(grads)
    assert norm.dtype == torch.float64 and norm.item() == pytest.approx(expected, rel=1e-12)
    flat = torch.cat([g.reshape(-1).double() for g in grads])
    assert norm.item() == pytest.approx(torch.linalg.vector_norm(flat).item(), rel=1e-12)
    assert not torch.isfinite(global_grad_norm([torch.tensor([1.0, math.nan])]))
    assert global_grad_norm([]).item() == 0.0


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _backward(model: torch.nn.Module, step: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
    model.zero_grad()
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    for p in model.parameters():
        p.grad.mul_(scale)
    return loss.detach()


class _Recorder(ss.SpikeDetector):
    """A SpikeDetector that remembers the gradient norms the guard gives it."""

    def update(self, loss, *, grad_norm=None, skip=None):
        self.seen = [*getattr(self, "seen", []), grad_norm]
        return super().update(loss, grad_norm=grad_norm, skip=skip)


@pytest.mark.parametrize("kind", ["adamw", "alera"])
def test_guard_feeds_the_global_norm_and_catches_an_explosion_before_the_update(kind):
    model = _model()
    base = (
        torch.optim.AdamW(model.parameters(), lr=1e-2)
        if kind == "adamw"
        else ss.ALeRA(ss.layer_groups(model), lr=1e-2)
    )
    opt = ss.CatastropheGuard(base, _Recorder())
    for step in range(20):
        before_last = [p.detach().clone() for p in model.parameters()]
        loss = _backward(model, step)
        opt.step(loss=loss)
    expected = global_grad_norm([p.grad for p in model.parameters()])
    assert torch.equal(opt.detector.seen[-1], expected)
    state = copy.deepcopy(base.state_dict()["state"])
    # Gradients x1e4 with an ordinary loss: the norm alarms at once, before the exploded
    # update is taken; the guard skips the step (a bad batch: no rollback, no cut).
    current = [p.detach().clone() for p in model.parameters()]
    loss = _backward(model, 20, scale=1e4)
    opt.step(loss=loss)
    assert int(opt.stats()["alarms"]) == 1 and int(opt.stats()["skips"]) == 1
    assert int(opt.stats()["rollbacks"]) == 0 and float(opt.stats()["lr_scale"]) == 1.0
    assert all(torch.equal(a, b) for a, b in zip(current, model.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before_last, current, strict=True))
    if kind == "adamw":  # the exploded gradient never reached Adam's moments
        for key, value in base.state_dict()["state"].items():
            assert torch.equal(value["exp_avg"], state[key]["exp_avg"])


@pytest.mark.parametrize("kind", ["adamw", "alera"])
def test_guard_skips_a_non_finite_gradient_without_alarm_or_observation(kind):
    # Note [non-finite gradients]: not an alarm, and the detector does not observe the step,
    # on the host path (torch's AdamW) and on the sync-free path (ALeRA) alike.
    model = _model()
    base = (
        torch.optim.AdamW(model.parameters(), lr=1e-2)
        if kind == "adamw"
        else ss.ALeRA(ss.layer_groups(model), lr=1e-2)
    )
    opt = ss.CatastropheGuard(base)
    for step in range(12):
        opt.step(loss=_backward(model, step))
    before = opt.detector.state_dict()
    loss = _backward(model, 12)
    next(model.parameters()).grad[0, 0] = math.nan
    opt.step(loss=loss)
    assert int(opt.stats()["alarms"]) == 0
    _assert_same_state(before, opt.detector.state_dict())


def test_training_diverged_pickles_with_its_history():
    error = ss.TrainingDiverged("diverged", [{"step": 3, "loss": 9.0}])
    copy_ = pickle.loads(pickle.dumps(error))
    assert str(copy_) == "diverged" and copy_.history == error.history


def test_guard_default_detector_and_sync_free_path():
    model = _model()
    opt = ss.CatastropheGuard(ss.ALeRA(ss.layer_groups(model), lr=1e-2))
    assert isinstance(opt.detector, ss.SpikeDetector)
    for step in range(12):
        opt.step(loss=_backward(model, step))
    reads = _HostReads()
    with reads:
        for step in range(12, 16):
            opt.step(loss=_backward(model, step))
    assert reads.count == 0


# --------------------------------------------------------------------------------------------
# Two real processes (gloo): the rank mean is tested; every rank decides alike
# --------------------------------------------------------------------------------------------


def _distributed_detectors(rank, world):
    out = {}
    for name in NAMES:
        det = PAIRS[name][0](torch.float64)
        alarms = []
        # Different losses on each rank; the gradient norm is global (the same everywhere).
        for i, (x, g) in enumerate(sequence("spiky", n=150, seed=21)):
            local = x * (1.0 + 0.5 * rank) if math.isfinite(x) else x
            if rank == 1 and i == 90:
                local = 500.0  # a spike on one rank only
            alarms.append(det.update(torch.tensor(local, dtype=torch.float64), grad_norm=g))
        out[name] = {"alarms": torch.stack(alarms), "state": det.state_dict()}
    return out


def test_ranks_agree_and_match_a_single_process_on_the_mean():
    results = run_distributed(_distributed_detectors, world=2)
    for name in NAMES:
        a, b = results[0][name], results[1][name]
        assert torch.equal(a["alarms"], b["alarms"]), name
        _assert_same_state(a["state"], b["state"])
        # One process fed the rank mean takes the same decisions.
        det = PAIRS[name][0](torch.float64)
        single = []
        for i, (x, g) in enumerate(sequence("spiky", n=150, seed=21)):
            locs = [x * (1.0 + 0.5 * r) if math.isfinite(x) else x for r in range(2)]
            if i == 90:
                locs[1] = 500.0
            mean = (torch.tensor(locs[0], dtype=torch.float64) + locs[1]) / 2
            single.append(det.update(mean, grad_norm=g))
        assert torch.equal(torch.stack(single), a["alarms"]), name


def _fsdp_grad_norm(rank, world):
    """global_grad_norm of FSDP2 shards against the norm of a replica's rank-averaged gradient."""
    from tests.test_distributed import _batch, _fsdp_model, _mlp

    model, replica = _fsdp_model(), _mlp()
    g = torch.Generator().manual_seed(600 + rank)
    x, y = _batch(g, rank)
    for net in (model, replica):
        (net(x) - y).pow(2).mean().backward()
    for p in replica.parameters():
        torch.distributed.all_reduce(p.grad)
        p.grad.div_(world)
    sharded = global_grad_norm([p.grad for p in model.parameters()])
    whole = global_grad_norm([p.grad for p in replica.parameters()])
    return {"sharded": sharded, "whole": whole}


def test_global_grad_norm_of_fsdp2_shards_is_the_whole_gradients_norm():
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    results = run_distributed(_fsdp_grad_norm, world=2)
    assert torch.equal(results[0]["sharded"], results[1]["sharded"])
    for r in results:
        assert r["sharded"].item() == pytest.approx(r["whole"].item(), rel=1e-6)
