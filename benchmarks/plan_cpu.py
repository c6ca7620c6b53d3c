"""CPU time of one reconcile pass (`kube/reconcile.plan`), without a cluster.

    .venv/bin/python benchmarks/plan_cpu.py [--population 64] [--parallelism 16] [--segments 4] [--repeats 3]

Drives a training to completion on the in-memory stand-in for the API server that the unit tests use
(tests/unit/test_reconcile.py: members, Jobs and pods as dicts, a toy worker), finishing one running Job
per pass, and times every `plan()` call with the process's CPU clock, so the figure is the operator's
own cost per pass and depends little on what else the machine runs (turnaround on a shared machine
mostly measures the neighbours). Prints the median and p95 per pass and the total, median over
`--repeats` runs. To compare two versions of the code, run it with each version's `operator/` folder
first on PYTHONPATH. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_reconcile import FakeCluster, training_obj  # noqa: E402


def one_run(population: int, parallelism: int, segments: int, seed: int) -> list[float]:
    c = FakeCluster(training_obj(population=population, parallelism=parallelism, budget={"segments": segments}))
    import pbt_operator.kube.reconcile as reconcile

    times: list[float] = []
    real = reconcile.plan

    def timed(*a: Any, **kw: Any) -> Any:
        t0 = time.process_time()
        try:
            return real(*a, **kw)
        finally:
            times.append(time.process_time() - t0)

    rng = random.Random(seed)
    import test_reconcile

    test_reconcile.plan = timed
    try:
        for _ in range(20 * population * segments):
            p = c.reconcile()
            if p.done:
                break
            running = c.running()
            if running and not p.create_members:
                c.finish(rng.choice(running))
        else:
            raise RuntimeError("the training did not finish")
    finally:
        test_reconcile.plan = real
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--population", type=int, default=64)
    ap.add_argument("--parallelism", type=int, default=16)
    ap.add_argument("--segments", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    import pbt_operator

    runs = [one_run(args.population, args.parallelism, args.segments, seed) for seed in range(args.repeats)]
    med = statistics.median(statistics.median(r) for r in runs)
    p95 = statistics.median(sorted(r)[int(0.95 * (len(r) - 1))] for r in runs)
    total = statistics.median(sum(r) for r in runs)
    passes = statistics.median(len(r) for r in runs)
    print(f"code: {Path(pbt_operator.__file__).parent}")
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}; load {os.getloadavg()[0]:.1f}")
    print(f"\nreconcile plan() CPU per pass (population {args.population}, parallelism {args.parallelism}, "
          f"{args.segments} segments; median of {args.repeats} runs)")
    print("| metric | value |\n|---|---|")
    print(f"| passes per run | {passes:.0f} |")
    print(f"| CPU per pass, median | {1000 * med:.2f} ms |")
    print(f"| CPU per pass, p95 | {1000 * p95:.2f} ms |")
    print(f"| CPU for the whole run | {total:.2f} s |")


if __name__ == "__main__":
    main()
