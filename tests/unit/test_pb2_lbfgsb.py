"""The direct L-BFGS-B driver must be scipy's L-BFGS-B exactly, only cheaper to call."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pbt_operator.core.pb2 import lbfgsb
from pbt_operator.core.pb2.lbfgsb import minimize_box, scipy_minimize_box


def quadratic(seed: int, n: int):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    h = a @ a.T + np.eye(n)
    b = 10.0 * rng.standard_normal(n)  # the unconstrained optimum lies far outside [-1, 1]^n

    def fg(x: np.ndarray) -> tuple[float, np.ndarray]:
        g = h @ x - b
        return float(0.5 * x @ h @ x - b @ x), g

    return fg


def rosenbrock(x: np.ndarray) -> tuple[float, np.ndarray]:
    f = float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))
    g = np.zeros_like(x)
    g[:-1] = -400.0 * x[:-1] * (x[1:] - x[:-1] ** 2) - 2.0 * (1.0 - x[:-1])
    g[1:] += 200.0 * (x[1:] - x[:-1] ** 2)
    return f, g


def walled(x: np.ndarray) -> tuple[float, np.ndarray]:
    """A bowl whose region x0 > 0.5 fails (infinite), like a Cholesky failure in the fit."""
    if x[0] > 0.5:
        return math.inf, np.zeros_like(x)
    return float(np.sum((x - 2.0) ** 2)), 2.0 * (x - 2.0)


CASES = [
    (quadratic(0, 5), np.zeros(5), -np.ones(5), np.ones(5), 25),
    (quadratic(1, 18), np.full(18, 0.3), np.zeros(18), np.ones(18), 25),
    (rosenbrock, np.full(4, -1.0), np.full(4, -2.0), np.full(4, 2.0), 60),
    (rosenbrock, np.full(6, 0.5), np.full(6, -2.0), np.full(6, 0.8), 5),  # stops on maxiter
    (walled, np.zeros(3), np.full(3, -5.0), np.full(3, 5.0), 30),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_same_iterates_as_scipy(case: int) -> None:
    fg, x0, lo, hi, maxiter = CASES[case]
    ours = minimize_box(fg, x0, lo, hi, maxiter, ftol=1e-9, gtol=1e-6)
    ref = scipy_minimize_box(fg, x0, lo, hi, maxiter, ftol=1e-9, gtol=1e-6)
    assert lbfgsb._fast_ok is True  # the direct path ran (the installed scipy has it)
    np.testing.assert_array_equal(ours.x, ref.x)
    assert ours.fun == ref.fun
    assert ours.iterations == ref.iterations
    assert np.all(ours.x >= lo) and np.all(ours.x <= hi)


def test_bounds_are_respected_and_the_constrained_optimum_found() -> None:
    fg = quadratic(2, 6)
    res = minimize_box(fg, np.zeros(6), -np.ones(6), np.ones(6), 200, ftol=1e-12, gtol=1e-9)
    _, g = fg(res.x)
    # KKT: at a bound the gradient points outward, inside it vanishes.
    for xi, gi in zip(res.x, g, strict=True):
        if xi <= -1.0 + 1e-9:
            assert gi >= -1e-6
        elif xi >= 1.0 - 1e-9:
            assert gi <= 1e-6
        else:
            assert abs(gi) < 1e-4


def test_walled_region_is_never_returned() -> None:
    res = minimize_box(walled, np.zeros(3), np.full(3, -5.0), np.full(3, 5.0), 30)
    assert res.x[0] <= 0.5 and math.isfinite(res.fun)


def test_falls_back_to_scipy_when_the_private_entry_point_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    class Changed:
        @staticmethod
        def setulb(*args: object) -> None:
            raise TypeError("setulb() takes 18 positional arguments")

    monkeypatch.setattr(lbfgsb, "_native", Changed)
    monkeypatch.setattr(lbfgsb, "_fast_ok", None)
    fg, x0, lo, hi, maxiter = CASES[0]
    res = minimize_box(fg, x0, lo, hi, maxiter)
    assert lbfgsb._fast_ok is False
    ref = scipy_minimize_box(fg, x0, lo, hi, maxiter)
    np.testing.assert_array_equal(res.x, ref.x)
