"""The contract between the guard and the optimizers it wraps.

:mod:`steadystep.guard` and :mod:`steadystep.optim` both stand on this package and neither
imports the other's internals:

* :mod:`~steadystep.compose.protocol`: :class:`MaskableOptimizer`, what an optimizer offers so
  that the guard's decisions stay on the device;
* :mod:`~steadystep.compose.wrapper`: :class:`OptimizerWrapper`, the base of every optimizer
  that wraps another (delegation, hooks, nested ``state_dict``);
* :mod:`~steadystep.compose.order`: which wrapper may wrap which (Note [the order of the
  composition]);
* :mod:`~steadystep.compose.torch_fused`: torch's fused optimizers as a
  :class:`MaskableOptimizer`, through the ``found_inf`` flag ``GradScaler`` uses.
"""

from steadystep.compose.order import Composable, check_wrappable, layers
from steadystep.compose.protocol import MaskableOptimizer
from steadystep.compose.torch_fused import TorchFusedMaskable, torch_fused_maskable
from steadystep.compose.wrapper import OptimizerWrapper, call_with_step_hooks

__all__ = [
    "Composable",
    "MaskableOptimizer",
    "OptimizerWrapper",
    "TorchFusedMaskable",
    "call_with_step_hooks",
    "check_wrappable",
    "layers",
    "torch_fused_maskable",
]
