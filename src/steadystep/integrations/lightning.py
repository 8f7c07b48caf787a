"""Lightning callbacks: feed the loss to loss-needing optimizers, log steadystep statistics.

Return steadystep optimizers from ``configure_optimizers`` as any other; add the callbacks::

    trainer = lightning.Trainer(callbacks=[LossFeeder(), StatsLogger()], ...)

With all three methods, return ``ss.stabilize(...)`` and clip the per-sample losses through it in
``training_step``, so that the guard watches the raw loss while the gradient comes from the
clipped one (a guard fed ALRC's clipped loss misses the catastrophes it is for)::

    def training_step(self, batch, batch_idx):
        x, y = batch
        per_sample = F.cross_entropy(self.net(x), y, reduction="none")
        return self.optimizers().clip(per_sample).mean()

    def configure_optimizers(self):
        return ss.stabilize(torch.optim.AdamW(self.parameters(), lr=1e-3),
                            batch_size=32, dataset_size=len(self.train_set))

Its one ``state_dict`` (ALRC's moments, the guard, CProp, AdamW) goes into Lightning's checkpoints,
and ``trainer.fit(..., ckpt_path=...)`` resumes it bitwise.

* :class:`LossFeeder` passes each training loss to every optimizer that has ``observe_loss``
  (SALeRA, SPALeRA, a ``CatastropheGuard``, a ``Stabilized``, where the raw loss remembered by
  its ``clip()`` wins) from ``on_before_backward``, which Lightning calls in
  every precision, including ``precision="16-mixed"`` where the precision plugin runs the closure
  itself and then calls ``optimizer.step()`` with no closure and no loss (the hook receives the
  loss multiplied by the GradScaler's scale there; it is divided back). It also makes a step
  that the GradScaler skips leave ALRC's moments untouched, the model's and a ``Stabilized``
  optimizer's alike (see :mod:`steadystep.integrations.amp`).
* :class:`StatsLogger` records the ``stats()`` of the trainer's optimizers and of every
  submodule of the LightningModule that has one (ALRC) with a :class:`~steadystep.Monitor`, and
  sends them to the trainer's loggers every ``log_every_n_steps`` steps (one host read then).

* :class:`DataPosition` tells a :class:`~steadystep.SkippableSampler` (a DataLoader's
  ``batch_sampler``) or a :class:`~steadystep.SkippableIterable` (the train dataloader itself)
  which batches were trained on: Lightning draws one batch ahead of ``training_step``, and
  without it a checkpoint would resume after the batch in flight (Note [batches drawn ahead] in
  :mod:`steadystep.data`).

Skipping data (``ss.Escalation(sampler=...)``, Note [escalation]): build the DataLoader with
``batch_sampler=ss.SkippableSampler(...)`` and hand the same sampler to the escalation of the
optimizer ``configure_optimizers`` returns; add :class:`DataPosition`. Lightning keeps a custom
``batch_sampler`` in a single process; under DDP set ``Trainer(use_distributed_sampler=False)``
(the sampler takes each rank's share of every global batch itself; Lightning would try to build
it around a DistributedSampler, which it refuses). The sampler's position and skip windows are
saved in the optimizer's state, so ``trainer.fit(..., ckpt_path=...)`` resumes them, with the
batches (Lightning warns that the DataLoader is not resumable: it does not see that state).
The batches and the weights of the resumed run are the uninterrupted run's, to the last bit
(``tests/test_lightning.py``). Lightning's *epoch* bookkeeping is not: after a resume from a
checkpoint taken mid-epoch, Lightning reads ``len(loader)`` once, as the batches left in the
sampler's epoch, while it counts the batches already trained in that epoch too, so its epochs
end before the sampler's and ``current_epoch``, epoch-end hooks, validation at epoch ends and
per-epoch schedulers fall at other batches than in the uninterrupted run. Resume from
end-of-epoch checkpoints, or train by steps, when that matters. A
:class:`~steadystep.SkippableIterable` is saved by Lightning itself too (it is a stateful
loader); both copies hold the same state.

With ``accumulate_grad_batches = k`` the loss fed is the mean over the k micro-batches of the step
(Lightning hands ``on_before_backward`` each micro-batch loss divided by k; their sum is fed).

Examples:
    >>> import torch, lightning as L, steadystep as ss
    >>> from steadystep.integrations.lightning import LossFeeder, StatsLogger
    >>> class Tiny(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net, self.alrc = torch.nn.Linear(4, 1), ss.ALRC()
    ...     def training_step(self, batch, batch_idx):
    ...         x, y = batch
    ...         return self.alrc((self.net(x) - y).pow(2).squeeze(1)).mean()
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    >>> trainer = L.Trainer(max_steps=4, logger=False, enable_progress_bar=False,
    ...     enable_checkpointing=False, enable_model_summary=False,
    ...     callbacks=[LossFeeder(), StatsLogger(every=2)])
    >>> trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=8))
    >>> trainer.callbacks[1].monitor.history[-1]["alrc/num_updates"]
    4
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from steadystep.integrations import find_stats_modules, loss_needing, unwrap_optimizer
from steadystep.integrations.amp import skip_aware
from steadystep.stabilize import Stabilized
from steadystep.telemetry import Monitor, component_name

__all__ = ["DataPosition", "LossFeeder", "StatsLogger"]


def _scaler(trainer: pl.Trainer) -> Any:
    return getattr(trainer.strategy.precision_plugin, "scaler", None)


def _stabilized(trainer: pl.Trainer) -> list[Stabilized]:
    """The trainer's :class:`~steadystep.Stabilized` optimizers."""
    return [opt for opt in map(unwrap_optimizer, trainer.optimizers) if isinstance(opt, Stabilized)]


class LossFeeder(Callback):
    """Give every loss-needing optimizer the training loss, in every precision.

    For each optimizer of the trainer with an ``observe_loss`` method, calls
    ``observe_loss(loss.detach())`` from ``on_before_backward`` (the mean over the micro-batches
    of the step under gradient accumulation). Under a precision plugin with a GradScaler
    (``"16-mixed"``), ALRC modules of the LightningModule get back their moments of before the
    step when the scaler skips it, so a skipped step updates no statistic anywhere.

    Args:
        undo_skipped_alrc: restore ALRC (any submodule with ``stats()`` and buffers) on steps the
            GradScaler skips (default True).
    """

    def __init__(self, undo_skipped_alrc: bool = True) -> None:
        self.undo_skipped_alrc = undo_skipped_alrc
        self._window: Tensor | None = None
        self._stepping = False
        self._guard: skip_aware | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._guard is None and self.undo_skipped_alrc:
            scaler = _scaler(trainer)
            modules = [
                m for _, m in find_stats_modules(pl_module) if any(True for _ in m.buffers())
            ]
            modules += [opt.alrc for opt in _stabilized(trainer) if opt.alrc is not None]
            if scaler is not None and modules:
                # Begins at the first micro-batch of an accumulation window: all of its forwards
                # are undone if the window's step is skipped.
                self._guard = skip_aware(scaler, *modules)
                self._guard.begin()

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if not pl_module.automatic_optimization:
            # Manual optimisation: the user calls step() and can pass loss= there; still feed the
            # last loss so that a plain opt.step() works too.
            self._window = None
        loss = loss.detach()
        scaler = _scaler(trainer)
        if scaler is not None and scaler.is_enabled():
            # The fp16 precision plugin hands this hook the *scaled* loss; the scale is a power of
            # two, so the division gives back the training loss exactly (a device op, no sync).
            scale = getattr(scaler, "_scale", None)
            loss = loss / (scale if isinstance(scale, Tensor) else scaler.get_scale())
        self._window = loss if self._window is None else self._window + loss
        for opt in trainer.optimizers:
            if loss_needing(opt):
                unwrap_optimizer(opt).observe_loss(self._window)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        self._window = None  # the next backward starts a new accumulation window
        self._stepping = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self._stepping:
            self._stepping = False
            for opt in _stabilized(trainer):
                # a step the GradScaler skipped left its raw losses: the next window starts afresh
                opt.reset_loss()
            if self._guard is not None:
                self._guard.end()
                self._guard = None


def _skippable_sources(trainer: pl.Trainer) -> list[Any]:
    """The train dataloaders' skippable sources: a loader that is one (``SkippableIterable``),
    or its ``batch_sampler`` (``SkippableSampler``), each once."""
    found: dict[int, Any] = {}
    stack = [trainer.train_dataloader]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif item is not None:
            for source in (item, getattr(item, "batch_sampler", None)):
                if callable(getattr(source, "mark_consumed", None)):
                    found[id(source)] = source
    return list(found.values())


class DataPosition(Callback):
    """Mark each batch ``training_step`` takes as consumed on the train dataloaders'
    :class:`~steadystep.SkippableSampler` / :class:`~steadystep.SkippableIterable`, so their
    checkpointed position is that of the batches trained on, not of the one Lightning has
    prefetched (Note [batches drawn ahead] in :mod:`steadystep.data`)."""

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        for source in _skippable_sources(trainer):
            source.mark_consumed()


class StatsLogger(Callback):
    """Log the ``stats()`` of steadystep optimizers and modules to the trainer's loggers.

    Records one row per optimizer step with a :class:`~steadystep.Monitor` (device-side, no host
    read) and flushes every ``every`` steps: the rows go to every logger of the trainer as
    ``<prefix><component>/<stat>`` at their step (``steadystep/guard/rollbacks`` for
    ``opt.stats()["guard/rollbacks"]``: the one naming of :mod:`steadystep.telemetry`, Note [one
    naming]), and to ``csv_path`` / ``tensorboard_dir`` if given, without the prefix. Notable
    events (rollbacks, LR cuts, sustained clipping) are logged at WARNING.

    Components: each optimizer of the trainer with ``stats()`` (a ``Stabilized`` by its own keys
    ``alrc/...``, ``guard/...``; another by its class name in lower case, ``salera/...``) and
    each submodule of the LightningModule with ``stats()`` (named by its attribute path).

    Args:
        every: flush interval in optimizer steps (default: the trainer's ``log_every_n_steps``).
        csv_path, tensorboard_dir: passed to the Monitor (default None).
        prefix: prepended to every metric name sent to the loggers (default ``"steadystep/"``).

    Attributes:
        monitor: the :class:`~steadystep.Monitor` (created at the start of training).
    """

    def __init__(
        self,
        every: int | None = None,
        csv_path: str | os.PathLike[str] | None = None,
        tensorboard_dir: str | os.PathLike[str] | None = None,
        prefix: str = "steadystep/",
    ) -> None:
        self.every = every
        self.csv_path = csv_path
        self.tensorboard_dir = tensorboard_dir
        self.prefix = prefix
        self.monitor: Monitor | None = None
        self._trainer: pl.Trainer | None = None
        self._last_step = -1

    def _log(self, metrics: dict[str, float], step: int) -> None:
        if self._trainer is None:
            return
        named = {f"{self.prefix}{k}": float(v) for k, v in metrics.items()}
        for lg in self._trainer.loggers:
            lg.log_metrics(named, step=step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        components: list[tuple[str, Any]] = []
        for opt in trainer.optimizers:
            inner = unwrap_optimizer(opt)
            if callable(getattr(inner, "stats", None)):
                components.append((component_name(inner), inner))
        components.extend(find_stats_modules(pl_module))
        self.monitor = Monitor(
            *components,
            every=self.every or trainer.log_every_n_steps,
            csv_path=self.csv_path,
            tensorboard_dir=self.tensorboard_dir,
            log_fn=self._log,
        )
        self._last_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # Record once per optimizer step (not per micro-batch under gradient accumulation).
        if self.monitor is not None and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            if self.monitor.components:
                self.monitor.step(step=trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.close()
            for lg in trainer.loggers:
                lg.save()
