"""steadystep's optimizers: one module per family."""

from steadystep.compose.protocol import MaskableOptimizer
from steadystep.optim.agadam import AgAdam
from steadystep.optim.alera import ALeRA
from steadystep.optim.cprop import CProp, CPropAdam, CPropAdamW, CPropSGD

__all__ = ["ALeRA", "AgAdam", "CProp", "CPropAdam", "CPropAdamW", "CPropSGD", "MaskableOptimizer"]
