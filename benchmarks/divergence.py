"""Segments that diverge to NaN: what the failure handling costs in attempts and buys in score.

`lr-schedule` (search_quality.py) with one change: a segment that trains at a learning rate more than
`--decades` above the moving optimum at any of its iterations blows up (its score is NaN and it leaves
no usable checkpoint), as a too-large learning rate does in a real training. The driver reports it the
way every driver of this repository does (`diverged: score is nan (not finite)`), under the default
failure policy (`maxRetries: 2`, `onExhausted: replace`), on search_quality's simulated cluster.

Failed attempts are not counted against the budget there (every member still finishes `segments`
segments), so a method that wastes attempts loses only time, and a member that waits through its
failed attempts and then copies a donor that has moved on inherits that donor's extra iterations: the
usual "final / limit" rewards the waste. This script therefore also reports the best noise-free score
reached within the limit's own number of iterations (100) by any segment, which compares methods at
equal training, and the simulated time to finish ("makespan", in iterations of one segment's nominal
duration).

    .venv/bin/python benchmarks/divergence.py [--seeds 40] [--population 4] [--decades 1.5]
        [--methods pb2-liar-pessimistic,pbt]
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import heapq  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import problems  # noqa: E402
import search_quality  # noqa: E402  (puts this tree's operator on sys.path)
from pbt_operator.core.engine import Engine  # noqa: E402
from pbt_operator.core.types import SegmentResult  # noqa: E402
from pbt_operator.spec import parse_manifest  # noqa: E402

BASE = problems.PROBLEMS["lr-schedule"]
LIMIT = 100.0  # lr-schedule's limit (its oracle never diverges)


def train(state: float, hp: dict[str, Any], t0: int, steps: int, rng: np.random.Generator, decades: float) -> float:
    log_lr = math.log10(float(hp["lr"]))
    if any(log_lr - problems.lr_optimum(t) > decades for t in range(t0, t0 + steps)):
        return math.nan
    return problems._lr_train(state, hp, t0, steps, rng)


def run(method: str, population: int, seed: int, decades: float) -> dict[str, float]:
    doc = search_quality.manifest(BASE.hyperparameters, method, population, seed, BASE.segments, BASE.steps,
                                  BASE.factors)
    doc["spec"]["failurePolicy"] = {"maxRetries": 2, "onExhausted": "replace"}  # the defaults
    eng = Engine(parse_manifest(doc))
    states: dict[tuple[int, int], float] = {}
    queue: list[tuple[float, int, int]] = []

    def launch(now: float, sugs: Sequence[Any]) -> None:
        for s in sugs:
            rng = np.random.default_rng([seed, s.member, s.segment, s.attempt, 1])
            start = states[s.restore] if s.restore is not None else 0.0
            states[s.ref] = train(start, s.hyperparameters, s.steps_start, s.steps_budget, rng, decades)
            heapq.heappush(queue, (now + s.steps_budget * float(np.exp(0.25 * rng.standard_normal())),
                                   s.member, s.segment))

    launch(0.0, eng.start())
    now = 0.0
    while queue:
        now, m, k = heapq.heappop(queue)
        sug = eng.pending[m]
        state = states[(m, k)]
        if math.isnan(state):
            res = SegmentResult(m, k, None, sug.steps_start, error="diverged: score is nan (not finite)")
        else:
            score = problems._additive_report(state, np.random.default_rng([seed, m, k, 2]))
            res = SegmentResult(m, k, score, sug.steps_start + sug.steps_budget)
        launch(now, eng.tell(res))
    done = not eng.failed
    horizon = BASE.segments * BASE.steps
    return {
        "failed_training": float(not done),
        "attempts_failed": float(len(eng.failures)),
        "final": max(states[r.ref] for r in eng.latest.values()) / LIMIT if done else 0.0,
        "within": max((states[r.ref] for r in eng.records.values() if r.steps_end <= horizon),
                      default=0.0) / LIMIT if done else 0.0,
        "longest": float(max(r.steps_end for r in eng.latest.values())) if done else 0.0,
        "makespan": now / BASE.steps,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--decades", type=float, default=1.5, help="how far above the optimum a rate diverges")
    ap.add_argument("--methods", default="pb2-liar-pessimistic,pbt")
    args = ap.parse_args(argv)
    print(f"lr-schedule, NaN above {args.decades:g} decades over the optimum; population {args.population}, "
          f"{args.seeds} seeds; medians (the failed trainings count 0)")
    print("| method | trainings failed | failed attempts per run | best within 100 iterations / limit "
          "| final / limit | longest lineage (iterations) | makespan (segments) |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        rows = [run(method, args.population, seed, args.decades) for seed in range(args.seeds)]

        def med(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.median(r[key] for r in rows)

        failed = int(sum(r["failed_training"] for r in rows))
        print(f"| {method} | {failed} of {args.seeds} | {med('attempts_failed'):.1f} (mean "
              f"{statistics.mean(r['attempts_failed'] for r in rows):.1f}) | {med('within'):.3f} | {med('final'):.3f} "
              f"| {med('longest'):.0f} | {med('makespan'):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
