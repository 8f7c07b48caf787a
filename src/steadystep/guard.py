"""CatastropheGuard: detect a catastrophe on the loss, roll back one step, cut the learning rate.

SALeRA's recovery (Algorithm 1, lines 7-11 of the paper; docs/decisions.md) around any optimizer.
Each step the minibatch loss goes to a change detector (:class:`~steadystep.SpikeDetector` by
default; the paper's :class:`~steadystep.PageHinkleyPaper` is one argument away). A detector
with ``needs_grad_norm`` also gets the global gradient norm, computed once per step on the
device (:func:`~steadystep.detectors.global_grad_norm`). On an alarm:

* the parameters return to their value before the last update (``backtrack=True``; with
  ``backtrack=False`` they stay, as in the authors' published runs),
* every learning rate is multiplied by ``lr_factor`` (0.5),
* the detector restarts (its threshold is kept) and no update is taken this step.

Otherwise the parameters are saved (one copy, the rollback snapshot) and the wrapped optimizer
steps. A NaN or inf loss is an alarm too, and leaves the detector's statistics untouched.

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

Note [host syncs]: around a :class:`~steadystep.compose.protocol.MaskableOptimizer`
(:class:`~steadystep.ALeRA`, :class:`~steadystep.AgAdam`, :class:`~steadystep.CPropSGD`,
:class:`~steadystep.CPropAdam`, :class:`~steadystep.CPropAdamW`) every decision stays on the
device: the rollback is one kernel call that copies ``snapshot -> p`` where ``alarm`` and
``p -> snapshot`` elsewhere (:func:`steadystep._kernels.rollback_`), the cut multiplies the
0-d multipliers by ``where(alarm, lr_factor, 1)`` (``scale_lr_``) and the base step runs
masked (``masked_step(alarm)``). torch's own fused optimizers (``fused=True`` Adam, AdamW, SGD,
Adagrad) take the same path through their ``found_inf`` flag, the one ``GradScaler`` uses
(:mod:`steadystep.compose.torch_fused`, which stores their learning rates as 0-d tensors so
the cut too stays on the device); there the guard checks the gradients itself, in one kernel
call. The only host read is the ``min_lr`` check (``max_lr()``), once every ``check_every``
steps. Any other optimizer (torch's non-fused ones, the CProp wrapper) keeps state the guard
cannot mask, so the guard reads the alarm on the host once per step and skips
``optimizer.step()`` on alarms; that read is the cost of wrapping such an optimizer.
``snapshot_device="cpu"`` also takes the host path (a rollback from host memory is only worth
paying on an alarm).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from steadystep import _kernels as kernels
from steadystep._tensors import gradient_stats, shards, stored_real_values
from steadystep._validation import (
    check_loss,
    check_nonnegative,
    check_probability,
    check_scalar_loss,
)
from steadystep.checkpoint import CLASS_KEY, check_class, check_same, check_shape
from steadystep.compose.order import Composable, check_wrappable
from steadystep.compose.protocol import MaskableOptimizer
from steadystep.compose.torch_fused import torch_fused_maskable
from steadystep.compose.wrapper import (
    OptimizerWrapper,
    call_with_step_hooks,
    is_state_init_step,
)
from steadystep.detectors import SpikeDetector
from steadystep.detectors.protocol import ChangeDetector, ForeignDetector, as_detector

__all__ = ["CatastropheGuard", "TrainingDiverged"]

_HISTORY = 64  # alarms remembered for TrainingDiverged (a ring buffer on the device)


class TrainingDiverged(RuntimeError):
    """Raised when alarms have driven the learning rate below ``min_lr``.

    ``history`` lists the last alarms (up to 64) as dicts ``{"step", "loss"}``, oldest first;
    ``loss`` is the loss the detector tested (the mean over ranks under torch.distributed).
    """

    def __init__(self, message: str, history: list[dict[str, float]]) -> None:
        super().__init__(message)
        self.history = history

    def __reduce__(self) -> tuple[type, tuple[str, list[dict[str, float]]]]:
        # Pickle with the history (the default would call __init__ with the message alone), so
        # the error crosses process boundaries: multiprocessing pools, spawned DDP workers.
        return (type(self), (str(self), self.history))


def _missing_loss(owner: str) -> RuntimeError:
    return RuntimeError(
        f"{owner} needs the minibatch loss to watch for catastrophes: call "
        "opt.step(loss=loss.detach()), or opt.observe_loss(loss) before opt.step(), "
        "or pass a closure that returns the loss: opt.step(closure) (built by ss.stabilize: "
        "opt.clip(per_sample_losses) before opt.step() remembers their raw mean)"
    )


class CatastropheGuard(OptimizerWrapper, Composable):
    """Wrap any optimizer with detect -> roll back -> cut the learning rate (SALeRA's recovery).

    With ``theta_b`` the parameters saved before the last update and ``A_t`` the detector's alarm
    on loss ``L_t``:

    .. math::
        A_t:\\ \\theta \\leftarrow \\theta_b,\\ \\eta \\leftarrow \\texttt{lr\\_factor}\\cdot\\eta,
        \\ \\text{no update};\\qquad
        \\neg A_t:\\ \\theta_b \\leftarrow \\theta,
        \\ \\theta \\leftarrow \\text{optimizer.step}(\\theta)

    Args:
        optimizer: the optimizer to protect (any ``torch.optim.Optimizer``, with whatever it
            supports: sparse gradients for SGD or SparseAdam, complex parameters; steadystep's
            ALeRA, AgAdam and native CProp classes stay sync-free, see Note [host syncs]).
        detector: change detector with ``update(loss) -> alarm``; default
            :class:`~steadystep.SpikeDetector` ``()`` (the benchmark's best, ``docs/detectors.md``;
            the paper's test is ``PageHinkleyPaper(ph_lambda=0.1, rho=batch/dataset)``).
        lr_factor: factor applied to every learning rate on an alarm (default 0.5, in (0, 1]).
            For a MaskableOptimizer (ALeRA, AgAdam, CPropSGD/Adam/AdamW) it multiplies
            ``group["lr_multiplier"]`` (through ``scale_lr_``); otherwise ``group["lr"]``
            (in place when it is a tensor). A scheduler that recomputes ``lr`` from its base
            values (LambdaLR, OneCycleLR) overwrites the cut; chainable ones keep it.
        backtrack: roll the parameters back on an alarm (default True); False only skips and
            cuts, as the authors' published runs did, and keeps no snapshot.
        min_lr: when an alarm leaves the largest effective learning rate below this, raise
            :class:`TrainingDiverged` with the alarm history (default 1e-15).
        snapshot_device: where the rollback snapshot lives (default: beside each parameter).
            ``"cpu"`` halves the device memory cost for models that do not fit twice, at one
            device-to-host copy of the parameters per step plus a host read of the alarm.
        check_every: steps between ``min_lr`` checks on the sync-free path (default 100; each
            check is one host read).

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
    ) -> None:
        super().__init__(optimizer)
        # Note [the order of the composition] (compose/order.py): one guard, outermost
        check_wrappable("CatastropheGuard", optimizer)
        self.lr_factor = check_probability("lr_factor", lr_factor)
        self.min_lr = check_nonnegative("min_lr", min_lr)
        if not isinstance(backtrack, bool):
            raise TypeError(f"backtrack must be a bool, got backtrack={backtrack!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got check_every={check_every!r}")
        self.backtrack = backtrack
        self.check_every = check_every
        self.snapshot_device = None if snapshot_device is None else torch.device(snapshot_device)
        # One contract for every detector (steadystep.detectors.protocol); one of your own
        # with update(loss) only is adapted, at one host read per step.
        self.detector = as_detector(SpikeDetector() if detector is None else detector)
        # Note [host syncs]: a MaskableOptimizer lets every decision stay on the device, and
        # skips a non-finite gradient itself (Note [non-finite gradients]); torch's fused
        # optimizers are masked through their found_inf (steadystep.compose.torch_fused), with
        # the gradients checked here.
        self._maskable: Any = None
        if isinstance(optimizer, MaskableOptimizer):
            self._maskable = optimizer
        elif self.snapshot_device is None:
            self._maskable = torch_fused_maskable(optimizer)
        self._device_side = self._maskable is not None and self.snapshot_device is None

        params = self._params()
        device = params[0].device if params else torch.device("cpu")
        self.alarms = torch.zeros((), dtype=torch.int64, device=device)
        self.rollbacks = torch.zeros((), dtype=torch.int64, device=device)
        self.steps = torch.zeros((), dtype=torch.int64, device=device)
        self.nonfinite_grads = torch.zeros((), dtype=torch.int64, device=device)
        self.lr_scale = torch.ones((), dtype=torch.float64, device=device)
        self.history_step = torch.full((_HISTORY,), -1, dtype=torch.int64, device=device)
        self.history_loss = torch.full((_HISTORY,), math.nan, dtype=torch.float32, device=device)
        self.snapshots: list[torch.Tensor] = []
        self._calls = 0
        self._pending_loss: torch.Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer; its snapshot is taken at the next step."""
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.optimizer!r}, detector={self.detector!r}, "
            f"lr_factor={self.lr_factor}, backtrack={self.backtrack}, min_lr={self.min_lr})"
        )

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    # -- state ------------------------------------------------------------------------------
    def _counters(self) -> dict[str, torch.Tensor]:
        return {
            "alarms": self.alarms,
            "rollbacks": self.rollbacks,
            "steps": self.steps,
            "lr_scale": self.lr_scale,
            "nonfinite_grads": self.nonfinite_grads,
            "history_step": self.history_step,
            "history_loss": self.history_loss,
        }

    checkpoint_key = "guard"  # Note [flat checkpoints] (steadystep.compose.wrapper)

    def _split_checkpoint(
        self, nested: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[str, Any]]:
        """The rollback snapshots go per parameter (``state[i]["guard/snapshot"]`` in the flat
        layout, sharded like the parameter by DCP); the rest of ``"guard"`` (detector,
        counters, settings) stays one dict. A new per-parameter tensor of the guard's goes here
        and in :meth:`_join_checkpoint`."""
        own = dict(nested)
        inner = own.pop("optimizer")
        guard = dict(own["guard"])
        per_param = {i: {"snapshot": s} for i, s in enumerate(guard.pop("snapshots"))}
        own["guard"] = guard
        return inner, per_param, own

    def _join_checkpoint(
        self, inner: dict[str, Any], per_param: dict[int, dict[str, Any]], own: dict[str, Any]
    ) -> dict[str, Any]:
        snapshots = [per_param[i].get("snapshot") for i in range(len(per_param))]
        names = {name for entry in per_param.values() for name in entry}
        gaps = set(per_param) != set(range(len(per_param))) or None in snapshots
        if gaps or names - {"snapshot"}:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the guard's per-parameter entries must "
                "be one 'guard/snapshot' for each of the first parameters in group order, found "
                f"{sorted(names)} for parameters {sorted(per_param)}"
            )
        guard = own.get("guard")
        if isinstance(guard, dict):
            own = {**own, "guard": {**guard, "snapshots": snapshots}}
        return {**own, "optimizer": inner}

    def _wrapped_state_dict(self) -> dict[str, Any]:
        """``{"optimizer": wrapped state_dict, "guard": detector, counters, snapshot}``, laid
        out flat by ``state_dict()`` (Note [flat checkpoints] of
        :mod:`steadystep.compose.wrapper`).

        The guard's part is a snapshot: its tensors (the rollback snapshot included: one copy of
        the parameters) are clones, so a state_dict kept in memory does not change with later
        steps. The wrapped optimizer's per-parameter ``state`` is as that optimizer returns it
        (torch's optimizers return their live tensors; ``copy.deepcopy`` it to keep it).
        """
        guard = {
            "detector": self.detector.state_dict(),
            **{k: v.clone() for k, v in self._counters().items()},
            "snapshots": [s.clone() for s in self.snapshots],
            "calls": self._calls,
            "lr_factor": self.lr_factor,
            "backtrack": self.backtrack,
            "min_lr": self.min_lr,
            "optimizer_class": type(self.optimizer).__name__,
            "detector_class": self._detector_class(),
        }
        return {
            "optimizer": self.optimizer.state_dict(),
            "guard": guard,
            CLASS_KEY: "CatastropheGuard",
        }

    def _load_wrapped_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; resuming continues bitwise as the saved run would.

        Checked first (:mod:`steadystep.checkpoint`): a dict that is not a guard's
        (a plain optimizer's), a guard's around another optimizer class, snapshots of other
        shapes or a detector state of another kind fail with a ValueError, and nothing loads.
        """
        self._check_wrapped_state_dict(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        guard = state_dict["guard"]
        self.detector.load_state_dict(guard["detector"])
        for name, value in self._counters().items():
            if name not in guard:  # a checkpoint from before the counter existed: as new
                fresh = {"lr_scale": 1.0, "history_step": -1, "history_loss": math.nan}
                setattr(self, name, torch.full_like(value, fresh.get(name, 0)))
                continue
            # A copy: the loaded dict must not alias (and later see) the live counters.
            setattr(self, name, guard[name].to(device=value.device, dtype=value.dtype, copy=True))
        params = self._params()
        self.snapshots = [
            s.to(device=self._snapshot_device(p), dtype=p.dtype, copy=True)
            for s, p in zip(guard["snapshots"], params, strict=False)
        ]
        self._calls = int(guard["calls"])
        self.lr_factor = check_probability("lr_factor", guard["lr_factor"])
        self.backtrack = bool(guard["backtrack"])
        self.min_lr = check_nonnegative("min_lr", guard["min_lr"])

    def _check_wrapped_state_dict(self, state_dict: dict[str, Any]) -> None:
        owner = type(self).__name__
        keys = ("optimizer", "guard")
        check_class(state_dict, owner=owner, expected="CatastropheGuard", required=keys)
        guard = state_dict["guard"]
        keys = ("detector", "snapshots", "calls", "lr_factor", "backtrack", "min_lr")
        check_class(
            guard, owner=owner, expected="CatastropheGuard", required=keys, what="its 'guard'"
        )
        inner = type(self.optimizer).__name__
        check_same("optimizer_class", guard.get("optimizer_class"), inner, owner=owner)
        detector = self._detector_class()
        check_same("detector_class", guard.get("detector_class"), detector, owner=owner)
        params = self._params()
        snapshots = guard["snapshots"]
        if not isinstance(snapshots, list) or len(snapshots) > len(params):
            found = len(snapshots) if isinstance(snapshots, list) else type(snapshots).__name__
            raise ValueError(
                f"{owner}.load_state_dict: the state_dict holds {found} rollback snapshots, "
                f"this guard's optimizer has {len(params)} parameters"
            )
        for i, (snap, p) in enumerate(zip(snapshots, params, strict=False)):
            check_shape(snap, "param", p, owner=owner, where=f"the rollback snapshot {i}")
        for name, value in self._counters().items():
            if name in guard and value.dim() == 0:
                check_shape(guard[name], "scalar", value, owner=owner, where=f"{name!r}")
            elif name in guard:
                check_shape(guard[name], "param", value, owner=owner, where=f"{name!r}")
        check_probability("lr_factor", guard["lr_factor"])
        check_nonnegative("min_lr", guard["min_lr"])
        # The detector checks its own part; on a copy, so a failure leaves it as it was.
        copy.deepcopy(self.detector).load_state_dict(guard["detector"])

    def stats(self, *, include_optimizer: bool = True) -> dict[str, torch.Tensor]:
        """Telemetry as 0-d tensors, no host sync (a Monitor writes ``<component>/<key>``):

        * the guard's counters ``alarms``, ``rollbacks``, ``steps``, ``nonfinite_grads`` (steps
          whose ``optimizer.step()`` the guard skipped for a non-finite gradient, Note
          [non-finite gradients]) and ``lr_scale`` (the product of the cuts so far);
        * ``detector_<key>`` for each of the detector's ``stats()`` (PageHinkley: threshold,
          relaxed_loss, mean, cusum, gap, count, alarms);
        * the wrapped optimizer's ``stats()`` when it has one, under their own names (ALeRA:
          ``skipped_steps``, ``group{i}.lr``...; CProp: ``mean_scale``...); a name that clashes
          with one of the guard's gets the prefix ``optimizer.``. ``include_optimizer=False``
          leaves them out (:class:`~steadystep.Stabilized` reports them under their own prefix).
        """
        out = {k: v for k, v in self._counters().items() if not k.startswith("history")}
        out.update({f"detector_{k}": v for k, v in self.detector.stats().items()})
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
        """Watch the loss, then roll back and cut, or step the wrapped optimizer.

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
            # Note [DCP's state initialization]: torch.distributed.checkpoint steps a stateless
            # optimizer with zero gradients and lr 0 to create the state it loads into; the
            # wrapped optimizer takes that step and the snapshots are made, but the detector
            # sees no loss and no counter moves (the load that follows restores them anyway).
            self._ensure_snapshots(self._params())
            self.optimizer.step()
            return None
        if loss is None:
            raise _missing_loss(type(self).__name__)
        check_scalar_loss(owner, loss)
        self._pending_loss = None
        observed = loss.detach() if isinstance(loss, torch.Tensor) else loss
        params = self._params()
        # Note [non-finite gradients]: one pass over the gradients, before the detector sees the
        # loss, gives the skip flag (so a skipped step leaves the detector untouched, whoever
        # skips it) and the norm some detectors watch, on the device. Sparse gradients are read
        # on their stored values, complex ones as real pairs (stored_real_values), so the guard
        # takes whatever the wrapped optimizer takes.
        grads = [stored_real_values(p.grad) for p in params if p.grad is not None]
        found_finite, grad_norm = gradient_stats(grads)
        bad_grads = ~found_finite
        alarm = self.detector.update(
            observed, grad_norm=grad_norm if self.detector.needs_grad_norm else None, skip=bad_grads
        )
        # History records the loss the detector tested: under torch.distributed the rank mean,
        # the same on every rank.
        loss_t = self.detector.last_loss
        self._ensure_snapshots(params)
        alarm = alarm.to(self.alarms.device)
        if self._device_side:
            self._device_step(alarm, params, bad_grads)
            self._record(alarm, loss_t)
            self._calls += 1
            if self._calls % self.check_every == 0:
                self._check_min_lr()
        else:
            alarmed = self._host_step(alarm, params, bad_grads)
            self._record(alarm, loss_t)
            self._calls += 1
            if alarmed:
                self._check_min_lr()
        return loss if closure is None else result

    def _snapshot_device(self, p: torch.Tensor) -> torch.device:
        return p.device if self.snapshot_device is None else self.snapshot_device

    def _ensure_snapshots(self, params: list[torch.Tensor]) -> None:
        """A snapshot per parameter (groups added later get theirs when first seen)."""
        if not self.backtrack:
            return
        for p in params[len(self.snapshots) :]:
            device = self._snapshot_device(p)
            pin = device.type == "cpu" and p.is_cuda
            # empty_like keeps p's kind and layout: a DTensor (FSDP2) gets a DTensor snapshot
            # sharded alike, a channels_last parameter a channels_last one.
            snap = torch.empty_like(p, device=device, pin_memory=pin)
            self.snapshots.append(snap.copy_(p))

    def _device_step(
        self, alarm: torch.Tensor, params: list[torch.Tensor], bad_grads: torch.Tensor
    ) -> None:
        """Roll back where ``alarm``, cut the rates by ``where(alarm, lr_factor, 1)``, and take
        the masked step, all on the device. ``bad_grads``: the guard's gradient check of this
        step (Note [non-finite gradients]): torch's fused optimizers take it as their mask, a
        MaskableOptimizer checks its gradients itself."""
        if self.backtrack:
            # On this rank's shards (FSDP2): the rollback is elementwise.
            local_params = shards(params)
            local_snaps = shards(self.snapshots)
            # Note [non-finite gradients]: a skipped step is no update, so the snapshot keeps
            # the parameters from before the last real one (``hold``).
            if not kernels.rollback_(local_params, local_snaps, alarm, hold=bad_grads):
                for p, snap in zip(local_params, local_snaps, strict=True):
                    # The masked rollback: a copy where alarm, bitwise even when p holds
                    # inf/NaN (lerp-style arithmetic would not be), sync-free on CUDA, and on
                    # CPU several times faster than torch.where with a 0-d condition.
                    p.masked_scatter_(alarm, snap)
                refresh = ~bad_grads.to(alarm.device)
                for snap, p in zip(local_snaps, local_params, strict=True):
                    snap.masked_scatter_(refresh, p)
        cut = torch.full((), self.lr_factor, dtype=torch.float64, device=alarm.device)
        factor = torch.where(alarm, cut, 1.0)
        inner = self._maskable
        if inner is None:  # pragma: no cover - _device_side implies a MaskableOptimizer
            raise RuntimeError("the sync-free path needs a MaskableOptimizer")
        inner.scale_lr_(factor)
        self.lr_scale.mul_(factor)
        if not self._self_protecting():
            # torch's fused step: its own step runs its hooks; a skipped non-finite gradient
            # that is not an alarm is counted here (Note [non-finite gradients])
            self.nonfinite_grads.add_((bad_grads & ~alarm).to(self.nonfinite_grads.dtype))
            inner.masked_step(alarm, ~bad_grads)
            return
        # Note [hooks]: ``masked_step`` bypasses the wrapped optimizer's ``step``, so its own
        # step hooks run here (the host path gets them from ``optimizer.step()``). They run
        # every step: an alarm's step is a masked no-op, not known on the host.
        call_with_step_hooks(self.optimizer, lambda: inner.masked_step(alarm, ~bad_grads))

    def _detector_class(self) -> str:
        """The detector's class name, as checkpoints record it (a foreign one's own name)."""
        inner = self.detector.detector if isinstance(self.detector, ForeignDetector) else None
        return type(inner if inner is not None else self.detector).__name__

    def _self_protecting(self) -> bool:
        """Does the wrapped optimizer skip non-finite gradients itself (a MaskableOptimizer)?"""
        return isinstance(self.optimizer, MaskableOptimizer)

    def _host_step(
        self, alarm: torch.Tensor, params: list[torch.Tensor], bad_grads: torch.Tensor
    ) -> bool:
        # Note [host syncs]: the one read per step a third-party optimizer costs; the alarm
        # and the non-finite-gradient flag come back together.
        flags = torch.stack([alarm.to(torch.bool), bad_grads.to(alarm.device)]).tolist()
        alarmed, skipped = bool(flags[0]), bool(flags[1]) and not flags[0]
        if skipped and self._self_protecting():
            # A MaskableOptimizer skips (and counts) a non-finite gradient itself; a skipped
            # step is no update, so the snapshot stays as it is.
            self.optimizer.step()
            return False
        if skipped:
            # Note [non-finite gradients]: no update, no cut (the detector did not observe it).
            self.nonfinite_grads.add_(1)
            return False
        if self.backtrack:
            self._copy_snapshots(params, restore=alarmed)
        if alarmed:
            self._cut_lr()
            self.lr_scale.mul_(self.lr_factor)
        else:
            self.optimizer.step()
        return alarmed

    def _copy_snapshots(self, params: list[torch.Tensor], *, restore: bool) -> None:
        """``p <- snapshot`` (``restore``) or ``snapshot <- p``: one kernel call where the
        kernels take the tensors, else one copy per tensor (host memory, other devices)."""
        local_params = shards(params)
        local_snaps = shards(self.snapshots)
        device = local_params[0].device if local_params else torch.device("cpu")
        flag = torch.full((), restore, dtype=torch.bool, device=device)
        same_device = all(s.device == device for s in local_snaps)
        if same_device and kernels.rollback_(local_params, local_snaps, flag):
            return
        for p, snap in zip(local_params, local_snaps, strict=True):
            if restore:
                p.copy_(snap, non_blocking=True)
            else:
                snap.copy_(p, non_blocking=True)

    def _cut_lr(self) -> None:
        if self._maskable is not None:
            self._maskable.scale_lr_(torch.tensor(self.lr_factor, dtype=torch.float64))
            return
        for group in self.optimizer.param_groups:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                lr.mul_(self.lr_factor)
            else:
                group["lr"] = lr * self.lr_factor

    def _record(self, alarm: torch.Tensor, loss: torch.Tensor) -> None:
        """Counters and the alarm ring buffer, written with masks (no host sync)."""
        index = (self.alarms % _HISTORY).view(1)
        old_step = self.history_step.gather(0, index)
        old_loss = self.history_loss.gather(0, index)
        loss = loss.to(device=old_loss.device, dtype=old_loss.dtype).reshape(1)
        self.history_step.scatter_(0, index, torch.where(alarm, self.steps, old_step))
        self.history_loss.scatter_(0, index, torch.where(alarm, loss, old_loss))
        self.alarms.add_(alarm.long())
        if self.backtrack:
            self.rollbacks.add_(alarm.long())
        self.steps.add_(1)

    def _max_lr(self) -> float:
        if self._maskable is not None:
            return float(self._maskable.max_lr())
        return max(float(g["lr"]) for g in self.optimizer.param_groups)

    def _check_min_lr(self) -> None:
        """Raise TrainingDiverged when alarms left every learning rate below ``min_lr``."""
        if not bool(self.alarms > 0):
            return
        max_lr = self._max_lr()
        if not max_lr >= self.min_lr:  # NaN-aware: a NaN learning rate has diverged too
            history = self.history()
            raise TrainingDiverged(
                f"{type(self).__name__}: after {int(self.alarms)} alarms the largest learning "
                f"rate is {max_lr:.3g} < min_lr={self.min_lr:g}; training diverged. Last alarms "
                f"(step, loss): {[(h['step'], h['loss']) for h in history[-5:]]}. Lower the "
                "initial lr, or make the detector less sensitive if the alarms come from a noisy "
                "plateau (a larger sigma for SpikeDetector, ph_lambda for PageHinkleyPaper).",
                history,
            )
