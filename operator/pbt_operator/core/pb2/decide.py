"""PB2's explore step: one call, one configuration (or a reasoned refusal).

    prepare rows -> fit the GP's hyperparameters by marginal likelihood -> account for pending
    configurations (settings.parallel) -> maximise UCB (or a Thompson sample) at the donor's (t, c)

Pending configurations (segments running or decided but not finished) are what makes PB2 parallel
("Challenge I" on the slides): without them every member exploited in the same round would get the
same answer.

The modes follow the slide's list ("Challenge I"):

* `bucb` (GP-BUCB, Desautels et al. 2014): pending points join the GP with their posterior mean as
  the observed value ("in expectation of the current surrogate"). The mean is unchanged, but the
  variance around them collapses, so UCB moves elsewhere. This is PB2's own choice.
* `liar-optimistic` / `liar-pessimistic`: pending points join with the surrogate's own optimistic /
  pessimistic value for them, mu +- sqrt(beta) sigma (the same beta as the acquisition). The
  pessimistic lie also lowers the mean around a running configuration, pushing choices away from
  it; the optimistic one raises it, pulling choices towards (and so exploiting near) it.
* `liar-mean` (constant liar, Ginsbourger et al. 2010): pending points join with the mean observed
  rate, whatever the surrogate thinks of them.
* `thompson` (asynchronous parallel TS, Kandasamy et al. 2018): no hallucination; each choice
  maximises its own posterior sample, and different samples give different choices.
* `randomized` (randomised GP-UCB, Berk et al. 2020): no hallucination; each choice draws its own
  beta from a Gamma distribution with the schedule's beta as its mean, so concurrent choices trade
  exploration for exploitation differently.

Trust region (TuRBO-style, Eriksson et al. 2019): the acquisition searches the numeric
hyperparameters within +- `trust_region` (unit space, log scale where the parameter is log) of the
donor's configuration, whatever the categorical part (a switch of category used to free the range,
and went to its corners: `acquisition.Region`). The member restarts from the donor's weights, and on a moving optimum the best next configuration is
near the one that just did best: a global search spends a population's few exploit decisions on
the corners of the space, where the GP's uncertainty (and so UCB) is largest and its mean reverts
to the average rate (benchmarks/README.md: search quality).

Budget-aware exploration: exploring pays off only in the segments a member still has to train, so
beta is scaled by `budget_factor(remaining)`: 0 on a member's last segment (pure exploitation of the
posterior mean; Thompson sampling also switches to the mean there), 1/3 and 2/3 on the two before,
unscaled before that.

The GP's kernel hyperparameters are fitted on the finished rows only: liars are a device of the
acquisition, not data, and refitting per pending set would double the cost.

Nothing raises into the engine: every failure becomes Pb2Choice(None, "pb2 fallback: <why>").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..choices import PB2_PARALLEL, check_table
from ..space import Space, Value
from ..types import Pb2Settings
from . import window
from .acquisition import Domain, Region, beta_schedule, maximise_ucb, thompson
from .data import Encoded, Pb2Choice, Pb2Fallback, Pb2Pending, Pb2Row, decode, prepare, unit_columns
from .gp import Posterior
from .kernel import Hyper, Layout

PARALLEL_MODES = PB2_PARALLEL  # spec.explore.pb2.parallel: core/choices.py holds the list
# beta reaches its full value this many segments before a member's last one.
BUDGET_HORIZON = 3
# Shape of the Gamma distribution `randomized` draws beta from (1: exponential; mean = the schedule's).
RANDOM_SHAPE = 1.0


def budget_factor(remaining: int | None) -> float:
    """Scale of the exploration weight for a member with `remaining` segments to train, the one being
    decided included (None: unknown, no scaling)."""
    if remaining is None:
        return 1.0
    return min(1.0, max(0.0, (int(remaining) - 1) / BUDGET_HORIZON))


def suggest(
    space: Space,
    rows: Sequence[Pb2Row],
    pending: Sequence[Pb2Pending],
    t: float,
    c: float,
    settings: Pb2Settings,
    rng: np.random.Generator,
    remaining: int | None = None,
    center: Mapping[str, Value] | None = None,
) -> Pb2Choice:
    """New hyperparameters for a member that restarts from a donor at time `t` with score `c` and
    has `remaining` segments left to train (this one included; None: unknown). With `center` (the
    donor's configuration) and `settings.trust_region` < 1 the search stays near it (see below).

    Deterministic given the arguments and the state of `rng`. Never raises.
    """
    try:
        with np.errstate(all="ignore"):
            return _suggest(space, rows, pending, t, c, settings, rng, remaining, center)
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
    remaining: int | None = None,
    center: Mapping[str, Value] | None = None,
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
    # The window is chosen by marginal likelihood once the history is long (pb2/window.py).
    win = window.choose(prep, layout, settings, rng)
    fitted = win.fitted
    theta = fitted.theta
    n_pending = len(prep.pending)
    beta_full = beta_schedule(prep.n_valid + n_pending + 1, domain.p + domain.q, settings.kappa)
    if _FILL[mode] is None or n_pending == 0:
        post = Posterior(theta, layout, win.rows, win.y)
    else:
        sqrt_full = math.sqrt(beta_full)
        post = Posterior(theta, layout, Encoded.concat(win.rows, prep.pending), win.y,
                         fill=lambda mu_p, var_p: hallucinate(mode, mu_p, var_p, win.y, sqrt_full))

    region = _region(space, domain, center, settings.trust_region)
    factor = budget_factor(remaining)
    beta = beta_full * factor
    if mode == "randomized":
        beta *= float(rng.gamma(RANDOM_SHAPE, 1.0 / RANDOM_SHAPE))
    if mode == "thompson" and factor > 0.0:
        pick = thompson(domain, post, win.y, prep.query_tau, prep.query_c, settings.candidates, rng, region)
    else:
        pick = maximise_ucb(domain, post, win.y, prep.query_tau, prep.query_c, math.sqrt(beta),
                            settings.candidates, settings.restarts, rng, region)

    hyperparameters = decode(space, pick.u, pick.h)
    if not space.contains(hyperparameters):
        raise Pb2Fallback(f"internal error: {hyperparameters} is outside the space")

    hp = Hyper.of(theta, layout)
    mu = pick.mu * win.y_std + win.y_mean
    sigma = pick.sigma * win.y_std
    head = (f"pb2 {mode}: sample={pick.score:.3g}" if mode == "thompson" and factor > 0.0
            else f"pb2 {mode}: ucb={pick.score:.3g} beta={beta:.3g}")
    parts = [
        f"{head} mu={mu:.4g} sigma={sigma:.3g} (rate)",
        f"rows={len(win.rows)}/{prep.n_total}",
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
    if win.note:
        parts.append(win.note)
    return Pb2Choice(hyperparameters, " ".join(parts))


def _region(space: Space, domain: Domain, center: Mapping[str, Value] | None, radius: float) -> Region | None:
    """The trust region around the donor's configuration, or None (search everywhere)."""
    if center is None or radius >= 1.0 or domain.p == 0:
        return None
    u, _, status = unit_columns(space, [center])
    if status[0] != 0:
        return None
    return Region.around(u[0], max(0.0, float(radius)))


# How each parallel mode fills in the pending points' values (standardised units), given their
# posterior mean and variance under the finished rows alone, the observed values and sqrt(beta);
# None: the mode conditions on finished rows only.
_Fill = Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]
_FILL: dict[str, _Fill | None] = {
    "bucb": lambda mu, var, y, sb: np.asarray(mu, dtype=float),
    "liar-optimistic": lambda mu, var, y, sb: mu + sb * np.sqrt(np.maximum(var, 0.0)),
    "liar-pessimistic": lambda mu, var, y, sb: mu - sb * np.sqrt(np.maximum(var, 0.0)),
    "liar-mean": lambda mu, var, y, sb: np.full(mu.shape[0], float(np.mean(y))),
    "thompson": None,
    "randomized": None,
}
check_table("pb2 parallel modes", _FILL, PB2_PARALLEL)


def hallucinate(mode: str, mu_pending: np.ndarray, var_pending: np.ndarray, y: np.ndarray,
                sqrt_beta: float) -> np.ndarray:
    """The values pending points are assumed to have (standardised units), given their posterior
    mean and variance under the finished rows alone."""
    fill = _FILL.get(mode)
    if fill is None:
        raise Pb2Fallback(f"no hallucination for mode {mode!r}")
    return fill(np.asarray(mu_pending, dtype=float), np.asarray(var_pending, dtype=float), y, sqrt_beta)


__all__ = ["PARALLEL_MODES", "Pb2Choice", "Pb2Pending", "Pb2Row", "suggest"]
