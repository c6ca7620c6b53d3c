"""Search quality: PB2 vs PBT vs random search at an equal budget of segments (issue 3).

    .venv/bin/python benchmarks/search_quality.py [--seeds 10] [--problems quadratic,digits]
        [--populations 4,8] [--segments N] [--out results.json]

Every run uses the local runner (`LocalRunner`, inline executor with threads, `mem://` checkpoints,
parallelism 1 so a run is deterministic given its seed) and the same manifest apart from the method:

* `pb2`:    exploit truncation 0.25, explore pb2 (all PB2 settings at their defaults)
* `pbt`:    exploit truncation 0.25, explore perturb (the example manifest's factors and resampling)
* `random`: exploit none: every member trains alone from its initial sample (random search; the
            engine samples initial members from the `initial` ranges, the same start as PB2 and PBT)
* `random-full`: exploit none, members sampled from the whole range (the `initial` ranges dropped):
            an extra, stronger random search, reported for context but not part of the targets

A seed is the manifest's `spec.seed`, so for one seed the three methods start from the same initial
members (and, for digits, the same initial weights). The budget is `population x segments` finished
segments for every method.

Problems (settings fixed before any comparison was run; see benchmarks/README.md):

* `quadratic`: the PBT paper's toy (examples/quadratic/quadratic.py): maximise 1.2 - |theta|^2 while
  each member only follows the surrogate h0 theta0^2 + h1 theta1^2. h0, h1 in [0, 1], initial values
  from [0, 0.2] (as in the example), 10 segments of 10 steps: too few for a member with small h to get
  close, so the score depends on moving h (exploration), not only on copying theta (exploitation).
* `digits`: examples/digits/train.py (a torch MLP, SGD) run inline via `train:segment`, with the
  example's space (learning rates initially far too small), 8 segments of 40 steps. CPU, 1 thread.

Reported per (problem, population, method), over seeds: median and interquartile range (q25..q75) of
  * final best: the best score any segment of the run reached (what `pbt run` reports as best);
  * AUC: the area under the best-score-so-far curve as a function of the number of segments finished
    (completion order), divided by the budget: the mean of the best-so-far over the run. Higher means
    good scores were found earlier.
plus how many seeds each method won or tied against PBT (paired by seed).
The verdict lines check the issue's targets at population 4: median final best of PB2 >= PBT >= random.
"""

from __future__ import annotations

import os

# Before numpy/torch load: PB2's matrices are tiny, and threaded BLAS on a busy 2-core machine spins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"
os.environ.setdefault("PBT_CPU", "1")  # digits on the CPU even where a GPU exists: comparable timings
os.environ.setdefault("PBT_TORCH_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "worker"))

from pbt_operator.local.runner import LocalRunner  # noqa: E402
from pbt_operator.spec import TrainingSpec, parse_manifest  # noqa: E402
from pbt_worker.storage import mem_storage  # noqa: E402

METHODS = ("pb2", "pbt", "random", "random-full")


@dataclass(frozen=True)
class Problem:
    name: str
    base_dir: Path
    function: str
    steps: int
    segments: int
    hyperparameters: dict[str, Any]
    factors: tuple[float, ...]
    resample_probability: float = 0.25
    setup: Callable[[int], None] | None = None  # called with the seed before each run


def _torch_seed(seed: int) -> None:
    # train.py initialises a fresh model with torch's global RNG; with parallelism 1 the segments of a
    # run execute in a fixed order, so seeding it makes a digits run reproducible.
    import torch

    torch.manual_seed(seed)


PROBLEMS: dict[str, Problem] = {
    "quadratic": Problem(
        name="quadratic", base_dir=ROOT / "examples" / "quadratic", function="quadratic:segment",
        steps=10, segments=10,
        hyperparameters={
            "h0": {"type": "float", "min": 0.0, "max": 1.0, "initial": {"min": 0.0, "max": 0.2}},
            "h1": {"type": "float", "min": 0.0, "max": 1.0, "initial": {"min": 0.0, "max": 0.2}},
        },
        factors=(0.8, 1.2),
    ),
    "digits": Problem(
        name="digits", base_dir=ROOT / "examples" / "digits", function="train:segment",
        steps=40, segments=8,
        hyperparameters={
            "lr": {"type": "float", "min": 1.0e-4, "max": 0.5, "log": True, "initial": {"min": 1.0e-4, "max": 2.0e-3}},
            "momentum": {"type": "float", "min": 0.0, "max": 0.95, "initial": {"min": 0.0, "max": 0.5}},
            "batch_size": {"type": "int", "min": 8, "max": 128, "log": True},
        },
        factors=(0.8, 1.25),
        setup=_torch_seed,
    ),
}


def manifest(problem: Problem, method: str, population: int, seed: int, segments: int | None = None,
             steps: int | None = None) -> dict[str, Any]:
    if method == "pb2":
        exploit: dict[str, Any] = {"strategy": "truncation", "fraction": 0.25}
        explore: dict[str, Any] = {"strategy": "pb2"}
    elif method == "pbt":
        exploit = {"strategy": "truncation", "fraction": 0.25}
        explore = {"strategy": "perturb", "factors": list(problem.factors),
                   "resampleProbability": problem.resample_probability}
    elif method in ("random", "random-full"):
        exploit = {"strategy": "none"}
        explore = {"strategy": "perturb"}  # never used: nobody exploits
    else:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    hyperparameters = problem.hyperparameters
    if method == "random-full":
        hyperparameters = {k: {kk: vv for kk, vv in v.items() if kk != "initial"} for k, v in hyperparameters.items()}
    name = f"sq-{problem.name}-{method}-p{population}-s{seed}"
    return {
        "apiVersion": "pbt.dev/v1alpha1",
        "kind": "PopulationTraining",
        "metadata": {"name": name},
        "spec": {
            "population": population,
            "parallelism": 1,
            "mode": "asynchronous",
            "seed": seed,
            "objective": {"metric": "score", "direction": "max"},
            "segment": {"steps": steps or problem.steps},
            "budget": {"segments": segments or problem.segments},
            "hyperparameters": hyperparameters,
            "exploit": exploit,
            "explore": explore,
            "failurePolicy": {"maxRetries": 0, "onExhausted": "fail"},
            "storage": {"uri": f"mem://{name}/"},
            "worker": {"executor": "inline", "function": problem.function},
        },
    }


@dataclass
class RunResult:
    problem: str
    method: str
    population: int
    seed: int
    final_best: float
    auc: float
    segments: int
    wall_seconds: float
    pb2_fallbacks: int = 0
    curve: list[float] = field(default_factory=list)


def best_so_far(scores: Sequence[float]) -> list[float]:
    out: list[float] = []
    for s in scores:
        out.append(s if not out else max(out[-1], s))
    return out


def run_one(problem: Problem, method: str, population: int, seed: int, workdir: Path,
            segments: int | None = None, steps: int | None = None) -> RunResult:
    spec: TrainingSpec = parse_manifest(manifest(problem, method, population, seed, segments, steps),
                                        base_dir=problem.base_dir)
    if problem.setup is not None:
        problem.setup(seed)
    run_dir = workdir / spec.name
    try:
        summary = LocalRunner(spec, run_dir, progress=None, plot=False).run()
    finally:
        mem_storage().clear()  # runs are sequential in this process: drop the finished run's checkpoints
    eng = summary.engine
    if eng.failed or eng.failures or summary.interrupted:
        raise RuntimeError(f"{spec.name}: the run failed: {eng.failed or eng.failures[0].error}")
    scores = [float(eng.records[ref].score) for ref in eng.order]  # type: ignore[arg-type]
    budget = spec.population * spec.budget.segments
    if len(scores) != budget:
        raise RuntimeError(f"{spec.name}: {len(scores)} segments finished, budget {budget}")
    curve = best_so_far(scores)
    fallbacks = sum(1 for r in eng.records.values() if "pb2 fallback" in r.suggestion.reason)
    return RunResult(problem.name, method, population, seed, curve[-1], sum(curve) / len(curve), len(scores),
                     summary.wall_seconds, fallbacks, curve)


@dataclass
class Row:
    problem: str
    population: int
    method: str
    seeds: int
    final_median: float
    final_q25: float
    final_q75: float
    auc_median: float
    auc_q25: float
    auc_q75: float
    vs_pbt: str  # "wins/ties/losses" of final best against PBT with the same seed
    wall_seconds: float
    pb2_fallbacks: int


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def summarise(results: Sequence[RunResult]) -> list[Row]:
    rows: list[Row] = []
    keys = sorted({(r.problem, r.population) for r in results}, key=lambda k: (list(PROBLEMS).index(k[0])
                                                                                 if k[0] in PROBLEMS else 99, k[1]))
    for prob, pop in keys:
        group = [r for r in results if r.problem == prob and r.population == pop]
        pbt = {r.seed: r.final_best for r in group if r.method == "pbt"}
        for method in METHODS:
            rs = sorted((r for r in group if r.method == method), key=lambda r: r.seed)
            if not rs:
                continue
            f25, fmed, f75 = quartiles([r.final_best for r in rs])
            a25, amed, a75 = quartiles([r.auc for r in rs])
            w = sum(1 for r in rs if r.seed in pbt and r.final_best > pbt[r.seed])
            t = sum(1 for r in rs if r.seed in pbt and r.final_best == pbt[r.seed])
            n = sum(1 for r in rs if r.seed in pbt)
            rows.append(Row(prob, pop, method, len(rs), fmed, f25, f75, amed, a25, a75,
                            "-" if method == "pbt" else f"{w}/{t}/{n - w - t}",
                            sum(r.wall_seconds for r in rs), sum(r.pb2_fallbacks for r in rs)))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'problem':<10} {'pop':>3} {'method':<11} {'seeds':>5}  {'final best median [q25, q75]':<32} "
            f"{'AUC median [q25, q75]':<32} {'vs PBT w/t/l':>12} {'wall s':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.problem:<10} {r.population:>3} {r.method:<11} {r.seeds:>5}  "
            f"{_fmt(r.final_median, r.final_q25, r.final_q75):<32} {_fmt(r.auc_median, r.auc_q25, r.auc_q75):<32} "
            f"{r.vs_pbt:>12} {r.wall_seconds:>7.1f}"
        )
    return "\n".join(lines)


def _fmt(med: float, lo: float, hi: float) -> str:
    return f"{med:.4f} [{lo:.4f}, {hi:.4f}]"


def verdicts(rows: Sequence[Row], population: int = 4) -> list[tuple[str, bool]]:
    """The issue's targets: at `population`, median final best PB2 >= PBT and PBT >= random."""
    out: list[tuple[str, bool]] = []
    for prob in dict.fromkeys(r.problem for r in rows):
        med = {r.method: r.final_median for r in rows if r.problem == prob and r.population == population}
        if "pb2" in med and "pbt" in med:
            out.append((f"{prob} pop {population}: PB2 median {med['pb2']:.4f} >= PBT median {med['pbt']:.4f}",
                        med["pb2"] >= med["pbt"]))
        if "pbt" in med and "random" in med:
            out.append((f"{prob} pop {population}: PBT median {med['pbt']:.4f} >= random median "
                        f"{med['random']:.4f}", med["pbt"] >= med["random"]))
    return out


def benchmark(problems: Sequence[str], populations: Sequence[int], seeds: Sequence[int],
              methods: Sequence[str] = METHODS, segments: int | None = None, steps: int | None = None,
              workdir: Path | None = None, log: Callable[[str], None] | None = None) -> tuple[list[Row], list[RunResult]]:
    """Run every (problem, population, seed, method) once; returns the summary rows and the raw runs."""
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="pbt-search-quality-") as tmp:
        wd = workdir or Path(tmp)
        for prob in problems:
            problem = PROBLEMS[prob]
            for pop in populations:
                for seed in seeds:
                    for method in methods:
                        r = run_one(problem, method, pop, seed, wd, segments, steps)
                        results.append(r)
                        if log is not None:
                            log(f"{prob:<10} pop {pop:>2} seed {seed:>3} {method:<11} final {r.final_best:.4f} "
                                f"auc {r.auc:.4f} ({r.wall_seconds:.1f}s)")
    return summarise(results), results


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
    return f"{cores} cores, {model}, Python {platform.python_version()}, {platform.system()}{load}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 per (problem, population); default 10")
    ap.add_argument("--problems", default="quadratic,digits")
    ap.add_argument("--populations", default="4,8")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--segments", type=int, default=None, help="override every problem's budget.segments")
    ap.add_argument("--out", type=Path, default=None, help="write every run (with its curve) as JSON")
    ap.add_argument("--quiet", action="store_true", help="no line per run")
    a = ap.parse_args(argv)
    problems = [p for p in a.problems.split(",") if p]
    for p in problems:
        if p not in PROBLEMS:
            ap.error(f"--problems: unknown problem {p!r} (one of {', '.join(PROBLEMS)})")
    methods = [m for m in a.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown method {m!r} (one of {', '.join(METHODS)})")
    populations = [int(x) for x in a.populations.split(",") if x]
    print(f"machine: {machine()}", flush=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}", flush=True)
    t0 = time.perf_counter()
    rows, results = benchmark(problems, populations, range(a.seeds), methods, a.segments,
                              log=None if a.quiet else (lambda s: print(s, flush=True)))
    wall = time.perf_counter() - t0
    for prob in problems:
        p = PROBLEMS[prob]
        print(f"\n{prob}: {a.segments or p.segments} segments x {p.steps} steps per member, "
              f"budget = population x {a.segments or p.segments} segments for every method")
    print()
    print(format_table(rows))
    fallbacks = sum(r.pb2_fallbacks for r in rows if r.method == "pb2")
    n_pb2 = sum(1 for r in results if r.method == "pb2")
    if n_pb2:
        print(f"\nPB2 explore steps that fell back to perturb (too few GP rows early on, or numerical): "
              f"{fallbacks} over {n_pb2} runs")
    print("\ntargets (median final best at population 4):")
    for text, ok in verdicts(rows):
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    print(f"\nwall time: {wall:.1f} s ({machine()})")
    if a.out is not None:
        a.out.write_text(json.dumps({"rows": [asdict(r) for r in rows], "runs": [asdict(r) for r in results],
                                     "machine": machine(), "wall_seconds": wall}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
