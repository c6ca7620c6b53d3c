"""How close PB2's two inner optimisations get to their optimum, per setting: the evidence for the defaults.

    .venv/bin/python benchmarks/pb2_convergence.py [--seeds 12] [--dims 10]

On synthetic histories (those of decision_latency.py: 16 members, a rate with an optimum inside the
space; 200 and 1000 rows, `--seeds` seeds each) it runs one PB2 decision per history and setting and
compares, against a reference run with a far larger budget:

* the kernel fit: the negative log marginal likelihood reached (nats above the reference's best
  over 4 starts x 300 iterations); smaller is better, 0 is the reference;
* the acquisition: the UCB value of the chosen point (in standardised units, minus the reference's
  512 candidates x 8 starts x 200 iterations), with the fit held fixed so that both maximise the
  same function; closer to 0 is better.

It prints median and 90th-percentile gaps and the CPU time of that phase. Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "operator"))

import numpy as np  # noqa: E402
from decision_latency import make_history, make_space  # noqa: E402
from pbt_operator.core.pb2 import acquisition, decide, gp, window  # noqa: E402
from pbt_operator.core.types import Pb2Settings  # noqa: E402

_seen: dict[str, Any] = {}


@contextlib.contextmanager
def _spied() -> Iterator[None]:
    """Record the fit's likelihood and the acquisition's value (and their CPU time) per decision.

    The spies replace the names where the decision looks them up: the kernel fit is `gp.fit` as
    imported by pb2/window.py (which chooses the data window and fits on it; one fit per decision
    unless Pb2Settings.window_search, which this benchmark leaves off), the acquisition is
    `acquisition.maximise_ucb` as imported by pb2/decide.py. If either moves, the run fails here
    rather than measuring nothing.
    """
    fit, maximise = window.fit, decide.maximise_ucb
    budgets = gp.FIT_MAXITER, acquisition.ACQ_MAXITER

    def fit_spy(*a: Any, **k: Any) -> Any:
        t0 = time.process_time()
        r = fit(*a, **k)
        _seen.update(nll=r.nll, fit_s=time.process_time() - t0)
        return r

    def ucb_spy(*a: Any, **k: Any) -> Any:
        t0 = time.process_time()
        r = maximise(*a, **k)
        _seen.update(ucb=r.score, acq_s=time.process_time() - t0)
        return r

    window.fit = fit_spy
    decide.maximise_ucb = ucb_spy
    try:
        yield
    finally:  # main() may be called from another program: leave the package as it was
        window.fit, decide.maximise_ucb = fit, maximise
        gp.FIT_MAXITER, acquisition.ACQ_MAXITER = budgets


def run(dims: int, seeds: int, settings: Pb2Settings, fit_iter: int, acq_iter: int) -> np.ndarray:
    gp.FIT_MAXITER, acquisition.ACQ_MAXITER = fit_iter, acq_iter
    if settings.window_search:
        raise ValueError("pb2_convergence measures one kernel fit per decision: leave window_search off")
    out = []
    for n in (200, 1000):
        for seed in range(seeds):
            space = make_space(dims)
            rows, pending, t, c = make_history(space, n, seed)
            _seen.clear()
            choice = decide.suggest(space, rows, pending, t, c, settings, np.random.default_rng(seed))
            if choice.hyperparameters is None or not {"nll", "ucb"} <= _seen.keys():
                raise RuntimeError(f"the decision did not fit and maximise UCB ({choice.reason}): nothing measured")
            out.append((_seen["nll"], _seen["ucb"], _seen["fit_s"], _seen["acq_s"]))
    return np.array(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--dims", default="3,10")
    args = ap.parse_args(argv)
    with _spied():
        _report(args)
    return 0


def _report(args: argparse.Namespace) -> None:
    base = Pb2Settings()
    fit_default, acq_default = gp.FIT_MAXITER, acquisition.ACQ_MAXITER
    print(f"defaults: fit_restarts={base.fit_restarts} fit iterations={fit_default} restarts={base.restarts} "
          f"acquisition iterations={acq_default} candidates={base.candidates}; seeds={args.seeds} x rows 200,1000")
    for dims in (int(d) for d in args.dims.split(",")):
        print(f"\n{dims} hyperparameters: kernel fit (gap in nats above the best of 4 starts x 300 iterations)")
        ref = run(dims, args.seeds, replace(base, fit_restarts=4), 300, acq_default)
        print(f"| {'fit_restarts':>12} | {'iterations':>10} | {'gap median':>10} | {'gap p90':>8} | {'fit cpu ms':>10} |")
        print(f"|{'-' * 14}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 12}|")
        for restarts, iters in ((1, 20), (1, fit_default), (2, fit_default), (4, fit_default), (1, 2 * fit_default)):
            r = run(dims, args.seeds, replace(base, fit_restarts=restarts), iters, acq_default)
            gap = r[:, 0] - ref[:, 0]
            print(f"| {restarts:>12} | {iters:>10} | {np.median(gap):>10.3f} | {np.percentile(gap, 90):>8.3f} "
                  f"| {1e3 * statistics.median(r[:, 2]):>10.2f} |")
        print(f"\n{dims} hyperparameters: acquisition (UCB minus that of 512 candidates x 8 starts x 200 iterations; "
              f"fit at defaults)")
        ref = run(dims, args.seeds, replace(base, restarts=8, candidates=512), fit_default, 200)
        print(f"| {'restarts':>8} | {'iterations':>10} | {'candidates':>10} | {'gap median':>10} | {'gap p10':>8} "
              f"| {'acq cpu ms':>10} |")
        print(f"|{'-' * 10}|{'-' * 12}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 12}|")
        for restarts, iters, cands in ((1, acq_default, 128), (2, 15, 128), (2, acq_default, 128),
                                       (4, acq_default, 128), (2, acq_default, 64)):
            r = run(dims, args.seeds, replace(base, restarts=restarts, candidates=cands), fit_default, iters)
            gap = r[:, 1] - ref[:, 1]
            print(f"| {restarts:>8} | {iters:>10} | {cands:>10} | {np.median(gap):>10.4f} | {np.percentile(gap, 10):>8.3f} "
                  f"| {1e3 * statistics.median(r[:, 3]):>10.2f} |")


if __name__ == "__main__":
    raise SystemExit(main())
