"""PB2 (Population-Based Bandits, Parker-Holder et al. 2020): GP-bandit explore step for PBT.

Pure: numpy and scipy only, no I/O, no clock, no global RNG. The engine calls `suggest` with the
finished segments (`Pb2Row`), the unfinished ones (`Pb2Pending`) and the donor's (t, c); it gets a
`Pb2Choice` back, whose `hyperparameters` is None when PB2 declines (the engine then perturbs).

Modules: `data` (rows, windowing, subsampling, encoding), `kernel` (time-varying mixed kernel),
`gp` (marginal-likelihood fit, posterior), `acquisition` (beta schedule, UCB, Thompson, mixed-space
optimisation), `decide` (`suggest`: the orchestration and the never-raise guarantee).
"""

from .data import Pb2Choice, Pb2Pending, Pb2Row
from .decide import PARALLEL_MODES, suggest

__all__ = ["PARALLEL_MODES", "Pb2Choice", "Pb2Pending", "Pb2Row", "suggest"]
