"""A real transformers.Trainer on a tiny randomly initialised BERT (built from a config, no hub
download): ALRC on per-sample losses, a CatastropheGuard fed the loss, an LR schedule that does not
advance on the skipped step and keeps the cut, stats in the logs, ALRC state in checkpoints."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import steadystep as ss
from steadystep.integrations.transformers import (
    SkipAwareScheduler,
    SteadystepTrainer,
    default_per_sample_loss,
)

SPIKE_STEP = 6
MAX_STEPS = 10
LR = 1e-3


def _stabilize(*args, **kwargs):
    """ss.stabilize with ALRC on (opt-in since the clean-run benchmark): these tests exercise
    ALRC inside the composition; a test of the defaults calls ss.stabilize itself."""
    return ss.stabilize(*args, **{"alrc": True, **kwargs})


def _model(**config: Any):
    """A two-layer BERT of width 16 (``config`` overrides: ``num_labels=1`` for regression)."""
    torch.manual_seed(0)
    config = BertConfig(
        **{
            "vocab_size": 50,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 16,
            "num_labels": 2,
            **config,
        }
    )
    return BertForSequenceClassification(config)


def _data(n=8 * MAX_STEPS):
    g = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(0, 50, (8,), generator=g), "labels": torch.tensor(i % 2)}
        for i in range(n)
    ]


class SpikyLoss:
    """The default per-sample loss plus 100 at one training call (a corrupted batch)."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, outputs, labels):
        loss = default_per_sample_loss(outputs, labels)
        if outputs.logits.requires_grad:  # training calls only
            if self.calls == self.at:
                loss = loss + 100.0
            self.calls += 1
        return loss


def _guarded_adamw(model):
    base = torch.optim.AdamW(model.parameters(), lr=LR)
    return ss.CatastropheGuard(base, ss.PageHinkley(ph_lambda=0.5, rho=0.5))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=8,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    alrc = ss.ALRC(beta1=0.9, beta2=0.9)
    monitor = ss.Monitor(alrc, every=4)
    trainer = SteadystepTrainer(
        model=_model(),
        args=args,
        train_dataset=_data(),
        eval_dataset=_data(16),
        alrc=alrc,
        per_sample_loss=SpikyLoss(at=SPIKE_STEP),
        optimizer_factory=_guarded_adamw,
        monitor=monitor,
    )
    trainer.train()
    return trainer, out


def test_guard_rolls_back_the_spike_and_alrc_clips_it(trained):
    trainer, _ = trained
    guard = trainer.steadystep_optimizer
    assert isinstance(guard, ss.CatastropheGuard)
    stats = guard.stats()
    assert int(stats["steps"]) == MAX_STEPS
    assert int(stats["alarms"]) == 1
    assert guard.history()[0]["step"] == SPIKE_STEP
    assert int(trainer.alrc.num_updates) == MAX_STEPS
    rows = {r["step"]: r for r in trainer.monitor.history}
    assert rows[SPIKE_STEP + 1]["alrc/clipped_fraction"] == 1.0  # Monitor steps are 1-based
    assert rows[SPIKE_STEP]["alrc/clipped_fraction"] < 1.0
    # the guard watched the raw loss (the spike of +100 per sample), not ALRC's clipped one
    assert guard.history()[0]["loss"] > 100.0


def test_scheduler_did_not_advance_on_the_skipped_step_and_kept_the_cut(trained):
    trainer, _ = trained
    sched = trainer.lr_scheduler
    assert isinstance(sched, SkipAwareScheduler)
    assert sched.skipped_steps == 1
    assert sched.scheduler.last_epoch == MAX_STEPS - 1  # one step fewer than optimizer calls
    assert sched.scheduler.base_lrs == [LR * 0.5]
    # linear decay over MAX_STEPS, evaluated at step MAX_STEPS - 1, with the cut
    expected = LR * 0.5 * (MAX_STEPS - (MAX_STEPS - 1)) / MAX_STEPS
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)


def test_stats_in_trainer_logs(trained):
    trainer, _ = trained
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all("steadystep/alrc/threshold" in h for h in logs)
    # one naming (docs/integrations.md): <component>/<stat>, the class name in lower case
    assert all("steadystep/catastropheguard/alarms" in h for h in logs)
    assert logs[-1]["steadystep/catastropheguard/alarms"] == 1.0


def test_eval_leaves_alrc_and_guard_alone_and_checkpoint_carries_alrc(trained, tmp_path):
    trainer, _ = trained
    before = {k: v.clone() for k, v in trainer.alrc.state_dict().items()}
    steps = int(trainer.steadystep_optimizer.stats()["steps"])
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics
    after = trainer.alrc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert int(trainer.steadystep_optimizer.stats()["steps"]) == steps
    assert not trainer.alrc.training  # follows the model: eval mode, the identity
    # ALRC moments go with the optimizer and scheduler into a checkpoint and come back
    trainer._save_optimizer_and_scheduler(str(tmp_path))
    assert os.path.isfile(tmp_path / "steadystep_alrc.pt")
    fresh = ss.ALRC(beta1=0.9, beta2=0.9)
    saved_alrc, trainer.alrc = trainer.alrc, fresh
    try:
        trainer._load_optimizer_and_scheduler(str(tmp_path))
        assert all(torch.equal(before[k], fresh.state_dict()[k]) for k in before)
    finally:
        trainer.alrc = saved_alrc


# -- ss.stabilize: ALRC + guard + CProp, save_steps checkpoints and resume_from_checkpoint -------

STABLE_SPIKES = (3, 7)  # before and after the checkpoint at step 5


def _stable_model(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


class StepSpikes:
    """The default per-sample loss, 100x at the steps in STABLE_SPIKES (by the trainer's
    global_step, which a resumed trainer restores)."""

    def __init__(self):
        self.trainer = None
        self.raw = {}

    def __call__(self, outputs, labels):
        loss = default_per_sample_loss(outputs, labels)
        if outputs.logits.requires_grad:  # training calls only
            step = self.trainer.state.global_step
            if step in STABLE_SPIKES:
                loss = loss * 100.0
            self.raw[step] = loss.detach().mean()
        return loss


def _stable_trainer(out, seed=0):
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=8,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        logging_steps=2,
        report_to=[],
        save_strategy="steps",
        save_steps=5,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    spikes = StepSpikes()
    trainer = SteadystepTrainer(
        model=_stable_model(seed),
        args=args,
        train_dataset=_data(),
        per_sample_loss=spikes,
        optimizer_factory=lambda m: _stabilize(
            torch.optim.AdamW(m.parameters(), lr=LR),
            guard={"detector": ss.PageHinkley(ph_lambda=0.5)},
            cprop=True,  # opt-in since the recipe's defaults; this file tests all three
            batch_size=8,
            dataset_size=8 * MAX_STEPS,
        ),
    )
    spikes.trainer = trainer
    return trainer, spikes


def test_stabilize_checkpointed_by_the_trainer_resumes_bitwise(tmp_path):
    whole, spikes = _stable_trainer(tmp_path / "whole")
    whole.train()
    opt = whole.steadystep_optimizer
    assert isinstance(opt, ss.Stabilized) and isinstance(opt.cprop, ss.CPropAdamW)
    stats = opt.stats()
    assert int(stats["guard/steps"]) == MAX_STEPS
    assert int(stats["alrc/num_updates"]) == MAX_STEPS
    history = opt.guard.history()
    assert [h["step"] for h in history] == list(STABLE_SPIKES)
    for h in history:  # the guard saw the raw (unclipped) losses
        assert h["loss"] == pytest.approx(float(spikes.raw[h["step"]]), rel=1e-6)
    assert int(stats["alrc/clipped_total"]) >= 8
    assert whole.lr_scheduler.skipped_steps == len(STABLE_SPIKES)  # found the guard inside
    logs = [h for h in whole.state.log_history if "loss" in h]
    assert logs[-1]["steadystep/guard/alarms"] == len(STABLE_SPIKES)
    # one naming (docs/integrations.md): opt.stats() keys under "steadystep/", as in Lightning
    assert {k for k in logs[-1] if k.startswith("steadystep/")} == {
        f"steadystep/{k}" for k in stats
    }

    checkpoint = tmp_path / "whole" / "checkpoint-5"
    assert (checkpoint / "optimizer.pt").is_file()
    resumed, _ = _stable_trainer(tmp_path / "resumed", seed=1)  # weights from the checkpoint
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for p, q in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)
    opt_b = resumed.steadystep_optimizer
    assert [h["step"] for h in opt_b.guard.history()] == list(STABLE_SPIKES)
    resumed_stats = opt_b.stats(per_parameter=True)
    for key, value in opt.stats(per_parameter=True).items():  # CProp's statistics too
        torch.testing.assert_close(value, resumed_stats[key], rtol=0, atol=0, msg=key)
    assert resumed.lr_scheduler.state_dict() == whole.lr_scheduler.state_dict()


def test_alrc_twice_is_refused(tmp_path):
    args = TrainingArguments(
        str(tmp_path), max_steps=1, report_to=[], save_strategy="no", use_cpu=True
    )
    trainer = SteadystepTrainer(
        model=_stable_model(),
        args=args,
        train_dataset=_data(8),
        alrc=ss.ALRC(),
        optimizer_factory=lambda m: _stabilize(torch.optim.AdamW(m.parameters())),
    )
    with pytest.raises(ValueError, match="drop alrc="):
        trainer.train()


# -- skipping data: escalation=, a SkippableSampler the Trainer builds -----------------------

BAD = range(30, 38)  # global batches whose labels are corrupted (100 instead of about +-1)
ESC_STEPS = 60


def _regression_model():
    return _model(num_labels=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _regression_data(n=8 * 120):
    """A learnable target (the mean of the first four ids); the items of BAD's batches (in the
    sequential order) carry a corrupted label."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        ids = torch.randint(0, 50, (8,), generator=g)
        y = 100.0 if i // 8 in BAD else float(ids[:4].float().mean() / 25 - 1)
        items.append({"input_ids": ids, "labels": torch.tensor(y)})
    return items


class _Recording:
    """The default per-sample loss; records the global batch of each training call."""

    def __init__(self):
        self.trainer, self.trained = None, []

    def __call__(self, outputs, labels):
        if outputs.logits.requires_grad:
            self.trained.append(self.trainer.skippable.position - 1)
        return default_per_sample_loss(outputs, labels)


def _escalating_trainer(out, max_steps=ESC_STEPS, save_steps=None):
    esc = ss.Escalation(every=5, keep=2, skip_ahead=10)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        train_sampling_strategy="sequential",
    )
    loss = _Recording()
    trainer = SteadystepTrainer(
        model=_regression_model(),
        args=args,
        train_dataset=_regression_data(),
        per_sample_loss=loss,
        escalation=esc,
        optimizer_factory=lambda m: ss.stabilize(
            torch.optim.AdamW(m.parameters(), lr=1e-3), model=m, escalation=esc
        ),
    )
    loss.trainer = trainer
    return trainer, esc, loss


def test_an_escalation_skips_the_bad_stretch_and_resumes_from_a_checkpoint(tmp_path):
    trainer, esc, loss = _escalating_trainer(tmp_path / "a", save_steps=20)
    trainer.train()
    assert trainer.state.global_step == ESC_STEPS
    assert isinstance(trainer.skippable, ss.SkippableSampler) and esc.sampler is trainer.skippable
    (record,) = esc.history
    assert record["restored_to"] == BAD[0]
    start, stop = record["skipped"]
    assert start <= BAD[-1] < stop and trainer.skippable.windows == [(start, stop)]
    assert loss.trained == [b for b in range(ESC_STEPS + stop - start) if not start <= b < stop]
    # resumed after the escalation: the window and the position come with optimizer.pt, the
    # Trainer does not fast-forward on its own, and the run ends as the uninterrupted one
    resumed, esc_b, loss_b = _escalating_trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-40"))
    assert resumed.skippable.windows == [(start, stop)]
    assert loss_b.trained == loss.trained[40:]
    assert [h["step"] for h in esc_b.history] == [record["step"]]
    for p, q in zip(trainer.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_escalation_needs_the_guard_it_is_in_and_max_steps(tmp_path):
    args = TrainingArguments(str(tmp_path), max_steps=2, report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="without a sampler"):
        SteadystepTrainer(model=_model(), args=args, escalation=ss.Escalation())
    esc = ss.Escalation()
    trainer = SteadystepTrainer(
        model=_model(),
        args=args,
        train_dataset=_data(16),
        escalation=esc,
        optimizer_factory=lambda m: ss.stabilize(torch.optim.AdamW(m.parameters())),
    )
    with pytest.raises(ValueError, match="with another escalation"):
        trainer.train()
    epochs = TrainingArguments(str(tmp_path), num_train_epochs=1, report_to=[], use_cpu=True)
    trainer = SteadystepTrainer(
        model=_model(),
        args=epochs,
        train_dataset=_data(16),
        escalation=ss.Escalation(),
        optimizer_factory=lambda m: m,
    )
    with pytest.raises(ValueError, match=r"set TrainingArguments\(max_steps=...\)"):
        trainer.train()


class _Stream(torch.utils.data.IterableDataset):
    """The same items as an iterable dataset (one pass in order, the same on every pass)."""

    def __init__(self) -> None:
        self.items = _regression_data()

    def __iter__(self):
        return iter(self.items)


def test_an_escalation_on_an_iterable_dataset_skips_through_a_skippable_iterable(tmp_path):
    """An IterableDataset: the Trainer's own loader is wrapped in a SkippableIterable, which the
    escalation tells what to skip, as the sampler of a map-style dataset."""
    trainer, esc, loss = _escalating_trainer(tmp_path)
    trainer.train_dataset = _Stream()
    trainer.train()
    assert trainer.state.global_step == ESC_STEPS
    assert isinstance(trainer.skippable, ss.SkippableIterable) and esc.sampler is trainer.skippable
    (record,) = esc.history
    assert record["restored_to"] == BAD[0]
    start, stop = record["skipped"]
    assert start <= BAD[-1] < stop
    assert not set(loss.trained) & set(range(start, stop))
