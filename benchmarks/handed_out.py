"""The operator's memory of checkpoints handed out for deletion, over a long training, without a cluster.

    .venv/bin/python benchmarks/handed_out.py [--population 20] [--segments 300] [--parallelism 8] [--rows 6]

Drives a training to completion on the in-memory stand-in for the API server that the unit tests use
(tests/unit/test_reconcile.py), with the engine kept across passes as the operator's daemon keeps it,
and prints, every so many finished segments, the size of the handed-out set the daemon keeps
(`Plan.collected`) and what a pass spends on it: the two copies `plan()` makes (`set` and `frozenset`)
and the pruning (core/policy.still_listable). "Without pruning" is what the set held before it was
pruned: every checkpoint ever handed out (here: the distinct refs in all Jobs' delete lists; no Job
fails, so none was given back). The last rows time the same copies and pruning at the size of a
1,000 x 1,000 training: every collected checkpoint without pruning, members x window with it (the
most the engine's window can hold; the runs here stay well under it). Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_reconcile import FakeCluster, StoredCluster, training_obj  # noqa: E402


def copy_ms(refs: set[tuple[int, int]], repeats: int = 5) -> float:
    """What plan() spends copying the set per pass (Plan.collected and Plan.handed_before)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        set(refs)
        frozenset(refs)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


def prune_ms(engine: object, refs: set[tuple[int, int]], repeats: int = 5) -> float:
    from pbt_operator.core.policy import still_listable

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        still_listable(engine, refs)  # type: ignore[arg-type]
        best = min(best, time.perf_counter() - t0)
    return 1000 * best


def run(population: int, segments: int, parallelism: int, rows: int, seed: int) -> None:
    c: FakeCluster = FakeCluster(training_obj(population=population, parallelism=parallelism,
                                              budget={"segments": segments}), cache=True)
    rng = random.Random(seed)
    total = population * segments
    marks = [total * (i + 1) // rows for i in range(rows)]
    ever: set[tuple[int, int]] = set()
    done = 0
    print(f"\npopulation {population} x {segments} segments, parallelism {parallelism}, member window "
          f"32 (the engine keeps each member's newest 32 segments)")
    print("| segments done | set without pruning | copies per pass | set with pruning | copies per pass "
          "| pruning per pass |")
    print("|---|---|---|---|---|---|")
    for _ in range(20 * total):
        p = c.reconcile()
        for j in p.create_jobs:
            ever.update(StoredCluster.gc_of(j))
        if marks and done >= marks[0]:
            marks.pop(0)
            print(f"| {done:,} | {len(ever):,} | {copy_ms(ever):.3f} ms | {len(c.collected):,} | "
                  f"{copy_ms(c.collected):.3f} ms | {prune_ms(p.engine, c.collected):.3f} ms |")
        if p.done:
            break
        running = c.running()
        if running and not p.create_members:
            c.finish(rng.choice(running))
            done += 1
    else:
        raise RuntimeError("the training did not finish")


def at_scale(members: int, segments: int, window: int) -> None:
    """Copy and pruning times at a long training's sizes (the refs are synthetic; the engine a stand-in
    holding a full window of records per member, the most it can hold)."""
    from types import SimpleNamespace

    tracemalloc.start()
    before = {(m, k) for m in range(members) for k in range(segments)}
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    engine = SimpleNamespace(records={(m, k): None for m in range(members) for k in range(segments - window, segments)},
                             evicted_live=[], evicted_garbage=[])
    after = set(engine.records)
    print(f"\nat {members:,} members x {segments:,} segments (window {window}): synthetic sets")
    print("| set | entries | memory | copies per pass | pruning per pass |\n|---|---|---|---|---|")
    print(f"| without pruning (every collected checkpoint) | {len(before):,} | {held / 2**20:.0f} MiB | "
          f"{copy_ms(before, 3):.1f} ms | - |")
    print(f"| with pruning, at most members x window | {len(after):,} | {held * len(after) / len(before) / 2**20:.1f} MiB | "
          f"{copy_ms(after):.2f} ms | "
          f"{prune_ms(engine, after):.2f} ms |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--population", type=int, default=20)
    ap.add_argument("--segments", type=int, default=300)
    ap.add_argument("--parallelism", type=int, default=8)
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", default="1000x1000", help="MEMBERSxSEGMENTS for the synthetic rows ('' to skip)")
    args = ap.parse_args(argv)
    import pbt_operator

    print(f"code: {Path(pbt_operator.__file__).parent}")
    print(f"machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}; load {os.getloadavg()[0]:.1f}")
    run(args.population, args.segments, args.parallelism, args.rows, args.seed)
    if args.scale:
        m, s = (int(x) for x in args.scale.split("x"))
        at_scale(m, s, 32)


if __name__ == "__main__":
    main()
