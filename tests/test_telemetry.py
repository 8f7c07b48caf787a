"""Monitor: rows equal the components' stats, one host read per flush, CSV / TensorBoard output,
and WARNING events (rollback, LR cut, sustained clipping, non-finite) logged once with the step."""

from __future__ import annotations

import io
import logging
import math
import re

import pytest
import torch

import steadystep as ss
from steadystep.telemetry import read_csv


def _stabilize(*args, **kwargs):
    """ss.stabilize with ALRC on (opt-in since the clean-run benchmark): these tests exercise
    ALRC inside the composition; a test of the defaults calls ss.stabilize itself."""
    return ss.stabilize(*args, **{"alrc": True, **kwargs})


class Scripted:
    """A component whose stats follow a script: ``values[name][step]``."""

    def __init__(self, **series):
        self.series = series
        self.t = 0

    def stats(self):
        out = {}
        for k, v in self.series.items():
            value = v[min(self.t, len(v) - 1)]
            dtype = torch.int64 if isinstance(value, int) else torch.float64
            out[k] = torch.tensor(value, dtype=dtype)
        return out

    def advance(self):
        self.t += 1


def _run(monitor, comp, steps):
    for _ in range(steps):
        monitor.step()
        comp.advance()
    monitor.close()


def test_rows_equal_stats_and_extra_scalars():
    torch.manual_seed(0)
    alrc = ss.ALRC(beta1=0.9, beta2=0.9)
    monitor = ss.Monitor(alrc, every=4)
    expected = []
    for step in range(10):
        loss = alrc(torch.rand(8) + (100.0 if step == 7 else 1.0)).mean()
        expected.append({k: v.clone() for k, v in alrc.stats().items()})
        monitor.step(loss=loss.detach())
    monitor.close()
    assert monitor.columns[:2] == ["step", "loss"]
    assert [r["step"] for r in monitor.history] == list(range(10))
    for row, stats in zip(monitor.history, expected, strict=True):
        for k, v in stats.items():
            got = row[f"alrc/{k}"]
            if v.is_floating_point():
                assert got == float(v) or (math.isinf(got) and math.isinf(float(v)))
            else:
                assert isinstance(got, int) and got == int(v)
    assert monitor.history[7]["alrc/clipped_fraction"] == 1.0
    assert monitor.history[0]["alrc/num_updates"] == 1


def test_one_host_read_per_flush_none_between(monkeypatch):
    alrc = ss.ALRC()
    monitor = ss.Monitor(alrc, every=5)
    calls = {"tolist": 0, "other": 0}
    orig_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        calls["tolist"] += 1
        return orig_tolist(self)

    def forbidden(self, *a, **k):
        calls["other"] += 1
        raise AssertionError("host read outside a flush")

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    for name in ("item", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for step in range(12):
        alrc(torch.full((4,), 1.0 + step))
        monitor.step(loss=torch.tensor(1.0))
        assert calls["tolist"] == (step + 1) // 5
    monkeypatch.undo()
    assert calls["other"] == 0
    monitor.close()
    assert len(monitor.history) == 12


def test_csv_format_round_trip(tmp_path):
    path = tmp_path / "m.csv"
    comp = Scripted(count=[0, 1, 2, 3, 4, 5, 6], value=[0.5, 1e-8, math.nan, math.inf, 2.0])
    monitor = ss.Monitor(("c", comp), every=3, csv_path=path)
    for _ in range(7):
        monitor.step(lr=0.1)
        comp.advance()
    monitor.close()
    lines = path.read_text().splitlines()
    assert lines[0] == "step,lr,c/count,c/value"
    assert lines[1] == "0,0.1,0,0.5"
    assert lines[2] == "1,0.1,1,1e-08"  # floats as repr, ints exact
    assert lines[3].endswith(",2,nan") and lines[4].endswith(",3,inf")
    assert len(lines) == 8  # header + 7 rows written over three flushes (3 + 3 + 1 at close)
    cols = read_csv(path)
    assert cols["step"] == [0, 1, 2, 3, 4, 5, 6]
    assert cols["c/count"] == [0, 1, 2, 3, 4, 5, 6]
    assert math.isnan(cols["c/value"][2])


def test_vector_stats_are_flattened_and_names_deduplicated():
    class Vec:
        def stats(self):
            return {"lr_multiplier": torch.tensor([1.0, 0.5])}

    a, b = Vec(), Vec()
    monitor = ss.Monitor(a, b, every=1)
    monitor.step()
    assert monitor.columns == [
        "step",
        "vec/lr_multiplier/0",
        "vec/lr_multiplier/1",
        "vec_1/lr_multiplier/0",
        "vec_1/lr_multiplier/1",
    ]
    assert monitor.history[0]["vec_1/lr_multiplier/1"] == 0.5


def test_layout_change_and_bad_arguments_raise():
    comp = Scripted(a=[1.0])
    monitor = ss.Monitor(comp, every=10)
    monitor.step()
    comp.series["b"] = [2.0]
    with pytest.raises(RuntimeError, match="changed shape or keys"):
        monitor.step()
    with pytest.raises(ValueError, match="every"):
        ss.Monitor(comp, every=0)
    with pytest.raises(ValueError, match="clip_patience"):
        ss.Monitor(comp, clip_patience=0)
    with pytest.raises(ValueError, match="lr_cut_ratio"):
        ss.Monitor(comp, lr_cut_ratio=math.nan)
    with pytest.raises(TypeError, match="stats"):
        ss.Monitor(object())


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_rollback_and_lr_cut_logged_once_with_step(caplog):
    comp = Scripted(
        rollbacks=[0] * 7 + [1] * 10 + [2],
        lr_multiplier=[1.0, 1.01, 1.02] + [0.51] * 20,
    )
    with caplog.at_level(logging.WARNING, logger="steadystep"):
        _run(ss.Monitor(("guard", comp), every=4), comp, 30)
    msgs = _warnings(caplog)
    assert len(msgs) == 3, msgs
    assert "step 3" in msgs[0] and "learning rate cut" in msgs[0]
    assert "step 7" in msgs[1] and "rolled back" in msgs[1]
    assert "step 17" in msgs[2] and "rollbacks = 2" in msgs[2]


def test_lr_cut_counter_preferred_over_lr_drop(caplog):
    comp = Scripted(lr_cuts=[0, 0, 1], lr=[1.0, 1.0, 0.5])
    with caplog.at_level(logging.WARNING, logger="steadystep"):
        _run(ss.Monitor(comp, every=2), comp, 5)
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "step 2" in msgs[0] and "cut the learning rate" in msgs[0]


def test_sustained_clipping_warned_once_per_stretch(caplog):
    fraction = [0.75] * 150 + [0.0] + [0.6] * 120
    comp = Scripted(clipped_fraction=fraction)
    with caplog.at_level(logging.WARNING, logger="steadystep"):
        _run(ss.Monitor(comp, every=50, clip_patience=100), comp, len(fraction))
    msgs = _warnings(caplog)
    assert len(msgs) == 2, msgs
    assert "step 99" in msgs[0] and "over half" in msgs[0]
    assert "step 250" in msgs[1]


def test_short_clipping_bursts_not_reported(caplog):
    fraction = ([0.9] * 99 + [0.1]) * 3
    comp = Scripted(clipped_fraction=fraction)
    with caplog.at_level(logging.WARNING, logger="steadystep"):
        _run(ss.Monitor(comp, every=64), comp, len(fraction))
    assert _warnings(caplog) == []


def test_non_finite_stat_reported(caplog):
    comp = Scripted(mu1=[1.0, 1.0, math.nan, math.nan])
    with caplog.at_level(logging.WARNING, logger="steadystep"):
        _run(ss.Monitor(comp, every=10), comp, 4)
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "step 2" in msgs[0] and "nan" in msgs[0]


def test_log_fn_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = []
    comp = Scripted(value=[0.5, 1.5, 2.5])
    monitor = ss.Monitor(
        ("c", comp),
        every=2,
        tensorboard_dir=tmp_path / "tb",
        log_fn=lambda metrics, step: logged.append((step, metrics)),
    )
    _run(monitor, comp, 3)
    assert logged == [(0, {"c/value": 0.5}), (1, {"c/value": 1.5}), (2, {"c/value": 2.5})]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("c/value")
    assert [e.step for e in events] == [0, 1, 2]
    assert [e.value for e in events] == [0.5, 1.5, 2.5]


def test_explicit_step_numbers_used():
    comp = Scripted(x=[1.0])
    monitor = ss.Monitor(comp, every=2)
    for s in (10, 20, 30):
        monitor.step(step=s)
    monitor.close()
    assert [r["step"] for r in monitor.history] == [10, 20, 30]


def test_alarm_without_rollback_reported_as_alarm(caplog):
    # a guard with backtrack=False counts alarms but no rollbacks
    comp = Scripted(alarms=[0, 0, 0, 1], rollbacks=[0])
    with caplog.at_level(logging.WARNING, logger="steadystep"):
        _run(ss.Monitor(("guard", comp), every=2), comp, 5)
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "step 3" in msgs[0] and "raised an alarm" in msgs[0]


def test_guard_rollback_reported_once_as_rollback_and_lr_cut(caplog):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = ss.SALeRA(model.parameters(), lr=0.05, rho=0.5)
    monitor = ss.Monitor(("salera", opt), every=8)
    with caplog.at_level(logging.WARNING, logger="steadystep"):
        for step in range(12):
            x = torch.randn(16, 3)
            loss = model(x).pow(2).mean() + (50.0 if step == 9 else 0.0)
            opt.zero_grad()
            loss.backward()
            opt.step(loss=loss.detach())
            monitor.step()
        monitor.close()
    msgs = _warnings(caplog)
    assert int(opt.stats()["rollbacks"]) == 1
    assert len(msgs) == 2, msgs
    assert all("step 9" in m for m in msgs)
    assert "rolled back" in msgs[0] and "learning rate cut" in msgs[1]


def test_events_false_logs_nothing(caplog):
    """A plain log: the same rows, and no warning for its NaN gaps, alarms or LR cuts."""
    rows = [
        {"test_error": 0.5, "alarms": 0.0, "lr_0": 1.0},
        {"test_error": math.nan, "alarms": 1.0, "lr_0": 0.5},
    ]
    for events, expected in ((True, 3), (False, 0)):
        monitor = ss.Monitor(every=2, events=events)
        with caplog.at_level(logging.WARNING, logger="steadystep"):
            caplog.clear()
            for row in rows:
                monitor.step(**row)
            monitor.close()
        assert len(_warnings(caplog)) == expected
        assert [row["lr_0"] for row in monitor.history] == [1.0, 0.5]


# -- resume ------------------------------------------------------------------------------------


def _stabilized_run(model_seed=0):
    torch.manual_seed(model_seed)
    model = torch.nn.Linear(4, 1)
    opt = _stabilize(torch.optim.AdamW(model.parameters(), lr=1e-2), guard=ss.PageHinkley(1.0))
    return model, opt


def _monitored_steps(model, opt, monitor, start, stop):
    for step in range(start, stop):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 4, generator=g)
        per_sample = (model(x) - x.sum(1, keepdim=True)).pow(2).squeeze(1)
        if step == 70:
            per_sample = per_sample * 100.0  # clipped, and an alarm: the guard skips the batch
        loss = opt.clip(per_sample).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss=loss.detach())


def _events(caplog):
    """The Monitor's events ("steadystep: step N: ..."), not the guard's own reports."""
    return [m for m in _warnings(caplog) if m.startswith("steadystep: step ")]


def test_resumed_monitor_continues_the_csv_without_duplicate_or_missing_rows(tmp_path, caplog):
    every, steps, checkpoint, killed = 7, 100, 50, 64
    whole = tmp_path / "whole" / "monitor.csv"
    whole.parent.mkdir()
    model, opt = _stabilized_run()
    monitor = ss.Monitor(("opt", opt), every=every, csv_path=whole)
    with caplog.at_level(logging.WARNING, logger="steadystep"):
        _monitored_steps(model, opt, monitor, 0, steps)
        monitor.close()
    late_events = [m for m in _events(caplog) if int(m.split()[2].rstrip(":")) >= checkpoint]
    assert late_events  # the alarm after step 70 and its LR cut, at least

    path = tmp_path / "resumed" / "monitor.csv"
    path.parent.mkdir()
    model, opt = _stabilized_run()
    monitor = ss.Monitor(("opt", opt), every=every, csv_path=path)
    _monitored_steps(model, opt, monitor, 0, checkpoint)
    saved = {"model": model.state_dict(), "opt": opt.state_dict(), "monitor": monitor.state_dict()}
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    _monitored_steps(model, opt, monitor, checkpoint, killed)  # then killed: no close()
    assert len(read_csv(path)["step"]) > checkpoint  # rows the resumed run will write again
    del model, opt, monitor

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model, opt = _stabilized_run(model_seed=1)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    monitor = ss.Monitor(("opt", opt), every=every, csv_path=path)
    monitor.load_state_dict(saved["monitor"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="steadystep"):
        _monitored_steps(model, opt, monitor, checkpoint, steps)
        monitor.close()
    assert path.read_bytes() == whole.read_bytes()
    columns = read_csv(path)
    assert columns["step"] == [float(s) for s in range(steps)]
    assert columns["opt/guard/alarms"][-1] >= 1 and columns["opt/alrc/clipped_total"][-1] >= 1
    # the event scan resumes too: the same warnings, each once, under the nested component
    assert _events(caplog) == late_events
    assert any("guard raised an alarm" in m for m in late_events)  # a skipped batch


def test_monitor_resume_refuses_another_file_or_a_used_monitor(tmp_path):
    comp = Scripted(x=[1.0, 2.0, 3.0])
    path = tmp_path / "m.csv"
    monitor = ss.Monitor(("c", comp), every=2, csv_path=path)
    for _ in range(3):
        monitor.step()
    state = monitor.state_dict()
    assert state["count"] == 3 and state["csv_bytes"] == path.stat().st_size
    with pytest.raises(ValueError, match="fresh Monitor"):
        monitor.load_state_dict(state)
    with pytest.raises(ValueError, match="is missing"):
        ss.Monitor(("c", comp), csv_path=tmp_path / "other.csv").load_state_dict(state)
    path.write_text("step,y\n")
    with pytest.raises(ValueError, match="has 7"):
        ss.Monitor(("c", comp), csv_path=path).load_state_dict(state)
    with pytest.raises(ValueError, match="not a Monitor's"):
        ss.Monitor(("c", comp)).load_state_dict({"count": 1})


# -- one naming: a Stabilized's stats() keys are the column names --------------------------------


def _trained_stabilized(steps=3):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = _stabilize(torch.optim.AdamW(model.parameters(), lr=1e-2))
    for _ in range(steps):
        x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        loss = opt.clip(torch.nn.functional.cross_entropy(model(x), y, reduction="none")).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


def test_monitor_columns_of_a_stabilized_are_its_stats_keys():
    opt = _trained_stabilized()
    monitor = ss.Monitor(opt, every=2)
    monitor.step(loss=1.0)
    monitor.close()
    assert monitor.columns == ["step", "loss", *opt.stats()]
    named = ss.Monitor(("opt", opt), every=2)  # a name given is still a prefix
    named.step()
    named.close()
    assert named.columns[1:] == [f"opt/{k}" for k in opt.stats()]


# -- the guard reports its events through logging, without a Monitor ----------------------------


def _guard_run(opt, model, steps, spikes):
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(16, 3, generator=g)
        loss = model(x).pow(2).mean() + spikes.get(step, 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step(loss=loss.detach())


def _guard_reports(caplog):
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "steadystep" and "guard" in r.getMessage()
    ]


@pytest.mark.parametrize("path", ["host", "sync-free"])
def test_guard_logs_what_changed_since_its_last_report(path, caplog):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    inner = (
        torch.optim.SGD(model.parameters(), lr=0.01)  # the host path: its decision read per step
        if path == "host"
        else ss.ALeRA(model.parameters(), lr=0.01)  # maskable: decided on the device
    )
    opt = ss.CatastropheGuard(inner, ss.PageHinkley(ph_lambda=0.5, rho=0.1), check_every=10)
    assert opt._device_side == (path == "sync-free")
    # a bad batch at 13 (skipped), a bad update at 24-25 (skipped, then rolled back and cut)
    with caplog.at_level(logging.INFO, logger="steadystep"):
        _guard_run(opt, model, 40, {13: 100.0, 24: 100.0, 25: 100.0})
    stats = opt.stats()
    assert int(stats["rollbacks"]) >= 1 and int(stats["skips"]) >= 2
    msgs = _guard_reports(caplog)
    assert msgs, "the guard logged nothing"
    assert "steps 10-19: guard rolled back 0, skipped 1 batch" in msgs[0]
    if path == "sync-free":  # only at the periodic min_lr check, every check_every steps
        assert all(re.search(r"steps \d+-\d9:", m) for m in msgs), msgs
    # every event reported once: the reports add up to the counters
    rolled = sum(int(re.search(r"rolled back (\d+)", m).group(1)) for m in msgs)
    skipped = sum(int(re.search(r"skipped (\d+) batch", m).group(1)) for m in msgs)
    assert (rolled, skipped) == (int(stats["rollbacks"]), int(stats["skips"]))
    assert f"lr_scale {float(stats['lr_scale']):g}" in msgs[-1]


def test_a_calm_guard_logs_nothing(caplog):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = ss.CatastropheGuard(torch.optim.SGD(model.parameters(), lr=0.01), check_every=5)
    with caplog.at_level(logging.INFO, logger="steadystep"):
        _guard_run(opt, model, 30, {})
    assert int(opt.stats()["alarms"]) == 0 and _guard_reports(caplog) == []
