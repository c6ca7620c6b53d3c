"""A peer on the same problems: Ray Tune's PB2 and PBT schedulers on search_quality.py's problems, with
the same population, segments, final score and limits, so that their rows sit beside ours.

    python -m venv /tmp/rayenv && /tmp/rayenv/bin/pip install "ray[tune]==2.60.0" scikit-learn
    /tmp/rayenv/bin/python benchmarks/peer_ray.py [--seeds 20]
        [--first-seed 0] [--problems cat-flip,lr-schedule] [--methods ray-pb2,ray-pbt] [--pop 4] [--ms-per-step 16]
        [--out results.json]

Ray Tune is not a dependency of this project and never imported by it: this script needs its own
environment (above). Nothing of Ray's code is copied here; the script calls its public API as a user would.

Each run is one `tune.Tuner` with `num_samples` = population trials running at once (one CPU each,
`reuse_actors`), a function trainable that trains one segment per `tune.report` (`problem.train` for
`problem.steps` iterations from the state and iteration count in its checkpoint), sleeps the segment's
simulated duration (`steps x exp(0.25 N(0, 1))` x `--ms-per-step` ms, as api_quality.py does, so trials
finish out of order), reports the problem's noisy score as the metric and saves a checkpoint. The
schedulers decide on `training_iteration` (one per segment) with `perturbation_interval` 1, i.e. an
exploit decision after every segment, as our asynchronous mode; trials stop at the problem's number of
segments.

The settings are what a Ray user would write, with Ray's defaults otherwise:
- `ray-pbt`: `PopulationBasedTraining`, `quantile_fraction` 0.25, `resample_probability` 0.25 (ours),
  mutations `tune.loguniform` / `tune.uniform` / the categorical's list of choices.
- `ray-pb2`: `PB2`, `quantile_fraction` 0.25 (its default). Its bounds are linear, so a log-scaled
  hyperparameter is searched as its log10 (what Ray's docs advise for a learning rate), and it has no
  categorical hyperparameters: a categorical is searched as a number in [0, k) whose integer part picks
  the choice, the usual workaround.

Differences from our runs that a reader must know (benchmarks/README.md, "A peer on the same problems"):
- Ray's exploited trial takes its donor's iteration count, and a trial stops at the problem's number of
  segments, so a trial that copies a member ahead of it trains fewer segments than ours (every member of
  ours trains exactly `segments`). The table's `segments` column is the run's total over its trials, and
  the mean fraction of our budget is printed.
- Noise comes from per-trial generators seeded by (seed, member, segment, a draw from the run's `random`
  seeded by the seed), but Ray's scheduling order depends on process timing: runs are not reproducible
  seed by seed, and seed k of a peer run is not paired with seed k of ours (medians only).

The final score and limits are search_quality's: the best noise-free score among the trials' final
states, over the same oracle's limit (its cache, its rule for per-seed problems).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import asdict  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

HERE = Path(__file__).resolve().parent
_PATHS = [str(HERE.parent / "operator"), str(HERE.parent / "worker"), str(HERE)]
sys.path[:0] = _PATHS
# Ray's worker processes import the trainable's modules (search_quality, problems) by name.
os.environ["PYTHONPATH"] = os.pathsep.join([*_PATHS, *filter(None, [os.environ.get("PYTHONPATH")])])

import numpy as np  # noqa: E402
import search_quality as sq  # noqa: E402
from api_quality import limits_for  # noqa: E402
from problems import PROBLEMS  # noqa: E402

METHODS = ("ray-pb2", "ray-pbt")
LOG_PREFIX = "log10_"  # a log-scaled hyperparameter searched by Ray's PB2 as its log10
INDEX_PREFIX = "index_"  # a categorical searched by Ray's PB2 as a number in [0, k)


def pb2_bounds(space: Mapping[str, Mapping[str, Any]]) -> dict[str, list[float]]:
    """Ray PB2's `hyperparam_bounds` for a manifest's `spec.hyperparameters` (linear bounds only)."""
    bounds: dict[str, list[float]] = {}
    for name, hp in space.items():
        if hp["type"] == "categorical":
            bounds[INDEX_PREFIX + name] = [0.0, float(len(hp["choices"]))]
        elif hp.get("log"):
            bounds[LOG_PREFIX + name] = [math.log10(hp["min"]), math.log10(hp["max"])]
        else:
            bounds[name] = [float(hp["min"]), float(hp["max"])]
    return bounds


def decode(config: Mapping[str, Any], space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The problem's hyperparameters from a trial's config (either scheduler's encoding)."""
    out: dict[str, Any] = {}
    for name, hp in space.items():
        if INDEX_PREFIX + name in config:
            choices = hp["choices"]
            out[name] = choices[min(len(choices) - 1, max(0, int(config[INDEX_PREFIX + name])))]
        elif LOG_PREFIX + name in config:
            out[name] = 10.0 ** float(config[LOG_PREFIX + name])
        else:
            out[name] = config[name]
        if hp["type"] == "int":
            out[name] = int(round(min(hp["max"], max(hp["min"], float(out[name])))))
    return out


def trainable(config: dict[str, Any]) -> None:
    """Ray's function trainable: one segment per report, the state and iteration count in the checkpoint."""
    from ray import tune

    problem = sq.instance(config["problem"], config["seed"])
    space = problem.hyperparameters
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state, t, k = pickle.loads((Path(d) / "state.pkl").read_bytes())
    else:
        state, t, k = problem.init(np.random.default_rng([config["seed"], config["member"], 0])), 0, 0
    rng = np.random.default_rng([config["seed"], config["member"], k, random.getrandbits(32)])
    while True:
        state = problem.train(state, decode(config, space), t, problem.steps, rng)
        t, k = t + problem.steps, k + 1
        with open(config["ledger"], "ab") as ledger:  # one byte per segment trained, over all trials
            ledger.write(b".")
        time.sleep(problem.steps * float(np.exp(0.25 * rng.standard_normal())) * config["ms_per_step"] / 1000.0)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "state.pkl").write_bytes(pickle.dumps((state, t, k)))
            tune.report({"score": problem.report(state, rng), "true": problem.true_score(state)},
                        checkpoint=tune.Checkpoint.from_directory(d))


def run_ray(prob: str, method: str, population: int, seed: int, ms_per_step: float, storage: Path) -> sq.RunResult:
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining
    from ray.tune.schedulers.pb2 import PB2

    random.seed(seed)
    np.random.seed(seed)
    problem = sq.instance(prob, seed)
    space: dict[str, Any]
    scheduler: Any
    if method == "ray-pb2":
        bounds = pb2_bounds(problem.hyperparameters)
        space = {name: tune.uniform(lo, hi) for name, (lo, hi) in bounds.items()}
        scheduler = PB2(time_attr="training_iteration", perturbation_interval=1, hyperparam_bounds=bounds,
                        quantile_fraction=0.25)
    else:
        mutations: dict[str, Any] = {}
        space = {}
        for name, hp in problem.hyperparameters.items():
            if hp["type"] == "categorical":
                mutations[name], space[name] = list(hp["choices"]), tune.choice(list(hp["choices"]))
            else:
                dist = (tune.loguniform if hp.get("log") else tune.uniform)(float(hp["min"]), float(hp["max"]))
                mutations[name] = space[name] = dist
        scheduler = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=1,
                                            hyperparam_mutations=mutations, quantile_fraction=0.25,
                                            resample_probability=0.25)
    members = iter(range(population))
    ledger = storage / f"{prob}-{method}-{seed}.segments"
    space.update({"problem": prob, "seed": seed, "ms_per_step": ms_per_step, "ledger": str(ledger),
                  "member": tune.sample_from(lambda _: next(members))})
    tuner = tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(scheduler=scheduler, num_samples=population, metric="score", mode="max",
                                    max_concurrent_trials=population, reuse_actors=True),
        run_config=tune.RunConfig(stop={"training_iteration": problem.segments}, verbose=0,
                                  storage_path=str(storage)))
    t0 = time.process_time()
    grid = tuner.fit()
    cpu = time.process_time() - t0
    finals = [r.metrics["true"] for r in grid if r.metrics and "true" in r.metrics]
    if len(finals) != population:
        errors = [str(r.error)[-400:] for r in grid if r.error is not None]
        raise RuntimeError(f"{prob}/{method}/seed {seed}: {len(finals)} of {population} trials finished: {errors}")
    return sq.RunResult(prob, method, population, seed, max(finals), ledger.stat().st_size, cpu)


OURS = ("pb2-liar-pessimistic", "pbt")


def median_difference(a: Sequence[float], b: Sequence[float], resamples: int = 4000,
                      seed: int = 0) -> tuple[float, float, float]:
    """median(a) - median(b) and its 95% bootstrap interval, each side resampled on its own: a peer's
    runs are not paired with ours seed by seed (its initial draws and timing are its own)."""
    rng = random.Random(seed)
    diffs = sorted(statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b)))
                   for _ in range(resamples))
    return (statistics.median(a) - statistics.median(b), diffs[int(0.025 * resamples)],
            diffs[int(0.975 * resamples)])


def compare(ours: Sequence[Mapping[str, Any]], peer: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines of `ours - peer` per problem and seeds run by both: each of our methods against each peer's,
    from search_quality.py's and this script's --out runs."""
    def fractions(runs: Sequence[Mapping[str, Any]], method: str, problem: str, seeds: set[int]) -> list[float]:
        return [r["final"] / r["limit"] for r in runs
                if r["method"] == method and r["problem"] == problem and r["seed"] in seeds]

    lines = []
    for problem in sorted({r["problem"] for r in peer}):
        seeds = {r["seed"] for r in peer if r["problem"] == problem} & {r["seed"] for r in ours if r["problem"] == problem}
        for mine in OURS:
            for theirs in METHODS:
                a, b = fractions(ours, mine, problem, seeds), fractions(peer, theirs, problem, seeds)
                if a and b:
                    d, lo, hi = median_difference(a, b)
                    lines.append(f"{problem:<11} seeds {len(seeds):>3}  {mine:<20} {statistics.median(a):.3f} - "
                                 f"{theirs:<8} {statistics.median(b):.3f} = {d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="N seeds from --first-seed; default 20")
    ap.add_argument("--first-seed", type=int, default=0, help="default 0")
    ap.add_argument("--problems", default="cat-flip,lr-schedule", help=f"of {', '.join(PROBLEMS)}")
    ap.add_argument("--pop", type=int, default=4, help="population (default 4)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ms-per-step", type=float, default=16.0,
                    help="milliseconds a segment sleeps per simulated time unit (default 16, as api_quality.py)")
    ap.add_argument("--out", type=Path, default=None, help="write every run as JSON (search_quality's format)")
    ap.add_argument("--compare", type=Path, nargs="+", metavar=("OURS.json", "PEER.json"), default=None,
                    help="no runs: compare search_quality.py's --out with this script's (several are pooled): "
                         "the difference of the medians with a 95%% bootstrap interval")
    a = ap.parse_args(argv)
    if a.compare is not None:
        if len(a.compare) < 2:
            ap.error("--compare: OURS.json and at least one PEER.json")
        ours, *peers = (json.loads(f.read_text())["runs"] for f in a.compare)
        print("\n".join(compare(ours, [r for p in peers for r in p])))
        return 0
    problems = sq.listed(ap, "--problems", a.problems, list(PROBLEMS), "problem")
    methods = sq.listed(ap, "--methods", a.methods, METHODS, "method")
    try:
        import ray
    except ImportError:
        ap.error("Ray Tune is not installed in this environment; see this script's docstring for its own venv")
    print(f"machine: {sq.machine()}, ray {ray.__version__}", flush=True)
    print(f"started: {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC", flush=True)
    seeds = range(a.first_seed, a.first_seed + a.seeds)
    limits, seed_limits = limits_for(problems, [a.pop], seeds)
    ray.init(num_cpus=a.pop, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    results: list[sq.RunResult] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pbt-peer-ray-") as tmp:
        for prob in problems:
            for method in methods:
                for seed in seeds:
                    r = run_ray(prob, method, a.pop, seed, a.ms_per_step, Path(tmp))
                    r.limit = seed_limits.get((prob, a.pop, seed), limits.get((prob, a.pop)))
                    results.append(r)
                    print(f"{prob:<11} seed {seed:>3} {method:<8} final {r.final:.4g} "
                          f"({r.final / r.limit if r.limit else math.nan:.3f} of the limit), "
                          f"{r.segments} segments", flush=True)
    wall = time.perf_counter() - t0
    rows = sq.summarise(results, limits, seed_limits)
    print()
    print(sq.format_table(rows).replace("engine s", "driver s"))
    budget = {m: statistics.mean(r.segments for r in results if r.method == m) for m in methods}
    print("\nsegments trained per run, mean (ours: population x segments every run): "
          + ", ".join(f"{m} {v:.1f}" for m, v in budget.items()))
    print(f"wall time: {wall:.1f} s ({sq.machine()})")
    if a.out is not None:
        a.out.write_text(json.dumps({"rows": [asdict(r) for r in rows], "runs": [asdict(r) for r in results],
                                     "ray": ray.__version__, "ms_per_step": a.ms_per_step,
                                     "machine": sq.machine(), "wall_seconds": wall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
