"""CProp reproduction (Preechakul & Kijsirikul, "CProp: Adaptive Learning Rate Scaling from Past
Gradient Conformity", Sec. 3 and 4).

The paper's fully connected 784-300-100-10 network and its CNN (16, M, 32, M, 64, M, 128, global
average pool, 1x1 conv; both adapted to the input), batch size 32, no preprocessing beyond
scaling. SGD (no momentum), Adam, RMSprop and AMSGrad at the paper's learning rates for
Fashion-MNIST, each with and without ``ss.CProp(optimizer, beta=0.999, c=1)``; 3 seeds; training
loss curves with one-std bands (Fig. 2), the histogram of CProp's scales over time (Fig. 8) and
the overconfidence coefficient sweep (Fig. 11).

Running: :mod:`~steadystep.experiments.cprop.running`; reporting:
:mod:`~steadystep.experiments.cprop.reporting`. This package is the
:class:`~steadystep.experiments.runner.Experiment`.
"""

from steadystep.experiments.cprop.reporting import figures, markdown, summarize, terminal
from steadystep.experiments.cprop.running import flops, name, plan, prepare, requires, run, title

# what reporting and running each provide of the Experiment protocol
__all__ = ["figures", "markdown", "summarize", "terminal"]
__all__ += ["flops", "name", "plan", "prepare", "requires", "run", "title"]
