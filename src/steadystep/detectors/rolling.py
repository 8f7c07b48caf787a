"""Rolling-window z-score on the loss and the gradient norm (OLMo-core's skip-step rule).

OLMo-core's ``SkipStepOptimizer`` (allenai/OLMo-core, ``olmo_core/optim/skip_step_optimizer.py``,
used by ``SkipStepAdamW``) skips an update when the loss or the gradient norm is more than
``sigma_factor`` standard deviations above the mean of the previous ``rolling_interval_length``
values (defaults 6 and 128), once at least ``max(20, rolling_interval_length // 2)`` values have
been seen. With ``W_t`` the last ``window`` values before ``x_t`` (a loss or a gradient norm):

.. math::
    \\mu_t = \\operatorname{mean}(W_t), \\qquad
    s_t = \\operatorname{std}(W_t)\\ \\text{(unbiased, } n - 1\\text{)}, \\qquad
    \\text{alarm}_t = (x_t - \\mu_t > \\sigma\\, s_t) \\wedge (n_t + 1 \\ge \\text{warmup})

with ``n_t`` the values seen since the last reset (an alarm on either signal is an alarm). As
in OLMo-core every finite value enters its window, alarms included. The departures: a
non-finite loss or gradient norm is an alarm that leaves the windows untouched (OLMo-core
would store it, and a NaN in the window makes every later comparison fail for ``window`` steps);
each signal has its own count, so a detector fed the gradient norm only some of the time tests
it only once its own window is warm. This is our own code, written from that public description.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from steadystep._distributed import is_distributed
from steadystep._kernels.decision import (
    CopyPlan,
    WindowSettings,
    masked_copy_,
    settings,
    window_update,
)
from steadystep._validation import check_positive
from steadystep.detectors._base import Detector

__all__ = ["RollingZScore", "WindowPair"]


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {name}={value!r}")
    return value


def window_test(
    window: torch.Tensor, count: torch.Tensor, x: torch.Tensor, *, sigma: float, warmup: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rolling z-score test: ``(change, window with x stored, mean, std)`` (pure).

    ``window`` is a ring buffer whose first ``min(count, len(window))`` slots hold the last
    values; ``x`` goes into slot ``count % len(window)``.
    """
    size = window.numel()
    n = count.clamp(max=size)
    filled = torch.arange(size, device=window.device) < n
    nf = n.to(window.dtype)
    mean = torch.where(filled, window, 0.0).sum() / nf
    var = torch.where(filled, window - mean, 0.0).square().sum() / (nf - 1)
    std = var.sqrt()
    # NaN-aware: a NaN gap alarms (``gap > sigma * std`` would be False for it).
    change = ~(x - mean <= sigma * std) & (count >= warmup - 1)
    stored = window.index_copy(0, (count % size).reshape(1), x.reshape(1))
    return change, stored, mean, std


class WindowPair(Detector):
    """A detector testing the loss and the gradient norm, each against a ring buffer of its own
    last ``window`` values (``self.window``, set by the subclass) with :meth:`_test`; an alarm
    on either signal is an alarm, and without a gradient norm the loss alone is tested."""

    needs_grad_norm: ClassVar[bool] = True
    _STATE = ("loss_window", "loss_count", "grad_norm_window", "grad_norm_count")
    _RESET = _STATE
    window: int

    def _test(
        self, signal: str, window: torch.Tensor, count: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """``(change, window with x stored, *statistics)`` for one value of ``signal``
        (``"loss"`` or ``"grad_norm"``), pure."""
        raise NotImplementedError

    def _init_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "loss_window": torch.zeros(self.window, dtype=self.dtype, device=device),
            "loss_count": torch.zeros((), dtype=torch.int64, device=device),
            "grad_norm_window": torch.zeros(self.window, dtype=self.dtype, device=device),
            "grad_norm_count": torch.zeros((), dtype=torch.int64, device=device),
        }

    def _advance(
        self, loss: torch.Tensor, grad_norm: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        change, window = self._test("loss", self.loss_window, self.loss_count, loss)[:2]
        new = {"loss_window": window, "loss_count": self.loss_count + 1}
        if grad_norm is not None:
            g_window, g_count = self.grad_norm_window, self.grad_norm_count
            g_change, g_window = self._test("grad_norm", g_window, g_count, grad_norm)[:2]
            change = change | g_change
            new.update(grad_norm_window=g_window, grad_norm_count=g_count + 1)
        return change, new

    # -- the CPU kernel (Note [the detector kernel] in _kernels/kernels_detect.c) ---------------
    def _kernel_hyper(self) -> WindowSettings | None:
        """The kernel's settings for this detector's test, or None: the torch path (a subclass
        of RollingZScore or SpikeDetector takes it, whatever hooks of the shell it changes)."""
        return None

    def _fused_update(
        self, loss: Any, grad_norm: Any, skip: torch.Tensor | None
    ) -> torch.Tensor | None:
        """:meth:`Detector.update` in one kernel call on the CPU (Note [the detector kernel])."""
        hyper = self._kernel_hyper()
        if (
            hyper is None
            or not isinstance(loss, torch.Tensor)
            or loss.numel() != 1
            or not (grad_norm is None or isinstance(grad_norm, torch.Tensor))
            or (grad_norm is not None and grad_norm.numel() != 1)
            or (skip is not None and skip.numel() != 1)
            or self.device.type != "cpu"
            or (self.reduce_over_ranks and is_distributed())
        ):
            return None
        state = [getattr(self, name) for name in self._STATE]
        return window_update(
            state,
            self._kernel_before(state),
            (self.observations, self.alarms, self.last_loss),
            loss,  # read by the kernel, never written: no detach needed
            grad_norm,
            skip,
            hyper,
        )

    def _kernel_before(self, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors the kernel copies the state into before an update (what :meth:`revert`
        restores), made once per set of state tensors rather than cloned every step."""
        key = tuple((t.shape, t.dtype, t.device) for t in state)
        kept = getattr(self, "_kept_before", None)
        if kept is None or kept[0] != key:
            kept = (key, {n: torch.empty_like(t) for n, t in zip(self._STATE, state, strict=True)})
            self._kept_before = kept
        self._before = kept[1]
        return list(kept[1].values())

    def revert(self, mask: torch.Tensor) -> None:
        before = getattr(self, "_before", None)
        if before is not None:
            live = [getattr(self, name) for name in before]
            plan = self._copy_plan("_revert_plan")
            if masked_copy_(live, list(before.values()), mask.to(live[0].device), plan):
                return
        super().revert(mask)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        if mask is not None:
            live = [getattr(self, name) for name in self._RESET]
            zeros = self._kernel_zeros(live)
            plan = self._copy_plan("_reset_plan")
            if zeros is not None and masked_copy_(live, zeros, mask.to(live[0].device), plan):
                return
        super().reset(mask)

    def _copy_plan(self, name: str) -> CopyPlan:
        """The masked copy's kept C arguments (Note [copy plans]), made at the first use."""
        plan = self.__dict__.get(name)
        if plan is None:
            plan = self.__dict__[name] = CopyPlan()
        return plan

    def _kernel_zeros(self, live: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """The fresh state :meth:`reset` restores (zeros), kept for the kernel's masked copy."""
        if type(self)._init_state is not WindowPair._init_state:
            return None  # a subclass whose fresh state may not be zeros
        key = tuple((t.shape, t.dtype, t.device) for t in live)
        kept = getattr(self, "_kept_zeros", None)
        if kept is None or kept[0] != key:
            fresh = self._init_state(live[0].device)
            kept = (key, [fresh[name] for name in self._RESET])
            self._kept_zeros = kept
        return kept[1]

    def _signal_stats(self) -> Iterator[tuple[str, torch.Tensor, tuple[torch.Tensor, ...]]]:
        """``(signal, count, statistics)`` of each signal: what :meth:`_test` says besides the
        change, for the value at the window's first slot."""
        for name in ("loss", "grad_norm"):
            window, count = getattr(self, f"{name}_window"), getattr(self, f"{name}_count")
            yield name, count, self._test(name, window, count, window[0])[2:]


class RollingZScore(WindowPair):
    """Alarm when the loss (or the gradient norm) leaves ``mean + sigma * std`` of its window.

    Args:
        window: values in each rolling window (default 128, OLMo-core's
            ``rolling_interval_length``). Each window is a ring buffer on the device.
        sigma: threshold in standard deviations (default 6.0, OLMo-core's ``sigma_factor``).
        warmup: no alarm before this many values (the current one included) have been seen
            since the last reset (default ``max(20, window // 2)``, as in OLMo-core; >= 3).
        dtype, device: of the statistics (default float32, CPU; they move to the loss's
            device at the first :meth:`update`).

    The gradient norm is tested when given (a :class:`~steadystep.CatastropheGuard` gives it,
    since ``needs_grad_norm`` is True); without it the loss alone is tested, as OLMo-core does
    when no gradient norm was set. The rule is in the module docstring.

    Examples:
        >>> import torch, steadystep as ss
        >>> det = ss.RollingZScore(window=8, sigma=3.0, warmup=4)
        >>> [bool(det.update(torch.tensor(x))) for x in (1.0, 1.1, 0.9, 1.0, 1.05, 5.0)]
        [False, False, False, False, False, True]
    """

    _HPARAMS = ("window", "sigma", "warmup")

    def __init__(
        self,
        window: int = 128,
        sigma: float = 6.0,
        warmup: int | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        hp = self._check_hparams({"window": window, "sigma": sigma, "warmup": warmup})
        self.window, self.sigma, self.warmup = hp["window"], hp["sigma"], hp["warmup"]
        super().__init__(dtype=dtype, device=device)

    def _check_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        window = _check_int("window", hparams["window"], 2)
        warmup = hparams["warmup"]
        warmup = max(20, window // 2) if warmup is None else _check_int("warmup", warmup, 3)
        return {
            "window": window,
            "sigma": check_positive("sigma", hparams["sigma"]),
            "warmup": warmup,
        }

    def _test(
        self, signal: str, window: torch.Tensor, count: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        return window_test(window, count, x, sigma=self.sigma, warmup=self.warmup)

    def _kernel_hyper(self) -> WindowSettings | None:
        if type(self) is not RollingZScore:  # a subclass may change any hook of the shell
            return None
        size = self.loss_window.numel()  # the tensors' size: the kernel indexes them
        # sigma, warmup_factor (none), scale_floor (none), size, warmup, clip
        return settings(WindowSettings, self.sigma, 0.0, 0.0, size, self.warmup, False)

    def stats(self) -> dict[str, torch.Tensor]:
        """0-d tensors: mean and std of each window, the counts, alarms."""
        out = {}
        for name, count, (mean, std) in self._signal_stats():
            out.update({f"{name}_mean": mean, f"{name}_std": std, f"{name}_count": count})
        return {**out, "alarms": self.alarms}
