"""L-BFGS-B for PB2's two small inner optimisations, without `scipy.optimize.minimize`'s overhead.

A decision optimises twice (the kernel hyperparameters, the acquisition), 25-40 evaluations each, of
functions that cost 40-130 microseconds. `minimize` wraps every evaluation in its ScalarFunction
bookkeeping (~60 microseconds) and every call in ~0.7 ms of set-up, which together were a quarter
of a decision. This module drives the very same L-BFGS-B routine scipy's `minimize` drives
(`scipy.optimize._lbfgsb.setulb`, the C translation shipped since scipy 1.15) with the same loop,
so the iterates are identical (a unit test checks they are, bit for bit); where that private entry
point is missing or has another signature, it falls back to `minimize` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize

try:  # private: present with this signature in scipy >= 1.15
    from scipy.optimize import _lbfgsb as _native
except ImportError:  # pragma: no cover - depends on the installed scipy
    _native = None

MEMORY = 10  # scipy's default maxcor
MAX_LINE_SEARCH = 20  # scipy's default maxls
_EPS = float(np.finfo(float).eps)

FunGrad = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclass(frozen=True)
class Result:
    x: np.ndarray
    fun: float
    iterations: int


_fast_ok: bool | None = None  # None: not tried yet


def minimize_box(fg: FunGrad, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, maxiter: int,
                 ftol: float = 2.2e-9, gtol: float = 1e-5) -> Result:
    """Minimise over lower <= x <= upper with L-BFGS-B; the same stopping rules as
    `minimize(method="L-BFGS-B", options={"maxiter", "ftol", "gtol"})`. `fg` returns the value and
    gradient and must not keep a reference to its argument (the solver reuses the array)."""
    global _fast_ok
    lower = np.ascontiguousarray(lower, dtype=np.float64).ravel()
    upper = np.ascontiguousarray(upper, dtype=np.float64).ravel()
    if _native is not None and _fast_ok is not False:
        try:
            out = _drive(fg, x0, lower, upper, maxiter, ftol, gtol)
        except TypeError:  # another scipy's signature: use the public path from now on
            _fast_ok = False
        else:
            _fast_ok = True
            return out
    return scipy_minimize_box(fg, x0, lower, upper, maxiter, ftol, gtol)


def scipy_minimize_box(fg: FunGrad, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, maxiter: int,
                       ftol: float = 2.2e-9, gtol: float = 1e-5) -> Result:
    res = minimize(fg, np.asarray(x0, dtype=float), jac=True, method="L-BFGS-B",
                   bounds=list(zip(np.asarray(lower, dtype=float), np.asarray(upper, dtype=float), strict=True)),
                   options={"maxiter": maxiter, "ftol": ftol, "gtol": gtol, "maxcor": MEMORY,
                            "maxls": MAX_LINE_SEARCH})
    return Result(np.asarray(res.x, dtype=float), float(res.fun), int(res.nit))


def _drive(fg: FunGrad, x0: np.ndarray, lower: np.ndarray, upper: np.ndarray, maxiter: int, ftol: float,
           gtol: float) -> Result:
    """scipy's `_minimize_lbfgsb` loop (both bounds finite everywhere, no callback)."""
    assert _native is not None
    n = int(np.asarray(x0).size)
    m = MEMORY
    x = np.clip(np.array(x0, dtype=np.float64).ravel(), lower, upper)
    f: Any = 0.0
    g = np.zeros(n, dtype=np.float64)
    nbd = np.full(n, 2, dtype=np.int32)  # 2: bounded below and above
    wa = np.zeros(2 * m * n + 5 * n + 11 * m * m + 8 * m, dtype=np.float64)
    iwa = np.zeros(3 * n, dtype=np.int32)
    task = np.zeros(2, dtype=np.int32)
    ln_task = np.zeros(2, dtype=np.int32)
    lsave = np.zeros(4, dtype=np.int32)
    isave = np.zeros(44, dtype=np.int32)
    dsave = np.zeros(29, dtype=np.float64)
    factr = ftol / _EPS
    iterations = 0
    while True:
        _native.setulb(m, x, lower, upper, nbd, f, g, factr, gtol, wa, iwa, task, lsave, isave, dsave,
                       MAX_LINE_SEARCH, ln_task)
        if task[0] == 3:  # evaluate f and g at x
            f, grad = fg(x)
            g = np.asarray(grad, dtype=np.float64)
        elif task[0] == 1:  # a new iterate
            iterations += 1
            if iterations >= maxiter:
                break
        else:  # converged, or stopped on an abnormal line search
            break
    return Result(x.copy(), float(f), iterations)
