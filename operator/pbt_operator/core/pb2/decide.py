"""PB2's explore step: one call, one configuration (or a reasoned refusal).

    prepare rows -> fit the GP's hyperparameters by marginal likelihood -> account for pending
    configurations (settings.parallel) -> maximise UCB (or a Thompson sample) at the donor's (t, c)

Pending configurations (segments running or decided but not finished) are what makes PB2 parallel
("Challenge I" on the slides): without them every member exploited in the same round would get the
same answer.

* `bucb` (GP-BUCB, Desautels et al. 2014): pending points join the GP with their posterior mean as
  the observed value. The mean is unchanged, but the variance around them collapses, so UCB moves
  elsewhere. This is PB2's own choice.
* `liar-mean` / `liar-optimistic` / `liar-pessimistic` (constant liar): pending points join with the
  mean / best / worst observed (standardised) rate, which also moves the mean.
* `thompson` (asynchronous parallel TS, Kandasamy et al. 2018): no hallucination; each choice
  maximises its own posterior sample, and different samples give different choices.

The GP's kernel hyperparameters are fitted on the finished rows only: liars are a device of the
acquisition, not data, and refitting per pending set would double the cost.

Nothing raises into the engine: every failure becomes Pb2Choice(None, "pb2 fallback: <why>").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from ..choices import PB2_PARALLEL, check_table
from ..space import Space
from ..types import Pb2Settings
from .acquisition import Domain, beta_schedule, maximise_ucb, thompson
from .data import Encoded, Pb2Choice, Pb2Fallback, Pb2Pending, Pb2Row, decode, prepare, select_rows
from .gp import Posterior, fit
from .kernel import Hyper, Layout

PARALLEL_MODES = PB2_PARALLEL  # spec.explore.pb2.parallel: core/choices.py holds the list


def suggest(
    space: Space,
    rows: Sequence[Pb2Row],
    pending: Sequence[Pb2Pending],
    t: float,
    c: float,
    settings: Pb2Settings,
    rng: np.random.Generator,
) -> Pb2Choice:
    """New hyperparameters for a member that restarts from a donor at time `t` with score `c`.

    Deterministic given the arguments and the state of `rng`. Never raises.
    """
    try:
        with np.errstate(all="ignore"):
            return _suggest(space, rows, pending, t, c, settings, rng)
    except Pb2Fallback as e:
        return Pb2Choice(None, f"pb2 fallback: {e}")
    except Exception as e:  # nothing may reach the engine: it falls back to perturb instead
        return Pb2Choice(None, f"pb2 fallback: {type(e).__name__}: {e}")


def _suggest(
    space: Space,
    rows: Sequence[Pb2Row],
    pending: Sequence[Pb2Pending],
    t: float,
    c: float,
    settings: Pb2Settings,
    rng: np.random.Generator,
) -> Pb2Choice:
    mode = settings.parallel
    if mode not in PARALLEL_MODES:
        raise Pb2Fallback(f"unknown parallel mode {mode!r}")
    if len(space) == 0:
        return Pb2Choice({}, "pb2: no hyperparameters to choose")
    prep = prepare(space, rows, pending, t, c, settings, rng)
    domain = Domain.of(space)
    layout = Layout(dx=1 + domain.p, q=domain.q)
    # Kernel hyperparameters are fitted on a smaller subsample than the posterior is conditioned on:
    # the fit costs O(n^3) per likelihood evaluation and needs dozens of them, the posterior one.
    fit_idx = select_rows(prep.rows.tau, max(2, int(settings.fit_rows)), rng)
    fitted = fit(layout, prep.rows.take(fit_idx), prep.y[fit_idx], max(1, int(settings.fit_restarts)), rng)
    theta = fitted.theta
    n_pending = len(prep.pending)
    if _FILL[mode] is None or n_pending == 0:
        post = Posterior(theta, layout, prep.rows, prep.y)
    else:
        post = Posterior(theta, layout, Encoded.concat(prep.rows, prep.pending), prep.y,
                         fill=lambda mu_pending: hallucinate(mode, mu_pending, prep.y))

    beta = beta_schedule(prep.n_valid + n_pending + 1, domain.p + domain.q, settings.kappa)
    if mode == "thompson":
        pick = thompson(domain, post, prep.y, prep.query_tau, prep.query_c, settings.candidates, rng)
    else:
        pick = maximise_ucb(domain, post, prep.y, prep.query_tau, prep.query_c, math.sqrt(beta),
                            settings.candidates, settings.restarts, rng)

    hyperparameters = decode(space, pick.u, pick.h)
    if not space.contains(hyperparameters):
        raise Pb2Fallback(f"internal error: {hyperparameters} is outside the space")

    hp = Hyper.of(theta, layout)
    mu = pick.mu * prep.y_std + prep.y_mean
    sigma = pick.sigma * prep.y_std
    head = (f"pb2 {mode}: sample={pick.score:.3g}" if mode == "thompson"
            else f"pb2 {mode}: ucb={pick.score:.3g} beta={beta:.3g}")
    parts = [
        f"{head} mu={mu:.4g} sigma={sigma:.3g} (rate)",
        f"rows={len(prep.rows)}/{prep.n_total}",
        f"pending={n_pending}",
        f"eps={hp.eps:.3g} noise={hp.noise:.2g}",
    ]
    if prep.dropped_nonfinite:
        parts.append(f"dropped {prep.dropped_nonfinite} non-finite")
    if prep.dropped_invalid:
        parts.append(f"dropped {prep.dropped_invalid} invalid")
    if prep.ignored_pending:
        parts.append(f"ignored {prep.ignored_pending} pending")
    if fitted.failed_starts:
        parts.append(f"{fitted.failed_starts}/{fitted.starts} fit starts failed")
    parts.extend(prep.notes)
    return Pb2Choice(hyperparameters, " ".join(parts))


# How each parallel mode fills in the pending points' values (standardised units), given their
# posterior mean under the finished rows alone; None: the mode conditions on finished rows only.
_FILL: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray] | None] = {
    "bucb": lambda mu, y: np.asarray(mu, dtype=float),
    "thompson": None,
    "liar-mean": lambda mu, y: np.full(mu.shape[0], float(np.mean(y))),
    "liar-optimistic": lambda mu, y: np.full(mu.shape[0], float(np.max(y))),
    "liar-pessimistic": lambda mu, y: np.full(mu.shape[0], float(np.min(y))),
}
check_table("pb2 parallel modes", _FILL, PB2_PARALLEL)


def hallucinate(mode: str, mu_pending: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The values pending points are assumed to have (standardised units), given their posterior
    mean under the finished rows alone."""
    fill = _FILL.get(mode)
    if fill is None:
        raise Pb2Fallback(f"no hallucination for mode {mode!r}")
    return fill(mu_pending, y)


__all__ = ["PARALLEL_MODES", "Pb2Choice", "Pb2Pending", "Pb2Row", "suggest"]
