"""The shell every catastrophe detector shares: input checks, the rank mean, masking, state.

A detector is a functional core, :meth:`Detector._advance`, that maps the current statistics and
one observation (the loss, and the gradient norm for detectors that watch it) to a change flag
and the statistics after that observation; this shell decides what is committed:

* a finite observation: the alarm is the core's change flag and its statistics are committed;
* a non-finite loss or gradient norm: an alarm, and every statistic stays as it was (it is never
  observed, so NaN never enters the state);
* a finite observation whose statistics would overflow (a loss near the dtype's largest value):
  treated as a non-finite one (an alarm, the old state kept);
* ``skip`` (0-d bool, True): the observation of a finite loss is a bitwise no-op (no alarm, no
  statistic or counter changes), whatever the gradient norm; a non-finite loss still alarms. A
  guard passes it for a step it skips for a non-finite gradient.

Every decision is a 0-d tensor applied with ``torch.where``: no host sync. Under
``torch.distributed`` the loss is averaged over ranks in one all-reduce of a scalar (every rank
decides alike); the gradient norm the caller passes must already be global (a guard computes
it so), and is not reduced again.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from steadystep._distributed import all_reduce_mean

__all__ = ["Detector"]


class Detector:
    """Base class of steadystep's detectors (see the module docstring for the contract).

    Subclasses define ``_HPARAMS`` (hyperparameter names, checked by ``_check_hparams``),
    ``_STATE`` (names of the evolving tensors; the counters ``observations``, ``alarms`` and
    ``last_loss`` are the shell's), ``_init_state`` (fresh tensors), ``_RESET`` (tensors that
    :meth:`reset` restores to their fresh values) and ``_advance`` (the core).
    """

    needs_grad_norm: ClassVar[bool] = False
    # A change restarts the test (the ``_RESET`` statistics return to their fresh values)
    _resets_on_change: ClassVar[bool] = False
    _HPARAMS: ClassVar[tuple[str, ...]] = ()
    _STATE: ClassVar[tuple[str, ...]] = ()
    _RESET: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got dtype={dtype}")
        self.dtype = dtype
        dev = torch.device("cpu") if device is None else torch.device(device)
        for name, value in self._init_state(dev).items():
            setattr(self, name, value)
        self.observations = torch.zeros((), dtype=torch.int64, device=dev)
        self.alarms = torch.zeros((), dtype=torch.int64, device=dev)
        # The loss the last update tested (the rank mean; NaN before the first).
        self.last_loss = torch.full((), math.nan, dtype=dtype, device=dev)
        # Average the loss over ranks (a guard that has reduced it already turns this off)
        self.reduce_over_ranks = True

    # -- subclass hooks ---------------------------------------------------------------------
    def _init_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _check_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        """Validated hyperparameters (raise ValueError naming the bad one)."""
        raise NotImplementedError

    def _advance(
        self, loss: torch.Tensor, grad_norm: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(change, new_state)`` for one finite observation, without writing ``self``."""
        raise NotImplementedError

    def _fused_update(
        self, loss: Any, grad_norm: Any, skip: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The whole :meth:`update` in one kernel call where a subclass has one for these
        inputs (its alarm), else None: the torch code below runs."""
        return None

    def _observes(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Where False (0-d bool), a finite ``loss`` is tested but not observed: no alarm, no
        statistic or counter changes (PageHinkleyPaper: a 0 before its threshold is set).
        None: every loss is observed."""
        return None

    def _upgrade_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint in an earlier format of this detector, as the current one."""
        return state_dict

    # -- state ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.alarms.device

    def hparams(self) -> dict[str, Any]:
        """The hyperparameters, as the constructor takes them."""
        return {name: getattr(self, name) for name in self._HPARAMS}

    def _tensors(self) -> dict[str, torch.Tensor]:
        names = (*self._STATE, "observations", "alarms", "last_loss")
        return {name: getattr(self, name) for name in names}

    def _to(self, device: torch.device) -> None:
        for name, value in self._tensors().items():
            setattr(self, name, value.to(device))

    def state_dict(self) -> dict[str, Any]:
        """``{"detector": class name, hyperparameters..., statistics (cloned tensors)}``."""
        return {
            "detector": type(self).__name__,
            **self.hparams(),
            **{k: v.clone() for k, v in self._tensors().items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (hyperparameters included); resuming is bitwise.

        A state_dict of another detector, with missing or extra keys, or whose tensors do not
        have the shapes its hyperparameters imply, raises ValueError naming what was expected
        and what was found; nothing is half-loaded.
        """
        name = type(self).__name__
        state_dict = self._upgrade_state_dict(state_dict)
        found = state_dict.get("detector")
        if found is None and "ph_lambda" in state_dict:
            found = "PageHinkleyPaper"  # its state_dict predates the "detector" key
        if found != name:
            raise ValueError(
                f"{name}.load_state_dict: expected a state_dict of {name}, found one of "
                f"{found!r} (keys {sorted(state_dict)})"
            )
        expected = {"detector", *self._HPARAMS, *self._tensors()}
        if set(state_dict) != expected:
            missing = sorted(expected - set(state_dict))
            extra = sorted(set(state_dict) - expected)
            raise ValueError(
                f"{name}.load_state_dict: keys do not match; missing {missing}, unexpected {extra}"
            )
        hparams = self._check_hparams({k: state_dict[k] for k in self._HPARAMS})
        fresh = type(self)(**hparams, dtype=self.dtype, device=self.device)
        loaded = {}
        for key, value in fresh._tensors().items():
            given = state_dict[key]
            if not isinstance(given, torch.Tensor) or given.shape != value.shape:
                shape = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given)
                raise ValueError(
                    f"{name}.load_state_dict: {key!r} must be a tensor of shape "
                    f"{tuple(value.shape)} for {hparams}, found {shape}"
                )
            # A copy: the loaded dict must not alias (and later see) this detector's state.
            loaded[key] = given.to(device=value.device, dtype=value.dtype, copy=True)
        for key, value in hparams.items():
            setattr(self, key, value)
        for key, value in loaded.items():
            setattr(self, key, value)
        self.__dict__.pop("_before", None)  # revert() takes back no observation of before the load

    def revert(self, mask: torch.Tensor) -> None:
        """Where ``mask`` (0-d bool) is True, take back the last :meth:`update`'s observation:
        the statistics return to what they were before it (the counters ``observations``,
        ``alarms`` and ``last_loss`` keep it). A guard reverts the observation of a batch it
        skipped or of weights it rolled back (Note [the ladder]), so the next loss is tested
        against the band from before the trouble. No host sync."""
        before = getattr(self, "_before", None)
        if before is None:
            return
        for name, value in before.items():
            live = getattr(self, name)
            live.copy_(torch.where(mask.to(live.device), value, live))

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Restart the test (the statistics a fresh detector has); counters are kept.

        ``mask`` (0-d bool tensor) resets only where True, without a host sync.
        """
        fresh = self._init_state(self.device)
        for name in self._RESET:
            value = getattr(self, name)
            if mask is None:
                value.copy_(fresh[name])
            else:
                value.copy_(torch.where(mask.to(value.device), fresh[name], value))

    # -- the test ---------------------------------------------------------------------------
    def _scalar(self, value: torch.Tensor | float, what: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            return torch.tensor(float(value), dtype=self.dtype, device=self.device)
        if value.numel() != 1:
            raise ValueError(
                f"{type(self).__name__}.update needs a scalar {what}, got shape "
                f"{tuple(value.shape)}; reduce it first (e.g. loss.mean())"
            )
        return value.detach().reshape(()).to(device=self.device, dtype=self.dtype)

    def update(
        self,
        loss: torch.Tensor | float,
        *,
        grad_norm: torch.Tensor | float | None = None,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Observe one minibatch loss (and gradient norm); return the alarm, a 0-d bool tensor.

        No host sync. ``grad_norm`` is the global L2 norm of this step's gradients (ignored by
        detectors that do not watch it); ``skip`` (0-d bool) makes the observation of a finite
        loss a no-op where True (see the module docstring).
        """
        fused = self._fused_update(loss, grad_norm, skip)
        if fused is not None:
            return fused
        if isinstance(loss, torch.Tensor) and loss.device != self.device:
            self._to(loss.device)
        x = self._scalar(loss, "loss")
        if self.reduce_over_ranks:
            x = all_reduce_mean(x)
        g = None
        if self.needs_grad_norm and grad_norm is not None:
            g = self._scalar(grad_norm, "grad_norm")
        finite = torch.isfinite(x) if g is None else torch.stack([x, g]).isfinite().all()
        # The core sees zeros in place of non-finite values; its result is then discarded.
        change, new = self._advance(
            torch.where(finite, x, torch.zeros_like(x)),
            None if g is None else torch.where(finite, g, torch.zeros_like(g)),
        )
        floats = [t.reshape(-1) for t in new.values() if t.is_floating_point()]
        ok = finite & torch.cat(floats).isfinite().all() if floats else finite
        # skip: a finite loss is not observed (its gradient norm is NaN when the guard skips a
        # step for non-finite gradients); a non-finite loss still alarms.
        tested = None
        if skip is not None:
            tested = ~(skip.to(device=x.device, dtype=torch.bool) & torch.isfinite(x))
        observed = self._observes(x)
        active = tested if observed is None else observed if tested is None else tested & observed
        commit = ok if active is None else ok & active
        # NaN-aware: a core writes its comparisons so that NaN alarms; ~ok covers overflow.
        alarm = ~ok | change
        if active is not None:
            alarm = alarm & active
        # What revert() restores: the statistics before this observation.
        self._before = {name: getattr(self, name).clone() for name in self._STATE}
        for name, value in new.items():
            old = getattr(self, name)
            old.copy_(torch.where(commit, value, old))
        if self._resets_on_change:
            self.reset(change & commit)
        self.last_loss.copy_(x if tested is None else torch.where(tested, x, self.last_loss))
        self.observations.add_(1 if active is None else active.to(self.observations.dtype))
        self.alarms.add_(alarm.to(self.alarms.dtype))
        return alarm

    def stats(self) -> dict[str, torch.Tensor]:
        """0-d tensors for telemetry (see each detector); always ``alarms``."""
        return {"alarms": self.alarms}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"
