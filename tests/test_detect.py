"""Page-Hinkley against a plain-Python restatement of the rules of docs/decisions.md."""

from __future__ import annotations

import io
import math

import pytest
import torch

import steadystep as ss


def _same(a, b) -> bool:
    """Equal state_dict entries: tensors bitwise, anything else (hyperparameters, the tag) by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a == b


class PlainPH:
    """The test in plain Python floats, line by line from docs/decisions.md."""

    def __init__(self, ph_lambda: float, rho: float) -> None:
        self.ph_lambda, self.rho = ph_lambda, rho
        self.delta = None
        self.n = 0
        self.relaxed = self.mean = self.U = self.U_min = 0.0

    def update(self, loss: float) -> bool:
        if not math.isfinite(loss):
            return True
        if self.delta is None:
            if loss == 0:  # before Delta is set, an exact 0 is not observed
                return False
            self.delta = self.ph_lambda * abs(loss)
        self.n += 1
        w = max(1.0 / self.n, self.rho)
        self.relaxed = self.relaxed + w * (loss - self.relaxed)
        self.mean = self.mean + (self.relaxed - self.mean) / self.n
        self.U = self.U + (self.relaxed - self.mean)
        self.U_min = min(self.U_min, self.U)
        alarm = self.n > 1 and self.U - self.U_min > self.delta
        if alarm:
            self.n = 0
            self.relaxed = self.mean = self.U = self.U_min = 0.0
        return alarm


def run(losses, ph_lambda=0.1, rho=0.1):
    det = ss.PageHinkley(ph_lambda=ph_lambda, rho=rho, dtype=torch.float64)
    ref = PlainPH(ph_lambda, rho)
    alarms, ref_alarms = [], []
    for i, x in enumerate(losses):
        if bool(det.update(torch.tensor(x, dtype=torch.float64))):
            alarms.append(i)
        if ref.update(x):
            ref_alarms.append(i)
        assert det.cusum.item() == pytest.approx(ref.U, rel=1e-12, abs=1e-12)
        assert det.relaxed_loss.item() == pytest.approx(ref.relaxed, rel=1e-12, abs=1e-12)
        assert det.mean.item() == pytest.approx(ref.mean, rel=1e-12, abs=1e-12)
        assert det.count.item() == ref.n
    return alarms, ref_alarms


def test_step_change_detected_where_the_formula_says():
    gen = torch.Generator().manual_seed(0)
    noise = (0.01 * torch.randn(120, generator=gen, dtype=torch.float64)).tolist()
    losses = [1.0 - 0.002 * i + e for i, e in enumerate(noise[:80])]
    losses += [2.0 + e for e in noise[80:]]  # the loss doubles at index 80
    alarms, ref_alarms = run(losses)
    assert alarms == ref_alarms
    assert alarms and 80 <= alarms[0] <= 82  # nothing before the change, a short delay

    # By hand: 20 losses of 1.0 then 3.0 (Delta = 0.1, rho = 0.1). At index 20, n = 21:
    # relaxed = 1 + 0.1 * 2 = 1.2, mean = 1 + 0.2 / 21, U = 0.2 - 0.2 / 21 = 0.19 > 0.1.
    alarms, ref_alarms = run([1.0] * 20 + [3.0] * 5)
    assert alarms == ref_alarms
    assert alarms[0] == 20


@pytest.mark.parametrize(
    "losses",
    [
        [1.0] * 2000,
        [5.0 * 0.999**i for i in range(2000)],
        [0.0] * 50,
        [1e-30] * 50,
        [1e6] * 50,
    ],
    ids=["constant", "decreasing", "zeros", "tiny", "huge"],
)
def test_constant_or_decreasing_never_alarms(losses):
    alarms, ref_alarms = run(losses, rho=0.01)
    assert alarms == ref_alarms == []


def test_no_alarm_on_first_observation_after_reset():
    det = ss.PageHinkley(ph_lambda=0.1, rho=0.5)
    for x in (1.0, 1.0, 1.0):
        assert not det.update(torch.tensor(x))
    assert det.update(torch.tensor(3.0))  # alarm, test restarts
    assert det.count.item() == 0 and det.cusum.item() == 0.0
    assert det.threshold.item() == pytest.approx(0.1)  # Delta kept
    assert not det.update(torch.tensor(100.0))  # first after reset: never
    assert det.update(torch.tensor(1000.0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_loss_alarms_and_keeps_statistics(bad):
    det = ss.PageHinkley(ph_lambda=0.1, rho=0.1)
    for x in (1.0, 0.9, 0.8):
        det.update(torch.tensor(x))
    before = det.state_dict()
    assert det.update(torch.tensor(bad))
    after = det.state_dict()
    for key in ("threshold", "count", "relaxed_loss", "mean", "cusum", "cusum_min"):
        assert torch.equal(before[key], after[key]), key
    assert after["alarms"].item() == 1
    # A non-finite first loss does not set Delta.
    fresh = ss.PageHinkley()
    assert fresh.update(torch.tensor(bad))
    assert not fresh.initialized and fresh.threshold.item() == 0.0


def test_state_dict_round_trip_continues_bitwise():
    losses = [1.0, 0.9, 0.95, 0.85, 0.8, 1.5, 0.7, 0.75, 0.6, 2.0, 0.5]
    det = ss.PageHinkley(ph_lambda=0.1, rho=0.2)
    for x in losses[:5]:
        det.update(torch.tensor(x))
    buf = io.BytesIO()
    torch.save(det.state_dict(), buf)
    buf.seek(0)
    other = ss.PageHinkley(ph_lambda=0.5, rho=0.9)
    other.load_state_dict(torch.load(buf, weights_only=True))
    for x in losses[5:]:
        assert torch.equal(det.update(torch.tensor(x)), other.update(torch.tensor(x)))
    for key, value in det.state_dict().items():
        assert (
            value == other.state_dict()[key]
            if not isinstance(value, torch.Tensor)
            else (torch.equal(value, other.state_dict()[key]))
        )


def test_python_float_loss_and_stats():
    det = ss.PageHinkley()
    assert not det.update(2.0)
    stats = det.stats()
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in stats.values())
    assert stats["threshold"].item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="scalar"):
        det.update(torch.ones(3))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"ph_lambda": 0.0}, "ph_lambda"),
        ({"ph_lambda": -1.0}, "ph_lambda"),
        ({"ph_lambda": math.nan}, "ph_lambda"),
        ({"ph_lambda": math.inf}, "ph_lambda"),
        ({"rho": 0.0}, "rho"),
        ({"rho": 1.5}, "rho"),
        ({"rho": math.nan}, "rho"),
    ],
)
def test_invalid_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ss.PageHinkley(**kwargs)


def test_last_loss_is_the_tested_loss_and_round_trips():
    det = ss.PageHinkley()
    assert math.isnan(det.last_loss.item())
    det.update(torch.tensor(2.5))
    assert det.last_loss.item() == 2.5
    det.update(torch.tensor(math.inf))
    assert det.last_loss.item() == math.inf  # recorded even though it never enters the statistics
    other = ss.PageHinkley()
    other.load_state_dict(det.state_dict())
    assert other.last_loss.item() == math.inf
    legacy = {k: v for k, v in det.state_dict().items() if k != "last_loss"}
    ss.PageHinkley().load_state_dict(legacy)  # checkpoints written before last_loss existed


def test_skip_leaves_a_finite_observation_unseen_but_alarms_on_a_nonfinite_loss():
    ph = ss.PageHinkley(ph_lambda=0.1, rho=0.5)
    for x in (1.0, 1.2, 0.9):
        ph.update(torch.tensor(x))
    before = ph.state_dict()
    alarm = ph.update(torch.tensor(100.0), skip=torch.tensor(True))
    assert not bool(alarm)
    after = ph.state_dict()
    for key, value in before.items():
        assert _same(value, after[key]), key
    assert bool(ph.update(torch.tensor(float("nan")), skip=torch.tensor(True)))
    assert not bool(ph.update(torch.tensor(1.0), skip=torch.tensor(False)))
    assert int(ph.observations) == 5


def test_load_state_dict_copies_so_loaded_objects_are_independent():
    ph = ss.PageHinkley(ph_lambda=0.1, rho=0.5)
    for x in (1.0, 1.5, 0.7):
        ph.update(torch.tensor(x))
    sd = ph.state_dict()
    frozen = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    first, second = ss.PageHinkley(), ss.PageHinkley()
    first.load_state_dict(sd)
    second.load_state_dict(sd)
    for x in (2.0, 0.5, 3.0):
        first.update(torch.tensor(x))
    for key, value in frozen.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(sd[key], value), key  # the dict was not written through
            assert torch.equal(getattr(second, key), value), key  # nor the other detector


def test_a_finite_loss_that_overflows_the_statistics_alarms_and_keeps_them():
    ph = ss.PageHinkley(ph_lambda=0.1, rho=0.25)
    for x in (1.0, 1.0, 1.0, -3e38):
        assert not bool(ph.update(torch.tensor(x)))
    before = ph.state_dict()
    # x - relaxed overflows float32: the statistics would become inf/NaN.
    assert bool(ph.update(torch.tensor(3e38)))
    after = ph.state_dict()
    for key in ("threshold", "count", "relaxed_loss", "mean", "cusum", "cusum_min"):
        assert torch.equal(before[key], after[key]), key
        assert torch.isfinite(after[key]).all(), key
    assert not bool(ph.update(torch.tensor(1.0)))  # the test goes on with finite statistics
    assert all(torch.isfinite(v).all() for v in ph.stats().values())


def test_threshold_is_ph_lambda_times_the_absolute_first_loss():
    # Documented extension: equal to the paper's ph_lambda * L_first for a positive first loss;
    # for a negative one Delta stays positive (a negative Delta would alarm at once).
    for first in (2.0, -2.0):
        ph = ss.PageHinkley(ph_lambda=0.1, rho=0.5)
        ph.update(torch.tensor(first))
        assert ph.threshold.item() == pytest.approx(0.2)
        assert not bool(ph.update(torch.tensor(first)))


def test_reset_zeroes_the_test_keeps_delta_and_honours_the_mask():
    def fed():
        ph = ss.PageHinkley(ph_lambda=0.1, rho=0.5)
        for x in (2.0, 1.0, 1.5):
            ph.update(torch.tensor(x))
        return ph

    ph = fed()
    before = ph.state_dict()
    ph.reset(mask=torch.tensor(False))  # masked out: nothing changes
    for key, value in before.items():
        assert _same(value, ph.state_dict()[key]), key
    for mask in (None, torch.tensor(True)):
        ph = fed()
        assert int(ph.count) == 3 and float(ph.relaxed_loss) != 0.0
        ph.reset(mask=mask)
        for name in ("count", "relaxed_loss", "mean", "cusum", "cusum_min"):
            assert float(getattr(ph, name)) == 0.0, name
        assert ph.threshold.item() == pytest.approx(0.2)  # Delta kept
        assert int(ph.observations) == 3
        assert not bool(ph.update(torch.tensor(100.0)))  # first observation after a reset
        assert int(ph.count) == 1 and ph.relaxed_loss.item() == 100.0


# -- PageHinkley edges that mutation testing (tools/mutation.py) found untested --------------------
# One block, PageHinkley's current behaviour only.


def test_page_hinkley_defaults_and_repr():
    ph = ss.PageHinkley()
    assert (ph.ph_lambda, ph.rho, ph.dtype) == (0.1, 0.01, torch.float32)
    assert repr(ph) == "PageHinkleyPaper(ph_lambda=0.1, rho=0.01)"


def test_page_hinkley_rejects_an_integer_dtype():
    with pytest.raises(ValueError, match=r"dtype.*torch\.int64"):
        ss.PageHinkley(dtype=torch.int64)


def test_page_hinkley_stats_gap_is_cusum_minus_its_minimum():
    ph = ss.PageHinkley(ph_lambda=10.0, rho=0.5, dtype=torch.float64)  # Delta = 30: no reset
    ref = PlainPH(10.0, 0.5)
    for x in (3.0, 1.0, 1.0, 2.0, 2.5):
        assert not bool(ph.update(torch.tensor(x, dtype=torch.float64)))
        assert not ref.update(x)
    assert ref.U_min < 0  # the minimum is not 0, so the gap is not the cusum
    gap = ph.stats()["gap"]
    assert torch.equal(gap, ph.cusum - ph.cusum_min)
    assert gap.item() == pytest.approx(ref.U - ref.U_min, rel=1e-12)


def test_page_hinkley_skipped_first_observation_is_never_seen():
    ph = ss.PageHinkley(ph_lambda=0.1, rho=0.5)
    assert not bool(ph.update(torch.tensor(100.0), skip=torch.tensor(True)))
    assert not bool(ph.initialized) and ph.threshold.item() == 0.0
    fresh = ss.PageHinkley(ph_lambda=0.1, rho=0.5)
    for x in (2.0, 2.1, 1.9, 2.0):
        assert torch.equal(ph.update(torch.tensor(x)), fresh.update(torch.tensor(x)))
    assert ph.threshold.item() == pytest.approx(0.2)  # Delta from the first loss it observed
    for key, value in fresh.state_dict().items():
        assert _same(value, ph.state_dict()[key]), key


def test_page_hinkley_overflow_still_alarms_when_skip_is_passed_as_false():
    # A guard always passes skip; skip=False must not weaken the overflow rule.
    ph = ss.PageHinkley(ph_lambda=0.1, rho=0.25)
    no = torch.tensor(False)
    for x in (1.0, 1.0, 1.0, -3e38):
        assert not bool(ph.update(torch.tensor(x), skip=no))
    before = ph.state_dict()
    assert bool(ph.update(torch.tensor(3e38), skip=no))
    after = ph.state_dict()
    for key in ("threshold", "count", "relaxed_loss", "mean", "cusum", "cusum_min"):
        assert torch.equal(before[key], after[key]), key
    assert int(after["alarms"]) == 1


def test_page_hinkley_statistics_move_to_the_loss_device():
    # "meta" stands in for an accelerator: every statistic follows the loss at its update.
    ph = ss.PageHinkley()
    alarm = ph.update(torch.tensor(1.0, device="meta"))
    assert alarm.device.type == "meta"
    for key, value in ph.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert value.device.type == "meta", key


def test_a_first_loss_of_zero_does_not_make_delta_zero():
    """Note [a first loss of 0]: a first loss of exactly 0 (a solved batch) would set Delta = 0
    and every later bit of noise would alarm. Zeros before the first non-zero loss are not
    observed, so small noisy losses after them raise exactly the alarms (none) they raise
    without them, and Delta is ph_lambda times the first non-zero loss; zeros alone never
    alarm. (A small decaying loss with 2% noise: the test raises no alarm on it.)"""
    gen = torch.Generator().manual_seed(0)
    decay = torch.exp(-torch.arange(200, dtype=torch.float64) / 200)
    noisy = 1e-3 * decay * (1.0 + 0.02 * torch.randn(200, generator=gen, dtype=torch.float64))
    for rho in (0.01, 0.5):
        plain = ss.PageHinkley(ph_lambda=0.1, rho=rho)
        assert not any(bool(plain.update(torch.tensor(x))) for x in noisy.tolist())
        ph = ss.PageHinkley(ph_lambda=0.1, rho=rho)
        assert not bool(ph.update(torch.tensor(0.0)))
        assert not bool(ph.update(torch.tensor(0.0)))
        assert ph.threshold.item() == 0.0 and int(ph.count) == 0
        alarms = [bool(ph.update(torch.tensor(x))) for x in noisy.tolist()]
        assert sum(alarms) == 0, rho
        assert ph.threshold.item() == pytest.approx(0.1 * noisy[0].item(), rel=1e-6)
        for key in ("threshold", "count", "relaxed_loss", "mean", "cusum", "cusum_min"):
            assert torch.equal(getattr(ph, key), getattr(plain, key)), key
        assert not bool(ph.update(torch.tensor(0.0))) and int(ph.count) == 201  # observed now
    zeros = ss.PageHinkley(ph_lambda=0.1, rho=0.5)
    assert not any(bool(zeros.update(torch.tensor(0.0))) for _ in range(50))
    # the plain restatement follows the same rule
    losses = [0.0, *noisy.tolist()[:40], 5e-3, *noisy.tolist()[40:60]]
    alarms, ref_alarms = run(losses, rho=0.5)
    assert alarms == ref_alarms and alarms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_gap_equal_to_delta_is_no_change_and_one_above_it_is(dtype):
    """The paper's test alarms when m_T - M_T > Delta, strictly. With rho = 1 the relaxed loss is
    the loss itself, and with ph_lambda = 0.5 and a first loss of 2, Delta = 1; a second loss of
    4 gives mean 3, cusum 1 and a gap of exactly 1 (every number exact in binary): no alarm;
    4.5 gives a gap of 1.25: an alarm."""
    for second, alarm in ((4.0, False), (4.5, True)):
        ph = ss.PageHinkleyPaper(ph_lambda=0.5, rho=1.0, dtype=dtype)
        assert not bool(ph.update(torch.tensor(2.0)))
        assert float(ph.threshold) == 1.0
        assert bool(ph.update(torch.tensor(second))) is alarm, second


def test_only_the_gradient_norm_detectors_ask_the_guard_for_the_norm():
    """``needs_grad_norm`` tells the guard whether to compute the global gradient norm (a pass
    over every gradient): the paper's test watches the loss only, and the default detector both."""
    assert ss.PageHinkleyPaper.needs_grad_norm is False
    assert ss.PageHinkleyPaper().needs_grad_norm is False
    assert ss.SpikeDetector().needs_grad_norm is True


# -- survivors of the mutation run (make mutation) ------------------------------------------------


def test_configure_sets_rho_on_a_fresh_detector_only():
    detector = ss.PageHinkleyPaper()
    detector.configure(batch_size=32, dataset_size=1000)
    assert detector.rho == 32 / 1000
    detector.update(torch.tensor(1.0))
    with pytest.raises(ValueError, match="already observed"):
        detector.configure(batch_size=32, dataset_size=1000)


def test_the_count_is_an_integer_tensor():
    detector = ss.PageHinkleyPaper()
    assert detector.state_dict()["count"].dtype == torch.int64
    detector.update(torch.tensor(2.0))
    assert detector.state_dict()["count"].dtype == torch.int64


def test_load_refuses_a_page_hinkley_state_tagged_as_another_detector():
    saved = ss.PageHinkleyPaper().state_dict()
    with pytest.raises(ValueError, match="expected a state_dict of PageHinkleyPaper"):
        ss.PageHinkleyPaper().load_state_dict({**saved, "detector": "SpikeDetector"})


def test_load_refuses_another_detectors_state_by_name():
    with pytest.raises(ValueError, match="found one of 'SpikeDetector'"):
        ss.PageHinkleyPaper().load_state_dict(ss.SpikeDetector().state_dict())
