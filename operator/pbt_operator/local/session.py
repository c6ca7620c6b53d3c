"""A population trained on this machine, from Python: `pbt_operator.run(...)`, and the one implementation
behind `pbt run` too (cli.cmd_run parses its flags into `execute` and prints the `RunResult`).

`run` takes the manifest as a file or as a dict shaped like the YAML, and optionally a Python function
to train each segment instead of `spec.worker` (it runs in threads of this process, so a function defined
in a notebook cell or a test works: nothing imports it again). Everything else is what `pbt run` does: the
same run folder and outputs, `resume` / `fresh`, one run per folder, the same decisions for the same seed,
the storage check and the GPU slots. The result reads the run back the way `pbt status` / `pbt export`
do (results_source.RunData), and `RunResult.load_best()` reads the best checkpoint the way `seg.restore()`
reads one.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.display import counted
from ..core.types import Record
from ..results_source import RunData, load_local, read_records
from ..spec import SpecError, TrainingSpec, parse_manifest, read_manifest
from .runner import RunError, RunSummary, workers_storage

if TYPE_CHECKING:
    from ..core.engine import Engine

Manifest = str | Path | Mapping[str, Any]
SegmentFunction = Callable[[Any], Any]

_FUNCTION_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # what spec.worker.function accepts
_MODULE = re.compile(r"^[A-Za-z_][\w.]*$")


@dataclass
class RunResult:
    """A local run as it ended (or as its folder holds it, `RunResult.open`).

    `finished` is the engine's line when the training stopped early (a target reached, no progress),
    `failed` its line when it failed (with `failure_log`, the failed attempt's log); both None when every
    member used its budget. `best` is what `pbt export` prints: member, segment, score, steps,
    hyperparameters and checkpoint (its URI), or None when no segment finished; `schedule` is the best
    lineage's hyperparameter schedule; `records` holds every finished and failed segment attempt
    (`core.types.Record`, in the order they were told to the engine; `.to_dict()` gives the JSON form
    of results.jsonl)."""

    run_dir: Path
    name: str
    metric: str
    direction: str
    finished: str | None
    failed: str | None
    best: dict[str, Any] | None
    schedule: list[dict[str, Any]] = field(repr=False)
    records: list[Record] = field(repr=False)
    data: RunData = field(repr=False)  # the run as the results commands read it (results_source)
    interrupted: bool = False
    failure_log: Path | None = None
    summary: RunSummary | None = field(repr=False, default=None)  # this process's run (None: `open`)

    @property
    def ok(self) -> bool:
        """Ran to its end (its budget, or an early finish) without failing or being interrupted."""
        return self.failed is None and not self.interrupted and self.engine.done

    @property
    def spec(self) -> TrainingSpec:
        return self.data.spec

    @property
    def engine(self) -> Engine:
        return self.data.engine

    @classmethod
    def open(cls, run_dir: str | Path) -> RunResult:
        """A run folder's results (`pbt run`'s, or `pbt_operator.run`'s), read as `pbt status` reads it."""
        from ..results_source import SourceError

        try:
            data = load_local(Path(run_dir))
        except (SourceError, SpecError) as e:
            raise RunError(str(e)) from None
        return cls._from_data(data)

    @classmethod
    def _from_data(cls, data: RunData, summary: RunSummary | None = None) -> RunResult:
        eng = data.engine
        doc = data.export_document()
        run_dir = Path(data.source.partition(":")[2])
        finished, failed = eng.finished, eng.failed
        if summary is None and data.phase in ("Failed", "Succeeded"):
            # an opened folder: the engine rebuilt from results.jsonl knows the segments, not how the
            # training ended; best.json, written at its end and read by load_local, says that
            finished, failed = data.ended.get("finished") or finished, data.ended.get("failed") or failed
        best = None if doc.get("best", True) is None else {
            k: doc[k] for k in ("member", "segment", "score", "steps", "hyperparameters", "checkpoint")}
        return cls(
            run_dir=run_dir.resolve(), name=data.spec.name, metric=data.spec.objective.metric,
            direction=data.spec.objective.direction, finished=finished, failed=failed, best=best,
            schedule=list(doc.get("schedule") or []), records=list(data.records),
            # an opened folder: stopped before its end, and no run holds it now (`pbt status`'s phase)
            interrupted=summary.interrupted if summary is not None else data.phase == "Incomplete",
            failure_log=summary.failure_log if summary else _failure_log(data, run_dir, failed), data=data,
            summary=summary,
        )

    def load_best(self, map_location: Any = "cpu", *, weights_only: bool | None = None,
                  dest: str | Path | None = None) -> Any:
        """The object the best segment saved, read back as `seg.restore()` reads it: `seg.save(obj)`'s
        object (torch objects with `map_location` and `weights_only` as in `seg.restore`, numpy arrays,
        pickles, bytes), or the local path of what `seg.save_file` / `seg.save_dir` stored, fetched under
        `dest` (default: a new temporary folder). The manifest's spec.worker.env applies to the storage
        calls, as for `pbt run`'s own (an s3:// endpoint or credentials given only there)."""
        if self.best is None:
            raise RunError(f"{self.run_dir}: no segment finished, so there is no best checkpoint")
        return load_checkpoint(self.best["checkpoint"], self.spec, map_location=map_location,
                               weights_only=weights_only, dest=dest)


def _failure_log(data: RunData, run_dir: Path, failed: str | None) -> Path | None:
    """An opened folder's log of the attempt that failed the training (what the run's own result has)."""
    from .executors import segment_log
    from .runner import failed_attempt

    at = data.ended.get("failedAttempt")
    parts = [at.get(k) for k in ("member", "segment", "attempt")] if isinstance(at, Mapping) else []
    attempt = [p for p in parts if isinstance(p, int)]
    fatal = failed_attempt(failed, data.failures, attempt if len(attempt) == 3 else None)
    if fatal is None or not data.source.startswith("local:"):
        return None
    path = segment_log(run_dir / "logs", fatal.suggestion)
    return path.resolve() if path.exists() else None


def load_checkpoint(uri: str, spec: TrainingSpec, *, map_location: Any = "cpu", weights_only: bool | None = None,
                    dest: str | Path | None = None) -> Any:
    """The saved thing of the committed checkpoint at `uri`, through pbt_worker's storage and
    checkpoint reader (the path `Segment.restore` takes), with spec.worker.env over this environment."""
    from pbt_worker.checkpoint import CheckpointReader

    prefix = uri if uri.endswith("/") else uri + "/"

    def scratch() -> Path:
        if dest is not None:
            Path(dest).mkdir(parents=True, exist_ok=True)
            return Path(dest)
        return Path(tempfile.mkdtemp(prefix=f"pbt-{spec.name}-best-"))

    from pbt_worker.errors import CheckpointNotFoundError

    try:
        reader = CheckpointReader(workers_storage(prefix, spec.worker.env), prefix)
        return reader.value(scratch, map_location=map_location, weights_only=weights_only)
    except CheckpointNotFoundError as e:
        if not uri.startswith("mem://"):
            raise
        # mem:// lives in the memory of the process that ran the training: gone once it ended
        raise RunError(f"{e}: mem:// checkpoints live only in the Python process that ran the training "
                       "(and only while it runs); to load the best one later, use file:// or s3:// "
                       "spec.storage.uri (the default is file:// under the run folder)") from None


def run(manifest: Manifest, *, function: SegmentFunction | None = None, out: str | Path | None = None,
        resume: bool = False, fresh: bool = False, seed: int | None = None, parallelism: int | None = None,
        name: str | None = None, progress: bool = False, gpus: str | Sequence[str | int] | None = None,
        gpus_per_member: int | None = None, plot: bool = True) -> RunResult:
    """Train a population on this machine, as `pbt run MANIFEST` does, and return its results.

    - `manifest`: a YAML file's path, or a dict shaped like that file (apiVersion, kind, metadata, spec),
      parsed exactly as the file would be (the same checks and messages).
    - `function`: `fn(seg) -> score | dict | None`, the contract of an inline `spec.worker.function`,
      used instead of spec.worker (which may then be left out; its `env` and `workingDir` still apply).
      It runs in threads of this process (`spec.parallelism` at a time), so it may be defined in
      `__main__`, a notebook cell or a closure. For `resume`, a run is identified by the manifest, the
      seed and the function's module and qualified name: editing the function's body is not detected.
    - `out` (default ./pbt-runs/NAME), `resume`, `fresh`, `seed`, `parallelism`, `name`, `gpus`,
      `gpus_per_member`: as `pbt run`'s flags. `progress`: the live member table on stderr. `plot`:
      write plot.png (as `pbt run` does unless --no-plot).

    Raises `RunError` for a manifest or setting that cannot run (its message names the field, as `pbt run`
    prints it; `.problems` lists them one per line). Ctrl-C stops the workers (a running function
    finishes its segment in its thread) and raises KeyboardInterrupt; `resume=True` continues the run.
    A run that fails (a segment used up its retries) returns, with `failed` saying why.
    """
    try:
        result = execute(manifest, function=function, out=out, resume=resume, fresh=fresh, seed=seed,
                         parallelism=parallelism, name=name, progress=progress, gpus=gpus,
                         gpus_per_member=gpus_per_member, plot=plot, note=_python_note)
    except RunError as e:  # the runner words its messages for `pbt run`: here they name run()'s arguments
        def say(text: str) -> str:
            text = python_terms(text)
            if function is not None:  # the function's module and name are in the fingerprint too
                text = text.replace("the manifest (or seed) changed",
                                    f"the manifest, seed or function ({_function_id(function)}) changed")
            return text

        raise RunError(say(str(e)), [say(p) for p in e.problems]) from None
    if result.interrupted:
        raise KeyboardInterrupt
    return result


def execute(manifest: Manifest, *, function: SegmentFunction | None = None, out: str | Path | None = None,
            resume: bool = False, fresh: bool = False, seed: int | None = None, parallelism: int | None = None,
            name: str | None = None, progress: bool = False, gpus: str | Sequence[str | int] | None = None,
            gpus_per_member: int | None = None, plot: bool = True,
            note: Callable[[str], None] | None = None) -> RunResult:
    """`run` without turning an interrupted run into KeyboardInterrupt (`result.interrupted`): `pbt run`
    prints how to resume it instead. A KeyboardInterrupt outside the training loop still propagates."""
    from ..results_cli import remember_manifest
    from .progress import Progress
    from .runner import LocalRunner, run_fingerprints, wait_for_interrupted

    if resume and fresh:  # --fresh deletes the folder that --resume was to continue: never both
        raise RunError("--resume and --fresh exclude each other: --resume continues the run in the folder, "
                       "--fresh deletes it first")
    _check_int("seed", seed, 0)
    _check_int("parallelism", parallelism, 1)
    _check_int("gpus_per_member", gpus_per_member, 0)
    gpus = _gpus_arg(gpus)
    if out is not None and not isinstance(out, (str, Path)):
        raise RunError(f"out: must be a folder's path (got {type(out).__name__})")
    if function is not None and not callable(function):
        raise RunError(f"function: must be a callable fn(seg) (got {type(function).__name__})")
    doc, path, base_dir = _document(manifest)
    effective = _with_function(doc, function, _function_ref(function)) if function is not None else doc
    worker = (doc.get("spec") or {}).get("worker") if isinstance(doc.get("spec"), Mapping) else None
    if function is not None and isinstance(worker, Mapping) and worker.get("pool") == "processes":
        # once here: _with_function runs twice (the manifest, the fingerprint) and said it twice
        print("pbt_operator.run: spec.worker.pool: processes ignored: a Python function runs in threads",
              file=sys.stderr)
    try:
        spec = parse_manifest(effective, base_dir=base_dir, name=name, name_field="--name")
    except SpecError as e:
        raise RunError(str(e), e.problems) from None
    overrides: dict[str, Any] = {}
    if seed is not None:
        overrides["seed"] = seed
    if parallelism is not None:
        overrides["parallelism"] = parallelism
    if overrides:
        spec = dataclasses.replace(spec, **overrides)
    run_dir = Path(out) if out is not None else Path("pbt-runs") / spec.name
    if fresh:  # a segment of an interrupted run, still running here, would save into the new run's folder
        wait_for_interrupted(run_dir, note or (lambda text: print(f"pbt run: {text}", file=sys.stderr)))
    if fresh and run_dir.exists():
        from .runlock import RunFolderBusy, holder

        pid = holder(run_dir)
        if pid is not None:  # never delete the folder under a running run
            raise RunError(f"--fresh: {RunFolderBusy(run_dir, pid)}")
        shutil.rmtree(run_dir)
    # What --resume compares: for a Python function its module and qualified name stand for it.
    fp_doc = _with_function(doc, function, _function_id(function)) if function is not None else doc
    fp, legacy_fp = run_fingerprints(fp_doc, overrides)
    runner = LocalRunner(spec, run_dir, resume=resume, fingerprint=fp, also_resumes=(legacy_fp,),
                         progress=Progress(spec) if progress else None, plot=plot, gpus=gpus,
                         gpus_per_member=gpus_per_member, function=function, note=note,
                         # manifest.json as soon as the folder is the run's: the results commands read a
                         # running run too
                         started=lambda: remember_manifest(run_dir, path, effective, spec.name, overrides))
    summary = runner.run()
    data = RunData(runner.spec, read_records(summary.run_dir / "results.jsonl"), runner.root,
                   f"local:{summary.run_dir}", _engine=summary.engine)
    return RunResult._from_data(data, summary)


# `pbt run`'s flags in the runner's messages, and the argument of `run` that each one is.
_FLAG_VALUE = re.compile(r"--(gpus-per-member|gpus|seed|parallelism) ('[^']*'|\d+(?:,\d+)*|all|none)\b"
                         r"|--(name) ([\w.-]+)")
_FLAG = re.compile(r"--(resume|fresh|gpus-per-member|gpus|name|seed|parallelism|out)\b")


def python_terms(text: str) -> str:
    """A message of the runner's (written for `pbt run`) in the terms of `pbt_operator.run`'s
    arguments: `pass --resume` is `pass resume=True`, `--gpus-per-member 2` is `gpus_per_member=2`."""

    def with_value(m: re.Match[str]) -> str:
        arg, value = (m.group(1) or m.group(3)).replace("-", "_"), m.group(2) or m.group(4)
        if arg in ("gpus_per_member", "seed", "parallelism") and value.isdigit():
            return f"{arg}={value}"
        return f"{arg}={value.strip(chr(39))!r}"

    def bare(m: re.Match[str]) -> str:
        arg = m.group(1).replace("-", "_")
        return f"{arg}=True" if arg in ("resume", "fresh") else arg

    return _FLAG.sub(bare, _FLAG_VALUE.sub(with_value, text))


def _python_note(text: str) -> None:
    print(f"pbt_operator.run: {python_terms(text)}", file=sys.stderr)


def _check_int(arg: str, value: int | None, minimum: int) -> None:
    """The bounds `pbt run`'s flags have, which are those of the spec fields they replace."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise RunError(f"{arg}: must be an integer (got {value!r})")
    if value < minimum:
        raise RunError(f"{arg}: must be >= {minimum} (got {value})")


def _gpus_arg(gpus: Any) -> str | None:
    """`gpus` as --gpus takes it: a string ("0,1", "all", "none"), or, from Python, a list of devices
    ([0, 1], ["GPU-..."]). A bare number is refused: a device (--gpus 2) or a count (gpus_per_member=2)?"""
    if gpus is None or isinstance(gpus, str):
        return gpus
    if isinstance(gpus, (list, tuple)) and all(isinstance(d, (str, int)) and not isinstance(d, bool) for d in gpus):
        return ",".join(str(d) for d in gpus)
    hint = f"; for {counted(gpus, 'GPU')} per member pass gpus_per_member={gpus}" if isinstance(gpus, int) else ""
    raise RunError(f"gpus: must be devices as a string ('0,1', 'all', 'none') or a list ([0, 1]) "
                   f"(got {gpus!r}{hint})")


def _document(manifest: Manifest) -> tuple[Mapping[str, Any], str | None, Path | None]:
    """The manifest's PopulationTraining document, the file it came from and its folder (where a
    worker's relative paths start; a dict's start in the current folder, as its worker runs there)."""
    if isinstance(manifest, str) and "\n" in manifest and not Path(manifest).exists():
        # YAML text where a path goes: "invalid PopulationTraining: apiVersion: ...: no such file"
        raise RunError("manifest: a str is a file's path; for YAML text pass yaml.safe_load(text), a dict")
    if isinstance(manifest, (str, Path)):
        try:
            doc = read_manifest(manifest)
        except SpecError as e:
            raise RunError(str(e), e.problems) from None
        return dict(doc), str(manifest), Path(manifest).resolve().parent
    if isinstance(manifest, Mapping):
        return copy.deepcopy(dict(manifest)), None, None
    raise RunError(f"manifest: must be a file's path or a dict shaped like the YAML (got {type(manifest).__name__})")


def _function_ref(fn: SegmentFunction) -> str:
    """spec.worker.function as manifest.json records it for a Python function: `module:name` when that
    is the form the field takes (a module-level function), else a stand-in; the function itself is
    handed to the runner, never imported."""
    module = getattr(fn, "__module__", None) or "__main__"
    if not _MODULE.match(module):
        module = "__main__"
    ref = f"{module}:{getattr(fn, '__name__', '')}"
    return ref if _FUNCTION_REF.match(ref) else f"{module}:function"


def _function_id(fn: SegmentFunction) -> str:
    """What identifies a Python function across runs (the fingerprint): its module and qualified name."""
    return f"{getattr(fn, '__module__', None)}:{getattr(fn, '__qualname__', None) or getattr(fn, '__name__', repr(fn))}"


def _with_function(doc: Mapping[str, Any], fn: SegmentFunction, ref: str) -> dict[str, Any]:
    """The document with spec.worker made the inline worker that runs `fn`: the function replaces the
    worker's command or function, executor and pool (threads: a notebook's function cannot be imported
    by another process); its env and workingDir stay, as the storage and the function see them."""
    out = copy.deepcopy(dict(doc))
    spec = out.get("spec")
    if not isinstance(spec, Mapping):
        return out  # the parser says what is wrong with it
    spec = out["spec"] = dict(spec)
    worker = spec.get("worker")
    kept = {k: worker[k] for k in ("env", "workingDir") if k in worker} if isinstance(worker, Mapping) else {}
    spec["worker"] = {**kept, "executor": "inline", "function": ref, "pool": "threads"}
    return out
