"""Exact GP regression on a few hundred rows: marginal-likelihood fit and posterior.

Own numpy code rather than a GP library: a decision must take milliseconds and be bit-reproducible,
and the whole model is one Cholesky factorisation. Every factorisation goes through `cholesky`
below (which calls `np.linalg.cholesky` at call time), so a single place decides what "not positive
definite" means, and tests can force that failure (it calls `scipy.linalg.lapack.dpotrf` at call
time, so patching that attribute reaches every factorisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_solve, lapack, solve_triangular
from scipy.linalg.lapack import dpotri, dpotrs

from .data import Encoded, Pb2Fallback
from .kernel import Hyper, Layout, Pairwise, cross
from .lbfgsb import minimize_box

# Jitter relative to the signal variance, added on top of the fitted noise; retried larger on failure.
JITTERS = (1e-8, 1e-6, 1e-4)
FIT_MAXITER = 30
# The marginal likelihood's optimum need not be precise: hyperparameters within a few percent give
# the same posterior for choosing the next config, and loose tolerances halve the evaluations.
FIT_FTOL = 1e-6
FIT_GTOL = 1e-3
_LOG_2PI = math.log(2.0 * math.pi)


class NotPositiveDefinite(Pb2Fallback):
    def __init__(self, what: str = "") -> None:
        super().__init__(f"cholesky failed (matrix not PD){': ' + what if what else ''}")


def cholesky(a: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor with a zero upper triangle; raises NotPositiveDefinite on failure.

    LAPACK directly: `np.linalg.cholesky` costs 4x more on the 50-100 row matrices of the fit.
    """
    low, info = lapack.dpotrf(a, lower=1, clean=1)
    if info != 0:
        raise NotPositiveDefinite(f"dpotrf info={info}")
    # NaN/inf in `a` either stops dpotrf (info > 0) or propagates to the diagonal of the factor.
    if not math.isfinite(low.trace()):
        raise NotPositiveDefinite("non-finite factor")
    return np.asarray(low)


def cholesky_jittered(a: np.ndarray, scale: float) -> np.ndarray:
    """Cholesky with increasing jitter on the diagonal (relative to `scale`)."""
    last: Pb2Fallback | None = None
    for j in JITTERS:
        try:
            return cholesky(a + (j * scale) * np.eye(a.shape[0]))
        except NotPositiveDefinite as e:
            last = e
    assert last is not None
    raise last


def neg_log_marginal(theta: np.ndarray, layout: Layout, pw: Pairwise, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Negative log marginal likelihood and its gradient w.r.t. theta (the log-hyperparameters)."""
    nll, grad = neg_log_marginal_batch(theta[None, :], layout, pw, y)
    return float(nll[0]), grad[0]


def neg_log_marginal_batch(thetas: np.ndarray, layout: Layout, pw: Pairwise, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`neg_log_marginal` for S hyperparameter vectors at once: (S,) values and (S, P) gradients.

    d log p / d theta_i = 1/2 tr((alpha alpha^T - K^-1) dK/dtheta_i), alpha = K^-1 y, with
    dK/dlog s2 = K_f, dK/dlog l_j = s2 * time * dm/dk_x * k_x * d2_j / l_j^2,
    dK/dlog rho = -K_f * rho |dt| / 2, dK/dlogit lam = s2 * time * dm/dlam * lam (1 - lam),
    dK/dlog noise = noise * I.

    This runs ~40 times per decision on 40-row matrices, where numpy's per-call overhead, not
    arithmetic, is the cost; hence the economies: s2 * k_x * time comes from one exp of one matrix
    product (`Pairwise.d2t` stacks the squared differences with |dt|), the length-scale and decay
    sums share one product, everything but the LAPACK calls is vectorised over S (one numpy call
    serves every restart), and the trace pairs use V = alpha alpha^T - 2 tril(K^-1) + diag(K^-1)
    instead of the full W = alpha alpha^T - K^-1: for a symmetric A, sum(V * A) = sum(W * A), and
    dpotri returns exactly tril(K^-1).
    """
    s_count = thetas.shape[0]
    n = y.shape[0]
    dx = layout.dx
    shape = (s_count, n, n)
    log_s2 = thetas[:, layout.signal]
    # [1/l_1^2 .. 1/l_dx^2, rho]: the length scales and the decay sit next to each other in theta.
    rates = np.exp(thetas[:, 1 : dx + 2] * _RATE_SIGNS[dx])
    inv_l2 = rates[:, :dx]
    rho = rates[:, dx]
    noise = np.exp(thetas[:, layout.noise])
    signal = np.exp(log_s2)
    sxt = np.exp(log_s2[:, None] - 0.5 * (rates @ pw.d2t)).reshape(shape)  # s2 * k_x * time
    if layout.mix is not None:
        assert pw.hs is not None
        lam = 1.0 / (1.0 + np.exp(-thetas[:, layout.mix]))
        half = (0.5 * (1.0 - lam))[:, None, None]
        sth = np.exp(log_s2[:, None, None] - (0.5 * rho)[:, None, None] * pw.dt) * pw.hs  # s2 * time * k_h
        kf = sxt * (half + lam[:, None, None] * pw.hs) + half * sth
    else:
        kf = sxt
    kn = kf.copy()
    kn.reshape(s_count, -1)[:, :: n + 1] += (noise + JITTERS[0] * signal)[:, None]  # the diagonals, as a view
    nll = np.empty(s_count)
    v = np.empty(shape)
    for i in range(s_count):
        low = cholesky(kn[i])
        alpha, info = dpotrs(low, y, lower=1)
        if info != 0:
            raise NotPositiveDefinite("potrs")
        nll[i] = 0.5 * float(y @ alpha) + float(np.log(low.diagonal()).sum()) + 0.5 * n * _LOG_2PI
        kinv_low, info = dpotri(low, lower=1)  # lower triangle of K^-1; the upper one stays zero
        if info != 0:
            raise NotPositiveDefinite("potri")
        vi = v[i]
        np.multiply.outer(alpha, alpha, out=vi)
        vi -= 2.0 * kinv_low
        vi.reshape(-1)[:: n + 1] += kinv_low.diagonal()
    grad = np.empty(thetas.shape)
    vflat = v.reshape(s_count, -1)
    if layout.mix is None:
        vk = vflat * kf.reshape(s_count, -1)
        sums = vk @ pw.d2t.T  # (S, dx + 1): length-scale sums, then the decay sum
        grad[:, layout.signal] = 0.5 * vk.sum(axis=1)
        grad[:, layout.lengthscales] = 0.5 * sums[:, :dx] * inv_l2
        grad[:, layout.decay] = -0.25 * rho * sums[:, dx]
    else:
        # With P = V * s2 k_x time and Q = V * s2 time k_h (elementwise), and a = (1 - lam) / 2:
        #   V * dK/dlog s2 = a P + lam P hs + a Q            (= V * K_f)
        #   V * s2 time dm/dk_x k_x = a P + lam P hs          (length scales, times d2_j / l_j^2)
        #   V * s2 time dm/dlam = P hs - P / 2 - Q / 2
        # so every sum is a combination of P's sums against [d2, dt, d2 hs, dt hs, 1, hs] and Q's
        # against [dt, 1]: two matrix products instead of one pass per hyperparameter.
        assert pw.mix_design is not None and pw.dt_one is not None
        a = half[:, 0, 0]
        sp = (vflat * sxt.reshape(s_count, -1)) @ pw.mix_design.T  # (S, 2 dx + 4)
        sq = (vflat * sth.reshape(s_count, -1)) @ pw.dt_one.T  # (S, 2): [dt, 1]
        k = dx + 1
        a1, lam1 = a[:, None], lam[:, None]
        plain, with_hs = sp[:, :k], sp[:, k : 2 * k]  # [d2.., dt] sums of P and of P * hs
        p_sum, p_hs = sp[:, 2 * k], sp[:, 2 * k + 1]
        len_dt = a1 * plain + lam1 * with_hs  # V * s2 time dm/dk_x k_x against [d2.., dt]
        grad[:, layout.signal] = 0.5 * (a * p_sum + lam * p_hs + a * sq[:, 1])
        grad[:, layout.lengthscales] = 0.5 * len_dt[:, :dx] * inv_l2
        grad[:, layout.decay] = -0.25 * rho * (len_dt[:, dx] + a * sq[:, 0])
        grad[:, layout.mix] = 0.5 * (p_hs - 0.5 * p_sum - 0.5 * sq[:, 1]) * lam * (1.0 - lam)
    grad[:, layout.noise] = 0.5 * vflat[:, :: n + 1].sum(axis=1) * noise
    return nll, -grad


class _RateSigns(dict[int, np.ndarray]):
    """[-2] * dx + [1] per dx: exp(theta * signs) turns log length scales into 1/l^2 and log rho into rho."""

    def __missing__(self, dx: int) -> np.ndarray:
        signs = np.array([-2.0] * dx + [1.0])
        self[dx] = signs
        return signs


_RATE_SIGNS = _RateSigns()


@dataclass(frozen=True)
class FitResult:
    theta: np.ndarray
    nll: float
    starts: int
    failed_starts: int


def fit(layout: Layout, data: Encoded, y: np.ndarray, restarts: int, rng: np.random.Generator) -> FitResult:
    """Maximise the log marginal likelihood with L-BFGS-B from `restarts` starts.

    The first start is a neutral default; the others are drawn from `rng` inside the bounds. The
    starts are optimised jointly: L-BFGS-B minimises the *sum* of their negative log likelihoods
    over the stacked parameters, which has the same optima as optimising each separately (the
    objective is separable), while every numpy call serves all starts (the same device as
    BoTorch's batched multi-start optimisation). The price is a shared line search and curvature
    memory, which slow each start down within the iteration budget; hence one start by default
    (`Pb2Settings.fit_restarts`). A trial point whose Cholesky fails is +inf, which
    makes L-BFGS-B backtrack; a start that fails at its initial point is dropped; only when every
    start fails does PB2 give up.
    """
    pw = Pairwise.of(data.tau, data.x, data.h, data.tau, data.x, data.h)
    n_starts = max(1, int(restarts))
    inits = [layout.default()] + [layout.random(rng) for _ in range(n_starts - 1)]
    alive = []
    for th in inits:
        try:
            f0, g0 = neg_log_marginal(th, layout, pw, y)
        except Pb2Fallback:
            continue
        if math.isfinite(f0) and np.all(np.isfinite(g0)):
            alive.append(th)
    failed = n_starts - len(alive)
    if not alive:
        raise NotPositiveDefinite("at every marginal-likelihood start")
    s_count = len(alive)
    p = layout.size

    def objective(flat: np.ndarray) -> tuple[float, np.ndarray]:
        try:
            f, g = neg_log_marginal_batch(flat.reshape(s_count, p), layout, pw, y)
        except Pb2Fallback:
            return math.inf, np.zeros_like(flat)
        total = float(np.sum(f))
        if not (math.isfinite(total) and np.all(np.isfinite(g))):
            return math.inf, np.zeros_like(flat)
        return total, g.ravel()

    lower, upper = np.array(layout.bounds() * s_count, dtype=float).T
    with np.errstate(all="ignore"):
        res = minimize_box(objective, np.concatenate(alive), lower, upper, FIT_MAXITER, FIT_FTOL, FIT_GTOL)
    thetas = np.asarray(res.x, dtype=float).reshape(s_count, p)
    if s_count == 1:  # the optimiser's value is the start's own
        finals = np.array([float(res.fun)])
    else:
        try:
            finals, _ = neg_log_marginal_batch(thetas, layout, pw, y)
        except Pb2Fallback:
            finals = np.full(s_count, math.inf)
    if not np.any(np.isfinite(finals)):  # cannot happen unless the optimiser ends on a failed point
        thetas, finals = np.stack(alive), np.array([neg_log_marginal(t, layout, pw, y)[0] for t in alive])
    best = int(np.argmin(np.where(np.isfinite(finals), finals, math.inf)))
    return FitResult(theta=thetas[best], nll=float(finals[best]), starts=n_starts, failed_starts=failed)


class Posterior:
    """The GP conditioned on (data, y) with fixed theta; latent-function predictions.

    When `y` is shorter than `data`, the trailing points are hallucinated (pending configurations):
    `fill` receives their posterior mean and variance given the leading points alone and returns
    the values to condition on. One factorisation serves both, because the leading block of the Cholesky factor
    of K is the Cholesky factor of K's leading block.
    """

    def __init__(self, theta: np.ndarray, layout: Layout, data: Encoded, y: np.ndarray,
                 fill: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None) -> None:
        self.theta = theta
        self.layout = layout
        self.data = data
        self.hp = Hyper.of(theta, layout)
        n = len(data)
        k = cross(theta, layout, data.tau, data.x, data.h, data.tau, data.x, data.h)
        k = 0.5 * (k + k.T)
        k.flat[:: n + 1] += self.hp.noise
        self.low = cholesky_jittered(k, self.hp.signal)
        n_obs = y.shape[0]
        if n_obs < n:
            if fill is None:
                raise ValueError("fewer targets than points and nothing to fill them with")
            low_obs = self.low[:n_obs, :n_obs]
            a_obs = cho_solve((low_obs, True), y, check_finite=False)
            v = solve_triangular(low_obs, k[:n_obs, n_obs:], lower=True, check_finite=False)
            var = np.maximum(self.hp.signal - np.sum(v * v, axis=0), 1e-12)
            y = np.concatenate([y, fill(k[n_obs:, :n_obs] @ a_obs, var)])
        self.y = y
        self.alpha = cho_solve((self.low, True), y, check_finite=False)
        self._kinv: np.ndarray | None = None
        self.prior_var = self.hp.signal  # k(z, z): the mixed and time factors are 1 on the diagonal

    @property
    def kinv(self) -> np.ndarray:
        """K^-1, computed on first use. Explicit inverse: the gradient path of the acquisition runs
        dozens of times per decision and a mat-vec is far cheaper than two triangular solves; K
        includes noise >= 1e-4 * signal, so it is well conditioned enough."""
        if self._kinv is None:
            kinv_low, info = dpotri(self.low, lower=1)
            if info != 0:
                raise NotPositiveDefinite("potri")
            kinv = kinv_low + kinv_low.T
            kinv.flat[:: len(self.data) + 1] -= np.diagonal(kinv_low)
            self._kinv = kinv
        return self._kinv

    def kvec(self, tau: np.ndarray, x: np.ndarray, h: np.ndarray) -> np.ndarray:
        """(n_data, m) cross-covariance with m query points."""
        d = self.data
        return cross(self.theta, self.layout, d.tau, d.x, d.h, tau, x, h)

    def predict(self, tau: np.ndarray, x: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance of f at m points (variance floored at 1e-12)."""
        ks = self.kvec(tau, x, h)
        mu = ks.T @ self.alpha
        v = solve_triangular(self.low, ks, lower=True, check_finite=False)
        var = self.prior_var - np.sum(v * v, axis=0)
        return mu, np.maximum(var, 1e-12)

    def joint(self, tau: np.ndarray, x: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean vector and full covariance matrix at m points (for Thompson sampling)."""
        ks = self.kvec(tau, x, h)
        mu = ks.T @ self.alpha
        v = solve_triangular(self.low, ks, lower=True, check_finite=False)
        kss = cross(self.theta, self.layout, tau, x, h, tau, x, h)
        return mu, kss - v.T @ v

    def value_grad(self, tau: float, c: float, u: np.ndarray, h: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
        """Mean, variance and their gradients w.r.t. the numeric hyperparameters `u` of one point
        at fixed (tau, c, h)."""
        mu, var, dmu, dvar = self.value_grad_batch(tau, c, u[None, :], h[None, :])
        return float(mu[0]), float(var[0]), dmu[0], dvar[0]

    def value_grad_batch(self, tau: float, c: float, u: np.ndarray, h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Mean (k,), variance (k,) and their gradients (k, p) w.r.t. the numeric hyperparameters
        of k points sharing (tau, c); the analytic gradient L-BFGS-B uses to maximise UCB."""
        return self.at(tau, c, h)(u)

    def at(self, tau: float, c: float, h: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """`value_grad_batch` for k points with fixed (tau, c) and categorical rows `h` (k, q), as a
        function of their numeric part u (k, p) alone.

        The polish calls it dozens of times with only u moving, and at ~130 rows numpy's per-call
        overhead, not arithmetic, is the cost; so everything that does not depend on u (the time
        factor, the categorical overlap, the score's distance) is computed here once, and the
        per-call work avoids (k, n, p) difference tensors altogether: with
        dk_i/du_j = -coef_i * (u_j - X_ij) / l_j^2 (coef = s2 * time * dm/dk_x * k_x; column 0 of
        x, the score, is fixed and has no gradient), sums over the rows i of a * dk_i/du_j are
        -(u_j * sum_i a_i coef_i - sum_i a_i coef_i X_ij) / l_j^2, one matrix product.
        """
        d = self.data
        hp = self.hp
        x_num = d.x[:, 1:]  # (n, p)
        inv_l2 = hp.inv_l2[1:]
        xs = x_num * inv_l2  # (n, p)
        base = hp.inv_l2[0] * (c - d.x[:, 0]) ** 2 + np.sum(x_num * xs, axis=1)  # (n,): all but the u terms
        time = hp.signal * np.exp(-0.5 * hp.rho * np.abs(d.tau - tau))  # (n,), times s2
        if self.layout.q:
            hs = (d.h[None, :, :] == np.asarray(h)[:, None, :]).mean(axis=2)  # (k, n)
            slope = time * (0.5 * (1.0 - hp.lam) + hp.lam * hs)  # s2 * time * dm/dk_x
            offset = time * (0.5 * (1.0 - hp.lam)) * hs  # the part of k not multiplied by k_x
        else:
            slope = np.broadcast_to(time, (np.asarray(h).shape[0], time.shape[0]))
            offset = None
        alpha = self.alpha
        kinv = self.kinv
        prior = self.prior_var

        def evaluate(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            r2 = base[None, :] + np.sum(u * u * inv_l2, axis=1)[:, None] - 2.0 * (u @ xs.T)  # (k, n)
            coef = slope * np.exp(-0.5 * np.maximum(r2, 0.0))
            kv = coef if offset is None else coef + offset
            w = kv @ kinv  # (k, n): K^-1 k for each point (K^-1 is symmetric)
            mu = kv @ alpha
            var = prior - np.sum(kv * w, axis=1)
            ca = coef * alpha
            cw = coef * w
            # d mu/du = -(u * sum(ca) - ca @ X) / l^2 ; d var/du = -2 k^T K^-1 dk/du = 2 (u * sum(cw) - cw @ X) / l^2
            dmu = (ca @ x_num - u * ca.sum(axis=1)[:, None]) * inv_l2
            dvar = 2.0 * (u * cw.sum(axis=1)[:, None] - cw @ x_num) * inv_l2
            return mu, var, dmu, dvar

        return evaluate
