"""Per-segment framework overhead of `pbt run`: what the runner, the engine, the checkpoint storage
and the executor cost per segment when the training itself costs nothing.

    .venv/bin/python benchmarks/overhead.py [--repeats 3] [--population 16] [--segments 100]
        [--cold-segments 10] [--parallelism 1] [--only inline-threads-mem,...] [--profile NAME]

Each configuration runs a whole `LocalRunner` (asynchronous PBT: truncation + perturb; and PB2 with
bucb) over `benchmarks/workers/noop.py`, whose segment restores a small dict, adds one, saves it and
reports. Per segment it reports, as medians over the repeats:

  total     wall time of the run / segments: everything the framework does per segment
  decision  `Engine.tell` (the decision and its bookkeeping in the engine), measured in the runner
  ckpt      restore + save inside the segment (reported by the worker)
  rest      total - decision - ckpt: results/suggestions journal, contract, executor hand-off
            (thread or process pool, a warm interpreter's pipe, or a fresh interpreter), gc,
            and, with file://, waiting for the durability barrier (one syncfs per batch on a background
            thread: only a segment decided from a batch not yet synced waits for it)
  cpu       CPU time (user + system) of the runner and of every worker process / segments: what
            the framework costs per segment whatever else the machine is doing. On a shared,
            oversubscribed machine the wall-clock columns mostly measure the neighbours (a process
            that gets a fifth of a core takes five times as long); `cpu` does not, but it leaves out
            waiting for the disk (fsync/syncfs), which only the wall-clock total shows.

Configurations: the inline executor with threads (`mem://` and `file://`) and with a process pool
(`file://` only: `mem://` lives in the runner's memory), and the process executor warm and cold
(`file://`). The cold process executor starts a Python interpreter per segment, so it runs
`--cold-segments` per member instead of `--segments`. `--parallelism 1` (the default) makes the total
the per-segment latency; a larger value measures throughput instead. `--profile NAME` runs that
configuration once under cProfile and prints the top functions. Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "operator"))
sys.path.insert(0, str(HERE.parent / "worker"))

from pbt_operator.core.engine import Engine  # noqa: E402
from pbt_operator.core.types import SegmentResult, Suggestion  # noqa: E402
from pbt_operator.local.runner import LocalRunner  # noqa: E402
from pbt_operator.spec import parse_manifest  # noqa: E402

NOOP = HERE / "workers" / "noop.py"

CONFIGS = {
    # name: (executor, pool, storage scheme, warm)
    "inline-threads-mem": ("inline", "threads", "mem", None),
    "inline-threads-file": ("inline", "threads", "file", None),
    "inline-processes-file": ("inline", "processes", "file", None),
    "process-warm-file": ("process", None, "file", True),
    "process-cold-file": ("process", None, "file", False),
}
STRATEGIES = {
    "pbt": {"exploit": {"strategy": "truncation", "fraction": 0.25},
            "explore": {"strategy": "perturb", "factors": [0.8, 1.2]}},
    "pb2": {"exploit": {"strategy": "truncation", "fraction": 0.25},
            "explore": {"strategy": "pb2", "pb2": {"parallel": "bucb"}}},
}


def manifest(config: str, strategy: str, population: int, segments: int, parallelism: int, tmp: Path,
             seed: int) -> dict[str, Any]:
    executor, pool, scheme, warm = CONFIGS[config]
    worker: dict[str, Any] = {"executor": executor}
    if executor == "inline":
        worker.update(function="noop:segment", pool=pool)
    else:
        worker.update(command=[sys.executable, str(NOOP)], warm=warm)
    uri = f"mem://overhead-{seed}-{time.monotonic_ns()}" if scheme == "mem" else f"file://{tmp / 'ck'}"
    return {
        "apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining", "metadata": {"name": "overhead"},
        "spec": {
            "population": population, "parallelism": parallelism, "mode": "asynchronous", "seed": seed,
            "segment": {"steps": 1}, "budget": {"segments": segments},
            "hyperparameters": {"lr": {"type": "float", "min": 1e-3, "max": 1.0, "log": True}},
            **STRATEGIES[strategy],
            "storage": {"uri": uri}, "worker": worker,
            "failurePolicy": {"maxRetries": 0, "onExhausted": "fail"},
        },
    }


class TellTimer:
    """Wraps Engine.tell to add up the time the runner spends deciding."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.real = Engine.tell

    def __enter__(self) -> TellTimer:
        real, timer = self.real, self

        def tell(engine: Engine, result: SegmentResult) -> list[Suggestion]:
            t0 = time.perf_counter()
            try:
                return real(engine, result)
            finally:
                timer.seconds += time.perf_counter() - t0

        # Replacing the method is the point (the runner calls engine.tell). mypy sees the class attribute
        # as a method with an extra self, so a plain function of (engine, result) is an [assignment] too.
        Engine.tell = tell  # type: ignore[method-assign, assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        Engine.tell = self.real  # type: ignore[method-assign]


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_once(config: str, strategy: str, population: int, segments: int, parallelism: int,
             seed: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="pbt-overhead-"))
    try:
        spec = parse_manifest(manifest(config, strategy, population, segments, parallelism, tmp, seed),
                              base_dir=HERE / "workers")
        with TellTimer() as timer:
            c0 = _cpu()
            t0 = time.perf_counter()
            summary = LocalRunner(spec, tmp / "run", plot=False).run()
            wall = time.perf_counter() - t0
            cpu = _cpu() - c0  # the workers have exited by now: their CPU time is in RUSAGE_CHILDREN
        eng = summary.engine
        if eng.failed:
            raise SystemExit(f"{config}/{strategy}: the run failed: {eng.failed}")
        n = len(eng.records)
        ck = sum(float(r.metrics.get("ck_ms", 0.0)) for r in eng.records.values()) / 1e3
        return {"segments": n, "total": wall / n * 1e3, "decision": timer.seconds / n * 1e3,
                "ckpt": ck / n * 1e3, "rest": (wall - timer.seconds - ck) / n * 1e3, "cpu": cpu / n * 1e3}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--segments", type=int, default=100, help="segments per member")
    ap.add_argument("--cold-segments", type=int, default=10, help="segments per member, cold process executor")
    ap.add_argument("--parallelism", type=int, default=1)
    ap.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations")
    ap.add_argument("--strategies", default="pbt,pb2")
    ap.add_argument("--profile", default=None, help="CONFIG[/STRATEGY]: one cProfile'd run, top functions")
    a = ap.parse_args(argv)

    if a.profile:
        config, _, strategy = a.profile.partition("/")
        prof = cProfile.Profile()
        prof.enable()
        row = run_once(config, strategy or "pbt", a.population, a.segments, a.parallelism, 0)
        prof.disable()
        print(row)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
        return

    load = os.getloadavg()
    print(f"# population {a.population}, parallelism {a.parallelism}, asynchronous; medians of "
          f"{a.repeats} runs; {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| configuration | strategy | segments | total ms/seg | decision | ckpt | rest | cpu ms/seg |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for config in a.only.split(","):
        for strategy in a.strategies.split(","):
            segs = a.cold_segments if config == "process-cold-file" else a.segments
            rows = [run_once(config, strategy, a.population, segs, a.parallelism, seed)
                    for seed in range(a.repeats)]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            print(f"| {config} | {strategy} | {int(med['segments'])} | {med['total']:.3f} | "
                  f"{med['decision']:.3f} | {med['ckpt']:.3f} | {med['rest']:.3f} | {med['cpu']:.3f} |", flush=True)
    load = os.getloadavg()
    print(f"# load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
