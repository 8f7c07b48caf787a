"""Recovery beyond one step: a ring of snapshots, and the rung above the ladder that uses it.

Note [escalation]
    The ladder (:mod:`steadystep.ladder`) answers what one step did: a bad batch is skipped, a
    bad update rolled back one step. Trouble that builds up over several steps gets past it: a
    stretch of bad data outlasts the skip and the ``accept_after`` wait, and the ladder accepts
    it as a change of level and trains on it; weights already spoiled before the first alarm
    (a slow divergence, a late alarm) are what a one-step rollback restores, and the alarms come
    back. Large runs answer that by hand (PaLM restarted about 100 steps before a spike and
    skipped 200-500 batches). :class:`Escalation` does it in process:

    * **a ring of snapshots**: every ``every`` steps, after the update, a copy of the
      parameters, the optimizer's state, the model's buffers and the detector goes into one of
      ``keep`` slots (the oldest is overwritten), beside each tensor, in (pinned) host memory or
      on disk (``snapshot_device``);
    * **when to escalate**: the one-step rollback did not hold, decided on the device with the
      ladder: a second rollback within ``within`` steps of the last one, or the ladder about to
      accept a change of level (``accept_after`` alarms at the restored weights) that has not
      been put to the test yet;
    * **what it does**: the newest slot taken at or before the step whose alarm opened the
      episode (the oldest when the ring holds none that early) is restored, the rate cut by the
      guard's ``lr_factor``, and the sampler (:class:`~steadystep.SkippableSampler`, or anything
      with ``position`` and ``skip(start, stop)``) told to skip the next ``skip_ahead`` global
      batches. The batches since the snapshot are not replayed: the run goes on with new data.
      Then the ladder takes over at the restored weights: if the loss is still out of the band
      there, on other data, the weights were not the cause: it is a new level, and the ladder
      accepts it as before (the episode's cuts undone);
    * **giving up**: ``max_escalations`` escalations, each within ``patience`` steps of the one
      before, raise :class:`TrainingDiverged` with their history.

Note [the escalation flag]
    The decision is a 0-d tensor on the device, like the ladder's; the host needs it to copy a
    slot back and to tell the sampler. It is posted to host memory without waiting (on CUDA a
    non-blocking copy into pinned memory and an event) and read at the start of the *next* step:
    no host read of the current step's work. On CUDA the host waits there for the previous
    step's event, which the device has usually passed while the host queued this step's forward
    and backward; a host running more than a step ahead of the device waits, so the ring bounds
    the host's lead to one step (not yet measured on a GPU). So an escalation acts one
    step late, on every device alike (and so on every rank alike): the step after the decision is
    dropped whole (its gradient was taken at the weights being abandoned), the slot restored in
    its place.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from steadystep._validation import check_count
from steadystep.ladder import NORMAL, ROLLED_BACK, Decision

__all__ = ["Escalation", "TrainingDiverged"]

_NEVER = -(2**62)  # the step of a rollback that never happened


class TrainingDiverged(RuntimeError):
    """Raised when alarms have driven the learning rate below ``min_lr``, or escalations
    (Note [escalation]) did not bring the run back.

    ``history`` lists dicts with at least ``"step"`` and ``"loss"``, oldest first: the guard's
    last alarms (up to 64; ``loss`` is the loss the detector tested, the mean over ranks under
    torch.distributed), or the escalations (with ``"restored_to"``, the step of the snapshot,
    and ``"skipped"``, the window ``[start, stop)`` of global batches or None without a
    sampler; the last, refused, with both None).
    """

    def __init__(self, message: str, history: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.history = history

    def __reduce__(self) -> tuple[type, tuple[str, list[dict[str, Any]]]]:
        # Pickle with the history (the default would call __init__ with the message alone), so
        # the error crosses process boundaries: multiprocessing pools, spawned DDP workers.
        return (type(self), (str(self), self.history))


def _where(value: Any) -> torch.device | Path | None:
    """``snapshot_device`` as a device, a directory, or None (beside each tensor)."""
    if value is None or isinstance(value, torch.device):
        return value
    if isinstance(value, os.PathLike):
        return Path(value)
    if isinstance(value, str):
        try:
            return torch.device(value)
        except RuntimeError:
            pass
    raise ValueError(
        f"snapshot_device must be None (beside each tensor), a device ('cpu', 'cuda:0') or a "
        f"directory as a pathlib.Path, got snapshot_device={value!r}"
    )


class Escalation:
    """The ring of snapshots and the rung above the ladder (Note [escalation]); give it to the
    guard: ``CatastropheGuard(opt, model=model, escalation=ss.Escalation(sampler=sampler))``.

    Args:
        every: steps between snapshots (default 50).
        keep: snapshots kept (default 2): the ring reaches ``every * keep`` steps back.
        snapshot_device: where the snapshots live: None (default: beside each tensor), a
            device (``"cpu"``: host memory, pinned for CUDA tensors, copied without waiting),
            or a directory (a ``pathlib.Path``: one file per slot, written synchronously).
        sampler: told which global batches to skip (``skip(start, stop)``, ``position``):
            :class:`~steadystep.SkippableSampler`, :class:`~steadystep.SkippableIterable`;
            its ``state_dict`` is saved with the guard's. None: nothing is skipped.
        skip_ahead: global batches skipped after an escalation (default 20).
        within: a second rollback within this many steps of the last escalates (default 20).
        max_escalations: escalations without recovery before :class:`TrainingDiverged`
            (default 3).
        patience: an escalation more than this many steps after the last one starts the count
            again (default 500).

    A slot costs the parameters, the optimizer's state and the buffers once more (with Adam,
    3x the parameters' bytes); docs/ladder.md has the measured memory and time per snapshot.
    """

    def __init__(
        self,
        *,
        every: int = 50,
        keep: int = 2,
        snapshot_device: torch.device | str | os.PathLike[str] | None = None,
        sampler: Any = None,
        skip_ahead: int = 20,
        within: int = 20,
        max_escalations: int = 3,
        patience: int = 500,
    ) -> None:
        self.every = check_count("every", every)
        self.keep = check_count("keep", keep)
        self.where = _where(snapshot_device)
        if sampler is not None and not (
            callable(getattr(sampler, "skip", None)) and hasattr(sampler, "position")
        ):
            raise TypeError(
                f"sampler must have skip(start, stop) and position (ss.SkippableSampler), "
                f"got {type(sampler).__name__}"
            )
        self.sampler = sampler
        self.skip_ahead = check_count("skip_ahead", skip_ahead, low=0)
        self.within = check_count("within", within)
        self.max_escalations = check_count("max_escalations", max_escalations)
        self.patience = check_count("patience", patience)
        self.slots: list[dict[str, Any] | None] = [None] * self.keep
        self.slot_steps: list[int] = [-1] * self.keep
        self.count = 0  # escalations without recovery
        self.last_step = _NEVER  # the step of the last escalation
        self.history: list[dict[str, Any]] = []
        self._flag: Tensor | None = None  # Note [the escalation flag]
        self._event: Any = None

    def __repr__(self) -> str:
        return (
            f"Escalation(every={self.every}, keep={self.keep}, snapshot_device={self.where!r}, "
            f"skip_ahead={self.skip_ahead}, within={self.within}, "
            f"max_escalations={self.max_escalations}, patience={self.patience})"
        )

    # -- the device state --------------------------------------------------------------------
    def attach(self, device: torch.device) -> None:
        """The 0-d tensors the decision keeps, on the guard's device."""
        self.episode_start = torch.zeros((), dtype=torch.int64, device=device)
        self.last_rollback = torch.full((), _NEVER, dtype=torch.int64, device=device)
        self.tried = torch.zeros((), dtype=torch.bool, device=device)
        self.loss = torch.zeros((), dtype=torch.float32, device=device)  # tested at the decision
        self._pinned = device.type == "cuda"
        self._flag = torch.zeros((), dtype=torch.bool, pin_memory=self._pinned)

    def counters(self) -> dict[str, Tensor]:
        return {
            "episode_start": self.episode_start,
            "last_rollback": self.last_rollback,
            "tried": self.tried,
            "loss": self.loss,
        }

    def amend(
        self, decision: Decision, alarm: Tensor, phase: Tensor, step: Tensor, loss: Tensor
    ) -> Decision:
        """The ladder's decision with this rung on top (no host read): on an escalation, no
        update, no rollback, no cut and no acceptance this step (the restore comes next step);
        the phase is ROLLED_BACK, as after a rollback."""
        self.episode_start.copy_(torch.where(alarm & (phase == NORMAL), step, self.episode_start))
        recent = step - self.last_rollback <= self.within
        has_slot = any(s >= 0 for s in self.slot_steps)
        escalate = ((decision.accept & ~self.tried) | (decision.rollback & recent)) & has_slot
        keep = ~escalate
        rolled = decision.rollback & keep
        self.last_rollback.copy_(torch.where(rolled, step, self.last_rollback))
        over = (decision.phase == NORMAL) & ~alarm  # the episode ended calm
        self.tried.copy_((self.tried | escalate) & ~over)
        self.loss.copy_(torch.where(escalate, loss.to(self.loss), self.loss))
        self._post(escalate)
        return Decision(
            update=decision.update & keep,
            rollback=rolled,
            cut=decision.cut & keep,
            accept=decision.accept & keep,
            phase=torch.where(
                escalate, torch.full_like(decision.phase, ROLLED_BACK), decision.phase
            ),
            waited=torch.where(escalate, torch.zeros_like(decision.waited), decision.waited),
        )

    def _post(self, escalate: Tensor) -> None:
        """Note [the escalation flag]: on its way to the host, without waiting."""
        assert self._flag is not None
        self._flag.copy_(escalate, non_blocking=self._pinned)
        if self._pinned:
            self._event = torch.cuda.Event()
            self._event.record()

    def due(self) -> bool:
        """Did the last step decide to escalate? (Note [the escalation flag]: on CUDA a wait for
        the last step's event; on the CPU a read of host memory.)"""
        if self._flag is None:
            return False
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        due = bool(self._flag)
        if due:
            self._flag.fill_(False)  # read once: the dropped step posts nothing
        return due

    def _peek(self) -> bool:
        """The posted flag, left for :meth:`due` (a checkpoint between the steps keeps it)."""
        if self._flag is None:
            return False
        if self._event is not None:
            self._event.synchronize()
        return bool(self._flag)

    # -- the ring ------------------------------------------------------------------------------
    def _copy(self, t: Tensor) -> Tensor:
        if isinstance(self.where, Path):  # written to disk right after: a synchronous copy
            return t.detach().to("cpu", copy=True)
        device = t.device if self.where is None else self.where
        pin = device.type == "cpu" and t.is_cuda
        return torch.empty_like(t, device=device, pin_memory=pin).copy_(t, non_blocking=pin)

    def take(self, live: list[Tensor], detector: Any, step: int) -> None:
        """Copy ``live`` (parameters, optimizer state, buffers) and the detector's state into
        the oldest slot, as the snapshot of ``step``."""
        i = min(range(self.keep), key=lambda k: self.slot_steps[k])
        old = self.slots[i]
        tensors = (
            old["tensors"]
            if old is not None and isinstance(self.where, torch.device | None)
            else None
        )
        if tensors is not None and [t.shape for t in tensors] == [t.shape for t in live]:
            for c, t in zip(tensors, live, strict=True):
                c.copy_(t, non_blocking=c.is_pinned())
        else:
            tensors = [self._copy(t) for t in live]
        slot = {
            "tensors": tensors,
            "detector": {
                k: v.clone() if isinstance(v, Tensor) else v
                for k, v in detector.state_dict().items()
            },
        }
        if isinstance(self.where, Path):
            self.where.mkdir(parents=True, exist_ok=True)
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            path = self.where / f"slot{i}-rank{rank}.pt"
            torch.save(slot, path)
            slot = {"path": str(path)}
        self.slots[i] = slot
        self.slot_steps[i] = step

    def _slot(self, i: int) -> dict[str, Any]:
        slot = self.slots[i]
        assert slot is not None
        if "path" in slot:
            return torch.load(slot["path"], map_location="cpu", weights_only=True)
        return slot

    def choose(self, episode_start: int) -> int:
        """The newest slot taken at or before ``episode_start``, else the oldest there is."""
        taken = [k for k in range(self.keep) if self.slot_steps[k] >= 0]
        before = [k for k in taken if self.slot_steps[k] <= episode_start]
        if before:
            return max(before, key=lambda k: self.slot_steps[k])
        return min(taken, key=lambda k: self.slot_steps[k])

    def nbytes(self) -> int:
        """Bytes the ring holds in memory (on disk: 0)."""
        return sum(
            t.nbytes for s in self.slots if s is not None and "tensors" in s for t in s["tensors"]
        )

    # -- escalating ----------------------------------------------------------------------------
    def restore(self, live: list[Tensor], detector: Any, step: int) -> dict[str, Any]:
        """Copy the chosen slot back into ``live`` and the detector, tell the sampler, and
        record it; raises :class:`TrainingDiverged` after ``max_escalations`` in a row."""
        if step - self.last_step > self.patience:
            self.count = 0
        start = int(self.episode_start)
        i = self.choose(start)
        loss = float(self.loss)  # the one the detector tested (the rank mean under DDP)
        record: dict[str, Any] = {"step": step, "loss": loss, "restored_to": self.slot_steps[i]}
        if self.count >= self.max_escalations:
            self.history.append({**record, "restored_to": None, "skipped": None})
            raise TrainingDiverged(
                f"CatastropheGuard: {self.count} escalations (rollbacks to snapshots up to "
                f"{self.every * self.keep} steps back, {self.skip_ahead} batches skipped each) "
                f"did not bring the run back; the last at step {self.last_step}. History "
                f"(step, loss, restored to): "
                f"{[(h['step'], h['loss'], h['restored_to']) for h in self.history[-5:]]}. "
                "Look for a persistent fault in the data or the model, or lower the lr.",
                list(self.history),
            )
        slot = self._slot(i)
        for t, c in zip(live, slot["tensors"], strict=True):
            t.copy_(c)
        detector.load_state_dict(slot["detector"])
        window = None
        if self.sampler is not None:
            position = int(self.sampler.position)
            window = [position, position + self.skip_ahead]
            self.sampler.skip(*window)
        self.count += 1
        self.last_step = step
        record["skipped"] = window
        self.history.append(record)
        self.last_rollback.fill_(_NEVER)
        return record

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The ring's metadata, its slots (clones, or the files' paths on disk), the decision's
        device state, the history and the sampler's state."""
        slots = [
            None
            if s is None
            else (
                {"path": s["path"]}
                if "path" in s
                else {
                    "tensors": [t.clone() for t in s["tensors"]],
                    "detector": s["detector"],
                }
            )
            for s in self.slots
        ]
        out: dict[str, Any] = {
            "slots": slots,
            "slot_steps": list(self.slot_steps),
            "count": self.count,
            "last_step": self.last_step,
            "history": [dict(h) for h in self.history],
            "due": self._peek(),
            **{k: v.clone() for k, v in self.counters().items()},
        }
        if self.sampler is not None and callable(getattr(self.sampler, "state_dict", None)):
            out["sampler"] = self.sampler.state_dict()
        return out

    def check_state_dict(
        self, state: dict[str, Any], params: list[Tensor], buffers: list[Tensor]
    ) -> None:
        """The checks of :meth:`load_state_dict`, without loading (the sampler's on a copy):
        the ring's size, and each slot's parameters and buffers of this model's shapes."""
        steps = state.get("slot_steps") if isinstance(state, dict) else None
        slots = state.get("slots") if isinstance(state, dict) else None
        if not isinstance(steps, list) or not isinstance(slots, list) or len(steps) != self.keep:
            raise ValueError(
                f"Escalation.load_state_dict: the checkpoint's ring has "
                f"{len(steps) if isinstance(steps, list) else steps!r} slots, this one "
                f"keep={self.keep}"
            )
        want = [tuple(t.shape) for t in params], [tuple(t.shape) for t in buffers]
        for saved in slots:
            if saved is None or "path" in saved:
                continue
            shapes = [tuple(t.shape) for t in saved["tensors"]]
            found = shapes[: len(params)], shapes[len(shapes) - len(buffers) :]
            if found != want:
                raise ValueError(
                    f"Escalation.load_state_dict: a slot's parameters and buffers have shapes "
                    f"{found}, this model's {want}"
                )
        missing = [k for k in ("count", "last_step", "history", *self.counters()) if k not in state]
        if missing:
            raise ValueError(f"Escalation.load_state_dict: the checkpoint lacks {missing}")
        if self.sampler is not None and "sampler" in state:
            check = getattr(self.sampler, "check_state_dict", None)
            if callable(check):  # ss.SkippableIterable: no copy of the stream it wraps
                check(state["sampler"])
            else:
                copy.deepcopy(self.sampler).load_state_dict(state["sampler"])

    def load_state_dict(self, state: dict[str, Any], live: list[Tensor]) -> None:
        """Restore :meth:`state_dict` (``live``: the tensors a slot holds, for their devices;
        the guard has run :meth:`check_state_dict`)."""
        slots: list[dict[str, Any] | None] = []
        for saved in state["slots"]:
            if saved is None or "path" in saved:
                slots.append(saved)
                continue
            tensors = [
                self._copy(c.to(t.device)) for c, t in zip(saved["tensors"], live, strict=True)
            ]
            slots.append({"tensors": tensors, "detector": saved["detector"]})
        self.slots, self.slot_steps = slots, [int(s) for s in state["slot_steps"]]
        self.count, self.last_step = int(state["count"]), int(state["last_step"])
        self.history = [dict(h) for h in state["history"]]
        for name, value in self.counters().items():
            value.copy_(state[name])
        assert self._flag is not None
        self._flag.fill_(bool(state.get("due", False)))
        self._event = None
        if self.sampler is not None and "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])
