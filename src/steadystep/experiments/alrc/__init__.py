"""ALRC reproduction: 2x supersampling with squared and quartic errors (Ede & Beanland, Sec. III).

Data pipeline (the paper's, in order): random left-right flip, random brightness, random
contrast, per-image standardisation to zero mean and unit variance, bilinear 2x downsampling.
(Standardisation undoes brightness and contrast; they are kept to follow the paper.) The network
is :class:`~steadystep.experiments.models.SupersamplingNet`; Adam with lr 1/1280; ALRC is
applied to each sample's loss (mean over pixels of the squared or quartic error) at 2, 3 or 4
running standard deviations, or not at all (threshold infinity). The reported number of a run is
the mean of its final training losses (the paper: the last 5,000 of 100,000 iterations); the table
gives mean and std over seeds, x100, as the paper's Table I.

Running: :mod:`~steadystep.experiments.alrc.running`; reporting:
:mod:`~steadystep.experiments.alrc.reporting`. This package is the
:class:`~steadystep.experiments.runner.Experiment`.
"""

from steadystep.experiments.alrc.reporting import figures, markdown, summarize, terminal
from steadystep.experiments.alrc.running import flops, name, plan, prepare, requires, run, title

# what reporting and running each provide of the Experiment protocol
__all__ = ["figures", "markdown", "summarize", "terminal"]
__all__ += ["flops", "name", "plan", "prepare", "requires", "run", "title"]
