"""PB2 kernel: values against the formula, gradients against finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pbt_operator.core.pb2 import kernel
from pbt_operator.core.pb2.gp import Posterior, neg_log_marginal
from pbt_operator.core.pb2.kernel import Hyper, Layout, Pairwise, cross, gram_grads, parts


def _points(n: int, dx: int, q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(size=n), rng.uniform(size=(n, dx)), rng.integers(3, size=(n, q))


def _theta(layout: Layout, seed: int = 1) -> np.ndarray:
    return layout.random(np.random.default_rng(seed))


@pytest.mark.parametrize("q", [0, 2])
def test_kernel_value_matches_formula(q: int) -> None:
    layout = Layout(dx=3, q=q)
    th = _theta(layout)
    hp = Hyper.of(th, layout)
    tau, x, h = _points(2, 3, q)
    k = cross(th, layout, tau[:1], x[:1], h[:1], tau[1:], x[1:], h[1:])[0, 0]

    ls = np.exp(th[layout.lengthscales])
    se = math.exp(-0.5 * float(np.sum(((x[0] - x[1]) / ls) ** 2)))
    eps = hp.eps
    time = (1.0 - eps) ** (abs(tau[0] - tau[1]) / 2.0)  # the paper's form
    if q:
        kh = float(np.mean(h[0] == h[1]))
        lam = hp.lam
        m = (1 - lam) * (se + kh) / 2 + lam * se * kh
    else:
        m = se
    assert k == pytest.approx(hp.signal * m * time, rel=1e-12)


def test_kernel_diagonal_is_signal_variance_and_matrix_is_pd() -> None:
    layout = Layout(dx=2, q=1)
    th = _theta(layout)
    tau, x, h = _points(30, 2, 1)
    k = cross(th, layout, tau, x, h, tau, x, h)
    assert np.allclose(np.diag(k), Hyper.of(th, layout).signal)
    assert np.allclose(k, k.T)
    assert np.min(np.linalg.eigvalsh(k)) > -1e-10


def test_eps_parametrisation_round_trip() -> None:
    layout = Layout(dx=1, q=0)
    th = layout.default()
    th[layout.decay] = math.log(-math.log(1 - 0.3))  # eps = 0.3
    assert Hyper.of(th, layout).eps == pytest.approx(0.3)


@pytest.mark.parametrize("q", [0, 1, 3])
def test_gram_gradients_match_finite_differences(q: int) -> None:
    layout = Layout(dx=3, q=q)
    tau, x, h = _points(7, 3, q, seed=3)
    pw = Pairwise.of(tau, x, h, tau, x, h)
    th = _theta(layout, seed=4)

    def gram(t: np.ndarray) -> np.ndarray:
        hp = Hyper.of(t, layout)
        return parts(hp, pw).kf + hp.noise * np.eye(7)

    analytic = gram_grads(th, layout, pw)
    assert len(analytic) == layout.size
    step = 1e-6
    for i in range(layout.size):
        e = np.zeros_like(th)
        e[i] = step
        numeric = (gram(th + e) - gram(th - e)) / (2 * step)
        np.testing.assert_allclose(analytic[i], numeric, rtol=1e-5, atol=1e-8, err_msg=f"slot {i}")


@pytest.mark.parametrize("q", [0, 2])
def test_log_marginal_gradient_matches_finite_differences(q: int) -> None:
    layout = Layout(dx=4, q=q)
    tau, x, h = _points(25, 4, q, seed=5)
    y = np.sin(3 * x[:, 0]) + 0.1 * np.random.default_rng(6).standard_normal(25)
    y = (y - y.mean()) / y.std()
    pw = Pairwise.of(tau, x, h, tau, x, h)
    for seed in (7, 8):
        th = _theta(layout, seed)
        _, g = neg_log_marginal(th, layout, pw, y)
        step = 1e-6
        num = np.empty_like(th)
        for i in range(layout.size):
            e = np.zeros_like(th)
            e[i] = step
            num[i] = (neg_log_marginal(th + e, layout, pw, y)[0] - neg_log_marginal(th - e, layout, pw, y)[0]) / (
                2 * step
            )
        np.testing.assert_allclose(g, num, rtol=1e-4, atol=1e-6)


def test_log_marginal_value_matches_direct_formula() -> None:
    layout = Layout(dx=2, q=1)
    tau, x, h = _points(12, 2, 1, seed=9)
    y = np.random.default_rng(10).standard_normal(12)
    pw = Pairwise.of(tau, x, h, tau, x, h)
    th = _theta(layout, 11)
    hp = Hyper.of(th, layout)
    k = parts(hp, pw).kf + (hp.noise + 1e-8 * hp.signal) * np.eye(12)
    sign, logdet = np.linalg.slogdet(k)
    direct = 0.5 * y @ np.linalg.inv(k) @ y + 0.5 * logdet + 6 * math.log(2 * math.pi)
    assert sign > 0
    assert neg_log_marginal(th, layout, pw, y)[0] == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("q", [0, 2])
def test_acquisition_gradients_match_finite_differences(q: int) -> None:
    layout = Layout(dx=4, q=q)
    tau, x, h = _points(20, 4, q, seed=12)
    y = np.random.default_rng(13).standard_normal(20)
    post = Posterior(_theta(layout, 14), layout, kernel_data(tau, x, h), y)
    u = np.array([0.2, 0.5, 0.9])
    hq = h[0]
    mu, var, dmu, dvar = post.value_grad(0.7, 0.4, u, hq)
    step = 1e-6
    for j in range(3):
        e = np.zeros(3)
        e[j] = step
        up = post.value_grad(0.7, 0.4, u + e, hq)
        dn = post.value_grad(0.7, 0.4, u - e, hq)
        assert dmu[j] == pytest.approx((up[0] - dn[0]) / (2 * step), rel=1e-5, abs=1e-8)
        assert dvar[j] == pytest.approx((up[1] - dn[1]) / (2 * step), rel=1e-5, abs=1e-8)
    # the single-point path agrees with the batch path
    m_b, v_b = post.predict(np.array([0.7]), np.array([[0.4, *u]]), hq[None, :])
    assert mu == pytest.approx(m_b[0], rel=1e-9)
    assert var == pytest.approx(v_b[0], rel=1e-7)


def kernel_data(tau: np.ndarray, x: np.ndarray, h: np.ndarray):
    from pbt_operator.core.pb2.data import Encoded

    return Encoded(tau, x, h)


def test_overlap_kernel_counts_agreements() -> None:
    a = np.array([[0, 1, 2], [0, 0, 0]])
    b = np.array([[0, 1, 0]])
    np.testing.assert_allclose(kernel.overlap(a, b), [[2 / 3], [2 / 3]])
