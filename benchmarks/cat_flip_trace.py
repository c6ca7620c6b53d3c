"""Where PB2 loses on `cat-flip`: the best final lineage's segments against the best configuration.

    .venv/bin/python benchmarks/cat_flip_trace.py [--seeds 60] [--population 4] [--pb2-settings JSON]

Runs PB2 (`liar-pessimistic`, the defaults) on the simulated cluster of `search_quality.py` and, for
every seed, follows the member with the best final noise-free score back through the checkpoints it
restored from (its lineage). Each of the lineage's segments is scored by its noise-free progress per
iteration as a fraction of the best configuration's (1 = adam at its optimum before the flip, sgd at
its optimum after), and the shortfall, in points of the 100 the best schedule earns, is split by half
(before / after iteration 50), by how the segment's configuration was chosen (the initial draw, a
PB2 explore step at an exploit, its perturb fallback, a retune of a member that kept its weights, or
kept unchanged) and by whether it ran the best optimizer of its half. Also: when the lineage and the
population first ran sgd after the flip, and when the population first ran sgd within half a decade
of its optimum; where PB2's explore steps put the learning rate (decades from the chosen optimizer's
optimum) and how often they switch the optimizer (benchmarks/README.md, "Tenth round").
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from dataclasses import replace
from typing import Any

import numpy as np
import search_quality as sq  # sets up the import paths and the BLAS threads
from pbt_operator.core.engine import Engine
from pbt_operator.core.types import Record
from problems import CAT_FLIP, CAT_ITERS, cat_optimizers, lr_progress


def run(seed: int, population: int, fields: dict[str, Any]) -> tuple[Engine, dict[Any, float]]:
    """One run, as `search_quality.simulate`, keeping the engine and every checkpoint's state."""
    problem = CAT_FLIP.for_seed(seed)
    spec = sq.parse_manifest(sq.manifest(problem.hyperparameters, "pb2-liar-pessimistic", population, seed,
                                         problem.segments, problem.steps, problem.factors))
    if fields:
        spec = replace(spec, explore=replace(spec.explore, pb2=replace(spec.explore.pb2, **fields)))
    eng, states, _ = sq.drive(problem, spec, seed)
    return eng, states


def efficiency(opts: dict[str, tuple[float, float, float]], hp: Any, t0: int, steps: int) -> float:
    """Noise-free progress per iteration of `hp` over [t0, t0 + steps), as a fraction of the best's (1)."""
    opt_lr, early, late = opts[str(hp["optimizer"])]
    log_lr = math.log10(float(hp["lr"]))
    return sum(lr_progress(log_lr, opt_lr, early if t < CAT_ITERS // 2 else late) for t in range(t0, t0 + steps)) / steps


def how(rec: Record) -> str:
    s = rec.suggestion
    if s.kind == "start":
        return "start"
    if s.kind == "exploit":
        return "fallback" if "pb2 fallback" in s.reason else "pb2"
    return "retune" if "retune:" in s.reason else "keep"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=60)
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--pb2-settings", default="{}", help="Pb2Settings fields, JSON")
    args = ap.parse_args()
    fields = json.loads(args.pb2_settings)
    seeds = range(args.seeds)
    loss: dict[tuple[str, ...], float] = defaultdict(float)
    count: dict[tuple[str, ...], int] = defaultdict(int)
    halves: dict[str, list[float]] = defaultdict(list)
    eff_by_segment: dict[int, list[float]] = defaultdict(list)
    firsts: dict[str, list[float]] = defaultdict(list)
    offsets: dict[tuple[str, str], list[float]] = defaultdict(list)
    switches: dict[str, list[int]] = defaultdict(list)
    for seed in seeds:
        opts = cat_optimizers(seed)
        eng, states = run(seed, args.population, fields)

        best = max(eng.latest.values(), key=lambda r: float(states[r.ref]))
        lineage = []
        ref: tuple[int, int] | None = best.ref
        while ref is not None:
            rec = eng.records[ref]
            lineage.append(rec)
            ref = rec.suggestion.restore
        lineage.reverse()
        per_half = {"first": 0.0, "second": 0.0}
        for rec in lineage:
            s = rec.suggestion
            half = "first" if s.steps_start < CAT_ITERS // 2 else "second"
            e = efficiency(opts, s.hyperparameters, s.steps_start, s.steps_budget)
            lost = (1.0 - e) * s.steps_budget
            per_half[half] += lost
            right = s.hyperparameters["optimizer"] == ("adam" if half == "first" else "sgd")
            key = (half, how(rec), "best optimizer" if right else "other optimizer")
            loss[key] += lost / len(seeds)
            count[key] += 1
            eff_by_segment[s.steps_start // s.steps_budget].append(e)
        for half, v in per_half.items():
            halves[half].append(v)
        after = [r for r in lineage if r.suggestion.steps_start >= CAT_ITERS // 2]
        sgd = [r.suggestion.steps_start for r in after if r.suggestion.hyperparameters["optimizer"] == "sgd"]
        firsts["lineage's first sgd segment after the flip"].append(sgd[0] if sgd else CAT_ITERS)
        after_sgd = [r.suggestion for r in eng.records.values() if r.suggestion.steps_start >= CAT_ITERS // 2
                and r.suggestion.hyperparameters["optimizer"] == "sgd"]
        firsts["population's first sgd segment after the flip"].append(min((s.steps_start for s in after_sgd), default=CAT_ITERS))
        good = [s.steps_start for s in after_sgd if abs(math.log10(float(s.hyperparameters["lr"])) - opts["sgd"][0]) < 0.5]
        firsts["population's first sgd within 0.5 decades of its optimum"].append(min(good, default=CAT_ITERS))
        for rec in eng.records.values():
            s = rec.suggestion
            if how(rec) != "pb2":
                continue
            half = "first" if s.steps_start < CAT_ITERS // 2 else "second"
            o = str(s.hyperparameters["optimizer"])
            offsets[(half, o)].append(math.log10(float(s.hyperparameters["lr"])) - opts[o][0])
            donor = eng.records.get(s.restore) if s.restore is not None else None
            switches[half].append(int(donor is not None and donor.suggestion.hyperparameters["optimizer"] != o))
    print(f"cat-flip, population {args.population}, seeds 0-{args.seeds - 1}, pb2 settings {fields}")
    for half in ("first", "second"):
        print(f"best lineage's shortfall, {half} half: median {statistics.median(halves[half]):.1f}, "
              f"mean {statistics.mean(halves[half]):.1f} points")
    print("best lineage's mean efficiency by segment: "
          + " ".join(f"{statistics.mean(eff_by_segment[i]):.2f}" for i in sorted(eff_by_segment)))
    print("| half | chosen by | optimizer | lineage segments | points lost per seed |")
    print("|---|---|---|---|---|")
    for k in sorted(loss):
        print(f"| {k[0]} | {k[1]} | {k[2]} | {count[k]} | {loss[k]:.2f} |")
    for name, its in firsts.items():
        q = np.percentile(its, [25, 50, 75])
        print(f"{name}: iteration median {q[1]:.0f} [{q[0]:.0f}, {q[2]:.0f}] (100: never)")
    for (half, o), offs in sorted(offsets.items()):
        a = np.abs(np.array(offs))
        print(f"PB2 explore steps, {half} half, {o}: {len(offs)}, lr - optimum median {statistics.median(offs):+.2f} "
              f"decades, within 0.25: {100 * np.mean(a < 0.25):.0f}%, within 0.5: {100 * np.mean(a < 0.5):.0f}%")
    for half, sw in switches.items():
        print(f"PB2 explore steps that switch the optimizer, {half} half: {100 * np.mean(sw):.0f}%")


if __name__ == "__main__":
    main()
