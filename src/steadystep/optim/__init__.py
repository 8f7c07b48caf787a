"""steadystep's optimizers: one module per family."""

from steadystep.optim.agadam import AgAdam
from steadystep.optim.alera import ALeRA

__all__ = ["ALeRA", "AgAdam"]
