"""PB2 GP: posterior against a brute-force numpy GP, fit, and the pending-point treatment."""

from __future__ import annotations

import numpy as np
import pytest
from pbt_operator.core.pb2.data import Encoded
from pbt_operator.core.pb2.decide import hallucinate
from pbt_operator.core.pb2.gp import Posterior, fit
from pbt_operator.core.pb2.kernel import Hyper, Layout, cross


def _data(n: int, dx: int, q: int, seed: int = 0) -> tuple[Encoded, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, dx))
    y = np.cos(4 * x[:, -1]) + 0.3 * x[:, 0] + 0.05 * rng.standard_normal(n)
    return Encoded(rng.uniform(size=n), x, rng.integers(2, size=(n, q))), (y - y.mean()) / y.std()


@pytest.mark.parametrize("q", [0, 1])
def test_posterior_matches_brute_force_inverse(q: int) -> None:
    layout = Layout(dx=3, q=q)
    data, y = _data(15, 3, q)
    th = layout.random(np.random.default_rng(1))
    post = Posterior(th, layout, data, y)
    rng = np.random.default_rng(2)
    tq, xq, hq = rng.uniform(size=6), rng.uniform(size=(6, 3)), rng.integers(2, size=(6, q))

    hp = Hyper.of(th, layout)
    k = cross(th, layout, data.tau, data.x, data.h, data.tau, data.x, data.h) + hp.noise * np.eye(15)
    ks = cross(th, layout, data.tau, data.x, data.h, tq, xq, hq)
    kss = cross(th, layout, tq, xq, hq, tq, xq, hq)
    kinv = np.linalg.inv(k)
    mu_ref = ks.T @ kinv @ y
    cov_ref = kss - ks.T @ kinv @ ks

    mu, var = post.predict(tq, xq, hq)
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(var, np.maximum(np.diag(cov_ref), 1e-12), rtol=1e-6, atol=1e-9)
    mu_j, cov_j = post.joint(tq, xq, hq)
    np.testing.assert_allclose(mu_j, mu_ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cov_j, cov_ref, rtol=1e-5, atol=1e-7)  # 1e-8 jitter + inv() error


def test_fit_improves_marginal_likelihood_and_finds_relevant_dimension() -> None:
    layout = Layout(dx=3, q=0)
    rng = np.random.default_rng(3)
    x = rng.uniform(size=(60, 3))
    y = np.sin(6 * x[:, 2]) + 0.05 * rng.standard_normal(60)  # only the last input matters
    data = Encoded(np.zeros(60), x, np.zeros((60, 0), dtype=np.int64))
    res = fit(layout, data, (y - y.mean()) / y.std(), 2, np.random.default_rng(4))
    ls = np.exp(res.theta[layout.lengthscales])
    assert ls[2] < ls[0] and ls[2] < ls[1]
    assert res.failed_starts == 0


def test_bucb_hallucination_shrinks_variance_at_pending_point_and_keeps_mean() -> None:
    layout = Layout(dx=2, q=0)
    data, y = _data(20, 2, 0, seed=5)
    th = layout.default()
    rows_only = Posterior(th, layout, data, y)
    pend = Encoded(np.array([0.9]), np.array([[0.5, 0.37]]), np.zeros((1, 0), dtype=np.int64))
    both = Posterior(th, layout, Encoded.concat(data, pend), y, fill=lambda mu, var: hallucinate("bucb", mu, var, y, 1.0))
    # the hallucinated value is the rows-only posterior mean, computed from the shared factorisation
    assert both.y[-1] == pytest.approx(rows_only.predict(pend.tau, pend.x, pend.h)[0][0], abs=1e-9)

    mu0, var0 = rows_only.predict(pend.tau, pend.x, pend.h)
    mu1, var1 = both.predict(pend.tau, pend.x, pend.h)
    assert var1[0] < 0.9 * var0[0]
    assert mu1[0] == pytest.approx(mu0[0], abs=1e-8)
    # ... and the mean is unchanged everywhere, not just at the pending point
    grid = np.column_stack([np.full(11, 0.5), np.linspace(0, 1, 11)])
    m0, v0 = rows_only.predict(np.full(11, 0.9), grid, np.zeros((11, 0), dtype=np.int64))
    m1, v1 = both.predict(np.full(11, 0.9), grid, np.zeros((11, 0), dtype=np.int64))
    np.testing.assert_allclose(m1, m0, atol=1e-7)
    assert np.all(v1 <= v0 + 1e-12)


def test_constant_liar_uses_the_observed_mean() -> None:
    layout = Layout(dx=2, q=0)
    data, y = _data(10, 2, 0)
    pend = Encoded(np.zeros(3), np.full((3, 2), 0.5), np.zeros((3, 0), dtype=np.int64))
    post = Posterior(layout.default(), layout, Encoded.concat(data, pend), y,
                     fill=lambda mu, var: hallucinate("liar-mean", mu, var, y, 1.0))
    np.testing.assert_allclose(post.y[-3:], np.full(3, np.mean(y)))


@pytest.mark.parametrize(("mode", "sign"), [("liar-optimistic", 1.0), ("liar-pessimistic", -1.0)])
def test_optimistic_and_pessimistic_liars_use_the_surrogates_bounds(mode: str, sign: float) -> None:
    """The slide's liars hallucinate the surrogate's optimistic / pessimistic value at the pending
    point, mu +- sqrt(beta) sigma, not the best / worst rate observed anywhere."""
    layout = Layout(dx=2, q=0)
    data, y = _data(12, 2, 0, seed=3)
    th = layout.default()
    pend = Encoded(np.array([0.2, 0.95]), np.array([[0.5, 0.1], [0.1, 0.9]]), np.zeros((2, 0), dtype=np.int64))
    mu, var = Posterior(th, layout, data, y).predict(pend.tau, pend.x, pend.h)
    post = Posterior(th, layout, Encoded.concat(data, pend), y,
                     fill=lambda m, v: hallucinate(mode, m, v, y, 1.7))
    np.testing.assert_allclose(post.y[-2:], mu + sign * 1.7 * np.sqrt(var), rtol=1e-6, atol=1e-9)
    assert not np.allclose(post.y[-2:], np.max(y) if sign > 0 else np.min(y))
