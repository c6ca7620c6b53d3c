"""How much does a schedule matter? The best *fixed* configuration of each search-quality problem,
chosen with hindsight, as a fraction of the problem's physical limit.

    .venv/bin/python benchmarks/fixed_configs.py [--seeds 10] [--problems lr-schedule,cat-flip,rl,rl-reach,quadratic]
        [--pops 4,8,16] [--points 21] [--max-configs 64] [--jobs 2]
    .venv/bin/python benchmarks/fixed_configs.py --schedules --problems rl-reach [--seeds 5]

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

`--schedules` searches, with hindsight, the family of geometric schedules whose start and end are
both on that grid (so every fixed configuration of the grid is in the family): one member per
seed, ranked by the median of its final noise-free score (to 3 places), ties by the worst seed (many
schedules tie at the top, and a median over few seeds hides a schedule that fails one seed in ten). `rl-reach`'s oracle trains at the winner.
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
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import search_quality as sq  # noqa: E402
from problems import OPT_IN, PROBLEMS, Problem, geometric_schedule  # noqa: E402

MAX_CONFIGS = 64


def grid(problem: Problem, points: int, max_configs: int = MAX_CONFIGS) -> list[dict[str, Any]]:
    """The grid's configurations: every categorical choice times `points` values per numeric
    hyperparameter, fewer per axis when the product would exceed `max_configs`."""
    spec = problem.hyperparameters
    cats = {n: list(s["choices"]) for n, s in spec.items() if s["type"] == "categorical"}
    nums = [n for n in spec if n not in cats]
    n_cat = math.prod(len(c) for c in cats.values()) if cats else 1
    per_axis = points
    while per_axis > 2 and n_cat * per_axis ** len(nums) > max_configs:
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


def _member_run(problem: Problem, hp_at: Callable[[int], Mapping[str, Any]], seed: int, member: int) -> float:
    """One member trained for the whole budget, segment k at `hp_at(k)`; its noise-free final score."""
    rng = np.random.default_rng([seed, member, 7])
    state = problem.init(np.random.default_rng([seed, member, 0]))
    for k in range(problem.segments):
        state = problem.train(state, hp_at(k), k * problem.steps, problem.steps, rng)
    return float(problem.true_score(state))


def fixed_run(problem: Problem, hp: dict[str, Any], seed: int, member: int) -> float:
    """One member trained at `hp` for the whole budget; its noise-free final score."""
    return _member_run(problem, lambda k: hp, seed, member)


def schedule_run(problem: Problem, start: dict[str, Any], end: dict[str, Any], seed: int) -> float:
    """One member (member 0, the same noise as fixed_run's) trained on the geometric schedule from
    `start` to `end`; its noise-free final score. With start == end it is fixed_run's."""
    pairs = {n: (float(start[n]), float(end[n])) for n in start}
    return _member_run(problem, lambda k: geometric_schedule(pairs, k, problem.segments), seed, 0)


def _schedule_task(args: tuple[str, int, dict[str, Any], list[dict[str, Any]], Sequence[int]]
                   ) -> list[tuple[float, float, int, int]]:
    name, i, start, ends, seeds = args
    prob = PROBLEMS[name]
    out = []
    for j, end in enumerate(ends):
        finals = [schedule_run(prob.for_seed(s), start, end, s) for s in seeds]
        out.append((round(statistics.median(finals), 3), min(finals), i, j))
    return out


def schedules(name: str, points: int, seeds: Sequence[int], jobs: int) -> None:
    """Print the best geometric schedules of the grid with hindsight (see the module docstring)."""
    configs = grid(PROBLEMS[name], points)
    if any(isinstance(v, str) for hp in configs for v in hp.values()):
        raise SystemExit(f"--schedules: {name} has a categorical hyperparameter; only numeric spaces")
    with ProcessPoolExecutor(jobs) as ex:
        found = [r for rows in ex.map(_schedule_task, [(name, i, hp, configs, list(seeds))
                                                       for i, hp in enumerate(configs)]) for r in rows]
    found.sort(reverse=True)
    fixed = max(r for r in found if r[2] == r[3])
    print(f"\n{name}: {len(found)} schedules, final score over {len(seeds)} seeds (one member): "
          "median (to 3 places), then the worst seed")
    for med, worst, i, j in found[:5]:
        print(f"  {med:.3f} {worst:.4f}  {describe(configs[i])}  ->  {describe(configs[j])}")
    print(f"  best fixed: {fixed[0]:.3f} {fixed[1]:.4f}  {describe(configs[fixed[2]])}")


def _task(args: tuple[str, int, dict[str, Any], Sequence[int], int]) -> tuple[str, int, list[list[float]]]:
    name, index, hp, seeds, members = args
    prob = PROBLEMS[name]
    return name, index, [[fixed_run(prob.for_seed(s), hp, s, m) for m in range(members)] for s in seeds]


def describe(hp: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in hp.items())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--problems", default=",".join(p for p in PROBLEMS if p != "lr-family" and p not in OPT_IN),
                    help=f"of {', '.join(PROBLEMS)} but lr-family")
    ap.add_argument("--pops", "--populations", dest="pops", default="4,8,16")
    ap.add_argument("--points", type=int, default=21, help="grid values per numeric hyperparameter (at most)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--max-configs", type=int, default=MAX_CONFIGS,
                    help="at most this many fixed configurations per problem (a finer grid: raise it)")
    ap.add_argument("--schedules", action="store_true",
                    help="search geometric schedules between grid points instead (numeric spaces only)")
    a = ap.parse_args(argv)
    problems = sq.listed(ap, "--problems", a.problems, list(PROBLEMS), "problem")
    for p in problems:
        if p == "lr-family":  # a grid over one space means nothing where every seed has its own
            ap.error("--problems: lr-family draws its space per seed; it has no fixed grid")
    pops = sorted(int(x) for x in a.pops.split(",") if x)
    if not pops or pops[0] < 1:
        ap.error("--pops: positive population sizes, e.g. 4,8,16")
    if a.points < 2:
        ap.error("--points: at least 2 values per numeric hyperparameter")
    seeds = list(range(a.seeds))
    print(f"machine: {sq.machine()}", flush=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    t0 = time.perf_counter()
    if a.schedules:
        for p in problems:
            schedules(p, a.points, seeds, a.jobs)
        print(f"\nwall time: {time.perf_counter() - t0:.1f} s with {a.jobs} processes ({sq.machine()})")
        return 0
    _, _, limits, seed_limits = sq.benchmark(problems, pops, seeds, methods=(), jobs=a.jobs)
    grids = {p: grid(PROBLEMS[p], a.points, a.max_configs) for p in problems}
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
                fr = [max(run[:pop]) / seed_limits.get((p, pop, s), limit) for s, run in zip(seeds, finals[(p, i)], strict=True)]
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
