"""EMA z-score of the gradient norm (ZClip's spike test, as a detector).

ZClip (Kumar et al., 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training",
arXiv:2504.02507; bluorion-com/ZClip, ``zclip/zclip.py``) tracks the gradient norm ``g`` with an
exponential moving mean and variance and clips a step whose z-score exceeds a threshold. Its
defaults: ``alpha = 0.97``, ``z_thresh = 2.5``, ``eps = 1e-6``, ``warmup_steps = 25``. The first
``warmup`` norms are collected; their mean and (population) variance start the averages. Then,
with ``mu, v`` the averages before step ``t``:

.. math::
    z_t = \\frac{g_t - \\mu}{\\sqrt{v} + \\epsilon}, \\qquad
    \\text{alarm}_t = z_t > z_{\\text{thresh}}, \\qquad
    x_t = \\begin{cases} \\mu + z_{\\text{thresh}}^2 \\sqrt{v} / z_t & \\text{alarm} \\\\
        g_t & \\text{otherwise}\\end{cases}\\\\
    \\mu \\leftarrow \\alpha\\mu + (1 - \\alpha)\\,x_t, \\qquad
    v \\leftarrow \\alpha v + (1 - \\alpha)\\,(x_t - \\mu)^2 \\quad\\text{(with the new } \\mu)

``x_t`` on an alarm is the norm ZClip clips to by default (``clip_option="adaptive_scaling"``,
``mu + z_thresh * std / (z / z_thresh)``), so the averages follow what ZClip would have let
through; ``skip_update_on_alarm=True`` (ZClip's ``skip_update_on_spike``) keeps them unchanged
instead. Here the alarm is reported (a guard rolls back) instead of clipping. No alarm during
the warm-up. Our own code, from that public description.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from steadystep._validation import check_positive, check_unit_interval
from steadystep.detectors._base import Detector
from steadystep.detectors.rolling import _check_int

__all__ = ["ZClipDetector"]


class ZClipDetector(Detector):
    """Alarm when the gradient norm's EMA z-score exceeds ``z_thresh`` (ZClip's test).

    Args:
        alpha: EMA weight of the past (default 0.97, ZClip's; in [0, 1)).
        z_thresh: z-score threshold (default 2.5, ZClip's).
        warmup: norms collected before the averages start (default 25, ZClip's; >= 1).
        eps: added to the standard deviation (default 1e-6, ZClip's).
        skip_update_on_alarm: keep the averages unchanged on an alarm (default False: update
            them with the clipped norm, as ZClip does by default).
        dtype, device: of the statistics (default float32, CPU).

    ``update`` needs ``grad_norm`` (a :class:`~steadystep.CatastropheGuard` passes it, since
    ``needs_grad_norm`` is True); the loss only matters when it is non-finite (an alarm).

    Examples:
        >>> import torch, steadystep as ss
        >>> det = ss.ZClipDetector(warmup=3)
        >>> loss = torch.tensor(1.0)
        >>> [bool(det.update(loss, grad_norm=torch.tensor(g))) for g in (1.0, 1.2, 0.8, 1.1, 9.0)]
        [False, False, False, False, True]
    """

    needs_grad_norm: ClassVar[bool] = True
    _HPARAMS = ("alpha", "z_thresh", "warmup", "eps", "skip_update_on_alarm")
    _STATE = ("buffer", "count", "mean", "var")
    _RESET = _STATE

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup: int = 25,
        eps: float = 1e-6,
        skip_update_on_alarm: bool = False,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        hp = self._check_hparams(
            {
                "alpha": alpha,
                "z_thresh": z_thresh,
                "warmup": warmup,
                "eps": eps,
                "skip_update_on_alarm": skip_update_on_alarm,
            }
        )
        for key, value in hp.items():
            setattr(self, key, value)
        super().__init__(dtype=dtype, device=device)

    def _check_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        skip = hparams["skip_update_on_alarm"]
        if not isinstance(skip, bool):
            raise TypeError(f"skip_update_on_alarm must be a bool, got {skip!r}")
        return {
            "alpha": check_unit_interval("alpha", hparams["alpha"]),
            "z_thresh": check_positive("z_thresh", hparams["z_thresh"]),
            "warmup": _check_int("warmup", hparams["warmup"], 1),
            "eps": check_positive("eps", hparams["eps"]),
            "skip_update_on_alarm": skip,
        }

    def _init_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "buffer": torch.zeros(self.warmup, dtype=self.dtype, device=device),
            "count": torch.zeros((), dtype=torch.int64, device=device),
            "mean": torch.zeros((), dtype=self.dtype, device=device),
            "var": torch.zeros((), dtype=self.dtype, device=device),
        }

    def _advance(
        self, loss: torch.Tensor, grad_norm: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if grad_norm is None:
            raise ValueError(
                "ZClipDetector watches the gradient norm: call update(loss, grad_norm=...) "
                "(a CatastropheGuard passes it)"
            )
        g = grad_norm
        warming = self.count < self.warmup
        # Warm-up: collect; at the last warm-up norm the averages start from the buffer.
        slot = self.count.clamp(max=self.warmup - 1).reshape(1)
        buffer = torch.where(warming, self.buffer.index_copy(0, slot, g.reshape(1)), self.buffer)
        start = self.count == self.warmup - 1
        m0 = buffer.sum() / self.warmup
        v0 = (buffer - m0).square().sum() / self.warmup
        # The test, then the averages with what ZClip would let through.
        std = self.var.sqrt()
        z = (g - self.mean) / (std + self.eps)
        change = ~(z <= self.z_thresh) & ~warming  # NaN-aware
        clipped = self.mean + self.z_thresh * std / (z / self.z_thresh)
        x = torch.where(change, clipped, g)
        mean = self.alpha * self.mean + (1.0 - self.alpha) * x
        var = self.alpha * self.var + (1.0 - self.alpha) * (x - mean).square()
        if self.skip_update_on_alarm:
            mean = torch.where(change, self.mean, mean)
            var = torch.where(change, self.var, var)
        mean = torch.where(warming, torch.where(start, m0, self.mean), mean)
        var = torch.where(warming, torch.where(start, v0, self.var), var)
        return change, {"buffer": buffer, "count": self.count + 1, "mean": mean, "var": var}

    def stats(self) -> dict[str, torch.Tensor]:
        """0-d tensors: ``mean`` and ``std`` of the gradient norm, ``count``, ``alarms``."""
        return {
            "mean": self.mean,
            "std": self.var.sqrt(),
            "count": self.count,
            "alarms": self.alarms,
        }
