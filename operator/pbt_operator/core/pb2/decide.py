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

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..choices import PB2_PARALLEL, check_table
from ..space import Space, Value
from ..types import Pb2Settings
from . import window
from .acquisition import ENUMERATE_LIMIT, Domain, Region, beta_schedule, maximise_ucb, thompson
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
    if not settings.use_score:
        def _noc(e: Encoded) -> Encoded:
            x = e.x.copy()
            x[:, 0] = 0.0
            return Encoded(e.tau, x, e.h)
        prep = dataclasses.replace(prep, rows=_noc(prep.rows), pending=_noc(prep.pending), query_c=0.0)
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

    radius: float | np.ndarray = settings.trust_region
    if settings.tr_lengthscales > 0.0 and domain.p > 0:
        ls = 1.0 / np.sqrt(Hyper.of(theta, layout).inv_l2[1:1 + domain.p])
        radius = np.clip(settings.tr_lengthscales * ls, settings.tr_min, settings.trust_region)
    region = _region(space, domain, center, radius)
    factor = budget_factor(remaining)
    beta = beta_full * factor
    if mode == "randomized":
        beta *= float(rng.gamma(RANDOM_SHAPE, 1.0 / RANDOM_SHAPE))
    fixed_h = None
    bandit_note = ""
    keep = (domain.q > 0 and settings.keep_category_prob > 0.0 and center is not None
            and float(rng.random()) < settings.keep_category_prob)
    if domain.q > 0 and (settings.fix_categories or keep) and center is not None:
        _, h_center, st = unit_columns(space, [center])
        if st[0] == 0:
            fixed_h = h_center[0]
    elif domain.q > 0 and settings.categorical_choice == "exp3" and domain.combinations <= ENUMERATE_LIMIT:
        fixed_h, bandit_note = exp3_choice(space, domain, rows, settings, rng)
    if mode == "thompson" and factor > 0.0:
        pick = thompson(domain, post, win.y, prep.query_tau, prep.query_c, settings.candidates, rng, region)
    else:
        pick = maximise_ucb(domain, post, win.y, prep.query_tau, prep.query_c, math.sqrt(beta),
                            settings.candidates, settings.restarts, rng, region, fixed_h)
    if (domain.q > 0 and settings.switch_category_prob > 0.0 and center is not None and fixed_h is None
            and float(rng.random()) < settings.switch_category_prob):
        _, h_center, st = unit_columns(space, [center])
        if st[0] == 0 and np.array_equal(pick.h, h_center[0]):
            others = [hc for hc in domain.all_combinations() if not np.array_equal(hc, h_center[0])]
            picks = [maximise_ucb(domain, post, win.y, prep.query_tau, prep.query_c, math.sqrt(beta),
                                  settings.candidates, settings.restarts, rng, region, hc) for hc in others]
            if picks:
                pick = max(picks, key=lambda pk: pk.score)
                bandit_note += " forced switch"
    if domain.q > 0 and domain.p > 0 and settings.switch_numbers != "ucb" and center is not None:
        _, h_center, st = unit_columns(space, [center])
        if st[0] == 0 and not np.array_equal(pick.h, h_center[0]):
            greedy = maximise_ucb(domain, post, win.y, prep.query_tau, prep.query_c, 0.0, settings.candidates,
                                  settings.restarts, rng, region if settings.switch_numbers == "mean-box" else None,
                                  pick.h)
            pick = greedy
            bandit_note += " switch at the posterior mean's best"

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
    if bandit_note:
        parts.append(bandit_note.strip())
    return Pb2Choice(hyperparameters, " ".join(parts))


def exp3_choice(space: Space, domain: Domain, rows: Sequence[Pb2Row], settings: Pb2Settings,
                rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """PB2-Mix's categorical step (Parker-Holder et al. 2021): a time-varying EXP3 bandit over the
    categorical combinations, replayed from the history.

    Rows are grouped by their start time t (a "round"); a row's reward is its improvement rate's rank
    among the rows of its round, in [0, 1]. A combination's reward in a round is the mean over its
    rows there; EXP3's importance-weighted sum over rounds is estimated by the combination's
    discounted mean reward times the discounted number of rounds (rounds it was not tried in count at
    that mean), so the weights forget at `exp3_discount` per round: a combination that became good
    after the optimum moved is found. p = (1 - g) softmax(eta * that sum) + g / K."""
    combos = domain.all_combinations()
    k = combos.shape[0]
    if not rows:
        return combos[int(rng.integers(k))], "exp3: no rows"
    t = np.array([float(r.t) for r in rows])
    rate = np.array([float(r.rate) for r in rows])
    _, h, status = unit_columns(space, [r.hyperparameters for r in rows])
    ok = (status == 0) & np.isfinite(t) & np.isfinite(rate)
    t, rate, h = t[ok], rate[ok], h[ok]
    rounds = np.unique(t)
    gamma = float(min(max(settings.exp3_discount, 0.0), 1.0))
    disc = np.zeros(k)
    wsum = np.zeros(k)
    g_total = 0.0
    code = {tuple(int(v) for v in c): i for i, c in enumerate(combos)}
    for age, tr in enumerate(rounds[::-1]):
        w = gamma ** age
        g_total += w
        sel = np.flatnonzero(t == tr)
        r = rate[sel]
        if sel.size > 1:
            order = np.argsort(np.argsort(r, kind="stable"), kind="stable")
            rank = order / (sel.size - 1)
        else:
            rank = np.full(1, 0.5)
        per: dict[int, list[float]] = {}
        for i, j in enumerate(sel):
            per.setdefault(code[tuple(int(v) for v in h[j])], []).append(float(rank[i]))
        for ci, vals in per.items():
            disc[ci] += w * float(np.mean(vals))
            wsum[ci] += w
    mean = np.where(wsum > 0, disc / np.maximum(wsum, 1e-300), 0.5)  # untried: a neutral prior
    score = float(settings.exp3_eta) * g_total * mean
    soft = np.exp(score - np.max(score))
    soft /= np.sum(soft)
    g = float(min(max(settings.exp3_explore, 0.0), 1.0))
    p = (1.0 - g) * soft + g / k
    i = int(rng.choice(k, p=p))
    return combos[i], "exp3 p=" + "/".join(f"{v:.2f}" for v in p)


def _region(space: Space, domain: Domain, center: Mapping[str, Value] | None,
            radius: float | np.ndarray) -> Region | None:
    """The trust region around the donor's configuration, or None (search everywhere)."""
    if center is None or float(np.min(radius)) >= 1.0 or domain.p == 0:
        return None
    u, _, status = unit_columns(space, [center])
    if status[0] != 0:
        return None
    return Region.around(u[0], np.maximum(0.0, radius))


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
