"""The guard's checkpoint: what :meth:`CatastropheGuard.state_dict` holds, and the checks that
:meth:`~CatastropheGuard.load_state_dict` runs before it changes anything."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from steadystep._validation import check_nonnegative, check_probability
from steadystep.checkpoint import (
    CLASS_KEY,
    check_class,
    check_dtype,
    check_finite,
    check_optimizer_state,
    check_same,
    check_shape,
)
from steadystep.detectors.protocol import ForeignDetector

__all__ = ["GuardCheckpoint"]

# Counters with sentinel values: the alarm ring buffer holds -1 steps and NaN losses.
_FREE_COUNTERS = ("history_step", "history_loss")


class GuardCheckpoint:
    """The state_dict half of :class:`~steadystep.CatastropheGuard` (a mixin: it reads the
    guard's counters, detector, snapshot and settings)."""

    # provided by the guard
    optimizer: Any
    detector: Any
    snapshot: Any
    escalation: Any

    checkpoint_key = "guard"  # Note [flat checkpoints] (steadystep.compose.wrapper)

    @property
    def snapshots(self) -> list[torch.Tensor]:
        """The parameters' rollback copies (one per parameter seen so far)."""
        return self.snapshot.param_copies

    def _detector_class(self) -> str:
        """The detector's class name, as checkpoints record it (a foreign one's own name)."""
        inner = self.detector.detector if isinstance(self.detector, ForeignDetector) else None
        return type(inner if inner is not None else self.detector).__name__

    def _split_checkpoint(
        self, nested: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[int, dict[str, Any]], dict[str, Any]]:
        """The per-parameter copies go per parameter (``state[i]["guard/snapshot"]`` and
        ``state[i]["guard/state/<key>"]`` in the flat layout, sharded like the parameter by
        DCP); the rest of ``"guard"`` (detector, counters, buffers' copies, settings) stays one
        dict."""
        own = dict(nested)
        inner = own.pop("optimizer")
        guard = dict(own["guard"])
        snapshots = guard.pop("snapshots")
        states = guard.pop("state_snapshots", None) or [{} for _ in snapshots]
        states = [*states, *({} for _ in range(len(snapshots) - len(states)))]
        per_param = {
            i: {"snapshot": s, **{f"state/{k}": t for k, t in state.items()}}
            for i, (s, state) in enumerate(zip(snapshots, states, strict=False))
        }
        own["guard"] = guard
        return inner, per_param, own

    def _join_checkpoint(
        self, inner: dict[str, Any], per_param: dict[int, dict[str, Any]], own: dict[str, Any]
    ) -> dict[str, Any]:
        snapshots = [per_param[i].get("snapshot") for i in range(len(per_param))]
        names = {name for entry in per_param.values() for name in entry}
        gaps = set(per_param) != set(range(len(per_param))) or None in snapshots
        strays = {n for n in names - {"snapshot"} if not n.startswith("state/")}
        if gaps or strays:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the guard's per-parameter entries must "
                "be one 'guard/snapshot' (and 'guard/state/<key>' copies) for each of the first "
                f"parameters in group order, found {sorted(names)} for parameters "
                f"{sorted(per_param)}"
            )
        states = [
            {k[len("state/") :]: v for k, v in per_param[i].items() if k.startswith("state/")}
            for i in range(len(per_param))
        ]
        guard = own.get("guard")
        if isinstance(guard, dict):
            own = {**own, "guard": {**guard, "snapshots": snapshots, "state_snapshots": states}}
        return {**own, "optimizer": inner}

    def _wrapped_state_dict(self) -> dict[str, Any]:
        """``{"optimizer": wrapped state_dict, "guard": detector, counters, snapshot}``.

        The guard's part is a snapshot: its tensors (the rollback copies included: the
        parameters, and with a full rollback the optimizer's state and the buffers) are clones,
        so a state_dict kept in memory does not change with later steps. The wrapped optimizer's
        per-parameter ``state`` is as that optimizer returns it (torch's optimizers return their
        live tensors; ``copy.deepcopy`` it to keep it).
        """
        copies = self.snapshot.state_dict()
        guard = {
            "detector": self.detector.state_dict(),
            **{k: v.clone() for k, v in self._counters().items()},
            "snapshots": copies["params"],
            "state_snapshots": copies["state"],
            "buffer_snapshots": copies["buffers"],
            "calls": self._calls,
            "lr_factor": self.lr_factor,
            "backtrack": self.backtrack,
            "min_lr": self.min_lr,
            "response": self.response,
            "accept_after": self.accept_after,
            "recover_every": self.recover_every,
            "rollback": self.rollback,
            "optimizer_class": type(self.optimizer).__name__,
            "detector_class": self._detector_class(),
        }
        if self.escalation is not None:  # Note [escalation]: the ring, its history, the sampler
            guard["escalation"] = self.escalation.state_dict()
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
        A checkpoint from before the learning-rate scale (Note [the learning-rate scale]) has
        its cuts in ``group["lr"]`` already: its scale loads as 1 around a torch optimizer.
        """
        self.check_state_dict(state_dict)
        self.optimizer.load_state_dict(state_dict["optimizer"])
        guard = state_dict["guard"]
        self.detector.load_state_dict(guard["detector"])
        fresh = {"lr_scale": 1.0, "episode_scale": 1.0, "history_step": -1}
        fresh["history_loss"] = math.nan
        old_format = "phase" not in guard
        for name, value in self._counters().items():
            if name not in guard or (old_format and name == "lr_scale" and not self._scales_itself):
                # a checkpoint from before the counter existed: as new
                setattr(self, name, torch.full_like(value, fresh.get(name, 0)))
                continue
            # A copy: the loaded dict must not alias (and later see) the live counters.
            setattr(self, name, guard[name].to(device=value.device, dtype=value.dtype, copy=True))
        params = self._params()
        where = self.snapshot.device
        self.snapshot.param_copies = [
            s.to(device=p.device if where is None else where, dtype=p.dtype, copy=True)
            for s, p in zip(guard["snapshots"], params, strict=False)
        ]
        self.snapshot.params = params[: len(self.snapshot.param_copies)]
        self.snapshot.load_state(guard.get("state_snapshots") or [], self.optimizer)
        buffer_copies = self.snapshot.buffer_copies
        for saved, c in zip(guard.get("buffer_snapshots") or [], buffer_copies, strict=False):
            c.copy_(saved)
        self._calls = int(guard["calls"])
        if self.escalation is not None and "escalation" in guard:
            self.escalation.load_state_dict(guard["escalation"], self._ring_tensors())
        self.lr_factor = check_probability("lr_factor", guard["lr_factor"])
        self.backtrack = bool(guard["backtrack"])
        self.min_lr = check_nonnegative("min_lr", guard["min_lr"])

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The checks of :meth:`load_state_dict`, without loading: the guard's part and the
        wrapped optimizer's (its own ``check_state_dict``, else finite statistics; Note [what a
        load checks] of :mod:`steadystep.checkpoint`)."""
        if self._is_flat(state_dict):  # Note [flat checkpoints]: as state_dict() writes it
            state_dict = self._nested_state_dict(state_dict)
        self._check_wrapped_state_dict(state_dict)
        owner = type(self).__name__
        check_optimizer_state(self.optimizer, state_dict["optimizer"], owner=owner)

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
        for name in ("response", "rollback"):
            if name in guard:
                check_same(name, guard[name], getattr(self, name), owner=owner)
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
            check_dtype(snap, p.dtype, owner=owner, where=f"the rollback snapshot {i}")
        buffers = guard.get("buffer_snapshots") or []
        if len(buffers) not in (0, len(self.snapshot.buffers)):
            raise ValueError(
                f"{owner}.load_state_dict: the state_dict holds {len(buffers)} buffer "
                f"snapshots, this guard's model has {len(self.snapshot.buffers)} buffers"
            )
        for i, (snap, b) in enumerate(zip(buffers, self.snapshot.buffers, strict=False)):
            check_shape(snap, "param", b, owner=owner, where=f"the buffer snapshot {i}")
        for name, value in self._counters().items():
            if name in guard and value.dim() == 0:
                check_shape(guard[name], "scalar", value, owner=owner, where=f"{name!r}")
            elif name in guard:
                check_shape(guard[name], "param", value, owner=owner, where=f"{name!r}")
            if name in guard and name not in _FREE_COUNTERS:
                # counts and scales: finite, >= 0 (a NaN scale would be NaN learning rates)
                check_finite(guard[name], owner=owner, where=f"{name!r}", nonnegative=True)
        check_probability("lr_factor", guard["lr_factor"])
        check_nonnegative("min_lr", guard["min_lr"])
        if self.escalation is not None and "escalation" in guard:
            self.escalation.check_state_dict(
                guard["escalation"], params, self.snapshot.model_buffers
            )
        # The detector checks its own part; on a copy, so a failure leaves it as it was.
        copy.deepcopy(self.detector).load_state_dict(guard["detector"])
