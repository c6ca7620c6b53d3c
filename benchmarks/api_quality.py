"""Search quality through the real local runner: search_quality.py's problems run by the public
`pbt_operator.run(manifest, function=fn)`, as a user runs them, instead of the simulated cluster.

    .venv/bin/python benchmarks/api_quality.py [--seeds 30] [--problems lr-schedule,cat-flip] [--pops 4]
        [--methods pb2-liar-pessimistic,pbt] [--mode asynchronous|synchronous] [--ms-per-step 16]
        [--simulate] [--quiet] [--out results.json]

search_quality.py drives the engine directly (`drive()`: Engine.start, then one tell per finished
segment in simulated finish order). A user goes through the local runner: threads, real finish order,
the driver policy's admission, results told in batches (everything that finished while the engine was
deciding), the run folder's journal, storage. This script runs the same manifests (search_quality's
`manifest()`, parallelism = population, `--mode` asynchronous by default) through that path.

The segment function restores the member's state (`seg.restore()`; the initial state on a member's
first segment, from `default_rng([seed, member, 0])` as in the simulator), trains it with
`problem.train` and the simulator's rng for that segment (`default_rng([seed, member, segment, 0, 1])`),
saves it (`seg.save`) and returns `problem.report` with the simulator's report rng
(`default_rng([seed, member, segment, 2])`). It then sleeps for the simulator's own duration of that
segment (`steps x exp(0.25 N(0, 1))`, drawn next from the same rng, as `drive()` draws it) times
`--ms-per-step` milliseconds (default 16: about 80 ms for a 5-step segment, 50-130 ms for the middle
95%), so members finish out of order as on the simulated cluster, but the order is decided by real
threads and the engine's own decision time. The default keeps a segment about ten times longer than a
PB2 decision (~5 ms of CPU at population 4 on a 2-core EPYC), as any real training's is: at 4 ms per
step (20 ms segments) the main thread deciding is the bottleneck, results queue while it decides,
the finish order is the engine's more than the durations', and PB2 ends 0.02-0.04 of the limit lower
than on the simulator (benchmarks/README.md, "Through the real local runner"). Every segment is checked to have started from the state
of the checkpoint its suggestion named (the run raises otherwise: a function or runner that does not
restore would otherwise only look like a bad search).

The final score is search_quality's: the best noise-free score among the members' final checkpoints,
as a fraction of the same limit (search_quality's oracle and its cache). The table and the JSON
(`--out`, readable by benchmarks/paired.py) have search_quality's format. `--simulate` runs the same
specs (the mode included) through search_quality's simulator instead, for a like-for-like comparison
(for asynchronous mode it equals search_quality.py's numbers).
"""

from __future__ import annotations

import os

# Before numpy loads, as in search_quality.py.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "worker"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pbt_operator  # noqa: E402
import search_quality as sq  # noqa: E402
from pbt_worker.storage import mem_storage  # noqa: E402
from problems import PROBLEMS, Problem  # noqa: E402

MODES = ("asynchronous", "synchronous")


def api_manifest(problem: Problem, method: str, population: int, seed: int, mode: str) -> dict[str, Any]:
    """search_quality's manifest for this run, in `mode`."""
    doc = sq.manifest(problem.hyperparameters, method, population, seed, problem.segments, problem.steps,
                      problem.factors)
    doc["spec"]["mode"] = mode
    if mode != "asynchronous":
        doc["metadata"]["name"] = f"{doc['metadata']['name']}-{mode[:4]}"
        doc["spec"]["storage"]["uri"] = f"mem://{doc['metadata']['name']}/"
    return doc


def run_api(problem: Problem, method: str, population: int, seed: int, workdir: Path, *,
            mode: str = "asynchronous", ms_per_step: float = 16.0) -> sq.RunResult:
    """One run through `pbt_operator.run` (see the module docstring)."""
    doc = api_manifest(problem, method, population, seed, mode)
    states: dict[tuple[int, int], Any] = {}  # what each segment saved, by ref (the score is measured on it)
    started: dict[tuple[int, int], Any] = {}  # what each segment started from
    lock = threading.Lock()

    def segment(seg: Any) -> float:
        restored = seg.restore()
        start = restored if restored is not None else problem.init(np.random.default_rng([seed, seg.member, 0]))
        rng = np.random.default_rng([seed, seg.member, seg.index, 0, 1])
        state = problem.train(start, seg.hyperparameters, seg.steps_start, seg.steps_budget, rng)
        duration = seg.steps_budget * float(np.exp(0.25 * rng.standard_normal()))
        seg.save(state)
        with lock:
            started[(seg.member, seg.index)] = start
            states[(seg.member, seg.index)] = state
        time.sleep(duration * ms_per_step / 1000.0)
        return problem.report(state, np.random.default_rng([seed, seg.member, seg.index, 2]))

    t0 = time.process_time()
    try:
        result = pbt_operator.run(doc, function=segment, out=workdir / problem.name / doc["metadata"]["name"],
                                  progress=False, plot=False)
    finally:
        mem_storage().clear()
    cpu = time.process_time() - t0
    eng = result.summary.engine if result.summary is not None else result.engine
    n = population * problem.segments
    if not result.ok or len(eng.records) != n:
        raise RuntimeError(f"{doc['metadata']['name']}: {len(eng.records)} of {n} segments finished "
                           f"({result.failed or result.finished or 'interrupted'})")
    for ref, rec in eng.records.items():
        want = (states[rec.suggestion.restore] if rec.suggestion.restore is not None
                else problem.init(np.random.default_rng([seed, rec.member, 0])))
        if pickle.dumps(started[ref]) != pickle.dumps(want):
            raise RuntimeError(f"{doc['metadata']['name']}: segment {ref} started from {started[ref]!r}, not from "
                               f"its checkpoint {rec.suggestion.restore} ({want!r}): the state was not restored")
    final = max(problem.true_score(states[r.ref]) for r in eng.latest.values())
    fallbacks = sum(1 for r in eng.records.values() if "pb2 fallback" in r.suggestion.reason)
    # decide_seconds: this process's CPU for the whole run (engine, runner, threads), not the engine's alone
    return sq.RunResult(problem.name, method, population, seed, final, len(eng.records), cpu, fallbacks)


def limits_for(problems: Sequence[str], pops: Sequence[int], seeds: Sequence[int]
               ) -> tuple[dict[tuple[str, int], float], sq.SeedLimits]:
    """search_quality's limits for these runs (its oracle, its cache, its rule for per-seed problems)."""
    cache = sq._load_limits()
    for prob, pop, seed in sq.missing_limits(problems, pops, seeds, None, cache):
        cache[sq.limit_key(prob, pop, seed)] = PROBLEMS[prob].for_seed(seed).limit(pop, seed)
    sq._save_limits(cache)
    return sq.read_limits(problems, pops, seeds, None, cache)


def benchmark(problems: Sequence[str], pops: Sequence[int], seeds: Sequence[int], methods: Sequence[str], *,
              mode: str = "asynchronous", ms_per_step: float = 16.0, simulate: bool = False,
              log: Any = None) -> tuple[list[sq.Row], list[sq.RunResult]]:
    limits, seed_limits = limits_for(problems, pops, seeds)
    results: list[sq.RunResult] = []
    with tempfile.TemporaryDirectory(prefix="pbt-api-quality-") as tmp:
        for prob in problems:
            for pop in pops:
                for seed in seeds:
                    problem = PROBLEMS[prob].for_seed(seed)
                    for method in methods:
                        r = (sq.simulate(problem, method, pop, seed, mode) if simulate else
                             run_api(problem, method, pop, seed, Path(tmp), mode=mode, ms_per_step=ms_per_step))
                        r.limit = seed_limits.get((prob, pop, seed), limits.get((prob, pop)))
                        results.append(r)
                        if log is not None:
                            log(f"{prob:<11} pop {pop:>2} seed {seed:>3} {method:<20} final {r.final:.4g} "
                                f"({r.final / r.limit if r.limit else math.nan:.3f} of the limit, {r.decide_seconds:.2f}s)")
    return sq.summarise(results, limits, seed_limits), results


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=30, help="seeds 0..N-1; default 30")
    ap.add_argument("--problems", default="lr-schedule,cat-flip", help=f"of {', '.join(PROBLEMS)}")
    ap.add_argument("--pops", default="4")
    ap.add_argument("--methods", default="pb2-liar-pessimistic,pbt")
    ap.add_argument("--mode", default="asynchronous", choices=MODES)
    ap.add_argument("--ms-per-step", type=float, default=16.0,
                    help="milliseconds a segment sleeps per simulated time unit (default 16)")
    ap.add_argument("--simulate", action="store_true",
                    help="search_quality's simulated cluster instead of the local runner (same specs and mode)")
    ap.add_argument("--out", type=Path, default=None, help="write every run as JSON (benchmarks/paired.py reads it)")
    ap.add_argument("--quiet", action="store_true", help="no line per run")
    a = ap.parse_args(argv)
    problems = sq.listed(ap, "--problems", a.problems, list(PROBLEMS), "problem")
    methods = sq.listed(ap, "--methods", a.methods, sq.METHODS, "method")
    pops = [int(x) for x in a.pops.split(",") if x]
    print(f"machine: {sq.machine()}", flush=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    print(f"started: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC", flush=True)
    t0 = time.perf_counter()
    rows, results = benchmark(problems, pops, range(a.seeds), methods, mode=a.mode, ms_per_step=a.ms_per_step,
                              simulate=a.simulate, log=None if a.quiet else (lambda s: print(s, flush=True)))
    wall = time.perf_counter() - t0
    print()
    print(sq.format_table(rows).replace("engine s", "  CPU s " if not a.simulate else "engine s"))
    print(f"\n{'simulated cluster' if a.simulate else 'local runner'}, mode {a.mode}; wall time: {wall:.1f} s "
          f"({sq.machine()})")
    if a.out is not None:
        a.out.write_text(json.dumps({"rows": [asdict(r) for r in rows], "runs": [asdict(r) for r in results],
                                     "mode": a.mode, "path": "simulated" if a.simulate else "local runner",
                                     "ms_per_step": a.ms_per_step, "machine": sq.machine(),
                                     "wall_seconds": wall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
