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
from scipy.optimize import minimize

from .data import Encoded, Pb2Fallback
from .kernel import Hyper, Layout, Pairwise, cross

# Jitter relative to the signal variance, added on top of the fitted noise; retried larger on failure.
JITTERS = (1e-8, 1e-6, 1e-4)
FIT_MAXITER = 30
# The marginal likelihood's optimum need not be precise: hyperparameters within a few percent give
# the same posterior for choosing the next config, and loose tolerances halve the evaluations.
FIT_OPTIONS = {"maxiter": FIT_MAXITER, "ftol": 1e-6, "gtol": 1e-3}
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
    if not math.isfinite(float(np.sum(np.diagonal(low)))):
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
    dK/dlog noise = noise * I. All length-scale terms share one matrix, so they cost one product
    with the precomputed squared differences. The elementwise work is vectorised over S (one numpy
    call serves every restart); only the LAPACK factorisations loop.
    """
    s_count = thetas.shape[0]
    n = y.shape[0]
    shape = (s_count, n, n)
    signal = np.exp(thetas[:, layout.signal])
    inv_l2 = np.exp(-2.0 * thetas[:, layout.lengthscales])  # (S, dx)
    rho = np.exp(thetas[:, layout.decay])
    noise = np.exp(thetas[:, layout.noise])
    se = np.exp(-0.5 * (inv_l2 @ pw.d2)).reshape(shape)
    time = np.exp((-0.5 * rho)[:, None, None] * pw.dt)
    s3 = signal[:, None, None]
    if layout.mix is not None:
        assert pw.hs is not None
        lam = 1.0 / (1.0 + np.exp(-thetas[:, layout.mix]))
        l3 = lam[:, None, None]
        se_hs = se * pw.hs
        mixed = 0.5 * (1.0 - l3) * (se + pw.hs) + l3 * se_hs
        dm_dse = 0.5 * (1.0 - l3) + l3 * pw.hs
        dm_dlam = se_hs - 0.5 * (se + pw.hs)
    else:
        mixed = se
        dm_dse = None
    st = s3 * time
    kf = st * mixed
    nll = np.empty(s_count)
    w = np.empty(shape)
    diag = np.arange(n)
    for i in range(s_count):
        k = kf[i].copy()
        k[diag, diag] += noise[i] + JITTERS[0] * signal[i]
        low = cholesky(k)
        alpha, info = dpotrs(low, y, lower=1)
        if info != 0:
            raise NotPositiveDefinite("potrs")
        nll[i] = 0.5 * float(y @ alpha) + float(np.sum(np.log(np.diagonal(low)))) + 0.5 * n * _LOG_2PI
        kinv_low, info = dpotri(low, lower=1)  # lower triangle of K^-1; the upper one stays zero
        if info != 0:
            raise NotPositiveDefinite("potri")
        wi = np.outer(alpha, alpha)
        wi -= kinv_low
        wi -= kinv_low.T
        wi[diag, diag] += np.diagonal(kinv_low)
        w[i] = wi
    grad = np.empty(thetas.shape)
    wk = w * kf
    grad[:, layout.signal] = 0.5 * wk.sum(axis=(1, 2))
    g = w * st * se if dm_dse is None else w * st * dm_dse * se
    grad[:, layout.lengthscales] = 0.5 * (g.reshape(s_count, -1) @ pw.d2.T) * inv_l2
    grad[:, layout.decay] = -0.25 * rho * (wk * pw.dt).sum(axis=(1, 2))
    if layout.mix is not None:
        grad[:, layout.mix] = 0.5 * (w * st * dm_dlam).sum(axis=(1, 2)) * lam * (1.0 - lam)
    grad[:, layout.noise] = 0.5 * np.trace(w, axis1=1, axis2=2) * noise
    return nll, -grad


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
    BoTorch's batched multi-start optimisation). A trial point whose Cholesky fails is +inf, which
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

    with np.errstate(all="ignore"):
        res = minimize(objective, np.concatenate(alive), jac=True, method="L-BFGS-B",
                       bounds=layout.bounds() * s_count, options=FIT_OPTIONS)
    thetas = np.asarray(res.x, dtype=float).reshape(s_count, p)
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
    `fill` receives their posterior mean given the leading points alone and returns the values to
    condition on. One factorisation serves both, because the leading block of the Cholesky factor
    of K is the Cholesky factor of K's leading block.
    """

    def __init__(self, theta: np.ndarray, layout: Layout, data: Encoded, y: np.ndarray,
                 fill: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
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
            a_obs = cho_solve((self.low[:n_obs, :n_obs], True), y, check_finite=False)
            y = np.concatenate([y, fill(k[n_obs:, :n_obs] @ a_obs)])
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
        of k points sharing (tau, c); the analytic gradient L-BFGS-B uses to maximise UCB.

        dk_i/du_j = s2 * time_i * dm/dk_x * k_x,i * (-(u_j - X_ij) / l_j^2); column 0 of x (the
        score c) is fixed, so it has no gradient.
        """
        d = self.data
        hp = self.hp
        k_pts = u.shape[0]
        x = np.column_stack([np.full(k_pts, c), u])  # (k, dx)
        diff = x[:, None, :] - d.x[None, :, :]  # (k, n, dx)
        se = np.exp(-0.5 * ((diff * diff) @ hp.inv_l2))  # (k, n)
        time = np.exp(-0.5 * hp.rho * np.abs(d.tau - tau))  # (n,)
        if self.layout.q:
            hs = (d.h[None, :, :] == h[:, None, :]).mean(axis=2)  # (k, n)
            mixed = 0.5 * (1.0 - hp.lam) * (se + hs) + hp.lam * se * hs
            coef = hp.signal * time * (0.5 * (1.0 - hp.lam) + hp.lam * hs) * se
        else:
            mixed = se
            coef = hp.signal * time * se
        kv = hp.signal * mixed * time  # (k, n)
        dk = -(coef[:, :, None] * diff[:, :, 1:] * hp.inv_l2[None, None, 1:])  # (k, n, p)
        mu = kv @ self.alpha
        dmu = np.einsum("knp,n->kp", dk, self.alpha)
        w = kv @ self.kinv  # (k, n): K^-1 k for each point (K^-1 is symmetric)
        var = self.prior_var - np.sum(kv * w, axis=1)
        dvar = -2.0 * np.einsum("knp,kn->kp", dk, w)
        return mu, var, dmu, dvar
