"""CatastropheGuard: watch the loss, and answer a catastrophe without taxing a healthy run.

Each step the minibatch loss goes to a change detector (:class:`~steadystep.SpikeDetector` by
default; the paper's :class:`~steadystep.PageHinkleyPaper` is one argument away). A detector
with ``needs_grad_norm`` also gets the global gradient norm, computed once per step on the
device (:func:`~steadystep.detectors.global_grad_norm`). An alarm is answered by the ladder of
:mod:`steadystep.ladder` (Note [the ladder]): a first alarm skips the step (a bad batch); a
second in a row rolls the parameters, the optimizer's state and the model's buffers back to
before the last update and cuts the learning rate (a bad update); ``accept_after`` more at the
restored weights are a change of level, accepted (detector restarted, the cuts undone).
``response="rollback"`` is SALeRA's published recovery (Algorithm 1, lines 7-11 of the paper;
docs/decisions.md): every alarm rolls back one step and multiplies the rate by ``lr_factor``.

Note [the learning-rate scale] (:mod:`steadystep.compose.lr_scale`): a cut is a guard-owned
scale on top of whatever rate the schedule sets; calm steps give it back.

Note [non-finite gradients]: a NaN or inf *gradient* with a finite loss is not an alarm (the loss
did not jump; nothing to roll back, no reason to cut the rate). Around a third-party optimizer
(torch's, CProp around one) the guard skips ``optimizer.step()`` for such a step, so the wrapped
optimizer's own state (Adam's moments) is never poisoned: no rollback, no LR cut, the detector
does not observe that step's loss (bitwise unchanged), and ``stats()["nonfinite_grads"]`` counts
it. The flag is read in the same single host read as the alarm. An optimizer that implements
:class:`~steadystep.compose.protocol.MaskableOptimizer` (steadystep's ALeRA, AgAdam and CProp's
native classes) skips such a step itself (ALeRA and AgAdam count it in their
``skipped_steps``), so the guard leaves the step to it; the guard still computes the flag on the
device (:func:`~steadystep._tensors.grads_finite`, one reduction over the gradients, no host
read) and passes it to the detector as ``skip``, so the detector does not observe that step's
loss there either (bitwise unchanged).

Note [collective decisions]: under ``torch.distributed`` the guard averages the loss, the
gradient norm and the non-finite-gradient flag over ranks in one all-reduce before the detector
sees them (the detector does not reduce again), so every rank takes the same decision even when
one rank's gradient differs after the all-reduce.

Note [host syncs]: around a :class:`~steadystep.compose.protocol.MaskableOptimizer`
(:class:`~steadystep.ALeRA`, :class:`~steadystep.AgAdam`, :class:`~steadystep.CPropSGD`,
:class:`~steadystep.CPropAdam`, :class:`~steadystep.CPropAdamW`) every decision stays on the
device: the rollback is one kernel call that copies ``snapshot -> live`` where it rolls back and
``live -> snapshot`` where the step updates (:mod:`steadystep.snapshot`), the scale multiplies
the 0-d multipliers (``scale_lr_``) and the base step runs masked (``masked_step``). torch's own
fused optimizers (``fused=True`` Adam, AdamW, SGD, Adagrad) take the same path through their
``found_inf`` flag, the one ``GradScaler`` uses (:mod:`steadystep.compose.torch_fused`), with
the applied rate a 0-d tensor; there the guard checks the gradients itself, in one kernel call.
The only host read is the ``min_lr`` check, once every ``check_every`` steps. Any other
optimizer (torch's non-fused ones, the CProp wrapper) keeps state the guard cannot mask, so the
guard reads its decision on the host once per step; that read is the cost of wrapping such an
optimizer. ``snapshot_device="cpu"`` also takes the host path (a rollback from host memory is
only worth paying on an alarm).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from steadystep._distributed import mean_over_ranks
from steadystep._guard_checkpoint import GuardCheckpoint
from steadystep._guard_decision import HISTORY, decide_step
from steadystep._guard_report import check_min_lr, report
from steadystep._tensors import gradient_stats, stored_real_values
from steadystep._validation import (
    check_count,
    check_loss,
    check_nonnegative,
    check_probability,
    check_scalar_loss,
)
from steadystep.compose.lr_scale import applied_lr, applied_max_lr
from steadystep.compose.order import Composable, check_wrappable
from steadystep.compose.protocol import MaskableOptimizer
from steadystep.compose.torch_fused import torch_fused_maskable
from steadystep.compose.wrapper import (
    OptimizerWrapper,
    call_with_step_hooks,
    is_state_init_step,
)
from steadystep.detectors import SpikeDetector
from steadystep.detectors.protocol import ChangeDetector, as_detector
from steadystep.escalation import Escalation, TrainingDiverged
from steadystep.ladder import RESPONSES, Decision
from steadystep.snapshot import ROLLBACKS, Snapshot, state_tensors

__all__ = ["CatastropheGuard", "TrainingDiverged"]

# The guard's evolving tensors besides the detector's and the snapshot's, in its state_dict
_COUNTERS = ("alarms", "rollbacks", "skips", "level_shifts", "steps", "lr_scale")
_COUNTERS += ("nonfinite_grads", "phase", "calm", "waited", "episode_scale")
_COUNTERS += ("history_step", "history_loss")


def _missing_loss(owner: str) -> RuntimeError:
    return RuntimeError(
        f"{owner} needs the minibatch loss to watch for catastrophes: call "
        "opt.step(loss=loss.detach()), or opt.observe_loss(loss) before opt.step(), "
        "or pass a closure that returns the loss: opt.step(closure) (built by ss.stabilize: "
        "opt.clip(per_sample_losses) before opt.step() remembers their raw mean)"
    )


def _as_device(value: Any) -> torch.device:
    """``snapshot_device`` as a torch.device, or an error naming it."""
    if isinstance(value, bool) or not isinstance(value, (torch.device, str, int)):
        raise TypeError(
            f"snapshot_device must be a torch.device, a device string or None, got "
            f"snapshot_device={value!r}"
        )
    try:
        return torch.device(value)
    except RuntimeError as error:
        raise ValueError(
            f"snapshot_device must name a device (e.g. 'cpu', 'cuda:0'), got "
            f"snapshot_device={value!r}: {error}"
        ) from None


class CatastropheGuard(GuardCheckpoint, OptimizerWrapper, Composable):
    r"""Wrap any optimizer with detect -> skip, roll back and cut, or accept (Note [the ladder]).

    With ``theta_b`` the parameters (and optimizer state) saved before the last update, ``A_t``
    the detector's alarm on loss ``L_t`` and ``s`` the learning-rate scale:

    .. math::
        \neg A_t:&\ \theta_b \leftarrow \theta,\ \theta \leftarrow \text{optimizer.step}(\theta,
        \ s\,\eta_t)\\
        A_t \text{ (first)}:&\ \text{skip the step}\\
        A_t \text{ (second)}:&\ \theta \leftarrow \theta_b,\ s \leftarrow
        \texttt{lr\_factor} \cdot s\\
        A_t \text{ (at } \theta_b \text{, finite, accept\_after in a row)}:&\ \text{accept:
        restart the detector, undo the episode's cuts, step}

    Args:
        optimizer: the optimizer to protect (any ``torch.optim.Optimizer`` whose ``step``
            needs no closure, with whatever it supports: sparse gradients for SGD or
            SparseAdam, complex parameters; steadystep's ALeRA, AgAdam and native CProp classes
            stay sync-free, see Note [host syncs]).
        detector: a change detector (:class:`~steadystep.detectors.ChangeDetector`; one with
            ``update(loss) -> alarm`` only is adapted, at one host read per step); default
            :class:`~steadystep.SpikeDetector` ``()`` (the benchmark's best, ``docs/detectors.md``;
            the paper's test is ``PageHinkleyPaper(ph_lambda=0.1, rho=batch/dataset)``).
        lr_factor: what a cut multiplies the learning-rate scale by (default 0.5, in (0, 1]);
            Note [the learning-rate scale].
        backtrack: roll back on the ladder's second rung (default True); False only skips and
            cuts, as the authors' published runs did, and keeps no snapshot.
        min_lr: when cuts leave the largest applied learning rate below this, raise
            :class:`TrainingDiverged` with the alarm history (default 1e-15).
        snapshot_device: where the rollback snapshot lives (default: beside each tensor).
            ``"cpu"`` halves the device memory cost for models that do not fit twice, at one
            device-to-host copy per step plus a host read of the decision.
        check_every: steps between ``min_lr`` checks on the sync-free path (default 100; each
            check is one host read).
        response: ``"ladder"`` (default; Note [the ladder]) or ``"rollback"`` (SALeRA's: every
            alarm rolls back and cuts).
        recover_every: calm steps after which one cut is undone (default 100; None keeps every
            cut); Note [recovering the rate].
        rollback: ``"full"`` (default: the parameters, the optimizer's state and the model's
            buffers) or ``"params"`` (the parameters only); Note [full rollback] in
            :mod:`steadystep.snapshot`.
        model: the ``torch.nn.Module`` being trained, whose buffers (BatchNorm's running
            statistics) a full rollback restores too (default None: no buffers).
        accept_after: alarms in a row at the restored weights before a change of level is
            accepted (default 4; those batches are skipped): a run of a few corrupted batches
            ends before that, a new level stays (Note [the ladder]).
        escalation: the rung above the ladder (:class:`~steadystep.Escalation`: a ring of
            snapshots tens of steps back, and data to skip; Note [escalation]), or None
            (default: the one-step ladder alone).

    The loss comes from ``step(loss=...)``, else :meth:`observe_loss`, else a closure's result
    (in that order, see :meth:`step`); a step without one raises a RuntimeError that says how
    to pass it. ``param_groups``, ``state``,
    ``zero_grad`` and ``add_param_group`` are the wrapped optimizer's; ``state_dict`` nests it
    with the guard's own state (detector, counters, snapshot).

    Note [hooks]: hooks registered on the guard (``register_step_pre_hook``,
    ``register_state_dict_post_hook``, ...) run as torch.optim runs them, around the guard's
    ``step``, ``state_dict`` and ``load_state_dict``. Step hooks registered on the wrapped
    optimizer run when it steps: on the host path only on steps it takes (not on alarms or
    skipped non-finite gradients); on the sync-free path every step, with ``args=()`` and
    ``kwargs={}`` (their return values are ignored there), since a masked step is still a step.
    The guard's counters, phase and history are written at the decision, before the wrapped
    optimizer steps: such a hook already sees this step counted in ``stats()["steps"]``.

    Examples:
        >>> import torch, steadystep as ss
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = ss.CatastropheGuard(torch.optim.AdamW(model.parameters(), lr=1e-3))
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward()
        >>> _ = opt.step(loss=loss.detach())
        >>> int(opt.stats()["alarms"])
        0
    """

    composition_role = "guard"  # Note [the order of the composition]

    def __init__(
        self,
        optimizer: Optimizer,
        detector: ChangeDetector | Any | None = None,
        *,
        lr_factor: float = 0.5,
        backtrack: bool = True,
        min_lr: float = 1e-15,
        snapshot_device: torch.device | str | None = None,
        check_every: int = 100,
        response: str = "ladder",
        recover_every: int | None = 100,
        rollback: str = "full",
        model: torch.nn.Module | None = None,
        accept_after: int = 4,
        escalation: Escalation | None = None,
    ) -> None:
        super().__init__(optimizer)
        # Note [the order of the composition] (compose/order.py): one guard, outermost
        check_wrappable("CatastropheGuard", optimizer)
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "optimizer=LBFGS needs its closure at every step (a line search re-evaluates "
                "the loss), which the guard cannot roll back or skip; use "
                "ss.stabilize(torch.optim.LBFGS(...), guard=False) for ALRC alone"
            )
        self.lr_factor = check_probability("lr_factor", lr_factor)
        self.min_lr = check_nonnegative("min_lr", min_lr)
        if not isinstance(backtrack, bool):
            raise TypeError(f"backtrack must be a bool, got backtrack={backtrack!r}")
        check_count("check_every", check_every)
        if response not in RESPONSES:
            raise ValueError(f"response must be one of {list(RESPONSES)}, got {response!r}")
        if recover_every is not None:
            check_count("recover_every", recover_every, "an int >= 1 or None")
        if rollback not in ROLLBACKS:
            raise ValueError(f"rollback must be one of {list(ROLLBACKS)}, got {rollback!r}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if escalation is not None and not isinstance(escalation, Escalation):
            raise TypeError(f"escalation must be an ss.Escalation, got {escalation!r}")
        self.backtrack = backtrack
        self.check_every = check_every
        self.response = response
        self.recover_every = recover_every
        self.accept_after = check_count("accept_after", accept_after)
        self.rollback = rollback
        self.snapshot_device = None if snapshot_device is None else _as_device(snapshot_device)
        # One contract for every detector (steadystep.detectors.protocol); one of your own
        # with update(loss) only is adapted, at one host read per step.
        self.detector = as_detector(SpikeDetector() if detector is None else detector)
        if hasattr(self.detector, "reduce_over_ranks"):
            self.detector.reduce_over_ranks = False  # Note [collective decisions]
        # Note [host syncs]: a MaskableOptimizer lets every decision stay on the device, and
        # skips a non-finite gradient itself (Note [non-finite gradients]); torch's fused
        # optimizers are masked through their found_inf (steadystep.compose.torch_fused), with
        # the gradients checked here.
        self._maskable: Any = None
        self._scales_itself = isinstance(optimizer, MaskableOptimizer)
        if self._scales_itself:
            self._maskable = optimizer
        elif self.snapshot_device is None:
            self._maskable = torch_fused_maskable(optimizer)
        self._device_side = self._maskable is not None and self.snapshot_device is None

        params = self._params()
        device = params[0].device if params else torch.device("cpu")

        def zeros(dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros((), dtype=dtype, device=device)

        self.alarms, self.rollbacks, self.skips, self.level_shifts = (zeros() for _ in range(4))
        self.steps, self.nonfinite_grads = zeros(), zeros()
        self.lr_scale = torch.ones((), dtype=torch.float64, device=device)
        self.phase, self.calm, self.waited = zeros(), zeros(), zeros()  # Note [the ladder]
        self.episode_scale = torch.ones((), dtype=torch.float64, device=device)
        self.history_step = torch.full((HISTORY,), -1, dtype=torch.int64, device=device)
        self.history_loss = torch.full((HISTORY,), math.nan, dtype=torch.float32, device=device)
        buffers = list(model.buffers()) if model is not None else []
        self.snapshot = Snapshot(
            device=self.snapshot_device, full=rollback == "full", buffers=buffers
        )
        self.escalation = escalation
        if escalation is not None:
            escalation.attach(device)
        self._calls = 0
        self._pending_loss: torch.Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its snapshot is taken at the next step."""
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.optimizer!r}, detector={self.detector!r}, "
            f"lr_factor={self.lr_factor}, backtrack={self.backtrack}, min_lr={self.min_lr}, "
            f"response={self.response!r}, recover_every={self.recover_every}, "
            f"rollback={self.rollback!r})"
        )

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # -- state ------------------------------------------------------------------------------
    def _counters(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _COUNTERS}

    def stats(self, *, include_optimizer: bool = True) -> dict[str, torch.Tensor]:
        """Telemetry as 0-d tensors, no host sync (a Monitor writes ``<component>/<key>``):

        * the guard's counters ``alarms``, ``skips`` (steps skipped on a first alarm: bad
          batches), ``rollbacks``, ``level_shifts`` (changes of level accepted), ``steps``,
          ``nonfinite_grads`` (steps whose ``optimizer.step()`` the guard skipped for a
          non-finite gradient, Note [non-finite gradients]), ``lr_scale`` (applied / scheduled
          learning rate, Note [the learning-rate scale]), ``lr`` (the largest applied rate) and,
          with an :class:`~steadystep.Escalation`, ``escalations``;
        * ``detector_<key>`` for each of the detector's ``stats()`` (SpikeDetector: its
          thresholds; PageHinkleyPaper: threshold, relaxed_loss, mean, cusum, gap, count);
        * the wrapped optimizer's ``stats()`` when it has one, under their own names (ALeRA:
          ``skipped_steps``, ``group{i}.lr``...; CProp: ``mean_scale``...); a name that clashes
          with one of the guard's gets the prefix ``optimizer.``. ``include_optimizer=False``
          leaves them out (:class:`~steadystep.Stabilized` reports them under their own prefix).
        """
        hidden = ("history_step", "history_loss", "phase", "calm", "waited", "episode_scale")
        out = {k: v for k, v in self._counters().items() if k not in hidden}
        out["lr"] = self._applied_max_lr()
        out.update({f"detector_{k}": v for k, v in self.detector.stats().items()})
        if self.escalation is not None:  # escalations taken (Note [escalation])
            out["escalations"] = torch.tensor(len(self.escalation.history))
        if not include_optimizer:
            return out
        base_stats = getattr(self.optimizer, "stats", None)
        if callable(base_stats):
            for key, value in base_stats().items():
                out[f"optimizer.{key}" if key in out else key] = value
        return out

    def history(self) -> list[dict[str, float]]:
        """The last alarms, oldest first, as ``{"step", "loss"}`` (a host read); ``loss`` is
        the one the detector tested (the mean over ranks under torch.distributed)."""
        steps = self.history_step.tolist()
        losses = self.history_loss.tolist()
        rows = [{"step": s, "loss": l} for s, l in zip(steps, losses, strict=True) if s >= 0]
        return sorted(rows, key=lambda row: row["step"])

    # -- stepping ---------------------------------------------------------------------------
    def observe_loss(self, loss: torch.Tensor | float) -> None:
        """Give the loss of this step's minibatch to the next :meth:`step`.

        It wins over a closure's returned loss and loses to ``step(loss=...)`` (Note [loss
        precedence] in :meth:`step`); a later call replaces it, and each step consumes it.
        """
        check_scalar_loss(f"{type(self).__name__}.observe_loss", loss)
        self._pending_loss = loss.detach() if isinstance(loss, torch.Tensor) else loss

    @torch.no_grad()
    def step(
        self, closure: Callable[[], Any] | None = None, *, loss: torch.Tensor | float | None = None
    ) -> Any:
        """Watch the loss, then answer an alarm (Note [the ladder]) or step the wrapped
        optimizer at the scaled rate.

        Note [loss precedence]: the detector watches, in this order, ``loss`` given here, else
        the loss given to :meth:`observe_loss` since the last step, else the closure's result.
        An observed loss wins over the closure's because frameworks that run the closure
        themselves return a stand-in: under gradient accumulation Lightning's closure returns
        the last micro-batch's loss divided by the number of micro-batches, while its loss
        callback (:class:`~steadystep.integrations.lightning.LossFeeder`) observes the mean
        over them. The closure still runs (it computes the gradients). Returns the closure's
        result when there is a closure (as torch's optimizers do), else the watched loss.
        """
        owner = f"{type(self).__name__}.step"
        check_loss(owner, loss)
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        if loss is None:
            loss = self._pending_loss
        if loss is None:
            check_loss(owner, result, name="the closure's result (the loss)")
            loss = result
        if loss is None and is_state_init_step(self.optimizer, closure):
            # DCP (compose.wrapper.is_state_init_step): the wrapped optimizer
            # takes torch.distributed.checkpoint's zero-gradient, lr-0 step and the snapshots
            # are made; the detector sees no loss and no counter moves.
            self.snapshot.track(self._params(), self.optimizer)
            self.optimizer.step()
            return None
        if loss is None:
            raise _missing_loss(type(self).__name__)
        check_scalar_loss(owner, loss)
        self._pending_loss = None
        observed = loss.detach() if isinstance(loss, torch.Tensor) else loss
        if self.escalation is not None and self.escalation.due():
            self._escalate()  # Note [the escalation flag]: this step is dropped
            return loss if closure is None else result
        params = self._params()
        # Note [non-finite gradients]: one pass over the gradients, before the detector sees the
        # loss, gives the skip flag (so a skipped step leaves the detector untouched, whoever
        # skips it) and the norm some detectors watch, on the device. Sparse gradients are read
        # on their stored values, complex ones as real pairs (stored_real_values), so the guard
        # takes whatever the wrapped optimizer takes.
        grads = [stored_real_values(p.grad) for p in params if p.grad is not None]
        found_finite, grad_norm = gradient_stats(grads)
        observed, grad_norm, found_finite = mean_over_ranks(observed, grad_norm, found_finite)
        bad_grads = ~found_finite
        alarm = self.detector.update(
            observed, grad_norm=grad_norm if self.detector.needs_grad_norm else None, skip=bad_grads
        ).to(self.alarms.device)
        bad_grads = bad_grads.to(alarm.device)
        self.last_step_skipped = bad_grads  # read by Stabilized (ALRC's moments)
        # The ladder's decision, the scale's factor (applied to lr_scale), and the phase, counts
        # and history written; the history keeps the loss the detector tested (under
        # torch.distributed the rank mean). One C call on the CPU (Note [the ladder kernel]).
        decision, factor, revert = decide_step(self, alarm, observed, bad_grads)
        if self.backtrack:
            self.snapshot.track(params, self.optimizer)
        if self._scales_itself:
            self._maskable.scale_lr_(factor)  # Note [the learning-rate scale]
        if self.response == "ladder":
            # A skipped batch or rolled-back weights are not the run's level: the next loss is
            # tested against the band from before the trouble. The last rung accepts the new
            # level: the detector restarts from it.
            self.detector.revert(revert)
            self.detector.reset(decision.accept)
        cut = False
        if self._device_side:
            self._device_step(decision, bad_grads, found_finite)
        else:
            cut = self._host_step(decision, bad_grads)
        _bookkeeping(self, cut)
        return loss if closure is None else result

    def _after_step(self, cut: bool) -> None:
        """The host's bookkeeping: the call count and the ``min_lr`` check, on a cut the host
        saw (the host path) or every ``check_every`` steps (the sync-free path), then the log's
        report (Note [the guard's report]); outside any ``torch.compile`` of ``step``, so a
        compiled step still counts, raises and reports."""
        self._calls += 1
        if cut or (self._device_side and self._calls % self.check_every == 0):
            check_min_lr(self)
        report(self, cut=cut)
        if self.escalation is not None and self._calls % self.escalation.every == 0:
            self.escalation.take(self._ring_tensors(), self.detector, self._calls)

    def _ring_tensors(self) -> list[torch.Tensor]:
        """A slot of the escalation's ring: parameters, optimizer state, model buffers."""
        params = self._params()
        return [*params, *state_tensors(self.optimizer, params)[0], *self.snapshot.model_buffers]

    def _escalate(self) -> None:
        """Note [escalation]: restore the ring's slot, cut the rate, skip data; the ladder
        goes on from the restored weights as after a rollback."""
        assert self.escalation is not None
        self.escalation.restore(self._ring_tensors(), self.detector, self._calls)
        self.last_step_skipped = torch.ones_like(self.phase, dtype=torch.bool)  # no observation
        if self.backtrack:  # the one-step snapshot is the restored state
            self.snapshot.track(self._params(), self.optimizer)
            self.snapshot.copy_(restore=False)
        factor = torch.full_like(self.lr_scale, self.lr_factor)
        self.lr_scale.mul_(factor)
        if self._scales_itself:
            self._maskable.scale_lr_(factor)
        # the decision's step left the phase ROLLED_BACK and the wait and calm counts at 0
        self.steps.add_(1)
        _bookkeeping(self, cut=True)

    def _device_step(
        self, decision: Decision, bad_grads: torch.Tensor, found_finite: torch.Tensor
    ) -> None:
        """Roll back where the decision says so, and take the masked step, all on the device.

        ``found_finite``: the guard's gradient check of this step (Note [non-finite
        gradients]), which the masked step takes instead of a pass of its own."""
        skip = ~decision.update
        if self.backtrack:
            # A step that takes no update keeps the snapshot (``hold``): it is what the next
            # rollback must restore.
            self.snapshot.apply_(decision.rollback, hold=skip | bad_grads)
        inner = self._maskable
        if not self._scales_itself:
            # torch's fused step: its own step runs its hooks; a skipped non-finite gradient
            # that is not an alarm is counted here (Note [non-finite gradients])
            self.nonfinite_grads.add_((bad_grads & decision.update).to(self.nonfinite_grads.dtype))
            with applied_lr(self.optimizer, self.lr_scale):
                inner.masked_step(skip, found_finite)
            return
        # Note [hooks]: ``masked_step`` bypasses the wrapped optimizer's ``step``, so its own
        # step hooks run here (the host path gets them from ``optimizer.step()``). They run
        # every step: an alarm's step is a masked no-op, not known on the host.
        call_with_step_hooks(self.optimizer, lambda: inner.masked_step(skip, found_finite))

    def _host_step(self, decision: Decision, bad_grads: torch.Tensor) -> bool:
        """The decision read on the host and carried out; returns whether the rate was cut."""
        # Note [host syncs]: the one read per step a third-party optimizer costs; the decision,
        # the non-finite-gradient flag and the scale come back together.
        flags = torch.stack(
            [
                decision.update.double(),
                decision.rollback.double(),
                bad_grads.double(),
                self.lr_scale.to(decision.update.device),
            ]
        ).tolist()
        update, rollback, skipped, scale = bool(flags[0]), bool(flags[1]), bool(flags[2]), flags[3]
        if rollback and self.backtrack:
            self.snapshot.copy_(restore=True)
        if not update:
            return rollback
        if skipped and self._scales_itself:
            # A MaskableOptimizer skips (and counts) a non-finite gradient itself; a skipped
            # step is no update, so the snapshot stays as it is.
            self.optimizer.step()
            return False
        if skipped:
            # Note [non-finite gradients]: no update, no cut (the detector did not observe it).
            self.nonfinite_grads.add_(1)
            return False
        if self.backtrack:
            self.snapshot.copy_(restore=False)
        if self._scales_itself:
            self.optimizer.step()
            return False
        with applied_lr(self.optimizer, scale):
            self.optimizer.step()
        return False

    def _applied_max_lr(self) -> torch.Tensor:
        """The largest applied learning rate (0-d, on the device; no host read)."""
        if self._scales_itself:
            return self._maskable.max_lr()
        return applied_max_lr(self.optimizer, self.lr_scale)


def _bookkeeping(guard: CatastropheGuard, cut: bool) -> None:
    """``guard._after_step(cut)``; under ``torch.compile`` (dynamo loaded) outside the graph."""
    after = CatastropheGuard._after_step
    (_outside_graph(after) if "torch._dynamo" in sys.modules else after)(guard, cut)


@functools.cache
def _outside_graph(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compiler.disable(fn)
