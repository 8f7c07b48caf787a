"""CProp: scale any optimizer's update by the confidence that past gradients agree in sign.

Preechakul & Kijsirikul (2019): per element, ``theta <- theta_old + s * (theta_base - theta_old)``
with ``s = min(1, c * F(|m_hat| / se))``, ``m_hat`` and ``se`` the bias-corrected mean and
standard error of the gradient's EMAs and ``F(x) = 2 |Phi(0; m, se) - 1/2|``. The full update
rule, each symbol mapped to its argument, and the Notes are in
:mod:`steadystep.optim.cprop._math`.

Public objects:

* :class:`CProp` wraps any ``torch.optim.Optimizer`` (:mod:`~steadystep.optim.cprop.wrapper`).
* :class:`CPropSGD`, :class:`CPropAdam`, :class:`CPropAdamW` are fast native paths with the same
  numbers as ``CProp(torch.optim.SGD/Adam/AdamW(...))`` (:mod:`~steadystep.optim.cprop.native`).
* :func:`cprop_update_`, :func:`cprop_scales`, :func:`cprop_sgd`, :func:`cprop_adam` are the
  functional cores (tensor lists positional, hyperparameters keyword-only;
  :mod:`~steadystep.optim.cprop.functional`), which dispatch to the fused kernels of
  :mod:`steadystep._kernels`.
"""

from steadystep._tensors import grads_finite
from steadystep.optim.cprop._math import CDFS, METHODS, erf_float32
from steadystep.optim.cprop.functional import cprop_adam, cprop_scales, cprop_sgd, cprop_update_
from steadystep.optim.cprop.native import CPropAdam, CPropAdamW, CPropSGD
from steadystep.optim.cprop.wrapper import CProp

__all__ = [
    "CDFS",
    "METHODS",
    "CProp",
    "CPropAdam",
    "CPropAdamW",
    "CPropSGD",
    "cprop_adam",
    "cprop_scales",
    "cprop_sgd",
    "cprop_update_",
    "erf_float32",
    "grads_finite",
]
