"""A real lightning.Trainer on CPU with steadystep optimizers and ALRC: the loss reaches the
guard in every precision (the closure path of "32-true", the GradScaler path of "16-mixed"), a
scripted spike is rolled back, stats reach the logger, and a step the GradScaler skips updates no
statistic. ss.stabilize (ALRC + guard + CProp) checkpointed by ModelCheckpoint and resumed with
ckpt_path= matches the uninterrupted run bitwise."""

from __future__ import annotations

import csv
import logging

import pytest
import torch

pytest.importorskip("lightning")
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import MixedPrecision

import steadystep as ss
from steadystep.integrations.lightning import DataPosition, LossFeeder, StatsLogger

SPIKE_STEP = 12


def _stabilize(*args, **kwargs):
    """ss.stabilize with ALRC on (opt-in since the clean-run benchmark): these tests exercise
    ALRC inside the composition; a test of the defaults calls ss.stabilize itself."""
    return ss.stabilize(*args, **{"alrc": True, **kwargs})


class _InfGrad(torch.autograd.Function):
    """Identity forward; an inf gradient backward (a finite loss whose gradients overflow)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class Tiny(L.LightningModule):
    def __init__(self, make_opt, spike_step=None, inf_grad_step=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        self.alrc = ss.ALRC(beta1=0.9, beta2=0.9)
        self.make_opt = make_opt
        self.spike_step = spike_step
        self.inf_grad_step = inf_grad_step
        self.seen_losses = []
        self.alrc_before_inf = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.global_step == self.inf_grad_step:
            self.alrc_before_inf = (self.alrc.mu1.clone(), self.alrc.mu2.clone())
        out = self.net(x)
        if self.global_step == self.inf_grad_step:
            out = _InfGrad.apply(out)
        per_sample = (out - y).pow(2).squeeze(1)
        loss = self.alrc(per_sample).mean()
        if self.global_step == self.spike_step:
            loss = loss + 100.0  # the loss jumps; gradients stay sane: a job for the guard
        self.seen_losses.append(loss.detach().float())
        return loss

    def configure_optimizers(self):
        return self.make_opt(self)


def _loader(n=24 * 8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(dim=1, keepdim=True) * 0.5
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _precision(precision):
    """Lightning turns precision="16-mixed" into "bf16-mixed" on CPU (no GradScaler); the fp16
    plugin with its GradScaler is what runs on a GPU, and runs on CPU when given explicitly."""
    if precision == "16-mixed":
        # a modest initial scale: no overflow (and skipped step) at the start
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    return {"precision": precision}


def _fit(module, tmp_path, precision="32-true", max_steps=20, callbacks=None, **kw):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        **_precision(precision),
        logger=CSVLogger(tmp_path, name="lt"),
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[LossFeeder(), StatsLogger()] if callbacks is None else callbacks,
        **kw,
    )
    trainer.fit(module, _loader())
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler is not None
    return trainer


def _logged(trainer):
    path = trainer.logger.log_dir + "/metrics.csv"
    with open(path) as f:
        return list(csv.DictReader(f))


def _salera(module):
    # Delta = first loss: fp16 noise never alarms, the +100 spike does
    return ss.SALeRA(ss.layer_groups(module.net), lr=0.05, rho=0.5, ph_lambda=1.0)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_salera_rolls_back_a_spike_and_stats_are_logged(precision, tmp_path, caplog):
    module = Tiny(_salera, spike_step=SPIKE_STEP)
    with caplog.at_level(logging.WARNING, logger="steadystep"):
        trainer = _fit(module, tmp_path, precision=precision)
    opt = trainer.optimizers[0]
    stats = opt.stats()
    assert int(stats["steps"]) == 20
    assert int(stats["rollbacks"]) == 1
    assert opt.history()[0]["step"] == SPIKE_STEP
    assert float(stats["lr_scale"]) == 0.5
    # the guard saw exactly the training losses (the detector's threshold is ph_lambda * first loss)
    torch.testing.assert_close(
        stats["detector_threshold"], 1.0 * module.seen_losses[0], rtol=1e-6, atol=0
    )
    rows = _logged(trainer)
    names = set(rows[0])
    assert {"steadystep/salera/rollbacks", "steadystep/alrc/threshold"} <= names
    rollbacks = {
        int(r["step"]): float(r["steadystep/salera/rollbacks"])
        for r in rows
        if r.get("steadystep/salera/rollbacks")
    }
    assert rollbacks[SPIKE_STEP] == 0 and rollbacks[SPIKE_STEP + 1] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("rolled back" in m and f"step {SPIKE_STEP + 1}" in m for m in warnings), warnings


def test_16_mixed_without_feeder_says_how_to_pass_the_loss(tmp_path):
    # the precision plugin runs the closure itself and calls step() with no loss
    module = Tiny(_salera)
    with pytest.raises(RuntimeError, match="observe_loss"):
        _fit(module, tmp_path, precision="16-mixed", max_steps=2, callbacks=[])


def test_scaler_skipped_step_updates_no_statistic(tmp_path):
    inf_step = 8
    module = Tiny(_salera, inf_grad_step=inf_step)
    trainer = _fit(module, tmp_path, precision="16-mixed", max_steps=12)
    opt = trainer.optimizers[0]
    # GradScaler skipped one optimizer.step(): the guard stepped one time less, no alarm
    assert int(opt.stats()["steps"]) == 11
    assert int(opt.stats()["alarms"]) == 0
    assert int(module.alrc.num_updates) == 11
    # the ALRC moments after step 8 are those of before it (restored on the device)
    rows = trainer.callbacks[-1].monitor.history  # StatsLogger is last
    by_step = {r["step"]: r for r in rows}
    assert by_step[inf_step + 1]["alrc/mu1"] == by_step[inf_step]["alrc/mu1"]
    assert by_step[inf_step + 1]["alrc/mu1"] == float(module.alrc_before_inf[0])


def test_alrc_with_adamw_and_accumulation_feeds_window_mean(tmp_path):
    observed = []

    class Recording(torch.optim.AdamW):
        def observe_loss(self, loss):
            observed.append(loss.clone())

    module = Tiny(lambda m: Recording(m.parameters(), lr=1e-2))
    trainer = _fit(module, tmp_path, max_steps=4, accumulate_grad_batches=2)
    assert trainer.global_step == 4
    # fed once per micro-batch with the running sum of loss / 2: the last one of each window is
    # the mean loss of the step
    assert len(observed) == 8
    for k in range(4):
        mean = (module.seen_losses[2 * k] + module.seen_losses[2 * k + 1]) / 2
        torch.testing.assert_close(observed[2 * k + 1], mean)
    assert int(module.alrc.num_updates) == 8
    rows = _logged(trainer)
    assert any(r.get("steadystep/alrc/mu1") for r in rows)


# -- ss.stabilize: ALRC + guard + CProp, checkpointed by Lightning and resumed -----------------

STABLE_SPIKES = (4, 13)  # one before the checkpoint at step 10, one after it


def _step_batch(step):
    """The batch of a step, a function of the step: Lightning restarts a plain DataLoader on
    resume (from an epoch-end checkpoint it even replays a batch), which is its business, not
    what this test is about."""
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(8, 4, generator=g)
    return x, x.sum(dim=1, keepdim=True) * 0.5


class Stable(L.LightningModule):
    """A regression net whose training_step clips through the optimizer (ss.stabilize)."""

    def __init__(self, seed=0, inf_grad_step=None):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        self.raw_losses = {}
        self.inf_grad_step = inf_grad_step

    def training_step(self, batch, batch_idx):
        x, y = _step_batch(self.global_step)
        out = self.net(x)
        if self.global_step == self.inf_grad_step:
            out = _InfGrad.apply(out)
        per_sample = (out - y).pow(2).squeeze(1)
        if self.global_step in STABLE_SPIKES:
            per_sample = per_sample * 100.0  # a corrupted batch: clipped, and an alarm
        self.raw_losses[self.global_step] = per_sample.detach().mean()
        return self.optimizers().clip(per_sample).mean()

    def configure_optimizers(self):
        return _stabilize(
            torch.optim.AdamW(self.parameters(), lr=0.02),
            # one rollback per spike (SALeRA's response): this file tests the integration
            guard={"detector": ss.PageHinkley(ph_lambda=1.0), "response": "rollback"},
            cprop=True,  # opt-in since the recipe's defaults; this file tests all three
            batch_size=8,
            dataset_size=64,
        )


def _stable_trainer(tmp_path, callbacks, max_steps=24, precision="32-true"):
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        **_precision(precision),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=tmp_path,
        callbacks=callbacks,
        deterministic=True,
    )


def _stable_loader():
    return _loader(n=64)  # 8 batches an epoch (their content is _step_batch's)


# the data is a function of the step (see _step_batch): the restarted loader does not matter
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_stabilize_checkpointed_by_lightning_resumes_bitwise(tmp_path):
    checkpoints = tmp_path / "ckpt"
    whole = Stable()
    saver = ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=10, save_top_k=-1)
    trainer = _stable_trainer(tmp_path, [LossFeeder(), StatsLogger(every=4), saver])
    trainer.fit(whole, _stable_loader())
    opt = trainer.optimizers[0]
    assert isinstance(opt, ss.Stabilized) and isinstance(opt.cprop, ss.CPropAdamW)
    stats = opt.stats()
    assert int(stats["guard/steps"]) == 24 and int(stats["alrc/num_updates"]) == 24
    history = opt.guard.history()
    assert [h["step"] for h in history] == list(STABLE_SPIKES)
    # the guard watched the raw losses (the spikes unclipped), not training_step's result
    for h in history:
        assert h["loss"] == pytest.approx(float(whole.raw_losses[h["step"]]), rel=1e-6)
    assert int(stats["alrc/clipped_total"]) >= 8
    logged = trainer.callbacks[-2].monitor.history  # StatsLogger: the stats() keys
    assert logged[-1]["guard/rollbacks"] == 2

    (ckpt,) = checkpoints.glob("*step=10.ckpt")  # mid-epoch, Lightning's own checkpoint
    resumed = Stable(seed=1)  # other weights: they must come from the checkpoint
    trainer_b = _stable_trainer(tmp_path, [LossFeeder()])
    trainer_b.fit(resumed, _stable_loader(), ckpt_path=ckpt)
    assert trainer_b.global_step == 24
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    opt_b = trainer_b.optimizers[0]
    assert [h["step"] for h in opt_b.guard.history()] == list(STABLE_SPIKES)
    resumed_stats = opt_b.stats(per_parameter=True)
    for key, value in opt.stats(per_parameter=True).items():  # CProp's statistics too
        torch.testing.assert_close(value, resumed_stats[key], rtol=0, atol=0, msg=key)


def test_stabilize_under_16_mixed_a_skipped_step_leaves_alrc_and_the_loss_window(tmp_path):
    inf_step = 13  # also a spike: its raw loss is 100x
    module = Stable(inf_grad_step=inf_step)
    trainer = _stable_trainer(
        tmp_path, [LossFeeder()], max_steps=inf_step + 2, precision="16-mixed"
    )
    trainer.fit(module, _stable_loader())
    opt = trainer.optimizers[0]
    stats = opt.stats()
    # GradScaler skipped the step of the inf gradient: no guard step, no ALRC update kept
    assert int(stats["guard/steps"]) == inf_step + 1
    assert int(stats["alrc/num_updates"]) == inf_step + 1
    # and its raw loss was forgotten: the guard's last loss is the last step's alone
    last = float(module.raw_losses[inf_step + 1])
    assert float(opt.guard.detector.last_loss) == pytest.approx(last, rel=1e-3)
    assert [h["step"] for h in opt.guard.history()] == [STABLE_SPIKES[0]]


class _Captured(L.pytorch.loggers.Logger):
    """A logger that keeps what it is sent."""

    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def name(self):
        return "captured"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))


def test_logged_names_are_the_stats_keys_under_one_prefix(tmp_path):
    # one naming (docs/integrations.md): opt.stats() keys, and "steadystep/" for a logger
    logger = _Captured()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=logger,
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[LossFeeder(), StatsLogger()],
    )
    trainer.fit(Stable(), _stable_loader())
    keys = trainer.optimizers[0].stats()
    names = {k for m in logger.metrics for k in m if k.startswith("steadystep/")}
    assert names == {f"steadystep/{k}" for k in keys}


# -- skipping data: a SkippableSampler, an escalation, a real Trainer ----------------------------

BAD = range(60, 75)  # global batches whose inputs are corrupted (x100): a stretch of bad data
SKIP_STEPS = 100


def _whole_batches(batch):
    return batch  # _Indexed.__getitems__ builds the batch itself


class _Indexed(torch.utils.data.Dataset):
    """test_escalation's teacher task, 400 batches of 32 (the runs stay in epoch 0), fetched a
    batch at a time; each batch carries its samples' indices, so the global batch trained on is
    known; the inputs of the batches in BAD are x100."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(400 * 32, 20, generator=g)
        torch.manual_seed(123)
        teacher = torch.nn.Sequential(
            torch.nn.Linear(20, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
        )
        with torch.no_grad():
            self.y = teacher(2 * self.x).argmax(1)

    def __len__(self):
        return len(self.x)

    def __getitems__(self, indices):
        index = torch.tensor(indices)
        scale = torch.where((index // 32 >= BAD[0]) & (index // 32 <= BAD[-1]), 100.0, 1.0)
        return self.x[index] * scale[:, None], self.y[index], index


def _indexed_loader(**kwargs):
    return torch.utils.data.DataLoader(_Indexed(), collate_fn=_whole_batches, **kwargs)


class Skipping(L.LightningModule):
    """A teacher-student MLP trained through ss.stabilize with an escalation whose sampler is
    the train dataloader's: a SkippableSampler (its batch_sampler) or a SkippableIterable (the
    loader itself, around a plain DataLoader)."""

    def __init__(self, seed=0, source="sampler", escalate=True):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
        )
        if source == "sampler":
            self.sampler = ss.SkippableSampler(400 * 32, batch_size=32, shuffle=False)
            self.loader = _indexed_loader(batch_sampler=self.sampler)
        else:
            self.sampler = self.loader = ss.SkippableIterable(_indexed_loader(batch_size=32))
        self.escalate = escalate
        self.trained = []  # the global batch of each training step

    def train_dataloader(self):
        return self.loader

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        self.trained.append(int(index[0]) // 32)
        per_sample = torch.nn.functional.cross_entropy(self.net(x), y, reduction="none")
        return self.optimizers().clip(per_sample).mean()

    def configure_optimizers(self):
        ring = ss.Escalation(every=10, keep=2, sampler=self.sampler) if self.escalate else None
        return ss.stabilize(
            torch.optim.AdamW(self.parameters(), lr=1e-2), model=self, escalation=ring
        )


def _skip_trainer(tmp_path, callbacks, max_steps=SKIP_STEPS):
    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.parametrize(
    "source,resume_at", [("sampler", (50, 90)), ("iterable", (90,))], ids=["sampler", "iterable"]
)
def test_an_escalation_skips_the_bad_stretch_and_a_checkpoint_resumes_it_bitwise(
    source, resume_at, tmp_path
):
    """A real Trainer: the stretch of bad batches escalates, the source skips the rest of it,
    training finishes; resumed from a checkpoint before the stretch (the escalation happens in
    the resumed run) or after it (the window comes back with the optimizer's state), the run is
    the uninterrupted one: the same batches, the same weights to the last bit."""
    checkpoints = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=10, save_top_k=-1)
    whole = Skipping(source=source)
    trainer = _skip_trainer(tmp_path, [DataPosition(), saver])
    trainer.fit(whole)
    assert trainer.global_step == SKIP_STEPS
    if source == "sampler":  # Lightning kept the batch_sampler
        assert trainer.train_dataloader.batch_sampler is whole.sampler
    (record,) = trainer.optimizers[0].guard.escalation.history
    assert record["restored_to"] == BAD[0]
    start, stop = record["skipped"]
    assert start <= BAD[-1] < stop and whole.sampler.windows == [(start, stop)]
    assert whole.trained == [b for b in range(SKIP_STEPS + stop - start) if not start <= b < stop]
    for at in resume_at:
        (ckpt,) = checkpoints.glob(f"*step={at}.ckpt")
        resumed = Skipping(seed=1, source=source)  # other weights: they come from the checkpoint
        _skip_trainer(tmp_path, [DataPosition()]).fit(resumed, ckpt_path=ckpt)
        assert resumed.sampler.windows == [(start, stop)]
        assert resumed.trained == whole.trained[at:], at
        for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
            assert torch.equal(p, q), at


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
@pytest.mark.parametrize("mark", [True, False], ids=["DataPosition", "no-callback"])
def test_data_position_keeps_the_batch_lightning_prefetched(mark, tmp_path):
    """Lightning draws one batch ahead of an unsized loader (a SkippableIterable): with
    DataPosition the checkpoint resumes at the batch in flight; without it that batch is lost."""
    checkpoints = tmp_path / "ckpt"
    saver = ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=5, save_top_k=-1)
    callbacks = [DataPosition()] if mark else []
    whole = Skipping(source="iterable")
    _skip_trainer(tmp_path, [*callbacks, saver], max_steps=10).fit(whole)
    (ckpt,) = checkpoints.glob("*step=5.ckpt")
    resumed = Skipping(source="iterable")
    _skip_trainer(tmp_path, callbacks, max_steps=10).fit(resumed, ckpt_path=ckpt)
    assert whole.trained == list(range(10))
    assert resumed.trained == (list(range(5, 10)) if mark else list(range(6, 11)))


def test_a_distributed_sampler_is_not_injected_into_a_skippable_sampler():
    """Under DDP Lightning (use_distributed_sampler=True) rebuilds a batch sampler around a
    DistributedSampler; SkippableSampler shards by itself and says what to set."""
    from lightning.pytorch.utilities.data import _update_dataloader

    data = torch.utils.data.TensorDataset(torch.arange(40.0))
    loader = torch.utils.data.DataLoader(data, batch_sampler=ss.SkippableSampler(40, batch_size=4))
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=0)
    with pytest.raises(TypeError, match=r"Trainer\(use_distributed_sampler=False\)"):
        _update_dataloader(loader, sampler)
