"""The data window: which part of the history the GP learns from, chosen by marginal likelihood.

The time kernel already discounts old rows as much as its fitted forgetting rate says, but one
kernel for the whole history must compromise when the response surface changed character (a phase
of training where nothing depended on the learning rate, then one where everything did). As in the
PB2 paper's implementation, once the history is long the window is chosen among candidates by the
GP's marginal likelihood: each candidate (the newest 1, 1/2, 1/4 of the time span) whose rows
number at least `fit_rows` gets its own fit on a subsample of exactly `fit_rows` of its rows, with
its own standardisation, and the candidate with the highest log marginal likelihood wins. The
subsamples have equal size, so their likelihoods are comparable (the paper's code compares windows
of different lengths, which favours the shortest). Opt-in (`Pb2Settings.window_search`, not a
manifest field yet: benchmarks/README.md has the numbers that kept it off); a fixed `window`
(steps) excludes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..types import Pb2Settings
from .data import Encoded, Prepared, select_rows
from .gp import FitResult, fit
from .kernel import Layout

# Candidate windows, as fractions of the time span from the oldest kept row to the decision's time.
FRACTIONS = (1.0, 0.5, 0.25)


@dataclass(frozen=True)
class Windowed:
    rows: Encoded
    y: np.ndarray  # standardised within the window
    y_mean: float  # of the (winsorised) rates, to report predictions in rate units
    y_std: float
    fitted: FitResult
    note: str  # "" when the whole history is used


def _standardise(y: np.ndarray, mean: float, std: float) -> tuple[np.ndarray, float, float]:
    """Re-standardise prepared targets (standardised with `mean`, `std`) over a subset."""
    raw = y * std + mean
    m = float(np.mean(raw))
    s = float(np.std(raw))
    if not (s > 0.0 and np.isfinite(s)):
        s = 1.0
    return (raw - m) / s, m, s


def choose(prep: Prepared, layout: Layout, settings: Pb2Settings, rng: np.random.Generator) -> Windowed:
    """Fit the GP on the window that the marginal likelihood prefers (see the module docstring)."""
    n_fit = max(2, int(settings.fit_rows))
    restarts = max(1, int(settings.fit_restarts))
    tau = prep.rows.tau
    candidates: list[np.ndarray] = [np.arange(len(prep.rows))]
    if settings.window_search and settings.window is None and len(prep.rows) >= 2 * n_fit:
        start = float(np.min(tau))
        span = prep.query_tau - start
        for frac in FRACTIONS[1:]:
            idx = np.flatnonzero(tau >= prep.query_tau - frac * span)
            if idx.size >= n_fit and idx.size < candidates[-1].size:
                candidates.append(idx)
    best: Windowed | None = None
    best_ll = -np.inf
    for i, idx in enumerate(candidates):
        data = prep.rows.take(idx)
        y, mean, std = (prep.y[idx], prep.y_mean, prep.y_std) if i == 0 else _standardise(
            prep.y[idx], prep.y_mean, prep.y_std)
        sub = select_rows(data.tau, n_fit, rng)
        fitted = fit(layout, data.take(sub), y[sub], restarts, rng)
        ll = -fitted.nll
        if best is None or ll > best_ll:
            note = "" if i == 0 else f"window {FRACTIONS[i]:g} of the span ({idx.size} rows, by likelihood)"
            best, best_ll = Windowed(data, y, mean, std, fitted, note), ll
    assert best is not None
    return best
