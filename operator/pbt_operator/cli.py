"""The `pbt` command line."""

from __future__ import annotations

import os

# PB2's linear algebra is many small problems: BLAS threads only add contention (seconds instead of
# milliseconds per decision on a busy 2-core machine). Must be set before numpy is first imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .results_cli import add_results_commands  # status, plot, export, replay
from .spec import SpecError, TrainingSpec


def _load(path: str, name: str | None = None) -> TrainingSpec:
    from .spec import load_manifest

    return load_manifest(path, name=name)


def cmd_run(args: argparse.Namespace) -> int:
    """`pbt run`: the flags into local/session.execute (the code `pbt_operator.run` runs), its result printed."""
    from .core.display import counted, fmt_hp, fmt_value
    from .local.runner import RunError
    from .local.session import execute

    # SIGTERM (timeout, docker stop, systemd) stops the run like Ctrl-C: workers run in their own
    # sessions, so dying without stopping them would leave them training as orphans.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    # And SIGINT always means Ctrl-C: a shell starts background jobs (`pbt run ... &` in a script, a
    # CI step) with SIGINT ignored, and Python keeps an inherited "ignore", so `kill -INT` would do
    # nothing at all.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    # The command that resumes this run as it was started: --name picks the folder, --seed is part of
    # the run's fingerprint, --parallelism keeps its slots.
    again = [args.manifest, "--resume"]
    for flag, value in (("--out", args.out), ("--name", args.name), ("--seed", args.seed),
                        ("--parallelism", args.parallelism), ("--gpus", args.gpus),
                        ("--gpus-per-member", args.gpus_per_member)):
        if value is not None:
            again += [flag, str(value)]
    resume_hint = f"\ninterrupted: workers stopped; continue with: pbt run {shlex.join(again)}"
    try:
        result = execute(args.manifest, out=args.out, resume=args.resume, fresh=args.fresh, seed=args.seed,
                         parallelism=args.parallelism, name=args.name, progress=not args.quiet, gpus=args.gpus,
                         gpus_per_member=args.gpus_per_member, plot=not args.no_plot)
    except RunError as e:
        print(f"pbt run: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C after the loop (the workers retiring, the last checkpoints deleted, best.json and the
        # plot written): every result is on disk, and --resume writes what is missing.
        print(resume_hint, file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
    summary = result.summary
    assert summary is not None
    run_dir = Path(args.out) if args.out else Path("pbt-runs") / result.name
    eng = summary.engine
    if summary.retried:
        print(f"pbt run: resumed a failed training: the segment that failed it got another round of "
              f"attempts (it had failed: {summary.retried})", file=sys.stderr)
    if summary.interrupted:
        print(resume_hint, file=sys.stderr)
        return 130
    st = eng.state()
    print(f"\n{result.name}: {_segments_line(st.done_segments, summary.ran, summary.wall_seconds, summary.finished, summary.failed)}")
    if eng.failed:
        print(f"FAILED: {eng.failed}")
        if summary.failure_log is not None:
            print(f"        log of the last failed attempt: {summary.failure_log}")
    elif eng.finished:
        print(f"finished early: {eng.finished}")
    if st.best:
        b = st.best
        print(f"best: member {b.member} segment {b.segment} {result.metric}={fmt_value(b.score)}")
        print(f"      {fmt_hp(b.suggestion.hyperparameters, 200)}")
        print("schedule (best lineage):")
        for s in eng.schedule():
            print(f"  steps {s['steps_start']:>6}-{s['steps_end']:<6} m{s['member']:<3} s{s['segment']:<4} "
                  f"{fmt_value(s['score']):>10}  {fmt_hp(s['hyperparameters'], 80)}")
    if summary.collected_at_end:
        print(f"deleted {counted(summary.collected_at_end, 'old checkpoint')} that no segment was left to delete")
    if summary.left_at_end:
        print(f"could not delete {counted(len(summary.left_at_end), 'old checkpoint')}, e.g. {summary.left_at_end[0]} "
              "(the warnings above say why); they take space only", file=sys.stderr)
    print(f"outputs: {run_dir}/results.jsonl lineage.json best.json" + ("" if args.no_plot else " plot.png"))
    return 1 if eng.failed else 0


def _segments_line(done: int, ran: int, seconds: float, finished: int | None = None, failed: int = 0) -> str:
    """'64 segments in 5.0s (12.8 segments/s)'; a resume rates only the segments it finished itself (a
    finished run resumed runs none: it said '64 segments in 0.0s (57371 segments/s)'). `ran` counts the
    attempts started, `finished` and `failed` those that finished and failed (failed attempts are not
    segments: a run with 9 said '32 segments, 41 of them in this run')."""
    from .core.display import counted

    if ran == 0:
        return f"{counted(done, 'segment')}; nothing was left to run"
    here = ran if finished is None else finished
    rate = f"{here / max(seconds, 1e-9):.1f} segments/s"
    tail = f"; {counted(failed, 'attempt')} failed (results.jsonl has each error)" if failed else ""
    if here == done:
        return f"{counted(done, 'segment')} in {seconds:.1f}s ({rate}){tail}"
    return f"{counted(done, 'segment')}, {here} of them in this run, in {seconds:.1f}s ({rate}){tail}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_validate(args: argparse.Namespace) -> int:
    from .spec import describe_search

    spec = _load(args.manifest)
    print(f"{args.manifest}: valid PopulationTraining {spec.name!r} (population {spec.population}, "
          f"{len(spec.space)} hyperparameters)")
    print(f"  search: {describe_search(spec)}")
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    """Run the operator: kopf with our handlers, JSON logs, a health endpoint."""
    import asyncio
    import logging

    import kopf

    from .kube import handlers  # noqa: F401  (registers the handlers)

    if args.log_format == "json":
        kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON)
    else:
        kopf.configure(verbose=args.verbose)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    namespaces = [n for n in (args.namespace or []) if n]
    asyncio.run(kopf.operator(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=not args.peering,
        peering_name=args.peering or None,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    ))
    return 0


def cmd_crds(args: argparse.Namespace) -> int:
    from .kube.crds import render

    files = render()
    if args.write:
        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        for fname, text in files.items():
            (out / fname).write_text(text)
            print(f"wrote {out / fname}")
    else:
        print("---\n".join(files.values()), end="")
    return 0


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: overrides get the same bounds as the spec fields they replace."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer (got {text!r})") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} (got {v})")
        return v

    return parse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pbt", description="Population Based Training, locally or on Kubernetes")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train a population on this machine")
    r.add_argument("manifest")
    r.add_argument("--out", help="run folder (default ./pbt-runs/NAME)")
    r.add_argument("--resume", action="store_true", help="continue a killed run without repeating segments")
    r.add_argument("--fresh", action="store_true", help="delete the run folder first")
    r.add_argument("--seed", type=_int_at_least(0), help="override spec.seed")
    r.add_argument("--parallelism", type=_int_at_least(1), help="override spec.parallelism")
    r.add_argument("--name", help="override metadata.name")
    r.add_argument("--gpus", metavar="all|none|LIST",
                   help="the GPUs to hand out, one slot per running member (default all: CUDA_VISIBLE_DEVICES "
                        "if set, else nvidia-smi; LIST as CUDA_VISIBLE_DEVICES writes it, e.g. 0,1); "
                        "given, it assigns 1 per member where the template requests none")
    r.add_argument("--gpus-per-member", type=_int_at_least(0), metavar="N",
                   help="GPUs per running member (default: the template's nvidia.com/gpu request; 0: do not assign)")
    r.add_argument("--quiet", action="store_true", help="no progress display")
    r.add_argument("--no-plot", action="store_true")
    r.set_defaults(fn=cmd_run)
    v = sub.add_parser("validate", help="check a manifest without running it; print the search it asks for, defaults filled in")
    v.add_argument("manifest")
    v.set_defaults(fn=cmd_validate)
    add_results_commands(sub)
    o = sub.add_parser("operator", help="run the Kubernetes operator")
    o.add_argument("--namespace", "-n", action="append", help="watch only these namespaces (default: all)")
    o.add_argument("--peering", default="", help="kopf peering name (for several replicas)")
    o.add_argument("--health-port", type=int, default=8080)
    o.add_argument("--log-format", choices=("json", "plain"), default="json")
    o.add_argument("--verbose", action="store_true")
    o.set_defaults(fn=cmd_operator)
    c = sub.add_parser("crds", help="print (or --write DIR) the CustomResourceDefinitions")
    c.add_argument("--write", metavar="DIR")
    c.set_defaults(fn=cmd_crds)
    args = p.parse_args(argv)
    try:
        return int(args.fn(args))
    except SpecError as e:
        print(f"pbt {args.cmd}: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"pbt {args.cmd}: missing dependency ({e}); install with: pip install 'pbt-operator[local]'",
              file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `pbt status RUN | head`: the reader left. No traceback for that, and none when Python flushes
        # stdout at exit either (https://docs.python.org/3/library/signal.html#note-on-sigpipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a command killed by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
