"""Time one PB2 decision (`pbt_operator.core.pb2.suggest`) against the size of the history.

    .venv/bin/python benchmarks/decision_latency.py [--repeats 20] [--sizes 100,1000,10000]
        [--dims 3,10] [--parallel MODE (default: Pb2Settings.parallel)] [--set fit_rows=32 ...]

For each history size (rows = finished segments) and each space (3 hyperparameters: log-float, int,
float; 10 hyperparameters: the same plus six floats and one categorical) it times `suggest` with a
few pending configurations, each repeat with a fresh rng seed, and prints median and p90 in ms.
The synthetic rows come from a population of 16 members whose rate has an optimum inside the
space, so the GP fit does real work. Prints a table; asserts nothing (tests never assert times).

Both wall-clock and CPU time (this process) are reported: on a shared 2-core machine the wall time
mostly measures the neighbours, the CPU time what one decision costs.

BLAS threads: unless OPENBLAS_NUM_THREADS / OMP_NUM_THREADS are already set, this script pins them
to 1 before numpy loads. PB2's matrices are 50-130 rows, far too small for threads to help, and a
multi-threaded OpenBLAS on an oversubscribed machine turns a 0.1 ms Cholesky into 100+ ms of
spinning. Processes that call PB2 (operator, local runner) should do the same.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import fields, replace
from typing import Any

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "operator"))

import numpy as np  # noqa: E402
from pbt_operator.core.pb2 import Pb2Pending, Pb2Row, suggest  # noqa: E402
from pbt_operator.core.space import Param, Space  # noqa: E402
from pbt_operator.core.types import Pb2Settings  # noqa: E402

POPULATION = 16
STEPS = 1000
PENDING = 4


def make_space(dims: int) -> Space:
    params = [
        Param("lr", "float", 1e-5, 1e-1, log=True),
        Param("batch", "int", 16, 512, log=True),
        Param("momentum", "float", 0.0, 0.99),
    ]
    if dims == 10:
        params += [Param(f"w{i}", "float", 0.0, 1.0) for i in range(6)]
        params.append(Param("optimizer", "categorical", choices=("sgd", "adam", "adamw", "rmsprop")))
    assert len(params) == dims
    return Space(tuple(params))


def make_history(space: Space, n: int, seed: int) -> tuple[list[Pb2Row], list[Pb2Pending], float, float]:
    rng = np.random.default_rng(seed)
    optimum = rng.uniform(0.2, 0.8, size=len(space.numeric))
    rows: list[Pb2Row] = []
    score = np.zeros(POPULATION)
    for i in range(n):
        member = i % POPULATION
        t = float((i // POPULATION) * STEPS)
        hp = space.sample(rng)
        u = space.to_unit(hp)
        rate = float(np.exp(-4.0 * np.sum((u - optimum) ** 2)) / STEPS + 1e-5 * rng.standard_normal())
        if space.categorical:
            rate *= 1.0 + 0.2 * space.categorical_indices(hp)[0]
        rows.append(Pb2Row(t=t, c=float(score[member]), hyperparameters=hp, rate=rate))
        score[member] += rate * STEPS
    t_now = float((n // POPULATION) * STEPS)
    c_now = float(np.max(score))
    pending = [Pb2Pending(t=t_now, c=c_now, hyperparameters=space.sample(rng)) for _ in range(PENDING)]
    return rows, pending, t_now, c_now


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def measure(space: Space, n: int, settings: Pb2Settings, repeats: int) -> dict[str, float]:
    rows, pending, t, c = make_history(space, n, seed=n)
    # As the engine calls it: the donor's configuration (the trust region's centre) and the member's
    # remaining segments (several: exploration at full weight).
    center = rows[-1].hyperparameters
    suggest(space, rows, pending, t, c, settings, np.random.default_rng(0), remaining=10, center=center)  # warm-up
    wall: list[float] = []
    cpu: list[float] = []
    fallbacks = 0
    for r in range(repeats):
        rng = np.random.default_rng(1000 + r)
        w0, c0 = time.perf_counter(), time.process_time()
        choice = suggest(space, rows, pending, t, c, settings, rng, remaining=10, center=center)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        fallbacks += choice.hyperparameters is None
    return {
        "wall_med": 1e3 * statistics.median(wall), "wall_p90": 1e3 * _p90(wall),
        "cpu_med": 1e3 * statistics.median(cpu), "cpu_p90": 1e3 * _p90(cpu), "fallbacks": fallbacks,
    }


# Pb2Settings fields that --set may override: those that hold an integer (types.py's annotations are strings).
INT_FIELDS = tuple(f.name for f in fields(Pb2Settings) if f.type in ("int", "int | None"))


def int_overrides(pairs: list[str]) -> dict[str, Any]:
    """--set FIELD=INT pairs as keyword arguments of Pb2Settings; a clear error names a bad one."""
    out: dict[str, Any] = {}
    for kv in pairs:
        name, sep, value = kv.partition("=")
        if not sep or name not in INT_FIELDS:
            raise ValueError(f"--set {kv!r}: expected FIELD=INT with FIELD one of {', '.join(INT_FIELDS)}")
        try:
            out[name] = int(value)
        except ValueError:
            raise ValueError(f"--set {kv!r}: {name} takes an integer, not {value!r}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--dims", default="3,10")
    ap.add_argument("--parallel", default=Pb2Settings.parallel, help="PB2 parallel mode (default: the default mode)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                    help="override an integer Pb2Settings field, e.g. --set fit_rows=32 (repeatable)")
    args = ap.parse_args(argv)
    try:
        overrides = int_overrides(args.set)
    except ValueError as e:
        ap.error(str(e))
    settings = replace(Pb2Settings(), parallel=args.parallel, **overrides)
    print(f"PB2 decision latency: parallel={settings.parallel} max_rows={settings.max_rows} "
          f"fit_rows={settings.fit_rows} fit_restarts={settings.fit_restarts} candidates={settings.candidates} "
          f"restarts={settings.restarts} pending={PENDING} repeats={args.repeats}")
    print(f"cpus={os.cpu_count()} OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')} "
          f"load1={os.getloadavg()[0]:.1f}")
    print(f"| {'rows':>6} | {'dims':>4} | {'wall median ms':>14} | {'wall p90 ms':>11} | {'cpu median ms':>13} "
          f"| {'cpu p90 ms':>10} | {'fallbacks':>9} |")
    print(f"|{'-' * 8}|{'-' * 6}|{'-' * 16}|{'-' * 13}|{'-' * 15}|{'-' * 12}|{'-' * 11}|")
    for dims in (int(d) for d in args.dims.split(",")):
        space = make_space(dims)
        for n in (int(s) for s in args.sizes.split(",")):
            m = measure(space, n, settings, args.repeats)
            print(f"| {n:>6} | {dims:>4} | {m['wall_med']:>14.1f} | {m['wall_p90']:>11.1f} | {m['cpu_med']:>13.1f} "
                  f"| {m['cpu_p90']:>10.1f} | {int(m['fallbacks']):>9} |")
    print(f"load1 after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
