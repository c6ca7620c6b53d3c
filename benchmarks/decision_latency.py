"""Time one PB2 decision (`pbt_operator.core.pb2.suggest`) against the size of the history.

    .venv/bin/python benchmarks/decision_latency.py [--repeats 20] [--sizes 100,1000,10000]

For each history size (rows = finished segments) and each space (3 hyperparameters: log-float, int,
float; 10 hyperparameters: the same plus six floats and one categorical) it times `suggest` with a
few pending configurations, each repeat with a fresh rng seed, and prints median and p90 in ms.
The synthetic rows come from a population of 16 members whose rate has an optimum inside the
space, so the GP fit does real work. Prints a table; asserts nothing (tests never assert times).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "operator"))

from pbt_operator.core.pb2 import Pb2Pending, Pb2Row, suggest
from pbt_operator.core.space import Param, Space
from pbt_operator.core.types import Pb2Settings

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


def measure(space: Space, n: int, settings: Pb2Settings, repeats: int) -> tuple[float, float, int]:
    rows, pending, t, c = make_history(space, n, seed=n)
    suggest(space, rows, pending, t, c, settings, np.random.default_rng(0))  # warm-up (imports, caches)
    times = []
    fallbacks = 0
    for r in range(repeats):
        rng = np.random.default_rng(1000 + r)
        t0 = time.perf_counter()
        choice = suggest(space, rows, pending, t, c, settings, rng)
        times.append(time.perf_counter() - t0)
        fallbacks += choice.hyperparameters is None
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    return 1e3 * statistics.median(times), 1e3 * p90, fallbacks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--dims", default="3,10")
    ap.add_argument("--parallel", default="bucb")
    args = ap.parse_args(argv)
    settings = replace(Pb2Settings(), parallel=args.parallel)
    print(f"PB2 decision latency: parallel={settings.parallel} max_rows={settings.max_rows} "
          f"candidates={settings.candidates} restarts={settings.restarts} pending={PENDING} "
          f"repeats={args.repeats}; cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}")
    print(f"{'rows':>7} {'dims':>5} {'median ms':>10} {'p90 ms':>8} {'fallbacks':>10}")
    for dims in (int(d) for d in args.dims.split(",")):
        space = make_space(dims)
        for n in (int(s) for s in args.sizes.split(",")):
            med, p90, fb = measure(space, n, settings, args.repeats)
            print(f"{n:>7} {dims:>5} {med:>10.1f} {p90:>8.1f} {fb:>10}")
    print(f"load after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
