"""Where PB2's explore choices land on one search_quality.py problem: rows, fallbacks, trust-region
edges and walls per hyperparameter, fitted length scales, distance of relevant numbers from their optima.

    .venv/bin/python benchmarks/pb2_trace.py lr-schedule-3d [--pop 4] [--seeds 20] [--pb2-settings JSON]
        [--mode asynchronous|synchronous] [--interval N]

Runs `pb2-liar-pessimistic` as search_quality.py does and wraps `pbt_operator.core.pb2.suggest` (and
the window's fit, for the length scales) to record every explore decision; retunes (kappa 0) are not
counted. A choice is "at the trust-region edge" when a numeric hyperparameter lies within 1e-3 (unit
space) of its box's bound and that bound is not a wall of the space; "at a wall" when it is at 0 or 1.
"Early -> late" compares the donors' distance from the optimum in the first two fifths of training with
the choices' distance in the last two fifths (relevant numbers of lr-schedule-Nd / -mixed only).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pbt_operator.core.pb2 as pb2mod
import pbt_operator.core.pb2.window as winmod
import search_quality as sq
from pbt_operator.core.pb2.data import unit_columns
from problems import BATCH_BEST, BATCH_RANGE, MANY_RELEVANT

# Unit-space optima of the relevant numbers of problems.py's lr-schedule-Nd and -mixed (the batch size's
# on its log range).
OPTIMA = {**{name: centre for name, centre, _ in MANY_RELEVANT},
          "batch": math.log(BATCH_BEST / BATCH_RANGE[0]) / math.log(BATCH_RANGE[1] / BATCH_RANGE[0])}


def trace(problem: str, pop: int, seeds: int, mode: str = "asynchronous",
          interval: int | None = None) -> tuple[list[dict[str, Any]], list[float]]:
    log: list[dict[str, Any]] = []
    last: dict[str, list[float]] = {}
    suggest, choose = pb2mod.suggest, winmod.choose

    def fit(prep: Any, layout: Any, settings: Any, rng: Any) -> Any:
        w = choose(prep, layout, settings, rng)
        last["ls"] = np.exp(w.fitted.theta[layout.lengthscales]).tolist()
        return w

    def traced(space: Any, rows: Sequence[Any], pending: Sequence[Any], t: float, c: float, settings: Any,
               rng: Any, remaining: int | None = None, center: Mapping[str, Any] | None = None) -> Any:
        last.pop("ls", None)
        ch = suggest(space, rows, pending, t, c, settings, rng, remaining=remaining, center=center)
        if settings.kappa == 0.0:  # a retune
            return ch
        rec: dict[str, Any] = {"t": t, "fallback": ch.hyperparameters is None, "reason": ch.reason,
                               "ls": last.get("ls"), "tr": settings.trust_region,
                               "names": [p.name for p in space.numeric]}
        if ch.hyperparameters is not None and center is not None:
            rec["uc"] = unit_columns(space, [center])[0][0].tolist()
            rec["un"] = unit_columns(space, [ch.hyperparameters])[0][0].tolist()
            rec["cat_changed"] = [center[p.name] != ch.hyperparameters[p.name] for p in space.categorical]
        log.append(rec)
        return ch

    pb2mod.suggest = traced
    winmod.choose = fit
    try:
        finals = [sq.simulate(sq.instance(problem, s, interval), "pb2-liar-pessimistic", pop, s, mode).final
                  for s in range(seeds)]
    finally:
        pb2mod.suggest, winmod.choose = suggest, choose
    return log, finals


def report(problem: str, pop: int, log: list[dict[str, Any]], finals: list[float],
           iterations: int | None = None) -> list[str]:
    n, fb = len(log), sum(r["fallback"] for r in log)
    out = [f"{problem} pop {pop}: {len(finals)} seeds, median final {np.median(finals):.2f}; {n} explore decisions, "
           f"{fb} fell back to perturb ({fb / max(n, 1):.0%})"]
    if iterations:  # how often a member restarts from a donor, per unit of training
        out.append(f"  explore steps (exploits) per member and 10 iterations: "
                   f"{10 * n / (len(finals) * pop * iterations):.2f}")
    why = collections.Counter(r["reason"].split("(")[0] for r in log if r["fallback"])
    out.append(f"  fallback reasons: {why.most_common(3)}")
    ok = [r for r in log if not r["fallback"] and "un" in r]
    if not ok:
        return out
    names, tr = ok[0]["names"], ok[0]["tr"]
    uc, un = np.array([r["uc"] for r in ok]), np.array([r["un"] for r in ok])
    lo, hi = np.maximum(uc - tr, 0.0), np.minimum(uc + tr, 1.0)
    bound = (np.abs(un - lo) < 1e-3) | (np.abs(un - hi) < 1e-3)
    wall = (un < 1e-3) | (un > 1.0 - 1e-3)
    ls = np.array([r["ls"] for r in ok if r["ls"] is not None])
    out.append("| hp | median step | at TR edge | at a wall | fitted length scale median [q25] |")
    out.append("|---|---|---|---|---|")
    for j, name in enumerate(names):
        lj = f"{np.median(ls[:, j + 1]):.2f} [{np.quantile(ls[:, j + 1], 0.25):.2f}]" if len(ls) else "-"
        out.append(f"| {name} | {np.median(np.abs(un[:, j] - uc[:, j])):.3f} | {np.mean(bound[:, j] & ~wall[:, j]):.0%} "
                   f"| {np.mean(wall[:, j]):.0%} | {lj} |")
    out.append(f"  choices with every number at a bound: {np.mean(bound.all(axis=1)):.0%}")
    early = [r for r in ok if r["t"] < 40]
    late = [r for r in ok if r["t"] >= 60]
    moves = {name: (np.median([abs(r["uc"][j] - OPTIMA[name]) for r in early]) if early else float("nan"),
                    np.median([abs(r["un"][j] - OPTIMA[name]) for r in late]) if late else float("nan"))
             for j, name in enumerate(names) if name in OPTIMA}
    if moves:
        out.append("  |number - optimum|, donors early -> choices late: "
                   + ", ".join(f"{k} {a:.2f} -> {b:.2f}" for k, (a, b) in moves.items()))
    if ok[0]["cat_changed"]:
        out.append(f"  choices that changed the category: {np.mean([r['cat_changed'][0] for r in ok]):.0%}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("problem")
    ap.add_argument("--pop", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--pb2-settings", default="{}", help="Pb2Settings fields, JSON (as search_quality.py)")
    ap.add_argument("--mode", default="asynchronous", choices=("asynchronous", "synchronous"))
    ap.add_argument("--interval", type=int, default=None, help="iterations per segment (as search_quality.py)")
    a = ap.parse_args(argv)
    sq.PB2_FIELDS.update(json.loads(a.pb2_settings))
    log, finals = trace(a.problem, a.pop, a.seeds, a.mode, a.interval)
    iterations = sq.instance(a.problem, 0, a.interval).iterations
    print("\n".join(report(a.problem, a.pop, log, finals, iterations)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
