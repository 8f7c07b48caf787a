"""Page-Hinkley change detection on the minibatch loss, with tensor state and no host sync.

The test of SALeRA (Algorithm 1, lines 3-9 of the paper), as published: the class is
:class:`PageHinkleyPaper`; ``PageHinkley`` is the same class under its earlier name, so code and
checkpoints written for it keep working. With ``n`` the
number of observations since the last reset and ``L_n`` the n-th loss:

.. math::
    \\Delta &= \\lambda\\, |L_{\\text{first}}|  \\quad\\text{(set once, kept across resets)}\\\\
    \\ell_n &= \\ell_{n-1} + \\max(1/n, \\rho)\\,(L_n - \\ell_{n-1})
        \\quad\\text{(cumulative mean while } n \\le 1/\\rho\\text{, then an EMA)}\\\\
    \\bar\\ell_n &= \\bar\\ell_{n-1} + (\\ell_n - \\bar\\ell_{n-1}) / n\\\\
    U_n &= U_{n-1} + (\\ell_n - \\bar\\ell_n), \\qquad U^{\\min}_n = \\min(U^{\\min}_{n-1}, U_n)\\\\
    \\text{alarm} &= (U_n - U^{\\min}_n > \\Delta) \\wedge (n > 1)

``L_first`` is the first finite non-zero loss. Note [a first loss of 0]: a loss of exactly 0
before it is not observed (no alarm, nothing changes, as a skipped observation): it gives Delta
no scale, and Delta = 0 would make every later bit of noise an alarm. ``lambda`` is
``ph_lambda`` and ``rho`` is ``rho``; ``ell`` is ``relaxed_loss``, ``ell_bar`` is ``mean``,
``U`` is ``cusum`` and ``U_min`` is ``cusum_min``. An alarm resets ``n, ell, ell_bar, U,
U_min`` to 0 (Delta is kept), so the next observation starts a fresh test and never alarms.

A non-finite loss is an alarm too (the clearest catastrophe there is) and leaves every statistic
untouched, Delta included; it does not reset the test. So is a finite loss whose statistics would
overflow (a loss near the dtype's largest value), and the comparisons are NaN-aware: a NaN gap
alarms rather than passing silently.
"""

from __future__ import annotations

from typing import Any

import torch

from steadystep._distributed import all_reduce_mean
from steadystep._validation import check_positive, check_probability
from steadystep.optim._state_checks import check_class, check_shape

__all__ = ["PageHinkley", "PageHinkleyPaper"]

_STAT_NAMES = ("count", "relaxed_loss", "mean", "cusum", "cusum_min")


class PageHinkleyPaper:
    """Page-Hinkley test for an increase of the (relaxed) minibatch loss, as SALeRA publishes it.

    Two choices the paper leaves open are made here: the relaxed loss is a cumulative mean for
    its first ``1/rho`` observations (the paper's EMA starts from 0 and would rise for ``1/rho``
    steps), and ``mean`` is the running mean of the relaxed losses. On decaying losses the test
    rarely fires once the loss has fallen well below the first one (``Delta`` is fixed from it);
    ``docs/detectors.md`` measures it against the other detectors.

    Args:
        ph_lambda: threshold as a fraction of the first observed (non-zero) loss, ``Delta =
            ph_lambda * |first loss|`` (default 0.1, the paper's ``1/10``). The paper (and the
            decisions) write ``ph_lambda * first loss``; the absolute value is an extension for
            losses that can be negative (equal for a positive first loss; for a negative one it
            keeps ``Delta`` positive, where the literal formula would alarm at the second
            observation).
        rho: weight of the loss EMA, ``batch_size / dataset_size`` in the paper (default 0.01).
            The first ``1/rho`` observations after a reset are averaged cumulatively.
        dtype: dtype of the statistics (default float32).
        device: where the statistics start; they move to the loss's device at the first
            :meth:`update` (a metadata check, no sync).

    Under ``torch.distributed`` the loss is averaged over ranks first (one all-reduce of a
    scalar), so every rank takes the same decision; ``last_loss`` (0-d) holds the loss the last
    :meth:`update` tested, that mean.

    Examples:
        >>> import torch, steadystep as ss
        >>> ph = ss.PageHinkleyPaper(ph_lambda=0.1, rho=0.5)
        >>> [bool(ph.update(torch.tensor(x))) for x in (1.0, 1.0, 1.0, 3.0)]
        [False, False, False, True]
    """

    needs_grad_norm = False  # it watches the loss only

    def __init__(
        self,
        ph_lambda: float = 0.1,
        rho: float = 0.01,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        self.ph_lambda = check_positive("ph_lambda", ph_lambda)
        self.rho = check_probability("rho", rho)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got dtype={dtype}")
        self.dtype = dtype
        dev = torch.device("cpu") if device is None else torch.device(device)
        self.threshold = torch.zeros((), dtype=dtype, device=dev)  # Delta
        self.initialized = torch.zeros((), dtype=torch.bool, device=dev)
        self.count = torch.zeros((), dtype=torch.int64, device=dev)
        self.relaxed_loss = torch.zeros((), dtype=dtype, device=dev)
        self.mean = torch.zeros((), dtype=dtype, device=dev)
        self.cusum = torch.zeros((), dtype=dtype, device=dev)
        self.cusum_min = torch.zeros((), dtype=dtype, device=dev)
        self.observations = torch.zeros((), dtype=torch.int64, device=dev)
        self.alarms = torch.zeros((), dtype=torch.int64, device=dev)
        # The loss the last update tested (the rank mean; NaN before the first): what a guard
        # records in its alarm history.
        self.last_loss = torch.full((), torch.nan, dtype=dtype, device=dev)

    # -- state ------------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            "threshold": self.threshold,
            "initialized": self.initialized,
            **{name: getattr(self, name) for name in _STAT_NAMES},
            "observations": self.observations,
            "alarms": self.alarms,
            "last_loss": self.last_loss,
        }

    def _to(self, device: torch.device) -> None:
        for name, value in self._tensors().items():
            setattr(self, name, value.to(device))

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters and every statistic (0-d tensors, cloned)."""
        return {
            "ph_lambda": self.ph_lambda,
            "rho": self.rho,
            **{k: v.clone() for k, v in self._tensors().items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; tensors land on this detector's device and dtypes.

        Checked first: a dict tagged with another class (``"class"``), a missing statistic or
        one that is not 0-d is a ValueError and nothing is loaded."""
        tensors = self._tensors()
        required = ["ph_lambda", "rho", *(k for k in tensors if k != "last_loss")]
        owner = type(self).__name__
        other = state_dict.get("detector") if isinstance(state_dict, dict) else None
        if other is not None:  # the detectors of steadystep.detectors tag their dicts
            raise ValueError(
                f"{owner}.load_state_dict: expected the keys {sorted(required)}, found "
                f"{sorted(state_dict)} (a state_dict of {other})"
            )
        check_class(state_dict, owner=owner, expected="PageHinkley", required=required)
        for name, value in tensors.items():
            if name in state_dict:
                check_shape(state_dict[name], "scalar", value, owner=owner, where=repr(name))
                if not isinstance(state_dict[name], torch.Tensor):
                    raise ValueError(f"{owner}.load_state_dict: {name!r} must be a 0-d tensor")
        ph_lambda = check_positive("ph_lambda", state_dict["ph_lambda"])
        self.rho = check_probability("rho", state_dict["rho"])
        self.ph_lambda = ph_lambda
        for name, value in tensors.items():
            if name == "last_loss" and name not in state_dict:
                continue  # a checkpoint from before last_loss existed
            # A copy: the loaded dict must not alias (and later see) this detector's state.
            setattr(
                self,
                name,
                state_dict[name].to(device=value.device, dtype=value.dtype, copy=True),
            )

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Restart the test (``n, relaxed_loss, mean, cusum, cusum_min <- 0``); Delta is kept.

        ``mask`` (0-d bool tensor) resets only where True, without a host sync.
        """
        for name in _STAT_NAMES:
            value = getattr(self, name)
            if mask is None:
                value.zero_()
            else:
                value.copy_(torch.where(mask, torch.zeros_like(value), value))

    # -- the test ---------------------------------------------------------------------------
    def update(
        self,
        loss: torch.Tensor | float,
        *,
        grad_norm: torch.Tensor | float | None = None,
        skip: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Observe one minibatch loss; return the alarm as a 0-d bool tensor (no host sync).

        ``grad_norm`` is accepted for the common detector interface and ignored (the test
        watches the loss only).

        On a change alarm the test resets itself; on a non-finite loss it alarms and keeps its
        statistics as they were. ``skip`` (0-d bool) makes the observation of a finite loss a
        no-op on the device where True: no alarm, every statistic and counter bitwise unchanged
        (a guard passes it for a step it skips for a non-finite gradient); a non-finite loss
        still alarms.
        """
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss), dtype=self.dtype, device=self.threshold.device)
        if loss.numel() != 1:
            raise ValueError(
                f"{type(self).__name__}.update needs a scalar loss, got shape {tuple(loss.shape)}; "
                "reduce it first (e.g. loss.mean())"
            )
        if loss.device != self.threshold.device:
            self._to(loss.device)
        x = all_reduce_mean(loss.detach().reshape(()).to(self.dtype))
        finite = torch.isfinite(x)
        # Note [a first loss of 0]: before Delta is set, an exact 0 is not observed (it is
        # tested, and recorded as the last loss tested, but changes no statistic).
        active = ~(finite & ~self.initialized & (x == 0))
        tested = torch.ones_like(finite)
        if skip is not None:
            # A non-finite loss is an alarm even in a skipped step; a finite one is not observed.
            tested = ~(skip.to(device=x.device, dtype=torch.bool) & finite)
            active = active & tested
        self.last_loss.copy_(torch.where(tested, x, self.last_loss))
        x = torch.where(finite, x, torch.zeros_like(x))
        # An observation that is not made behaves as a non-finite one (keep everything) minus
        # the alarm.
        finite = finite & active

        # Delta from the first finite (non-zero) loss observed; |.| so a negative loss gives a
        # usable test.
        first = finite & ~self.initialized
        threshold = torch.where(first, self.ph_lambda * x.abs(), self.threshold)

        count = self.count + 1
        inv_count = count.to(self.dtype).reciprocal()
        weight = torch.clamp(inv_count, min=self.rho)
        relaxed = self.relaxed_loss + weight * (x - self.relaxed_loss)
        mean = self.mean + (relaxed - self.mean) * inv_count
        cusum = self.cusum + (relaxed - mean)
        cusum_min = torch.minimum(self.cusum_min, cusum)
        # A finite loss can still overflow the statistics (a loss near the dtype's max): such a
        # step is treated as a non-finite loss (an alarm, old state kept), never committed.
        valid = (
            finite
            & torch.stack(
                [t.isfinite() for t in (threshold, relaxed, mean, cusum, cusum_min)]
            ).all()
        )
        valid = valid | ~active  # an observation not made keeps the state and raises no alarm
        # NaN-aware: a NaN gap is an alarm (``gap > Delta`` would be False for it).
        change = ~(cusum - cusum_min <= threshold) & (count > 1) & finite & valid
        alarm = (change | ~valid | ~finite) & active

        # finite & no change: commit; change: reset to 0; non-finite: keep everything.
        keep = ~(finite & valid)
        for name, new in zip(_STAT_NAMES, (count, relaxed, mean, cusum, cusum_min), strict=True):
            old = getattr(self, name)
            old.copy_(torch.where(keep, old, torch.where(change, torch.zeros_like(new), new)))
        self.threshold.copy_(torch.where(valid, threshold, self.threshold))
        self.initialized.logical_or_(first & valid)
        self.observations.add_(active.to(self.observations.dtype))
        self.alarms.add_(alarm.to(self.alarms.dtype))
        return alarm

    def stats(self) -> dict[str, torch.Tensor]:
        """0-d tensors: threshold, relaxed_loss, mean, cusum, gap (U - U_min), count, alarms."""
        return {
            "threshold": self.threshold,
            "relaxed_loss": self.relaxed_loss,
            "mean": self.mean,
            "cusum": self.cusum,
            "gap": self.cusum - self.cusum_min,
            "count": self.count,
            "alarms": self.alarms,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ph_lambda={self.ph_lambda}, rho={self.rho})"


# The earlier name: the same class, so code and checkpoints written for it keep working.
PageHinkley = PageHinkleyPaper
