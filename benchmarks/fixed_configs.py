"""How much does a schedule matter? The best *fixed* configuration of each search-quality problem,
chosen with hindsight, as a fraction of the problem's physical limit.

    .venv/bin/python benchmarks/fixed_configs.py [--seeds 10] [--problems lr-schedule,cat-flip,rl,quadratic]
        [--pops 4,8,16] [--points 21] [--jobs 2]

Issue 14 asks for problems "where the optimal hyperparameters move during training": on such a
problem no single configuration, however well chosen, reaches the limit, and the gap between the
best fixed configuration and the limit is what population-based methods can win. This script
measures that gap instead of assuming it. Every configuration of a grid over the problem's space
(`--points` values per numeric hyperparameter, log-spaced where the space is, at most about 64
configurations in all; every choice of a categorical) trains a population of members for the whole
budget without exploiting (each member with its own noise, as `random-full` in search_quality.py),
and the final score is the best member's noise-free score, as there. The configuration with the
best median over seeds is reported per population: an optimistic baseline, since it is picked
after seeing the results.

A problem whose best fixed configuration comes close to the limit does not test moving optima,
whatever its oracle does: there a method wins by finding one good configuration, which random
search over the whole space can do as well.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import search_quality as sq  # noqa: E402
from problems import PROBLEMS, Problem  # noqa: E402

MAX_CONFIGS = 64


def grid(problem: Problem, points: int) -> list[dict[str, Any]]:
    """The grid's configurations: every categorical choice times `points` values per numeric
    hyperparameter, fewer per axis when the product would exceed MAX_CONFIGS."""
    spec = problem.hyperparameters
    cats = {n: list(s["choices"]) for n, s in spec.items() if s["type"] == "categorical"}
    nums = [n for n in spec if n not in cats]
    n_cat = math.prod(len(c) for c in cats.values()) if cats else 1
    per_axis = points
    while per_axis > 2 and n_cat * per_axis ** len(nums) > MAX_CONFIGS:
        per_axis -= 1
    axes: dict[str, list[Any]] = dict(cats)
    for n in nums:
        s = spec[n]
        lo, hi = float(s["min"]), float(s["max"])
        if s.get("log"):
            axes[n] = [float(v) for v in np.geomspace(lo, hi, per_axis)]
        else:
            axes[n] = [float(v) for v in np.linspace(lo, hi, per_axis)]
        if s["type"] == "int":
            axes[n] = sorted({int(round(v)) for v in axes[n]})
    names = list(axes)
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(axes[n] for n in names))]


def fixed_run(problem: Problem, hp: dict[str, Any], seed: int, member: int) -> float:
    """One member trained at `hp` for the whole budget, segment by segment; its noise-free final score."""
    rng = np.random.default_rng([seed, member, 7])
    state = problem.init(np.random.default_rng([seed, member, 0]))
    for k in range(problem.segments):
        state = problem.train(state, hp, k * problem.steps, problem.steps, rng)
    return float(problem.true_score(state))


def _task(args: tuple[str, int, dict[str, Any], Sequence[int], int]) -> tuple[str, int, list[list[float]]]:
    name, index, hp, seeds, members = args
    prob = PROBLEMS[name]
    return name, index, [[fixed_run(prob.for_seed(s), hp, s, m) for m in range(members)] for s in seeds]


def describe(hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--problems", default=",".join(PROBLEMS), help=f"of {', '.join(PROBLEMS)}")
    ap.add_argument("--pops", "--populations", dest="pops", default="4,8,16")
    ap.add_argument("--points", type=int, default=21, help="grid values per numeric hyperparameter (at most)")
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args(argv)
    problems = [p for p in a.problems.split(",") if p]
    for p in problems:
        if p not in PROBLEMS:
            ap.error(f"--problems: unknown problem {p!r} (one of {', '.join(PROBLEMS)})")
    pops = sorted(int(x) for x in a.pops.split(",") if x)
    if not pops or pops[0] < 1:
        ap.error("--pops: positive population sizes, e.g. 4,8,16")
    if a.points < 2:
        ap.error("--points: at least 2 values per numeric hyperparameter")
    seeds = list(range(a.seeds))
    print(f"machine: {sq.machine()}", flush=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    t0 = time.perf_counter()
    _, _, limits = sq.benchmark(problems, pops, seeds, methods=(), jobs=a.jobs)
    grids = {p: grid(PROBLEMS[p], a.points) for p in problems}
    tasks = [(p, i, hp, seeds, pops[-1]) for p in problems for i, hp in enumerate(grids[p])]
    finals: dict[tuple[str, int], list[list[float]]] = {}
    with ProcessPoolExecutor(a.jobs) as ex:
        for name, index, values in ex.map(_task, tasks, chunksize=2):
            finals[(name, index)] = values
    print()
    print("| problem     | pop | configs | best fixed configuration (hindsight) | final / limit: median [q25, q75] |")
    print("|-------------|-----|---------|--------------------------------------|----------------------------------|")
    for p in problems:
        for pop in pops:
            limit = limits[(p, pop)]
            best: tuple[float, int, list[float]] | None = None
            for i in range(len(grids[p])):
                fr = [max(run[:pop]) / limit for run in finals[(p, i)]]
                med = statistics.median(fr)
                if best is None or med > best[0]:
                    best = (med, i, fr)
            assert best is not None
            q25, med, q75 = sq.quartiles(best[2])
            print(f"| {p:<11} | {pop:>3} | {len(grids[p]):>7} | {describe(grids[p][best[1]]):<36} | "
                  f"{f'{med:.3f} [{q25:.3f}, {q75:.3f}]':<32} |")
    print(f"\nwall time: {time.perf_counter() - t0:.1f} s with {a.jobs} processes ({sq.machine()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
