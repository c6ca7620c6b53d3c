"""Does the best schedule reproduce the best model? PBT on the digits example, then a replay.

For each seed: train examples/digits (population 8 by default) with `pbt run`'s LocalRunner, take the
best member's lineage (its hyperparameter schedule), and retrain one model from scratch along it with
`pbt replay`'s machinery (results_source.replay): each schedule entry becomes one segment with the
entry's hyperparameters, member index and step range, restoring the previous replay segment. The
digits worker seeds its minibatch sampler from (member, steps_start), so the replay sees the same
batches as the population did, and draws a member's first weights from a generator seeded with the
member index, so a replay should match to the last image; replays are still compared with a tolerance
(other workers need not be deterministic), and each schedule is replayed `--repeats` times to show the
replay-to-replay spread.

    .venv/bin/python benchmarks/replay_digits.py                    # 3 seeds, inline worker
    .venv/bin/python benchmarks/replay_digits.py --executor process # the manifest's command in warm workers, as `pbt run`
    .venv/bin/python benchmarks/replay_digits.py --plot docs/digits-plot.png   # also save seed 0's plot

Prints a table; never asserts.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "worker")]

from pbt_operator.local.plots import plot_run  # noqa: E402
from pbt_operator.local.runner import LocalRunner  # noqa: E402
from pbt_operator.results_source import replay  # noqa: E402
from pbt_operator.spec import Worker, load_manifest  # noqa: E402

MANIFEST = ROOT / "examples" / "digits" / "populationtraining.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--segments", type=int, default=None, help="override spec.budget.segments (default: manifest's)")
    ap.add_argument("--parallelism", type=int, default=2)
    ap.add_argument("--executor", choices=("inline", "process"), default="inline",
                    help="inline: train:segment in threads (fast); process: the manifest's command (warm workers)")
    ap.add_argument("--repeats", type=int, default=2, help="replays per schedule (their spread is the noise floor)")
    ap.add_argument("--tolerance", type=float, default=0.03, help="|replay - population| counted as reproduced")
    ap.add_argument("--plot", type=Path, help="save the first seed's run plot here (e.g. docs/digits-plot.png)")
    ap.add_argument("--out", type=Path, help="keep run folders here (default: a temporary folder)")
    args = ap.parse_args(argv)

    base = load_manifest(MANIFEST)
    budget = base.budget if args.segments is None else dataclasses.replace(base.budget, segments=args.segments)
    worker = base.worker
    if args.executor == "inline":
        worker = Worker(executor="inline", function="train:segment", env=base.worker.env, inline_pool="threads")
    out = args.out or Path(tempfile.mkdtemp(prefix="replay-digits-"))
    rows = []
    print(f"digits: population {args.population}, {budget.segments} segments x {base.segment.steps} steps, "
          f"parallelism {args.parallelism}, {args.executor} worker; "
          f"run folders in {out}", flush=True)
    for i, seed in enumerate(args.seeds):
        spec = dataclasses.replace(base, seed=seed, population=args.population, budget=budget,
                                   parallelism=args.parallelism, worker=worker)
        run_dir = out / f"seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        summary = LocalRunner(spec, run_dir, plot=False).run()
        t_pop = time.perf_counter() - t0
        eng = summary.engine
        if summary.interrupted:
            print("interrupted", flush=True)
            return 130
        if eng.best is None or eng.failed:
            print(f"seed {seed}: population run failed: {eng.failed}", flush=True)
            continue
        if i == 0 and args.plot is not None:
            args.plot.parent.mkdir(parents=True, exist_ok=True)
            plot_run(spec, eng, args.plot)
            print(f"wrote {args.plot}", flush=True)
        sched = eng.schedule()
        finals = [r.score for r in eng.latest.values() if r.score is not None]
        replays = []
        t1 = time.perf_counter()
        for k in range(args.repeats):
            steps = replay(spec, sched, run_dir / f"replay{k}")
            if steps[-1].error is not None:
                print(f"seed {seed}: replay {k} failed at step {steps[-1].index}: {steps[-1].error}", flush=True)
                break
            replays.append(float(steps[-1].score))  # type: ignore[arg-type]
        t_rep = (time.perf_counter() - t1) / max(1, len(replays))
        best = float(eng.best.score)  # type: ignore[arg-type]
        row = {"seed": seed, "best": best, "member": eng.best.member, "lineage": len(sched),
               "members_used": len({s["member"] for s in sched}), "median": statistics.median(finals),
               "replays": replays, "t_pop": t_pop, "t_rep": t_rep}
        rows.append(row)
        print(f"seed {seed}: best {best:.4f} (member {eng.best.member}), replays "
              f"{', '.join(f'{r:.4f}' for r in replays)}; {t_pop:.0f}s population, {t_rep:.0f}s per replay", flush=True)

    print()
    print(f"{'seed':>4} {'pop best':>9} {'pop median':>10} {'lineage':>8} {'replays':>17} {'mean diff':>10} "
          f"{'max |diff|':>10} {f'<= {args.tolerance:g}':>7} {'t_pop':>6} {'t_rep':>6}")
    diffs_all = []
    for r in rows:
        diffs = [x - r["best"] for x in r["replays"]]
        diffs_all += diffs
        worst = max((abs(d) for d in diffs), default=float("nan"))
        ok = "yes" if diffs and worst <= args.tolerance else "no"
        reps = " ".join(f"{x:.4f}" for x in r["replays"])
        lineage = f"{r['lineage']}/{r['members_used']}m"
        print(f"{r['seed']:>4} {r['best']:>9.4f} {r['median']:>10.4f} {lineage:>8} {reps:>17} "
              f"{statistics.mean(diffs) if diffs else float('nan'):>+10.4f} {worst:>10.4f} {ok:>7} "
              f"{r['t_pop']:>5.0f}s {r['t_rep']:>5.0f}s")
    if diffs_all:
        print(f"\nover {len(diffs_all)} replays: mean replay - population best = {statistics.mean(diffs_all):+.4f}, "
              f"max |diff| = {max(abs(d) for d in diffs_all):.4f} (tolerance {args.tolerance:g}; validation set "
              f"397 images, one image = 0.0025)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
