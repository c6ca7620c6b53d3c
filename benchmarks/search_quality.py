"""Search quality where PBT is meant to win: problems whose best hyperparameters move during training,
each measured against its physical limit (issue 14).

    .venv/bin/python benchmarks/search_quality.py [--seeds 20] [--problems lr-schedule,cat-flip,rl,rl-reach,quadratic]
        [--pops 4,8,16] [--methods ...] [--jobs 2] [--pb2 JSON] [--pb2-settings JSON] [--pb2-fraction 0.5]
        [--mode asynchronous|synchronous] [--interval N] [--out results.json]

Problems and their limits: benchmarks/problems.py (`digits`, the torch example, runs through the
real local runner and has no known limit; it is opt-in: `--problems digits`, raw accuracy reported).
`lr-schedule-10d` (ten hyperparameters, three of which matter) is opt-in too: `--problems lr-schedule-10d`,
and so are `lr-schedule-3d`, `lr-schedule-5d` and `lr-schedule-mixed` (an int and a categorical that matter).

Every run drives the real engine (`pbt_operator.core.engine.Engine`, the ask/tell core the operator
and `pbt run` use) on a simulated cluster: all members train at once (parallelism = population,
asynchronous mode) and each segment takes `steps x exp(0.25 N(0, 1))` time units, so members finish
out of order and PB2 always has running (pending) configurations to account for. Checkpoints are the
simulator's states; an exploit restores the donor's. Every method gets the same budget: `segments`
segments per member. A seed is the manifest's `spec.seed` plus the simulator's noise and durations,
so for one seed all methods start from the same initial members.

`--mode synchronous` runs the same with spec.mode synchronous (every member waits at a barrier after
each segment, and the whole generation is decided there). `--interval N` cuts each problem's training
(its total iterations stay the same) into segments of N iterations: the members exploit every N
iterations, and so does the oracle, so the limit is that interval's (`Problem.with_interval`). Default:
each problem's own (5, the quadratic's 10). Both are recorded in the table and the JSON.

Methods (all with exploit truncation 0.25 unless said otherwise):
* `pb2-<mode>`: explore pb2 with `parallel: <mode>`, every other PB2 setting at its default, and
  truncation at the manifest's default with PB2 (0.75 below 8 members, else 0.5, at most 15 / segments
  and never below 0.25: spec.pb2_fraction;
  `--pb2-fraction F` sets one fraction for every population, 0.25 for the same as PBT)
* `pbt`: explore perturb (factors 0.8/1.2, resample probability 0.25)
* `pbt-crossover`: the same with `crossover: true`
* `tournament`: exploit tournament (size 2), explore perturb
* `random-full`: exploit none; members sampled from the whole space (random search)

Reported per (problem, population, method): median and interquartile range over seeds of the final
score as a fraction of the limit (the final score is the best noise-free score among the members'
final checkpoints), and wins/ties/losses against PBT paired by seed. The limit of a problem that is
the same for every seed is the median of the oracle's over the first 5 seeds; a problem whose
constants are drawn per seed (`Problem.per_seed`: `cat-flip`, `lr-family`) has one limit per seed,
and each seed's final score is divided by its own (the table's limit column then says "seed").
Oracle runs are cached in the temporary directory: change problems.py and the cache's version
together. Problems whose instances carry class labels (`Problem.classes`: `lr-family`'s shape
draws) are also broken down by class. The verdicts check the issue's targets at population 4.
"""

from __future__ import annotations

import os

# Before numpy loads: PB2's matrices are tiny, and threaded BLAS on a busy 2-core machine spins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("PBT_CPU", "1")
os.environ.setdefault("PBT_TORCH_THREADS", "1")

import argparse  # noqa: E402
import heapq  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import asdict, dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "worker"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pbt_operator.core.engine import Engine  # noqa: E402
from pbt_operator.core.pb2 import PARALLEL_MODES  # noqa: E402
from pbt_operator.core.types import SegmentResult  # noqa: E402
from pbt_operator.spec import TrainingSpec, parse_manifest  # noqa: E402
from problems import NONSTATIONARY, OPT_IN, PROBLEMS, Problem  # noqa: E402

PB2_METHODS = tuple(f"pb2-{m}" for m in PARALLEL_MODES)
METHODS = (*PB2_METHODS, "pbt", "pbt-crossover", "tournament", "random-full")
DIGITS = "digits"


# Extra spec.explore.pb2 settings for every pb2 method (--pb2 JSON), e.g. {"window": 25}.
PB2_EXTRA: dict[str, Any] = {}
# Pb2Settings fields that are not manifest fields (--pb2-settings JSON), e.g. {"window_search": true}.
PB2_FIELDS: dict[str, Any] = {}
# Truncation fraction of the pb2 methods (--pb2-fraction); None: the manifest default with PB2.
PB2_FRACTION: float | None = None
# spec.exploit.donorFraction of the pb2 methods (--pb2-donors); None: the manifest default (0.25 with PB2).
PB2_DONORS: float | None = None


def manifest(hyperparameters: dict[str, Any], method: str, population: int, seed: int, segments: int,
             steps: int, factors: Sequence[float] = (0.8, 1.2), function: str = "bench:segment",
             parallelism: int | None = None, mode: str = "asynchronous") -> dict[str, Any]:
    exploit: dict[str, Any] = {"strategy": "truncation", "fraction": 0.25}
    explore: dict[str, Any] = {"strategy": "perturb", "factors": list(factors), "resampleProbability": 0.25}
    if method.startswith("pb2-"):
        exploit = {"strategy": "truncation"}
        if PB2_FRACTION is not None:
            exploit["fraction"] = PB2_FRACTION
        if PB2_DONORS is not None:
            exploit["donorFraction"] = PB2_DONORS
        explore = {"strategy": "pb2", "pb2": {"parallel": method[4:], **PB2_EXTRA}}
    elif method == "pbt-crossover":
        explore["crossover"] = True
    elif method == "tournament":
        exploit = {"strategy": "tournament", "size": 2}
    elif method == "random-full":
        exploit = {"strategy": "none"}
        hyperparameters = {k: {kk: vv for kk, vv in v.items() if kk != "initial"} for k, v in hyperparameters.items()}
    elif method != "pbt":
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    name = f"sq-{method}-p{population}-s{seed}"
    return {
        "apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining", "metadata": {"name": name},
        "spec": {
            "population": population, "parallelism": parallelism or population, "mode": mode,
            "seed": seed, "objective": {"metric": "score", "direction": "max"},
            "segment": {"steps": steps}, "budget": {"segments": segments},
            "hyperparameters": hyperparameters, "exploit": exploit, "explore": explore,
            "failurePolicy": {"maxRetries": 0, "onExhausted": "fail"},
            "storage": {"uri": f"mem://{name}/"}, "worker": {"executor": "inline", "function": function},
        },
    }


@dataclass
class RunResult:
    problem: str
    method: str
    population: int
    seed: int
    final: float  # best noise-free score among the final checkpoints
    segments: int
    decide_seconds: float  # CPU time inside the engine (PB2's decisions dominate)
    pb2_fallbacks: int = 0
    limit: float | None = None  # what `final` is divided by (set by `benchmark`)
    mode: str = "asynchronous"  # spec.mode
    interval: int | None = None  # iterations per segment (spec.segment.steps)


def simulate(problem: Problem, method: str, population: int, seed: int, mode: str = "asynchronous") -> RunResult:
    """One run on the simulated cluster (see the module docstring); `problem` already cut into its
    segments (`Problem.with_interval`)."""
    spec: TrainingSpec = parse_manifest(manifest(problem.hyperparameters, method, population, seed,
                                                 problem.segments, problem.steps, problem.factors, mode=mode))
    if PB2_FIELDS:
        spec = replace(spec, explore=replace(spec.explore, pb2=replace(spec.explore.pb2, **PB2_FIELDS)))
    eng, states, decide = drive(problem, spec, seed)
    if eng.failed or len(eng.records) != population * problem.segments:
        raise RuntimeError(f"{problem.name}/{method}: {len(eng.records)} segments finished ({eng.failed})")
    final = max(problem.true_score(states[r.ref]) for r in eng.latest.values())
    fallbacks = sum(1 for r in eng.records.values() if "pb2 fallback" in r.suggestion.reason)
    return RunResult(problem.name, method, population, seed, final, len(eng.records), decide, fallbacks,
                     mode=spec.mode, interval=spec.segment.steps)


def drive(problem: Problem, spec: TrainingSpec, seed: int) -> tuple[Engine, dict[tuple[int, int], Any], float]:
    """The engine for `spec` driven to its end on the simulated cluster: the engine, every checkpoint's
    state by ref, and the CPU seconds spent inside the engine (the traces in this folder reuse it)."""
    t_decide = time.process_time()
    eng = Engine(spec)
    queue: list[tuple[float, int, int]] = []
    states: dict[tuple[int, int], Any] = {}
    decide = time.process_time() - t_decide

    def launch(now: float, sugs: Sequence[Any]) -> None:
        for s in sugs:
            rng = np.random.default_rng([seed, s.member, s.segment, s.attempt, 1])
            start = states[s.restore] if s.restore is not None else problem.init(
                np.random.default_rng([seed, s.member, 0]))
            state = problem.train(start, s.hyperparameters, s.steps_start, s.steps_budget, rng)
            states[s.ref] = state
            heapq.heappush(queue, (now + s.steps_budget * float(np.exp(0.25 * rng.standard_normal())),
                                   s.member, s.segment))

    t0 = time.process_time()
    first = eng.start()
    decide += time.process_time() - t0
    launch(0.0, first)
    while queue:
        now, m, k = heapq.heappop(queue)
        sug = eng.pending[m]
        state = states[(m, k)]
        score = problem.report(state, np.random.default_rng([seed, m, k, 2]))
        t0 = time.process_time()
        nxt = eng.tell(SegmentResult(m, k, score, sug.steps_start + sug.steps_budget))
        decide += time.process_time() - t0
        launch(now, nxt)
    return eng, states, decide


def run_digits(method: str, population: int, seed: int, workdir: Path) -> RunResult:
    """The torch digits example through the real local runner (parallelism 1: deterministic)."""
    import torch
    from pbt_operator.local.runner import LocalRunner
    from pbt_worker.storage import mem_storage

    hyperparameters = {
        "lr": {"type": "float", "min": 1.0e-4, "max": 0.5, "log": True, "initial": {"min": 1.0e-4, "max": 2.0e-3}},
        "momentum": {"type": "float", "min": 0.0, "max": 0.95, "initial": {"min": 0.0, "max": 0.5}},
        "batch_size": {"type": "int", "min": 8, "max": 128, "log": True},
    }
    doc = manifest(hyperparameters, method, population, seed, 8, 40, (0.8, 1.25), "train:segment", parallelism=1)
    spec = parse_manifest(doc, base_dir=ROOT / "examples" / "digits")
    torch.manual_seed(seed)
    t0 = time.process_time()
    try:
        summary = LocalRunner(spec, workdir / spec.name, progress=None, plot=False).run()
    finally:
        mem_storage().clear()
    eng = summary.engine
    if eng.failed or eng.failures:
        raise RuntimeError(f"{spec.name}: the run failed")
    final = max(float(r.score) for r in eng.latest.values())  # type: ignore[arg-type]
    fallbacks = sum(1 for r in eng.records.values() if "pb2 fallback" in r.suggestion.reason)
    return RunResult(DIGITS, method, population, seed, final, len(eng.records), time.process_time() - t0, fallbacks)


def _task(args: tuple[str, str, int, int, dict[str, Any]]) -> RunResult | tuple[str, int, int, float]:
    global PB2_FRACTION, PB2_DONORS
    prob, method, pop, seed, extra = args
    PB2_EXTRA.clear()
    PB2_EXTRA.update(extra.get("manifest", {}))
    PB2_FIELDS.clear()
    PB2_FIELDS.update(extra.get("fields", {}))
    PB2_FRACTION = extra.get("fraction")
    PB2_DONORS = extra.get("donors")
    interval = extra.get("interval")
    if method == "limit":
        return prob, pop, seed, instance(prob, seed, interval).limit(pop, seed)
    if prob == DIGITS:
        with tempfile.TemporaryDirectory(prefix="pbt-sq-") as tmp:
            return run_digits(method, pop, seed, Path(tmp))
    return simulate(instance(prob, seed, interval), method, pop, seed, extra.get("mode", "asynchronous"))


def instance(prob: str, seed: int, interval: int | None = None) -> Problem:
    """Problem `prob` as seed `seed` sees it, cut into segments of `interval` iterations (None: its own)."""
    problem = PROBLEMS[prob].for_seed(seed)
    return problem if interval is None else problem.with_interval(interval)


def limit_key(prob: str, pop: int, seed: int, interval: int | None = None) -> str:
    """The limit cache's key: the problem's own interval keeps the key it always had."""
    own = interval is None or prob == DIGITS or interval == PROBLEMS[prob].steps
    return f"{prob}/{pop}/{seed}" if own else f"{prob}@{interval}/{pop}/{seed}"


@dataclass
class Row:
    problem: str
    population: int
    method: str
    seeds: int
    limit: float | None
    median: float  # fraction of the limit (raw score without a limit)
    q25: float
    q75: float
    vs_pbt: str
    decide_seconds: float
    pb2_fallbacks: int
    mode: str = "asynchronous"  # spec.mode of its runs
    interval: int | None = None  # iterations per segment of its runs


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


SeedLimits = dict[tuple[str, int, int], float]  # (problem, population, seed) -> that seed's own limit


def fraction(r: RunResult, limits: dict[tuple[str, int], float], seed_limits: SeedLimits | None = None) -> float:
    """A run's final score as a fraction of its limit: its seed's own for a per-seed problem, else the
    problem's (the raw score without a limit)."""
    own = (seed_limits or {}).get((r.problem, r.population, r.seed))
    limit = own if own is not None else limits.get((r.problem, r.population))
    return r.final / limit if limit else r.final


def summarise(results: Sequence[RunResult], limits: dict[tuple[str, int], float],
              seed_limits: SeedLimits | None = None) -> list[Row]:
    order = [*PROBLEMS, DIGITS]
    rows: list[Row] = []
    for prob, pop in sorted({(r.problem, r.population) for r in results}, key=lambda k: (order.index(k[0]), k[1])):
        limit = limits.get((prob, pop))
        group = [r for r in results if r.problem == prob and r.population == pop]
        if any((prob, pop, r.seed) in (seed_limits or {}) for r in group):
            limit = math.nan  # one per seed
        frac = {(r.method, r.seed): fraction(r, limits, seed_limits) for r in group}
        for method in [*METHODS, *sorted({r.method for r in group} - set(METHODS))]:  # then a peer's (peer_ray.py)
            seeds = sorted(s for (m, s) in frac if m == method)
            if not seeds:
                continue
            q25, med, q75 = quartiles([frac[(method, s)] for s in seeds])
            paired = [s for s in seeds if ("pbt", s) in frac]
            w = sum(1 for s in paired if frac[(method, s)] > frac[("pbt", s)])
            t = sum(1 for s in paired if frac[(method, s)] == frac[("pbt", s)])
            mine = [r for r in group if r.method == method]
            rows.append(Row(prob, pop, method, len(seeds), limit, med, q25, q75,
                            "-" if method == "pbt" or not paired else f"{w}/{t}/{len(paired) - w - t}",
                            sum(r.decide_seconds for r in mine), sum(r.pb2_fallbacks for r in mine),
                            "/".join(sorted({r.mode for r in mine})),
                            mine[0].interval if len({r.interval for r in mine}) == 1 else None))
    return rows


def _header(head: str) -> list[str]:
    """A markdown table's header line and the separator under it, column widths kept."""
    return [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]


def format_table(rows: Sequence[Row]) -> str:
    head = (f"| {'problem':<11} | {'pop':>3} | {'mode':<5} | {'int':>3} | {'method':<20} | {'seeds':>5} | "
            f"{'limit':>7} | {'final / limit: median [q25, q75]':<32} | {'vs PBT w/t/l':>12} | {'engine s':>8} |")
    lines = _header(head)
    for r in rows:
        lim = "seed" if r.limit is not None and math.isnan(r.limit) else f"{r.limit:.4g}" if r.limit else "none"
        mode = {"asynchronous": "async", "synchronous": "sync"}.get(r.mode, r.mode)
        interval = "-" if r.interval is None else str(r.interval)
        lines.append(f"| {r.problem:<11} | {r.population:>3} | {mode:<5} | {interval:>3} | {r.method:<20} | "
                     f"{r.seeds:>5} | {lim:>7} | "
                     f"{f'{r.median:.3f} [{r.q25:.3f}, {r.q75:.3f}]':<32} | {r.vs_pbt:>12} | "
                     f"{r.decide_seconds:>8.1f} |")
    return "\n".join(lines)


@dataclass
class ClassRow:
    problem: str
    population: int
    key: str  # what was drawn, e.g. "path"
    value: str  # its class, e.g. "bell"
    method: str
    seeds: int
    median: float
    vs_pbt: str
    mean_vs_pbt: float | None  # mean paired difference of the fraction against PBT


def class_rows(results: Sequence[RunResult], limits: dict[tuple[str, int], float],
               seed_limits: SeedLimits | None = None) -> list[ClassRow]:
    """The results of per-seed problems with class labels (`Problem.classes`), split by each label."""
    out: list[ClassRow] = []
    for prob, pop in sorted({(r.problem, r.population) for r in results}):
        base = PROBLEMS.get(prob)
        if base is None or base.per_seed is None or base.classes is None:
            continue
        group = [r for r in results if r.problem == prob and r.population == pop]
        seeds = sorted({r.seed for r in group})
        labels = {s: dict(base.for_seed(s).classes or {}) for s in seeds}
        frac = {(r.method, r.seed): fraction(r, limits, seed_limits) for r in group}
        for key in base.classes:
            for value in sorted({labels[s].get(key, "?") for s in seeds}):
                mine = [s for s in seeds if labels[s].get(key, "?") == value]
                for method in METHODS:
                    have = [s for s in mine if (method, s) in frac]
                    if not have:
                        continue
                    paired = [s for s in have if ("pbt", s) in frac]
                    d = [frac[(method, s)] - frac[("pbt", s)] for s in paired]
                    w = sum(1 for x in d if x > 0)
                    t = sum(1 for x in d if x == 0)
                    out.append(ClassRow(prob, pop, key, value, method, len(have),
                                        statistics.median(frac[(method, s)] for s in have),
                                        "-" if method == "pbt" else f"{w}/{t}/{len(d) - w - t}",
                                        None if method == "pbt" or not d else statistics.fmean(d)))
    return out


def format_classes(rows: Sequence[ClassRow]) -> str:
    head = (f"| {'problem':<11} | {'pop':>3} | {'class':<28} | {'method':<20} | {'seeds':>5} | "
            f"{'median':>6} | {'vs PBT w/t/l':>12} | {'mean vs PBT':>11} |")
    lines = _header(head)
    for r in rows:
        mean = "-" if r.mean_vs_pbt is None else f"{r.mean_vs_pbt:+.3f}"
        lines.append(f"| {r.problem:<11} | {r.population:>3} | {f'{r.key}: {r.value}':<28} | {r.method:<20} | "
                     f"{r.seeds:>5} | {r.median:>6.3f} | {r.vs_pbt:>12} | {mean:>11} |")
    return "\n".join(lines)


BEST_DEFAULT = "pb2-liar-pessimistic"  # Pb2Settings.parallel


def verdicts(rows: Sequence[Row], population: int = 4, pb2: str = BEST_DEFAULT) -> list[tuple[str, bool]]:
    """Issue 14's targets at `population` on every non-stationary problem."""
    out: list[tuple[str, bool]] = []
    for prob in NONSTATIONARY:
        med = {r.method: r.median for r in rows if r.problem == prob and r.population == population}
        if pb2 in med and "pbt" in med:
            out.append((f"{prob} pop {population}: {pb2} median {med[pb2]:.3f} >= 1.15 x PBT {med['pbt']:.3f}",
                        med[pb2] >= 1.15 * med["pbt"]))
        if pb2 in med:
            out.append((f"{prob} pop {population}: {pb2} median {med[pb2]:.3f} >= 0.75 of the limit",
                        med[pb2] >= 0.75))
        if "pbt" in med and "random-full" in med:
            out.append((f"{prob} pop {population}: PBT median {med['pbt']:.3f} > random-full "
                        f"{med['random-full']:.3f}", med["pbt"] > med["random-full"]))
    return out


def benchmark(problems: Sequence[str], populations: Sequence[int], seeds: Sequence[int],
              methods: Sequence[str] = METHODS, jobs: int = 1, pb2_extra: dict[str, Any] | None = None,
              log: Callable[[str], None] | None = None
              ) -> tuple[list[Row], list[RunResult], dict[tuple[str, int], float], SeedLimits]:
    """Rows, runs, the problems' limits (for a per-seed problem: the median of its first seeds') and
    the per-seed problems' own limits."""
    pb2_extra = dict(pb2_extra or {})
    interval = pb2_extra.get("interval")
    cache = _load_limits()
    tasks: list[tuple[str, str, int, int, dict[str, Any]]] = [
        (prob, "limit", pop, seed, pb2_extra) for prob, pop, seed in missing_limits(problems, populations, seeds,
                                                                                   interval, cache)]
    tasks.extend((prob, m, pop, seed, pb2_extra) for prob in problems for pop in populations for seed in seeds
                 for m in methods)
    results: list[RunResult] = []
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as ex:
            outs = list(ex.map(_task, tasks, chunksize=4))
    else:
        outs = [_task(t) for t in tasks]
    for out in outs:
        if isinstance(out, RunResult):
            results.append(out)
            if log is not None:
                log(f"{out.problem:<11} pop {out.population:>2} seed {out.seed:>3} {out.method:<20} "
                    f"final {out.final:.4g} ({out.decide_seconds:.2f}s in the engine)")
        else:
            prob, pop, seed, value = out
            cache[limit_key(prob, pop, seed, interval)] = value
    _save_limits(cache)
    limits, seed_limits = read_limits(problems, populations, seeds, interval, cache)
    for r in results:
        r.limit = seed_limits.get((r.problem, r.population, r.seed), limits.get((r.problem, r.population)))
    return summarise(results, limits, seed_limits), results, limits, seed_limits


def missing_limits(problems: Sequence[str], populations: Sequence[int], seeds: Sequence[int],
                   interval: int | None, cache: dict[str, float]) -> list[tuple[str, int, int]]:
    """The oracle runs these runs need that `cache` lacks: the first LIMIT_SEEDS seeds of each
    (problem, population), and every seed of a per-seed problem."""
    return [(prob, pop, seed) for prob in problems if prob != DIGITS for pop in populations
            for i, seed in enumerate(seeds)
            if (i < LIMIT_SEEDS or PROBLEMS[prob].per_seed is not None)
            and limit_key(prob, pop, seed, interval) not in cache]


def read_limits(problems: Sequence[str], populations: Sequence[int], seeds: Sequence[int],
                interval: int | None, cache: dict[str, float]
                ) -> tuple[dict[tuple[str, int], float], SeedLimits]:
    """The limit of each (problem, population) (the median of its first seeds' oracles) and, for a
    per-seed problem, each seed's own, from `cache` once missing_limits' runs are in it."""
    limits: dict[tuple[str, int], float] = {}
    seed_limits: SeedLimits = {}
    for prob in problems:
        for pop in populations:
            first = [cache[k] for k in (limit_key(prob, pop, s, interval) for s in list(seeds)[:LIMIT_SEEDS])
                     if k in cache]
            if first:
                limits[(prob, pop)] = statistics.median(first)
            if prob != DIGITS and PROBLEMS[prob].per_seed is not None:
                seed_limits.update({(prob, pop, s): cache[limit_key(prob, pop, s, interval)] for s in seeds})
    return limits, seed_limits


# The limit of a (problem, population) is the median of the oracle over the first LIMIT_SEEDS seeds
# (its spread across seeds is a fraction of a percent; the RL oracle's look-ahead is the costliest
# part of the benchmark); a per-seed problem's oracle runs for every seed (cheap: known optima).
# Oracle runs are deterministic, so they are cached between invocations.
LIMIT_SEEDS = 5
LIMIT_CACHE = Path(tempfile.gettempdir()) / "pbt-search-quality-limits-v3.json"


def _load_limits() -> dict[str, float]:
    try:
        data = json.loads(LIMIT_CACHE.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _save_limits(cache: dict[str, float]) -> None:
    """Merge into the file (another invocation may have added entries meanwhile), atomically."""
    merged = {**_load_limits(), **cache}
    tmp = LIMIT_CACHE.with_name(f"{LIMIT_CACHE.name}.{os.getpid()}")
    try:
        tmp.write_text(json.dumps(merged, sort_keys=True))
        os.replace(tmp, LIMIT_CACHE)
    except OSError:
        pass


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        load = " load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = ""
    # PB2's GP fits run on numpy's linear algebra: the same seed decides the same on one installation,
    # not always across numpy builds (benchmarks/README.md, "Eighth round"), so the versions are part of a row
    import scipy
    return (f"{cores} cores, {model}, Python {platform.python_version()}, numpy {np.__version__}, "
            f"scipy {scipy.__version__}, {platform.system()}{load}")


def listed(ap: argparse.ArgumentParser, flag: str, value: str, known: Sequence[str], what: str) -> list[str]:
    """A comma-separated option's items, each one of `known`, or the parser's error naming the flag."""
    items = [x for x in value.split(",") if x]
    for x in items:
        if x not in known:
            ap.error(f"{flag}: unknown {what} {x!r} (one of {', '.join(known)})")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="seeds 0..N-1 per (problem, population); default 20")
    ap.add_argument("--problems", default=",".join(p for p in PROBLEMS if p not in OPT_IN), help=f"of {', '.join([*PROBLEMS, DIGITS])}")
    ap.add_argument("--pops", "--populations", dest="pops", default="4,8,16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--pb2", default="{}", help='extra spec.explore.pb2 settings for every pb2 method, JSON, '
                                                 'e.g. \'{"window": 25}\'')
    ap.add_argument("--pb2-settings", default="{}", help='Pb2Settings fields that are not manifest fields, JSON, '
                                                          'e.g. \'{"window_search": true}\'')
    ap.add_argument("--pb2-fraction", type=float, default=None,
                    help="truncation fraction of the pb2 methods (default: the manifest's with pb2, 0.75 below 8 "
                         "members, else 0.5; at most 15 / segments, never below 0.25)")
    ap.add_argument("--pb2-donors", type=float, default=None,
                    help="spec.exploit.donorFraction of the pb2 methods (default: the manifest's, 0.25 with pb2; "
                         "0.5 for the top half as before 2026-12-01)")
    ap.add_argument("--mode", default="asynchronous", choices=("asynchronous", "synchronous"),
                    help="spec.mode of every run (default asynchronous)")
    ap.add_argument("--interval", type=int, default=None,
                    help="iterations per segment, the problems' total iterations kept (segments = total / N; "
                         "default: each problem's own, 5, the quadratic's 10); the limit follows it")
    ap.add_argument("--out", type=Path, default=None, help="write every run as JSON")
    ap.add_argument("--quiet", action="store_true", help="no line per run")
    a = ap.parse_args(argv)
    problems = listed(ap, "--problems", a.problems, [*PROBLEMS, DIGITS], "problem")
    methods = listed(ap, "--methods", a.methods, METHODS, "method")
    pops = [int(x) for x in a.pops.split(",") if x]
    if DIGITS in problems and (a.mode != "asynchronous" or a.interval is not None):
        ap.error("--mode and --interval do not apply to digits (its own manifest: parallelism 1, 8 x 40 steps)")
    for p in problems if a.interval is not None else ():
        try:
            instance(p, 0, a.interval)  # Problem.with_interval refuses an interval that does not divide
        except ValueError as e:
            ap.error(f"--interval: {e}")
    print(f"machine: {machine()}", flush=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    t0 = time.perf_counter()
    extra = {"manifest": json.loads(a.pb2), "fields": json.loads(a.pb2_settings), "fraction": a.pb2_fraction, "donors": a.pb2_donors,
             "mode": a.mode, "interval": a.interval}
    rows, results, limits, seed_limits = benchmark(problems, pops, range(a.seeds), methods, a.jobs, extra,
                                                   log=None if a.quiet else (lambda s: print(s, flush=True)))
    wall = time.perf_counter() - t0
    print()
    print(format_table(rows))
    by_class = class_rows(results, limits, seed_limits)
    if by_class:
        print("\nby class (per-seed problems: what was drawn for each seed):\n")
        print(format_classes(by_class))
    n_pb2 = [r for r in results if r.method.startswith("pb2-")]
    if n_pb2:
        print(f"\nPB2 explore steps that fell back to perturb: {sum(r.pb2_fallbacks for r in n_pb2)} over {len(n_pb2)} runs")
    print("\ntargets (population 4):")
    for text, ok in verdicts(rows):
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    print(f"\nwall time: {wall:.1f} s with {a.jobs} processes ({machine()})")
    if a.out is not None:
        a.out.write_text(json.dumps({"rows": [asdict(r) for r in rows], "runs": [asdict(r) for r in results],
                                     "limits": {f"{k[0]}/{k[1]}": v for k, v in limits.items()},
                                     "mode": a.mode, "interval": a.interval,
                                     "machine": machine(), "wall_seconds": wall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
