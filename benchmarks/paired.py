"""Paired comparison of two `search_quality.py --out` files: does setting B decide better than A?

    .venv/bin/python benchmarks/paired.py A.json B.json [--method pb2-liar-pessimistic]

Runs of the same (problem, population, seed) start from the same members and noise, so the
difference B - A per seed is what B's setting changed; the medians of A and B alone hide it under
the seed-to-seed spread (on lr-schedule-10d a final score's interquartile range is ~0.17 of the
limit, a setting's effect ~0.01). Per (problem, population): both medians (fractions of the limit),
the mean difference with a 95% bootstrap interval (2000 resamples of seeds, fixed rng), the median
difference, B's wins/ties/losses by seed, a two-sided exact sign test, and B's engine CPU over A's.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from collections.abc import Sequence
from pathlib import Path

Key = tuple[str, int, int]


def load(path: Path, method: str) -> dict[Key, tuple[float, float]]:
    """(problem, population, seed) -> (final / limit, seconds in the engine) for `method`'s runs."""
    runs = json.loads(path.read_text())["runs"]
    return {(r["problem"], r["population"], r["seed"]): (r["final"] / r["limit"], r["decide_seconds"])
            for r in runs if r["method"] == method}


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test p-value (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2.0 * tail)


def compare(a: dict[Key, tuple[float, float]], b: dict[Key, tuple[float, float]]) -> list[str]:
    """The table's lines, one row per (problem, population) that both files ran."""
    groups: dict[tuple[str, int], list[Key]] = {}
    for key in sorted(set(a) & set(b)):
        groups.setdefault(key[:2], []).append(key)
    lines = ["| problem | pop | seeds | A median | B median | mean B-A [95% bootstrap] | median B-A | B w/t/l "
             "| sign p | CPU B/A |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rng = random.Random(0)
    for (problem, pop), keys in sorted(groups.items()):
        fa, fb = [a[k][0] for k in keys], [b[k][0] for k in keys]
        diff = [y - x for x, y in zip(fa, fb, strict=True)]
        boots = sorted(statistics.mean(rng.choices(diff, k=len(diff))) for _ in range(2000))
        wins, losses = sum(d > 1e-9 for d in diff), sum(d < -1e-9 for d in diff)
        cpu = sum(b[k][1] for k in keys) / max(sum(a[k][1] for k in keys), 1e-12)
        lines.append(f"| {problem} | {pop} | {len(keys)} | {statistics.median(fa):.3f} | {statistics.median(fb):.3f} "
                     f"| {statistics.mean(diff):+.3f} [{boots[50]:+.3f}, {boots[1949]:+.3f}] "
                     f"| {statistics.median(diff):+.3f} | {wins}/{len(diff) - wins - losses}/{losses} "
                     f"| {sign_test(wins, losses):.2f} | {cpu:.2f}x |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("a", type=Path, help="search_quality.py --out file of the baseline")
    ap.add_argument("b", type=Path, help="search_quality.py --out file of the setting compared")
    ap.add_argument("--method", default="pb2-liar-pessimistic")
    args = ap.parse_args(argv)
    a, b = load(args.a, args.method), load(args.b, args.method)
    if not set(a) & set(b):
        ap.error(f"no (problem, population, seed) of method {args.method!r} in both files")
    print("\n".join(compare(a, b)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
