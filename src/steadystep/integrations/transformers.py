"""Hugging Face ``transformers.Trainer`` with ALRC on per-sample losses and a catastrophe guard.

:class:`SteadystepTrainer` is a ``Trainer`` subclass with three additions:

* ``optimizer_factory(model) -> optimizer`` builds any steadystep optimizer (``SALeRA``,
  ``CatastropheGuard(AdamW(...))``, ``CProp``, ``ss.stabilize(AdamW(...))``...) instead of the
  default AdamW;
* with ``ss.stabilize(...)`` (ALRC, the guard and CProp in one optimizer) the per-sample losses
  go through its ``clip()``: the gradient comes from the clipped losses and the guard watches
  their raw mean (a guard fed the clipped loss misses the catastrophes it is for). Its one
  ``state_dict`` is the Trainer's ``optimizer.pt``, so ``save_steps`` checkpoints carry every
  component and ``train(resume_from_checkpoint=...)`` resumes them;
* ``alrc=ALRC(...)`` clips the *per-sample* losses, computed from the model's outputs and the
  labels by ``per_sample_loss(outputs, labels)`` (default: cross-entropy for classification
  logits ``[B, C]``, squared error for regression ``[B]`` / ``[B, 1]``; pass your own for language
  modelling, e.g. per-sequence token means). ALRC follows the model's train/eval mode, and its
  moments are saved with the optimizer in checkpoints and restored on resume;
* the training loss reaches every loss-needing optimizer (``observe_loss``), and the learning
  rate scheduler does not advance on a step the guard skipped: it is wrapped in
  :class:`SkipAwareScheduler`, which also keeps the guard's LR cut when the schedule recomputes
  ``lr`` from its base values (the Trainer's default linear schedule does).

* ``escalation=ss.Escalation(...)`` (Note [escalation]) makes the Trainer draw its training
  batches through a :class:`~steadystep.SkippableSampler` it builds (seeded by ``data_seed`` or
  ``seed``, shuffled unless ``train_sampling_strategy="sequential"``, sharded over the ranks
  itself; a :class:`~steadystep.SkippableIterable` around the Trainer's own loader for an
  ``IterableDataset``) and hands it to the escalation, which must be the one in the guard
  ``optimizer_factory`` builds (``ss.stabilize(..., escalation=esc)``).
  Its epochs follow one another without a restart, so the run is sized by
  ``TrainingArguments(max_steps=...)`` (required); the sampler's position and skip windows are
  saved with the optimizer and ``train(resume_from_checkpoint=...)`` resumes them instead of the
  Trainer's fast-forward of the epoch. Each batch the Trainer trains on is marked consumed, so
  batches that loader workers drew ahead are drawn again on resume (Note [batches drawn ahead]
  in :mod:`steadystep.data`); the window an escalation skips starts after them.

Steadystep statistics are added to the Trainer's logs (``steadystep/<component>/<stat>``, named
as in a Monitor and in Lightning: Note [one naming] in :mod:`steadystep.telemetry`) every
``logging_steps``, and a :class:`~steadystep.Monitor` passed as ``monitor=`` records every step.

With ``ss.stabilize``, pass ``optimizer_factory=lambda m: ss.stabilize(torch.optim.AdamW(
m.parameters(), lr=1e-3), batch_size=..., dataset_size=...)`` and no ``alrc=`` (it has its own).

Example (``tests/test_transformers.py`` runs the same; ``docs/integrations.md`` has more)::

    import torch, steadystep as ss
    from transformers import BertConfig, BertForSequenceClassification, TrainingArguments
    from steadystep.integrations.transformers import SteadystepTrainer
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=16)
    model = BertForSequenceClassification(config)  # random weights: no download
    data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.tensor(i % 2)}
            for i in range(32)]
    args = TrainingArguments("hf_out", max_steps=3, per_device_train_batch_size=8,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = SteadystepTrainer(model=model, args=args, train_dataset=data, alrc=ss.ALRC(),
        optimizer_factory=lambda m: ss.CatastropheGuard(torch.optim.AdamW(m.parameters())))
    _ = trainer.train()
    int(trainer.alrc.num_updates), int(trainer.steadystep_optimizer.stats()["steps"])
    # -> (3, 3)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Sampler
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import has_length

from steadystep.alrc import ALRC
from steadystep.data import SkippableIterable, SkippableSampler
from steadystep.escalation import Escalation
from steadystep.guard import CatastropheGuard
from steadystep.integrations import loss_needing, unwrap_optimizer
from steadystep.integrations.scheduler import SkipAwareScheduler  # also exported here
from steadystep.stabilize import Stabilized
from steadystep.telemetry import Monitor, component_name, metric_name

__all__ = ["SkipAwareScheduler", "SteadystepTrainer", "default_per_sample_loss"]

ALRC_STATE_NAME = "steadystep_alrc.pt"


def default_per_sample_loss(outputs: Any, labels: Tensor) -> Tensor:
    """Per-sample loss ``[B]`` from ``outputs.logits``: cross-entropy for ``[B, C]`` logits with
    integer labels, squared error for regression (``[B]`` or ``[B, 1]`` float logits)."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    if labels.is_floating_point() or logits.shape[-1] == 1:
        return (
            (logits.reshape(labels.shape[0], -1) - labels.reshape(labels.shape[0], -1))
            .pow(2)
            .mean(dim=1)
        )
    if logits.dim() != 2:
        raise ValueError(
            f"default_per_sample_loss handles [batch, classes] logits, got shape "
            f"{tuple(logits.shape)}; pass per_sample_loss=fn(outputs, labels) -> [batch] losses"
        )
    return F.cross_entropy(logits.float(), labels, reduction="none")


class _Endless(Sampler[list[int]]):
    """A :class:`~steadystep.SkippableSampler`'s epochs one after another, unsized: the Trainer
    runs by ``max_steps`` and never restarts an epoch (the sampler's position is the truth)."""

    def __init__(self, sampler: SkippableSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Any:
        while True:
            yield from self.sampler


def _guard_of(optimizer: Any) -> CatastropheGuard | None:
    opt = unwrap_optimizer(optimizer)
    if isinstance(opt, Stabilized):
        return opt.guard
    return opt if isinstance(opt, CatastropheGuard) else None


class _StepBoundary(TrainerCallback):
    """Tells the trainer where optimizer steps happen; drives a Monitor."""

    def __init__(self, trainer: SteadystepTrainer) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._loss_window = None
        opt = self.trainer.steadystep_optimizer
        if isinstance(opt, Stabilized):
            # empty after a step it took; a step a GradScaler skipped leaves its raw losses
            opt.reset_loss()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.monitor is not None:
            self.trainer.monitor.step(step=state.global_step)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.trainer.monitor is not None:
            self.trainer.monitor.close()


class SteadystepTrainer(Trainer):
    """``transformers.Trainer`` with ALRC on per-sample losses, steadystep optimizers and a
    skip-aware LR schedule (see the module docstring).

    Args:
        *args, **kwargs: as ``transformers.Trainer``.
        alrc: an :class:`~steadystep.ALRC` applied to the per-sample losses (default None: the
            model's own loss, unclipped).
        per_sample_loss: ``fn(outputs, labels) -> [batch]`` losses (default
            :func:`default_per_sample_loss`); used only with ``alrc``.
        optimizer_factory: ``fn(model) -> optimizer`` (default None: the Trainer's optimizer,
            or the one passed as ``optimizers=(opt, sched)``).
        monitor: a :class:`~steadystep.Monitor` to step once per optimizer step (default None).
        escalation: the :class:`~steadystep.Escalation` of the guard that ``optimizer_factory``
            builds, without a sampler: the Trainer draws its batches through a skippable one
            and gives it to the escalation (default None: the Trainer's own loader).

    Under gradient accumulation the loss fed to the optimizer is the mean of the micro-batch
    losses of the step.
    """

    def __init__(
        self,
        *args: Any,
        alrc: ALRC | None = None,
        per_sample_loss: Callable[[Any, Tensor], Tensor] | None = None,
        optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
        monitor: Monitor | None = None,
        escalation: Escalation | None = None,
        **kwargs: Any,
    ) -> None:
        if escalation is not None:
            if not isinstance(escalation, Escalation):
                raise TypeError(f"escalation must be an ss.Escalation, got {escalation!r}")
            if escalation.sampler is not None or optimizer_factory is None:
                raise ValueError(
                    "escalation= is the Escalation of the guard optimizer_factory builds "
                    "(optimizer_factory=lambda m: ss.stabilize(..., escalation=esc)), without a "
                    "sampler: the Trainer builds the sampler its batches are drawn through"
                )
        super().__init__(*args, **kwargs)
        self.escalation = escalation
        self.skippable: SkippableSampler | SkippableIterable[Any] | None = None
        self.alrc = alrc
        self.per_sample_loss = per_sample_loss or default_per_sample_loss
        self.optimizer_factory = optimizer_factory
        self.monitor = monitor
        self._loss_window: tuple[Tensor, int] | None = None
        if alrc is not None:
            alrc.to(self.args.device)
            # compute_loss returns a per-batch mean: the Trainer divides it for accumulation.
            self.loss_is_scaled_for_ga = False
        self.add_callback(_StepBoundary(self))

    @property
    def steadystep_optimizer(self) -> Any:
        """The optimizer without framework wrappers (``None`` before training starts)."""
        return None if self.optimizer is None else unwrap_optimizer(self.optimizer)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.optimizer_factory is not None:
            self.optimizer = self.optimizer_factory(self.model if model is None else model)
            if isinstance(self.optimizer, Stabilized) and self.alrc is not None:
                raise ValueError(
                    "alrc= and an optimizer from ss.stabilize(...) would both handle the "
                    "per-sample losses; drop alrc= (pass ALRC's settings to stabilize, alrc={...})"
                )
            guard = _guard_of(self.optimizer)
            if self.escalation is not None and (
                guard is None or guard.escalation is not self.escalation
            ):
                raise ValueError(
                    "escalation= must be the Escalation of the guard optimizer_factory builds "
                    "(ss.stabilize(..., escalation=esc) or CatastropheGuard(..., "
                    f"escalation=esc)); the factory built {type(self.optimizer).__name__} "
                    + ("with another escalation" if guard is not None else "without a guard")
                )
        return super().create_optimizer(model) if self.optimizer is None else self.optimizer

    # -- skipping data (Note [escalation]) --------------------------------------------------------
    def get_train_dataloader(self) -> Any:
        """The Trainer's loader, or with ``escalation=`` one drawing through a skippable source
        handed to the escalation (the module docstring)."""
        if self.escalation is None:
            return super().get_train_dataloader()
        if self.args.max_steps <= 0:
            raise ValueError(
                "escalation= runs the sampler's epochs one after another: set "
                f"TrainingArguments(max_steps=...) (got max_steps={self.args.max_steps})"
            )
        strategy = self.args.train_sampling_strategy
        if strategy not in ("random", "sequential"):
            raise ValueError(
                f"escalation= draws batches through ss.SkippableSampler, which shuffles or not: "
                f"train_sampling_strategy must be 'random' or 'sequential', got {strategy!r}"
            )
        dataset = self.train_dataset
        if dataset is None or isinstance(dataset, IterableDataset) or not has_length(dataset):
            source: Any = SkippableIterable(super().get_train_dataloader())
            loader = source
        else:
            collator = self._get_collator_with_removed_columns(
                self.data_collator, description="Training"
            )
            source = SkippableSampler(
                len(dataset),
                batch_size=self._train_batch_size,
                shuffle=strategy == "random",
                seed=self.args.data_seed if self.args.data_seed is not None else self.args.seed,
                drop_last=self.args.dataloader_drop_last,
                rank=self.args.process_index,
                world_size=self.args.world_size,
            )
            workers = self.args.dataloader_num_workers
            loader = DataLoader(
                dataset,
                batch_sampler=_Endless(source),
                collate_fn=collator,
                num_workers=workers,
                pin_memory=self.args.dataloader_pin_memory,
                persistent_workers=self.args.dataloader_persistent_workers and workers > 0,
                prefetch_factor=self.args.dataloader_prefetch_factor if workers > 0 else None,
            )
        self.skippable = source
        self.escalation.sampler = source
        return loader

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        """With ``escalation=`` the sampler resumes from the optimizer's state: no fast-forward."""
        if self.skippable is not None:
            return dataloader
        return super().get_resumed_dataloader(dataloader, num_batches)

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        if self.skippable is not None:
            self.skippable.mark_consumed()  # Note [batches drawn ahead]
        return super().training_step(model, inputs, num_items_in_batch)

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if not isinstance(scheduler, SkipAwareScheduler) and not plateau:
            self.lr_scheduler = SkipAwareScheduler(scheduler, optimizer or self.optimizer)
        return self.lr_scheduler

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        opt = self.steadystep_optimizer
        stabilized = opt if isinstance(opt, Stabilized) else None
        if (self.alrc is None and stabilized is None) or "labels" not in inputs:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss, outputs = result if return_outputs else (result, None)
            if model.training:
                self._feed(loss)
            return (loss, outputs) if return_outputs else loss
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        per_sample = self.per_sample_loss(outputs, labels)
        if stabilized is not None:
            # clip() remembers the raw mean for the guard; evaluation reports the raw loss
            loss = stabilized.clip(per_sample).mean() if model.training else per_sample.mean()
        elif self.alrc is not None:
            self.alrc.train(model.training)  # eval: identity, and the moments stay put
            loss = self.alrc(per_sample).mean()
            if model.training:
                # the guard watches the raw loss (Note [the guard watches the raw loss])
                self._feed(per_sample.detach().mean())
        return (loss, outputs) if return_outputs else loss

    def _feed(self, loss: Tensor) -> None:
        opt = self.optimizer
        if opt is None or not loss_needing(opt):
            return
        total, n = self._loss_window or (torch.zeros_like(loss.detach()), 0)
        total, n = total + loss.detach(), n + 1
        self._loss_window = (total, n)
        unwrap_optimizer(opt).observe_loss(total / n)

    def steadystep_stats(self) -> dict[str, float]:
        """The optimizer's and ALRC's ``stats()`` as ``steadystep/<component>/<stat>`` floats
        (one host read), named as everywhere (Note [one naming] in :mod:`steadystep.telemetry`):
        a Stabilized's own keys (``steadystep/guard/alarms``), another optimizer's under its
        class name in lower case (``steadystep/catastropheguard/alarms``), ``alrc=``'s under
        ``alrc/``; a stat with several elements as ``<name>/<i>``."""
        components: list[tuple[str, Any]] = []
        opt = self.steadystep_optimizer
        if opt is not None and callable(getattr(opt, "stats", None)):
            components.append((component_name(opt), opt))
        if self.alrc is not None:
            components.append(("alrc", self.alrc))
        names: list[str] = []
        parts: list[Tensor] = []
        for component, obj in components:
            for key, value in obj.stats().items():
                name = metric_name(component, key)
                flat = value.detach().double().reshape(-1)
                names += [name] if flat.numel() == 1 else [f"{name}/{i}" for i in range(len(flat))]
                parts.append(flat)
        if not parts:
            return {}
        device = parts[0].device
        values = torch.cat([p.to(device) for p in parts]).tolist()  # the one host read
        return {f"steadystep/{k}": v for k, v in zip(names, values, strict=True)}

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add :meth:`steadystep_stats` to the training logs, then log as the Trainer does."""
        if "loss" in logs:  # training logs only, every logging_steps
            logs = {**logs, **self.steadystep_stats()}
        super().log(logs, *args, **kwargs)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.alrc is not None and self.args.should_save:
            torch.save(self.alrc.state_dict(), os.path.join(output_dir, ALRC_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.alrc is None:
            return
        path = os.path.join(checkpoint, ALRC_STATE_NAME)
        if os.path.isfile(path):
            state = torch.load(path, map_location=self.args.device, weights_only=True)
            self.alrc.load_state_dict(state)
