"""`pbt status | plot | export | replay`: the results of a run, local or in a cluster.

Each command takes a TARGET: an existing directory is a local run folder (`pbt run`'s output), anything
else is the name of a PopulationTraining read from the cluster kubectl would use (`-n` for the
namespace). Reading goes through `results_source.load_run`, so every command works on both.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .core.display import counted, fmt_hp, fmt_value
from .results_source import (
    ReplayStep,
    RunData,
    SourceError,
    download_checkpoint,
    load_cluster,
    load_run,
    read_export,
    replay,
    save_manifest,
)
from .spec import load_manifest

# The results commands' tables have room for more than `pbt run`'s progress table (fmt_hp's 48).
HP_WIDTH = 80


def remember_manifest(run_dir: Path, manifest: str | None, doc: Mapping[str, Any], name: str,
                      overrides: Mapping[str, Any]) -> None:
    """Called by `pbt run` (local/session.py): the results commands then know the exact spec (and worker)
    of a run folder. `manifest` is None for a document given as a dict (`pbt_operator.run`)."""
    if not run_dir.is_dir():
        return
    eff = copy.deepcopy(dict(doc))
    eff.setdefault("metadata", {})["name"] = name
    eff.setdefault("spec", {}).update(overrides)
    try:
        save_manifest(run_dir, manifest, eff)
    except OSError as e:  # never fail a finished run over a convenience file
        print(f"pbt run: could not write {run_dir}/manifest.json: {e}", file=sys.stderr)


def _load(args: argparse.Namespace) -> RunData:
    return load_run(args.target, getattr(args, "namespace", None), getattr(args, "manifest", None))


# -- status ------------------------------------------------------------------------------------------
def status_lines(run: RunData) -> list[str]:
    spec, eng = run.spec, run.engine
    out = [f"{spec.name}  ({run.source})  phase: {run.phase or '-'}  {spec.mode}, "
           f"{spec.exploit.strategy} + {spec.explore.strategy}",
           f"segments: {eng.done_count} done / {spec.population * spec.budget.segments} budgeted, "
           f"{counted(eng.failure_count, 'failed attempt')}; metric {spec.objective.metric} ({spec.objective.direction})"]
    if run.note:
        out.append(f"note: {run.note}")
    if run.spec_inferred:
        out.append("(manifest unknown: spec reconstructed from results.jsonl; pass --manifest for the real one)")
    for c in run.status.get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Succeeded", "Failed"):
            out.append(f"{c['type']}: {c.get('reason', '')}: {c.get('message', '')}")
    best = eng.best
    out.append("")
    has_phase = any(i.phase for i in run.members.values())
    head = f"{'member':>6} {'seg':>4} {'steps':>7} {'score':>10} {'parent':<9} "
    out.append(head + ("phase    " if has_phase else "") + "hyperparameters")
    members = sorted(set(range(spec.population)) | set(eng.latest) | set(run.members))
    for m in members:
        rec = eng.latest.get(m)
        mark = "*" if best is not None and rec is not None and best.member == m else " "
        if rec is None:
            row = f"{m:>5}{mark} {'-':>4} {'-':>7} {'-':>10} {'-':<9} "
            hp = ""
        else:
            parent = f"m{rec.suggestion.restore[0]}/s{rec.suggestion.restore[1]}" if rec.suggestion.restore else "-"
            row = f"{m:>5}{mark} {rec.segment:>4} {rec.steps_end:>7} {fmt_value(rec.score):>10} {parent:<9} "
            hp = fmt_hp(rec.suggestion.hyperparameters, HP_WIDTH)
        if has_phase:
            info = run.members.get(m)
            row += f"{(info.phase if info and info.phase else '-'):<8} "
        out.append(row + hp)
    out.append("")
    if best is None:
        out.append("best: none yet (no finished segment)")
        return out
    out.append(f"best: member {best.member} segment {best.segment} {spec.objective.metric}={fmt_value(best.score)} "
               f"at step {best.steps_end}")
    out.append(f"checkpoint: {run.checkpoint(best.ref)}")
    out.append("best lineage (the schedule that produced it):")
    out.append(f"  {'steps':>15}  {'member':>6} {'seg':>4} {'kind':<8} {'score':>10}  hyperparameters")
    for s in run.schedule(best.ref):
        rng = f"{s['steps_start']}-{s['steps_end']}"
        out.append(f"  {rng:>15}  {'m' + str(s['member']):>6} {s['segment']:>4} {s['kind']:<8} "
                   f"{fmt_value(s['score']):>10}  {fmt_hp(s['hyperparameters'], HP_WIDTH)}")
    return out


def cmd_status(args: argparse.Namespace) -> int:
    run = _load(args)
    if args.json:
        doc = run.export_document()
        doc["phase"] = run.phase
        doc["members"] = [
            {"member": m, "segment": r.segment, "steps": r.steps_end, "score": r.score,
             "parent": list(r.suggestion.restore) if r.suggestion.restore else None,
             "hyperparameters": dict(r.suggestion.hyperparameters)}
            for m, r in sorted(run.engine.latest.items())]
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join(status_lines(run)))
    return 0


# -- plot --------------------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> int:
    from .local.plots import html, plot_data, plot_run, write_json

    run = _load(args)
    if not run.done:
        print(f"pbt plot: {run.source} has no finished segment yet", file=sys.stderr)
        return 2
    if args.out:
        png = Path(args.out)
    elif Path(args.target).is_dir():
        png = Path(args.target) / "plot.png"
    else:
        png = Path(f"{run.spec.name}-plot.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    data = plot_data(run.spec, run.engine)
    plot_run(run.spec, run.engine, png, data)
    sidecar = write_json(data, png.with_suffix(".json"))
    print(f"wrote {png} (series: {sidecar})")
    if args.html is not None:
        page = Path(args.html) if args.html else png.with_suffix(".html")
        page.write_text(html(data))
        print(f"wrote {page}")
    return 0


# -- export ------------------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    run = _load(args)
    doc = run.export_document()
    if run.note:
        print(f"pbt export: note: {run.note}", file=sys.stderr)
    if doc.get("best", True) is None:
        print(f"pbt export: {run.source} has no finished segment yet", file=sys.stderr)
        return 2
    if args.format == "yaml":
        import yaml

        text = yaml.safe_dump(doc, sort_keys=False)
    else:
        text = json.dumps(doc, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    rc = 0
    if args.download:
        dest = Path(args.download)
        try:
            keys = download_checkpoint(doc["checkpoint"], dest)
        except SourceError as e:
            print(f"pbt export: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # storage errors (credentials, network) name the URI
            print(f"pbt export: downloading {doc['checkpoint']}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        print(f"downloaded {doc['checkpoint']} -> {dest} ({counted(len(keys), 'object')}: {', '.join(keys[:5])}"
              f"{'...' if len(keys) > 5 else ''})", file=sys.stderr)
    if args.tensorboard:
        rc = max(rc, write_tensorboard(run, Path(args.tensorboard)))
    return rc


def write_tensorboard(run: RunData, out: Path) -> int:
    """Scalars per member (score and numeric metrics and hyperparameters by step), one run folder each."""
    writer_cls: Any = None
    try:
        from tensorboardX import SummaryWriter

        writer_cls = SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter as TorchWriter

            writer_cls = TorchWriter
        except ImportError:
            writer_cls = None
    if writer_cls is None:
        print("pbt export: --tensorboard skipped: it needs `tensorboardX` or `tensorboard` "
              "(pip install tensorboardX); nothing else was affected", file=sys.stderr)
        return 0
    metric = run.spec.objective.metric
    for m in sorted({r.member for r in run.done}):
        w = writer_cls(str(out / f"member-{m:03d}"))
        for r in sorted((r for r in run.done if r.member == m), key=lambda r: r.segment):
            w.add_scalar(metric, float(r.score or 0.0), r.steps_end)
            for k, v in r.metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != metric:
                    w.add_scalar(f"metrics/{k}", float(v), r.steps_end)
            for k, v in r.suggestion.hyperparameters.items():
                if isinstance(v, (int, float)):
                    w.add_scalar(f"hyperparameters/{k}", float(v), r.suggestion.steps_start)
        w.close()
    print(f"wrote TensorBoard scalars to {out} (tensorboard --logdir {out})", file=sys.stderr)
    return 0


# -- replay ------------------------------------------------------------------------------------------
def cmd_replay(args: argparse.Namespace) -> int:
    target = Path(args.target)
    if target.is_file():
        doc = read_export(target)
        manifest = args.manifest or doc.get("manifest")
        if manifest:
            spec = load_manifest(manifest, name=doc.get("training"))
        elif str(doc.get("source", "")).startswith("cluster:"):
            ns, _, name = str(doc["source"])[len("cluster:"):].partition("/")
            spec = load_cluster(name, ns).spec
        else:
            print("pbt replay: the export names no manifest: pass --manifest", file=sys.stderr)
            return 2
        schedule, label = doc["schedule"], str(target)
    else:
        run = _load(args)
        if run.spec_inferred:
            print(f"pbt replay: {args.target} does not say which manifest it ran: pass --manifest", file=sys.stderr)
            return 2
        spec, schedule, label = run.spec, run.schedule(), run.source
    if not schedule:
        print("pbt replay: the schedule is empty (no finished segment)", file=sys.stderr)
        return 2
    function = spec.worker.function if spec.worker.executor == "inline" else None
    if isinstance(function, str) and function.startswith("__main__:"):
        # pbt_operator.run(function=...) from a script or a notebook: the function lived in that process
        print(f"pbt replay: the run's spec.worker.function {function} was a function of the Python process that "
              f"ran it (pbt_operator.run(..., function=...)), which replay cannot import: pass --manifest with "
              f"a spec.worker.command, or with a spec.worker.function MODULE:NAME that Python can import",
              file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path("pbt-runs") / f"{spec.name}-replay"
    if out.exists() and any(out.iterdir()) and not args.fresh:
        print(f"pbt replay: {out} is not empty: pass --fresh to replace it, or --out", file=sys.stderr)
        return 2
    if out.exists() and args.fresh:
        import shutil

        shutil.rmtree(out)
    metric = spec.objective.metric
    print(f"replaying {counted(len(schedule), 'segment')} of {label} with {spec.worker.executor} worker into {out}")
    print(f"{'step':>4} {'steps':>13} {'member':>6} {'seg':>4} {'population':>11} {'replay':>11} {'diff':>10}"
          f"  hyperparameters")

    def show(st: ReplayStep) -> None:
        diff = (st.score - st.population_score) if st.score is not None and st.population_score is not None else None
        print(f"{st.index:>4} {f'{st.steps_start}-{st.steps_end}':>13} {'m' + str(st.member):>6} {st.segment:>4} "
              f"{fmt_value(st.population_score):>11} {fmt_value(st.score) if st.error is None else 'FAILED':>11} "
              f"{fmt_value(diff) if diff is not None else '-':>10}  {fmt_hp(st.hyperparameters, 60)}", flush=True)
        if st.error:
            print(f"     error: {st.error}", flush=True)

    steps = replay(spec, schedule, out, storage_uri=args.storage, on_step=show)
    last = steps[-1]
    if last.error is not None:
        print(f"replay failed at step {last.index}: {last.error}", file=sys.stderr)
        return 1
    pop = schedule[-1].get("score")
    diff = last.score - pop if last.score is not None and pop is not None else None
    print(f"replayed {metric}: {fmt_value(last.score)}  population's: {fmt_value(pop)}  "
          f"difference: {fmt_value(diff) if diff is not None else '-'}  ({out}/replay.json)")
    if args.tolerance is not None and (diff is None or abs(diff) > args.tolerance):
        print(f"pbt replay: the replay differs from the population by more than {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0


def _safe(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except SourceError as e:
            print(f"pbt {args.cmd}: {e}", file=sys.stderr)
            return 2

    return run


def add_results_commands(sub: Any) -> None:
    def target(p: argparse.ArgumentParser) -> None:
        p.add_argument("target", help="a run folder (pbt run's output), or a PopulationTraining name in the cluster")
        p.add_argument("-n", "--namespace", help="the training's namespace (default: the kubeconfig context's)")
        p.add_argument("--manifest", help="the manifest the run used (local folders remember it since pbt run "
                                          "writes manifest.json)")

    s = sub.add_parser("status", help="members, best model and its lineage (local run folder or cluster)")
    target(s)
    s.add_argument("--json", action="store_true", help="machine-readable: the export document plus members")
    s.set_defaults(fn=_safe(cmd_status))
    p = sub.add_parser("plot", help="PNG (and --html) of scores per member and the best schedule")
    target(p)
    p.add_argument("--out", help="PNG path (default: RUN_DIR/plot.png, or ./NAME-plot.png for a cluster run); "
                                 "the series go next to it as .json")
    p.add_argument("--html", nargs="?", const="", default=None, metavar="PATH",
                   help="also write a self-contained interactive HTML page (default: the PNG path with .html)")
    p.set_defaults(fn=_safe(cmd_plot))
    e = sub.add_parser("export", help="the best checkpoint URI and its hyperparameter schedule")
    target(e)
    e.add_argument("--format", choices=("json", "yaml"), default="json")
    e.add_argument("--output", "-o", help="write to this file instead of stdout")
    e.add_argument("--download", metavar="DIR", help="copy the best checkpoint here (file:// or s3://; "
                                                     "credentials from AWS_* variables)")
    e.add_argument("--tensorboard", metavar="DIR", help="write per-member scalars as TensorBoard event files "
                                                        "(needs tensorboardX or tensorboard)")
    e.set_defaults(fn=_safe(cmd_export))
    r = sub.add_parser("replay", help="retrain one model from scratch along the best schedule and compare")
    r.add_argument("target", help="a run folder, a file written by `pbt export`, or a training name in the cluster")
    r.add_argument("-n", "--namespace")
    r.add_argument("--manifest", help="the manifest whose worker runs the replay (default: the run's own)")
    r.add_argument("--out", help="replay folder (default ./pbt-runs/NAME-replay)")
    r.add_argument("--fresh", action="store_true", help="delete the replay folder first")
    r.add_argument("--storage", help="checkpoint storage URI for the replay (default: file://OUT/checkpoints)")
    r.add_argument("--tolerance", type=float, help="exit 1 when |replayed - population| exceeds this")
    r.set_defaults(fn=_safe(cmd_replay))
