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

from steadystep._validation import check_positive, check_probability
from steadystep.detectors._base import Detector

__all__ = ["PageHinkley", "PageHinkleyPaper"]

_STAT_NAMES = ("count", "relaxed_loss", "mean", "cusum", "cusum_min")


class PageHinkleyPaper(Detector):
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

    It is a :class:`~steadystep.detectors.Detector`: the shell averages the loss over ranks
    under ``torch.distributed``, turns a non-finite loss (or statistics that would overflow)
    into an alarm that keeps every statistic, masks ``skip`` and keeps ``last_loss``. What is
    this test's own: a change restarts it (``_resets_on_change``) and a loss of exactly 0
    before ``Delta`` is set is not observed (:meth:`_observes`).

    Examples:
        >>> import torch, steadystep as ss
        >>> ph = ss.PageHinkleyPaper(ph_lambda=0.1, rho=0.5)
        >>> [bool(ph.update(torch.tensor(x))) for x in (1.0, 1.0, 1.0, 3.0)]
        [False, False, False, True]
    """

    _HPARAMS = ("ph_lambda", "rho")
    _STATE = ("threshold", "initialized", *_STAT_NAMES)
    _RESET = _STAT_NAMES  # Delta is kept across restarts
    _resets_on_change = True

    def __init__(
        self,
        ph_lambda: float = 0.1,
        rho: float = 0.01,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        hp = self._check_hparams({"ph_lambda": ph_lambda, "rho": rho})
        self.ph_lambda, self.rho = hp["ph_lambda"], hp["rho"]
        super().__init__(dtype=dtype, device=device)

    def _check_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        return {
            "ph_lambda": check_positive("ph_lambda", hparams["ph_lambda"]),
            "rho": check_probability("rho", hparams["rho"]),
        }

    def configure(self, *, batch_size: int, dataset_size: int) -> None:
        """``rho = batch_size / dataset_size``, the weight of the loss average in the paper (the
        fraction of the data one step sees); only on a fresh detector (one host read, at
        set-up)."""
        if int(self.observations) > 0:
            raise ValueError(
                "the detector has already observed losses; rho can only be set on a fresh one"
            )
        self.rho = batch_size / dataset_size

    def _init_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        zero = torch.zeros((), dtype=self.dtype, device=device)
        return {
            "threshold": zero.clone(),  # Delta
            "initialized": torch.zeros((), dtype=torch.bool, device=device),
            "count": torch.zeros((), dtype=torch.int64, device=device),
            **{name: zero.clone() for name in _STAT_NAMES[1:]},
        }

    def _upgrade_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Checkpoints written before Page-Hinkley shared the detector shell: no ``"detector"``
        tag and no ``last_loss`` (NaN, as a fresh detector has it)."""
        name = type(self).__name__
        if "ph_lambda" not in state_dict or state_dict.get("detector", name) != name:
            return state_dict
        upgraded = {**state_dict, "detector": name}
        upgraded.setdefault("last_loss", self.last_loss.new_full((), torch.nan))
        return upgraded

    def _observes(self, loss: torch.Tensor) -> torch.Tensor:
        # Note [a first loss of 0]: before Delta is set, an exact 0 is not observed (it is
        # tested, and recorded as the last loss tested, but changes no statistic).
        return ~(torch.isfinite(loss) & ~self.initialized & (loss == 0))

    def _advance(
        self, loss: torch.Tensor, grad_norm: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # Delta from the first finite (non-zero) loss observed; |.| so a negative loss gives a
        # usable test.
        first = ~self.initialized
        threshold = torch.where(first, self.ph_lambda * loss.abs(), self.threshold)
        count = self.count + 1
        inv_count = count.to(self.dtype).reciprocal()
        weight = torch.clamp(inv_count, min=self.rho)
        relaxed = self.relaxed_loss + weight * (loss - self.relaxed_loss)
        mean = self.mean + (relaxed - self.mean) * inv_count
        cusum = self.cusum + (relaxed - mean)
        cusum_min = torch.minimum(self.cusum_min, cusum)
        # NaN-aware: a NaN gap is a change (``gap > Delta`` would be False for it).
        change = ~(cusum - cusum_min <= threshold) & (count > 1)
        return change, {
            "threshold": threshold,
            "initialized": torch.ones_like(self.initialized),
            "count": count,
            "relaxed_loss": relaxed,
            "mean": mean,
            "cusum": cusum,
            "cusum_min": cusum_min,
        }

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


# The earlier name: the same class, so code and checkpoints written for it keep working.
PageHinkley = PageHinkleyPaper
