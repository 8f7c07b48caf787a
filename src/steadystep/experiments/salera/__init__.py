"""SALeRA reproduction (Schoenauer Sebag et al., "Stochastic Gradient Descent: going as fast as
possible but not faster", Sec. 3).

Models M0, M2, M2b, M4 (:func:`~steadystep.experiments.models.build_classifier`, adapted to the
input), inputs normalised per coordinate with the training set's mean and std, mini-batches of 1%
of the training set. Algorithms NAG, Adagrad, Adam (torch.optim) and Ag-Adam, ALeRA, SALeRA,
SPALeRA (steadystep, layer-wise rates through ``ss.layer_groups``; SPALeRA per parameter) over
a hyperparameter grid. Reported: test error at 5 and 20 epochs (Tables 1/2: the best setting
of each algorithm), the failure rate (test error > 80% after 20 epochs) of ALeRA vs SALeRA over
the same grid and seeds, and a figure like the paper's Fig. 1.

The demo and quick grids of ALeRA/SALeRA are full sub-grids of the paper's values that include
its aggressive corner (alpha = 0.001 with C = 3e-5): on MNIST-1D that is where ALeRA fails; with
alpha >= 0.01, C <= 3e-5 and eta_0 <= 1 no ALeRA run failed in 20 epochs when we explored, so a
grid without that corner has nothing for SALeRA to rescue (docs/experiments.md).

Running: :mod:`~steadystep.experiments.salera.running`; reporting:
:mod:`~steadystep.experiments.salera.reporting`. This package is the
:class:`~steadystep.experiments.runner.Experiment`.
"""

from steadystep.experiments.salera.reporting import figures, markdown, summarize, terminal
from steadystep.experiments.salera.running import flops, name, plan, prepare, requires, run, title

# what reporting and running each provide of the Experiment protocol
__all__ = ["figures", "markdown", "summarize", "terminal"]
__all__ += ["flops", "name", "plan", "prepare", "requires", "run", "title"]
