"""Choosing the next configuration: UCB (or a Thompson sample) at the donor's (t, c).

The donor's time and score are fixed; only the hyperparameters move. Numeric hyperparameters are
searched in the unit space of `Param.to_unit` (so log-scaled ones in log space), integers are
rounded *inside* the acquisition (the value of a point is the value of its rounded point, as in
Garrido-Merchan & Hernandez-Lobato 2020), and categoricals are chosen jointly with the continuous
part, through the mixed kernel:

* few combinations (<= ENUMERATE_LIMIT): the random candidates cycle through all combinations, and
  the final continuous optimum is re-scored under every combination;
* many combinations: each candidate draws its combination at random, and the winner is refined by
  hill climbing over one-coordinate changes (the Hamming neighbourhood).

Trust region: when the caller gives a `Region` (PB2 passes one around the donor's configuration),
numeric hyperparameters stay within it, whatever the categorical part (see `Region`).

Optimisation: score `candidates` random points plus jittered copies of the best observed rows,
start L-BFGS-B (analytic gradient, box [0, 1]) from the best `restarts` of them with the categorical
part fixed, round, and keep the best rounded point. Everything random comes from the caller's rng.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..space import Space
from .data import Pb2Fallback
from .gp import Posterior, cholesky_jittered
from .lbfgsb import minimize_box

ENUMERATE_LIMIT = 64
ANCHORS = 8  # best observed rows used as seeds of the candidate set
ANCHOR_JITTER = 0.05
ACQ_MAXITER = 25
# The regret theorem's beta is notoriously conservative (Srinivas et al. scale theirs by 1/5 in
# their experiments, PB2's code uses a small constant times log t); with standardised targets this
# scale keeps sqrt(beta) between ~0.9 (one hyperparameter, tens of rows) and ~3 (ten
# hyperparameters, thousands of rows). `kappa` multiplies beta further.
BETA_SCALE = 0.02
BETA_DELTA = 0.1


def beta_theory(t: float, d: int, delta: float = BETA_DELTA, a: float = 1.0, b: float = 1.0, r: float = 1.0) -> float:
    """The confidence parameter of the GP-UCB regret bound that PB2's theorem builds on:

        beta_t = 2 log(2 pi^2 t^2 / (3 delta)) + 2 d log(t^2 d b r sqrt(log(4 d a / delta)))

    t: round (number of observations so far), d: dimension of the searched domain (here the number
    of hyperparameters), delta: failure probability, [0, r]^d the domain (r = 1 in unit space), a, b:
    the constants of the kernel's derivative tail bound (1 for a unit-length-scale SE kernel).
    Form of Srinivas et al. 2010, Thm 2, which TV-GP-UCB (Bogunovic et al. 2016) and PB2
    (Parker-Holder et al. 2020) inherit; the papers differ only in constants inside the logarithms.
    It grows like (4 d + 4) log t: more exploration as data accumulates and as dimension grows.
    """
    t = max(1.0, float(t))
    d = max(1, int(d))
    first = 2.0 * math.log(2.0 * math.pi**2 * t * t / (3.0 * delta))
    second = 2.0 * d * math.log(t * t * d * b * r * math.sqrt(math.log(4.0 * d * a / delta)))
    return first + max(0.0, second)


def beta_schedule(t: float, d: int, kappa: float) -> float:
    """beta actually used by UCB: kappa * BETA_SCALE * beta_theory(t, d); UCB = mu + sqrt(beta) sigma."""
    return max(0.0, float(kappa)) * BETA_SCALE * beta_theory(t, d)


@dataclass(frozen=True)
class Domain:
    """The searched box: unit-space numeric hyperparameters and categorical index vectors."""

    space: Space
    int_cols: tuple[int, ...]
    n_choices: tuple[int, ...]

    @staticmethod
    def of(space: Space) -> Domain:
        return Domain(
            space=space,
            int_cols=tuple(j for j, p in enumerate(space.numeric) if p.kind == "int"),
            n_choices=tuple(len(p.choices) for p in space.categorical),
        )

    @property
    def p(self) -> int:
        return len(self.space.numeric)

    @property
    def q(self) -> int:
        return len(self.n_choices)

    @property
    def combinations(self) -> int:
        return math.prod(self.n_choices) if self.n_choices else 1

    def round(self, u: np.ndarray) -> np.ndarray:
        """Snap integer hyperparameters to the unit-space image of the nearest allowed integer,
        with `Param.from_unit` / `Param.clip` semantics (log-scaled ints included)."""
        u = np.clip(u, 0.0, 1.0)
        if not self.int_cols:
            return u
        u = np.array(u, dtype=float, copy=True)
        numeric = self.space.numeric
        for j in self.int_cols:
            prm = numeric[j]
            lo, hi = float(prm.low), float(prm.high)
            if hi == lo:
                continue
            col = u[..., j]
            if prm.log:
                v = np.exp(math.log(lo) + col * (math.log(hi) - math.log(lo)))
            else:
                v = lo + col * (hi - lo)
            v = np.clip(np.round(np.clip(v, lo, hi)), math.ceil(lo), int(hi))
            if prm.log:
                u[..., j] = (np.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
            else:
                u[..., j] = (v - lo) / (hi - lo)
        return u

    def all_combinations(self) -> np.ndarray:
        grids = np.meshgrid(*[np.arange(k) for k in self.n_choices], indexing="ij")
        return np.stack([g.ravel() for g in grids], axis=1).astype(np.int64)

    def random_h(self, m: int, rng: np.random.Generator) -> np.ndarray:
        if self.q == 0:
            return np.zeros((m, 0), dtype=np.int64)
        if self.combinations <= ENUMERATE_LIMIT:
            combos = self.all_combinations()
            order = np.arange(m) % combos.shape[0]
            return combos[rng.permutation(order)]
        return np.stack([rng.integers(k, size=m) for k in self.n_choices], axis=1).astype(np.int64)


@dataclass(frozen=True)
class Region:
    """A trust region around a centre configuration: numeric hyperparameters within [lo, hi] (unit
    space), for every categorical combination.

    The box used to be freed for a point whose categories differ from the centre's (the best
    learning rate depends on the optimizer, so a switch of category seemed to need the whole
    range). Measured, that spent exploits on the corners: for a category the GP knows little about,
    the uncertainty, and so UCB, is largest at the ends of the numeric range (learning rates of
    1e-5 and 1), and on the categorical benchmark half of PB2's category switches landed there.
    Held in the box, a switch is tried at numbers near the ones that work now, as PBT's perturb
    tries it, and successive exploits still move the numbers by up to `radius` each (paired over
    20 seeds on `cat-flip`: mean +0.008, +0.053 and +0.020 of the limit at populations 4, 8, 16;
    benchmarks/README.md)."""

    lo: np.ndarray
    hi: np.ndarray

    @staticmethod
    def around(u: np.ndarray, radius: float) -> Region:
        return Region(np.clip(u - radius, 0.0, 1.0), np.clip(u + radius, 0.0, 1.0))

    def bounds(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi), each (m, p), for the m rows of categorical indices h (the same box for each)."""
        m = np.asarray(h).shape[0]
        return np.repeat(self.lo[None, :], m, axis=0), np.repeat(self.hi[None, :], m, axis=0)


@dataclass(frozen=True)
class Pick:
    u: np.ndarray
    h: np.ndarray
    score: float  # acquisition value (UCB, or the Thompson sample) in standardised units
    mu: float
    sigma: float


def candidates(domain: Domain, post: Posterior, y: np.ndarray, n: int, rng: np.random.Generator,
               region: Region | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random points plus the configs of the best observed rows and jittered copies of them (good
    seeds for the polish), rounded, without duplicates (rounding collapses small integer ranges, and
    duplicates would make a Thompson sample's covariance singular)."""
    m = max(1, int(n))
    u = rng.uniform(size=(m, domain.p))
    h = domain.random_h(m, rng)
    if region is not None:
        lo, hi = region.bounds(h)
        u = lo + (hi - lo) * u
    data = post.data
    n_obs = min(ANCHORS, y.shape[0])
    if n_obs:
        top = np.argsort(-y, kind="stable")[:n_obs]  # rows come first in post.data, pending after
        base_u = data.x[top, 1:]
        base_h = data.h[top]
        jit = base_u + ANCHOR_JITTER * rng.standard_normal(base_u.shape)
        if region is not None:
            lo, hi = region.bounds(base_h)
            base_u, jit = np.clip(base_u, lo, hi), np.clip(jit, lo, hi)
        u = np.vstack([u, base_u, jit])
        h = np.vstack([h, base_h, base_h])
    u = domain.round(u)
    _, first = np.unique(np.column_stack([u, h.astype(float)]), axis=0, return_index=True)
    keep = np.sort(first)
    return u[keep], h[keep]


def _ucb(post: Posterior, tau: float, c: float, u: np.ndarray, h: np.ndarray,
         sqrt_beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UCB, mean and standard deviation at m points (u, h) sharing the donor's (tau, c)."""
    m = u.shape[0]
    x = np.column_stack([np.full(m, c), u])
    mu, var = post.predict(np.full(m, tau), x, h)
    sig = np.sqrt(var)
    return mu + sqrt_beta * sig, mu, sig


def maximise_ucb(domain: Domain, post: Posterior, y: np.ndarray, tau: float, c: float, sqrt_beta: float,
                 n_candidates: int, restarts: int, rng: np.random.Generator, region: Region | None = None) -> Pick:
    """argmax over the domain (or the trust region) of mu(z) + sqrt(beta) * sigma(z), z = (tau, c, u, h)."""
    u_c, h_c = candidates(domain, post, y, n_candidates, rng, region)
    acq, mu, sig = _ucb(post, tau, c, u_c, h_c, sqrt_beta)
    if not np.all(np.isfinite(acq)):
        raise Pb2Fallback("acquisition not finite on the candidate set")
    i_best = int(np.argmax(acq))
    best = Pick(u_c[i_best], h_c[i_best], float(acq[i_best]), float(mu[i_best]), float(sig[i_best]))

    if domain.p > 0 and restarts > 0:
        best = _polish(domain, post, tau, c, sqrt_beta, u_c, h_c, _distinct_best(acq, u_c, h_c, restarts), best,
                       region)

    if domain.q > 0:
        best = _refine_categorical(domain, post, tau, c, sqrt_beta, best)
    return best


def _polish(domain: Domain, post: Posterior, tau: float, c: float, sqrt_beta: float, u_c: np.ndarray,
            h_c: np.ndarray, starts: list[int], best: Pick, region: Region | None = None) -> Pick:
    """Multi-start L-BFGS-B from the given candidates, categorical parts fixed, all starts at once.

    The starts are independent, so maximising the *sum* of their UCB values over the stacked
    variables has the same optima as maximising each separately (the Hessian is block-diagonal);
    one L-BFGS-B run on the stack pays the Python and numpy call overhead once per iteration
    instead of once per start and iteration. Ints are relaxed during the polish and rounded after.
    """
    k, p = len(starts), domain.p
    h_fix = h_c[starts]

    at = post.at(tau, c, h_fix)

    def neg(flat: np.ndarray) -> tuple[float, np.ndarray]:
        u = flat.reshape(k, p)
        mu, var, dmu, dvar = at(u)
        s = np.sqrt(np.maximum(var, 1e-12))
        val = float(np.sum(mu + sqrt_beta * s))
        grad = dmu + sqrt_beta * dvar / (2.0 * s[:, None])
        if not (math.isfinite(val) and np.all(np.isfinite(grad))):
            return math.inf, np.zeros_like(flat)
        return -val, -grad.ravel()

    with np.errstate(all="ignore"):
        lo, hi = region.bounds(h_fix) if region is not None else (np.zeros((k, p)), np.ones((k, p)))
        res = minimize_box(neg, np.clip(u_c[starts], lo, hi).ravel(), lo.ravel(), hi.ravel(), ACQ_MAXITER)
    u_new = domain.round(np.asarray(res.x, dtype=float).reshape(k, p))
    a, mu1, s1 = _ucb(post, tau, c, u_new, h_fix, sqrt_beta)
    i = int(np.argmax(np.where(np.isfinite(a), a, -np.inf)))
    if math.isfinite(float(a[i])) and float(a[i]) > best.score:
        return Pick(u_new[i], h_fix[i], float(a[i]), float(mu1[i]), float(s1[i]))
    return best


def _distinct_best(acq: np.ndarray, u: np.ndarray, h: np.ndarray, k: int) -> list[int]:
    """Indices of the k best distinct candidates (rounding can make candidates coincide)."""
    out: list[int] = []
    seen: set[bytes] = set()
    for i in np.argsort(-acq, kind="stable"):
        key = u[i].tobytes() + h[i].tobytes()
        if key not in seen:
            seen.add(key)
            out.append(int(i))
            if len(out) >= k:
                break
    return out


def _refine_categorical(domain: Domain, post: Posterior, tau: float, c: float, sqrt_beta: float,
                        best: Pick) -> Pick:
    """Best categorical combination for the chosen continuous point: all of them when few, else
    hill climbing over one-coordinate changes."""
    if domain.combinations <= ENUMERATE_LIMIT:
        hs = domain.all_combinations()
        us = np.repeat(best.u[None, :], hs.shape[0], axis=0)
        a, mu, s = _ucb(post, tau, c, us, hs, sqrt_beta)
        i = int(np.argmax(a))
        if float(a[i]) > best.score:
            return Pick(best.u, hs[i], float(a[i]), float(mu[i]), float(s[i]))
        return best
    for _ in range(domain.q):
        neigh = []
        for j, k in enumerate(domain.n_choices):
            for v in range(k):
                if v != best.h[j]:
                    hn = best.h.copy()
                    hn[j] = v
                    neigh.append(hn)
        if not neigh:
            break
        hs = np.stack(neigh)
        us = np.repeat(best.u[None, :], hs.shape[0], axis=0)
        a, mu, s = _ucb(post, tau, c, us, hs, sqrt_beta)
        i = int(np.argmax(a))
        if float(a[i]) <= best.score:
            break
        best = Pick(best.u, hs[i], float(a[i]), float(mu[i]), float(s[i]))
    return best


def thompson(domain: Domain, post: Posterior, y: np.ndarray, tau: float, c: float, n_candidates: int,
             rng: np.random.Generator, region: Region | None = None) -> Pick:
    """Draw one joint posterior sample of f over a candidate set and return its argmax.

    Parallel Thompson sampling (Kandasamy et al. 2018): each concurrent choice follows a different
    plausible explanation of the data, so choices differ without hallucinating pending outcomes.
    """
    u_c, h_c = candidates(domain, post, y, n_candidates, rng, region)
    m = u_c.shape[0]
    taus = np.full(m, tau)
    x = np.column_stack([np.full(m, c), u_c])
    mu, cov = post.joint(taus, x, h_c)
    cov = 0.5 * (cov + cov.T)
    low = cholesky_jittered(cov, post.prior_var)
    f = mu + low @ rng.standard_normal(m)
    if not np.all(np.isfinite(f)):
        raise Pb2Fallback("thompson sample not finite")
    i = int(np.argmax(f))
    sig = math.sqrt(max(float(cov[i, i]), 0.0))
    return Pick(u_c[i], h_c[i], float(f[i]), float(mu[i]), sig)
