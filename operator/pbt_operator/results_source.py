"""Reading a run, wherever it lives: a local run folder (`pbt run`) or a PopulationTraining in a cluster.

Every results command (`pbt status | plot | export | replay`) starts from `load_run(target, namespace)`,
which returns the same `RunData` for both: the parsed spec, every finished (and failed) segment as a
`Record`, an `Engine` rebuilt from them (best member, lineage, schedule) and the storage root that
checkpoint URIs are built from. Nothing here writes anything.

- Local: `results.jsonl` holds one Record per line in the order the runner told the engine. The spec
  comes from `manifest.json` (written by `pbt run` since the results commands exist), from
  `--manifest`, or, for older folders, is reconstructed from the records themselves (hyperparameter
  names, types and observed ranges; objective from best.json) - enough for tables and plots.
- Cluster: the PopulationTraining's spec and status, and every segment's complete record from
  storage (written by the worker under `<storage>/<training>/records/`, read with the user's own
  credentials the AWS way), merged with the members' `status.history` (a bounded window with the
  engine's totals). When storage cannot be read, the window alone is shown, with totals and best exact
  and `RunData.note` saying what is missing and why.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoints import checkpoint_uri, storage_root
from .contract import flagged_prefix
from .core.display import shorten
from .core.engine import Engine
from .core.types import Record, Ref
from .local.runlock import holder
from .spec import SpecError, TrainingSpec, load_manifest, parse_manifest, parse_spec

MANIFEST_FILE = "manifest.json"


class SourceError(RuntimeError):
    """The target is neither a readable run folder nor a training the cluster knows."""


@dataclass
class MemberInfo:
    member: int
    name: str | None = None
    phase: str | None = None


@dataclass
class RunData:
    spec: TrainingSpec
    records: list[Record]
    root: str  # storage root: checkpoint URIs are checkpoint_uri(root, spec.name, ref)
    source: str  # "local:<dir>" or "cluster:<namespace>/<name>"
    phase: str | None = None  # the training's phase (cluster), or what the local files say
    status: Mapping[str, Any] = field(default_factory=dict)  # the cluster status (empty for local runs)
    members: dict[int, MemberInfo] = field(default_factory=dict)
    manifest_path: Path | None = None  # the manifest a local run was started from, when known
    spec_inferred: bool = False  # True when the spec was reconstructed from the records
    note: str | None = None  # what is missing from `records` (a cluster run whose storage was unreadable)
    # A local run's best.json, written at its end: how it ended (finished / failed), which an engine
    # rebuilt from the records does not know; empty for a cluster run or one that has not ended.
    ended: Mapping[str, Any] = field(default_factory=dict)
    _engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.spec, self.records)
        return self._engine

    @property
    def done(self) -> list[Record]:
        return [r for r in self.records if r.status == "done"]

    @property
    def failures(self) -> list[Record]:
        return [r for r in self.records if r.status != "done"]

    @property
    def best(self) -> Record | None:
        return self.engine.best

    def checkpoint(self, ref: Ref) -> str:
        return checkpoint_uri(self.root, self.spec.name, ref)

    def schedule(self, ref: Ref | None = None) -> list[dict[str, Any]]:
        """The lineage's schedule; only its known part when records are missing (see `note`)."""
        try:
            return self.engine.schedule(ref)
        except ValueError:  # a lineage gap: records older than the status window, storage unread
            from .core.lineage import schedule

            target = ref if ref is not None else (self.best.ref if self.best else None)
            known = {**{r.ref: r for r in self.engine.evicted_best.values()}, **self.engine.records}
            return schedule(known, target, partial=True) if target is not None else []

    def export_document(self) -> dict[str, Any]:
        """The best member, its checkpoint and its schedule: what `pbt export` prints and `pbt replay` reads."""
        spec, eng = self.spec, self.engine
        best = eng.best
        doc: dict[str, Any] = {
            "training": spec.name,
            "source": self.source,
            "metric": spec.objective.metric,
            "direction": spec.objective.direction,
        }
        if spec.namespace:
            doc["namespace"] = spec.namespace
        if self.manifest_path is not None:
            doc["manifest"] = str(self.manifest_path)
        if best is None:
            doc["best"] = None
            return doc
        doc.update({
            "member": best.member,
            "segment": best.segment,
            "score": best.score,
            "steps": best.steps_end,
            "hyperparameters": dict(best.suggestion.hyperparameters),
            "checkpoint": self.checkpoint(best.ref),
            "schedule": self.schedule(best.ref),
        })
        if self.note:
            doc["note"] = self.note
        return doc


def load_run(target: str, namespace: str | None = None, manifest: str | None = None) -> RunData:
    """A run folder if `target` is an existing directory, otherwise a training name in the cluster."""
    if Path(target).is_dir():
        return load_local(Path(target), manifest)
    return load_cluster(target, namespace, manifest)


# -- local run folders -------------------------------------------------------------------------------
def read_records(path: Path) -> list[Record]:
    out: list[Record] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(Record.from_dict(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write: the runner reruns that segment too
    return out


def load_local(run_dir: Path, manifest: str | None = None) -> RunData:
    results = run_dir / "results.jsonl"
    if not results.exists() and not (run_dir / "run.json").exists():
        raise SourceError(f"{run_dir} is not a run folder (no results.jsonl or run.json)")
    records = read_records(results)
    meta = _json(run_dir / "run.json") or {}
    best_doc = _json(run_dir / "best.json") or {}
    manifest_path: Path | None = None
    inferred = False
    if manifest is not None:
        spec = load_manifest(manifest, name=meta.get("name") or None)
        manifest_path = Path(manifest).resolve()
    elif (saved := _json(run_dir / MANIFEST_FILE)) is not None:
        base = Path(saved["path"]).parent if saved.get("path") else None
        spec = parse_manifest(saved["document"], base_dir=base)
        manifest_path = Path(saved["path"]) if saved.get("path") else None
    else:
        spec = infer_spec(meta.get("name") or best_doc.get("training") or run_dir.name, records, best_doc)
        inferred = True
    root = meta.get("storage") or storage_root(spec.storage.uri, spec.name, run_dir)
    phase = None
    if holder(run_dir) is not None:
        phase = "Running"  # a pbt run holds the folder now (a resumed run's best.json is the old one's)
    elif best_doc:
        phase = "Failed" if best_doc.get("failed") else "Succeeded"
    elif records:
        phase = "Incomplete"  # interrupted or killed: `pbt run MANIFEST --resume` continues it
    return RunData(spec, records, root, f"local:{run_dir}", phase, {}, {}, manifest_path, inferred, ended=best_doc)


def save_manifest(run_dir: Path, manifest: str | None, document: Mapping[str, Any]) -> None:
    """Remember which manifest (as effectively run: overrides applied) produced a run folder; `manifest`
    (its file) is None for a document given to `pbt_operator.run` as a dict."""
    path = str(Path(manifest).resolve()) if manifest is not None else None
    (run_dir / MANIFEST_FILE).write_text(json.dumps(
        {"path": path, "document": document}, indent=2, default=str) + "\n")


def infer_spec(name: str, records: Sequence[Record], best_doc: Mapping[str, Any] | None = None) -> TrainingSpec:
    """A spec good enough to read a run whose manifest is unknown: observed members, segments and
    hyperparameters (log scale when a positive range spans more than 1.5 decades)."""
    best_doc = best_doc or {}
    values: dict[str, list[Any]] = {}
    for r in records:
        for k, v in r.suggestion.hyperparameters.items():
            values.setdefault(k, []).append(v)
    space: dict[str, Any] = {}
    for k, vs in values.items():
        if any(isinstance(v, str) for v in vs):
            space[k] = {"type": "categorical", "choices": sorted({str(v) for v in vs})}
            continue
        nums = [float(v) for v in vs]
        kind = "int" if all(isinstance(v, int) for v in vs) else "float"
        lo, hi = min(nums), max(nums)
        if kind == "int":
            lo, hi = math.floor(lo), math.ceil(hi)
            hi = hi if hi > lo else lo + 1
        elif hi <= lo:
            hi = lo + (abs(lo) or 1.0)
        log = lo > 0 and hi / lo > 10 ** 1.5
        space[k] = {"type": kind, "min": lo, "max": hi, "log": log}
    if not space:
        space = {"x": {"type": "float", "min": 0.0, "max": 1.0}}
    members = max((r.member for r in records), default=1) + 1
    segments = max((r.segment for r in records), default=0) + 1
    steps = max((r.suggestion.steps_budget for r in records), default=1)
    doc = {
        "apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining", "metadata": {"name": _dns(name)},
        "spec": {
            "population": max(2, members), "segment": {"steps": max(1, steps)}, "budget": {"segments": segments},
            "objective": {"metric": best_doc.get("metric", "score"), "direction": best_doc.get("direction", "max")},
            "hyperparameters": space,
            "worker": {"executor": "process", "command": ["false"]},
        },
    }
    return parse_manifest(doc)


# -- clusters ----------------------------------------------------------------------------------------
def load_cluster(name: str, namespace: str | None = None, manifest: str | None = None) -> RunData:
    try:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException
    except ImportError as e:  # pragma: no cover - the operator extra is missing
        raise SourceError(f"{name!r} is not a directory, and reading a cluster needs the kubernetes client "
                          f"(pip install 'pbt-operator[operator]'): {e}") from None
    from .kube.api import MEMBERS, TRAININGS
    from .kube.builders import LABEL_TRAINING
    from .kube.crds import GROUP, VERSION

    try:
        config.load_kube_config()
        if namespace is None:
            _, active = config.list_kube_config_contexts()
            namespace = (active or {}).get("context", {}).get("namespace") or "default"
    except (config.ConfigException, OSError) as e:
        raise SourceError(f"{name!r} is not a run folder, and no cluster is configured to look it up in "
                          f"(kubeconfig: {e})") from None
    api = client.CustomObjectsApi()
    training: Any
    listed: Any
    try:
        training = api.get_namespaced_custom_object(GROUP, VERSION, namespace, TRAININGS, name)
        listed = api.list_namespaced_custom_object(GROUP, VERSION, namespace, MEMBERS,
                                                   label_selector=f"{LABEL_TRAINING}={name}")
    except ApiException as e:
        if e.status == 404:
            raise SourceError(f"{name!r} is not a run folder, and there is no PopulationTraining {name!r} in "
                              f"namespace {namespace!r}") from None
        raise SourceError(f"reading pbt/{name} in {namespace}: {e.status} {e.reason}") from None
    except Exception as e:  # connection refused, TLS, timeouts: say where we looked
        raise SourceError(f"reading pbt/{name} in {namespace}: {type(e).__name__}: {e}") from None
    run = from_cluster_objects(training, listed["items"], manifest)
    return with_storage_records(run, listed["items"])


def with_storage_records(run: RunData, members: Sequence[Mapping[str, Any]]) -> RunData:
    """`run` with every segment's record read from storage, merged with the members' status windows
    (attempts the worker could not record, such as a refused Job or a killed pod, are only there).
    Unreadable storage leaves `run` as it is, with `note` saying so."""
    from .checkpoints import records_prefix

    prefix = records_prefix(run.root, run.spec.name)
    try:
        stored = storage_records(prefix)
    except Exception as e:  # no credentials, unreachable, denied: the status window still answers
        run.note = (f"the full history could not be read from storage ({prefix}: {type(e).__name__}: "
                    f"{shorten(str(e), 200)}); shown: each member's newest segments kept in the cluster status "
                    f"(totals and best are exact; lineage and tables are partial)")
        return run
    if not stored:
        if run.engine.done_count > len(run.done):
            run.note = (f"no segment records in storage under {prefix} (workers older than the records, or "
                        f"records written elsewhere); shown: each member's newest segments kept in the cluster "
                        f"status (totals and best are exact; lineage and tables are partial)")
        return run
    entries = {_ident(r): (f, r) for f, r in stored}
    for m in members:
        for h in (m.get("status") or {}).get("history") or []:
            rec = Record.from_dict(h)
            entries.setdefault(_ident(rec), (str(h.get("finishedAt") or ""), rec))
    ordered = sorted(entries.values(), key=lambda fr: (fr[0], fr[1].member, fr[1].segment, fr[1].suggestion.attempt))
    run.records = [r for _, r in ordered]
    run._engine = None
    return run


def _ident(r: Record) -> tuple[int, int, int, str]:
    return (r.member, r.segment, r.suggestion.attempt, r.status)


def storage_records(prefix: str, threads: int = 16) -> list[tuple[str, Record]]:
    """Every segment record under `prefix` as (finished time, Record), read in parallel; records that do
    not parse are skipped (a foreign file, a newer format)."""
    from concurrent.futures import ThreadPoolExecutor

    from pbt_worker.storage import open_storage

    storage = open_storage(prefix)
    keys = [k for k in storage.list(prefix) if k.endswith(".json")]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        raw = list(pool.map(lambda k: storage.get_bytes(prefix, k), keys))
    out = []
    for data in raw:
        try:
            out.append(record_from_storage(json.loads(data)))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def record_from_storage(doc: Mapping[str, Any]) -> tuple[str, Record]:
    """A worker's segment record (pbt_worker.Segment.record) as (finished time, Record)."""
    from .core.types import Suggestion

    if doc.get("format") != "pbt-segment-record":
        raise ValueError("not a segment record")
    steps = doc["steps"]
    sug = Suggestion.from_dict(doc["decision"])
    ok = doc.get("error") is None and doc.get("score") is not None
    error = None if ok else str(doc.get("error"))
    prefix = flagged_prefix(doc)
    if error is not None and prefix is not None:  # as the driver's parse_result words it
        error = f"{prefix} {error}"
    rec = Record(sug, doc.get("score"), int(steps["end"]), doc.get("metrics") or {}, "done" if ok else "failed",
                 error, doc.get("seconds"))
    return str(doc.get("finished") or ""), rec


def from_cluster_objects(training: Mapping[str, Any], members: Sequence[Mapping[str, Any]],
                         manifest: str | None = None) -> RunData:
    """Pure: a RunData from a PopulationTraining and its PopulationMembers as the API returns them."""
    meta = training["metadata"]
    name, ns = meta["name"], meta.get("namespace")
    manifest_path = None
    if manifest is not None:
        spec = dataclasses.replace(load_manifest(manifest, name=name), namespace=ns)
        manifest_path = Path(manifest).resolve()
    else:
        try:
            spec = parse_spec(training.get("spec"), name=name, namespace=ns)
        except SpecError as e:
            raise SourceError(f"pbt/{name}: its spec does not parse: {e}") from None
    from .core.policy import rebuild
    from .kube.reconcile import HISTORY_WINDOW, journal_order

    journal = journal_order(h for m in members for h in ((m.get("status") or {}).get("history") or []))
    records = [j.record for j in journal]
    evicted = {int(m["spec"]["index"]): Record.from_dict(b) for m in members
               if isinstance(b := (m.get("status") or {}).get("evictedBest"), dict)}
    # The engine the operator holds, totals and best exact, from the windows (no decision is owed here).
    engine = rebuild(spec, journal, {}, HISTORY_WINDOW, evicted).engine
    info = {}
    for m in members:
        idx = int(m["spec"]["index"])
        info[idx] = MemberInfo(idx, m["metadata"]["name"], (m.get("status") or {}).get("phase"))
    status = dict(training.get("status") or {})
    root = (spec.storage.uri or "").rstrip("/")
    run = RunData(spec, records, root, f"cluster:{ns}/{name}", status.get("phase"), status, info, manifest_path)
    run._engine = engine
    return run


# -- helpers -----------------------------------------------------------------------------------------
def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _dns(name: str) -> str:
    import re

    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return s[:63].strip("-") or "run"


# -- export: copy a checkpoint out of storage --------------------------------------------------------
def download_checkpoint(uri: str, dest: Path) -> list[str]:
    """Copy a committed checkpoint (file:// or s3://, credentials from the environment the AWS way) into
    `dest`, verifying every object against the commit marker; the marker is written last, so `dest` is a
    checkpoint a worker can restore from (file://DEST/). Returns the object keys copied."""
    from pbt_worker.storage import MARKER, open_storage

    prefix = uri if uri.endswith("/") else uri + "/"
    storage = open_storage(prefix)
    manifest = storage.manifest(prefix)
    if manifest is None:
        raise SourceError(f"{prefix} holds no committed checkpoint (deleted by garbage collection, or never "
                          f"written); stored there: {storage.list(prefix)[:10]}")
    dest.mkdir(parents=True, exist_ok=True)
    keys = []
    for entry in manifest.objects.values():
        target = dest / entry.key
        target.parent.mkdir(parents=True, exist_ok=True)
        storage.get_file(prefix, entry.key, target, expect=entry.info())
        keys.append(entry.key)
    (dest / MARKER).write_bytes(manifest.to_json())
    return sorted(keys)


# -- replay: one model trained from scratch along a schedule ------------------------------------------
@dataclass
class ReplayStep:
    index: int
    member: int
    segment: int
    steps_start: int
    steps_end: int
    hyperparameters: dict[str, Any]
    population_score: float | None
    score: float | None = None
    error: str | None = None
    duration: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def replay(spec: TrainingSpec, schedule: Sequence[Mapping[str, Any]], out_dir: Path, *,
           storage_uri: str | None = None, on_step: Any = None) -> list[ReplayStep]:
    """Run each schedule entry as a segment with the manifest's worker, one after the other, each one
    restoring the previous replay segment's checkpoint. Every segment is told the lineage's member and
    segment index and starts at the lineage's step count, so a worker that seeds its data order from
    (member, steps) sees the same minibatches as the population did. Stops at the first failure."""
    import queue
    import time

    from .contract import build_contract
    from .core.types import SegmentResult, Suggestion
    from .local.runner import LocalRunner, RunError

    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    root = storage_uri.rstrip("/") if storage_uri else (out_dir / "checkpoints").resolve().as_uri()
    name = f"{spec.name}-replay"
    # The runner's storage is the replay's: an inline worker otherwise got the population run's own
    # (file://) storage object and could not write a --storage mem:// or s3:// checkpoint.
    runner = LocalRunner(dataclasses.replace(spec, parallelism=1, storage=dataclasses.replace(spec.storage, uri=root)),
                         out_dir, plot=False, note=lambda text: print(f"pbt replay: {text}", file=sys.stderr))
    try:
        # The template's GPU request, as `pbt run` honours it: the replay's one segment at a time gets
        # one slot (it saw every GPU of the machine, so a replay of a 1-GPU member trained on all of them).
        runner._plan_gpus()
    except RunError as e:
        raise SourceError(str(e)) from None
    try:
        executor = runner._executor()
    except ValueError as e:  # a worker that cannot start: a command not there, a function not importable
        raise SourceError(str(e)) from None
    inbox: queue.Queue[tuple[Suggestion, SegmentResult]] = queue.Queue()
    steps: list[ReplayStep] = []
    prev: Ref | None = None
    try:
        for i, s in enumerate(schedule):
            hp = dict(s["hyperparameters"])
            sug = Suggestion(member=int(s["member"]), segment=int(s["segment"]), hyperparameters=hp, restore=prev,
                             steps_start=int(s["steps_start"]), steps_budget=int(s["steps_end"]) - int(s["steps_start"]),
                             kind="start" if prev is None else "continue", reason="replay")
            contract = build_contract(name, sug, root, str(out_dir / "results" / f"step{i:03d}.json"))
            t0 = time.perf_counter()
            executor.submit(sug, contract, lambda a, b: inbox.put((a, b)))
            while True:
                try:
                    _, res = inbox.get(timeout=0.5)
                    break
                except queue.Empty:
                    continue
            step = ReplayStep(i, sug.member, sug.segment, sug.steps_start, int(s["steps_end"]), hp,
                              s.get("score"), res.score if res.ok else None, res.error,
                              round(time.perf_counter() - t0, 3))
            steps.append(step)
            if on_step is not None:
                on_step(step)
            if not res.ok:
                break
            prev = sug.ref
    except KeyboardInterrupt:
        executor.shutdown(cancel=True)
        raise
    executor.shutdown(cancel=False)
    (out_dir / "replay.json").write_text(json.dumps({
        "training": spec.name, "storage": root, "steps": [st.to_dict() for st in steps],
        "checkpoint": checkpoint_uri(root, name, prev) if prev is not None and steps and steps[-1].error is None else None,
    }, indent=2) + "\n")
    return steps


def read_export(path: Path) -> dict[str, Any]:
    """An export document written by `pbt export` (JSON or YAML)."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())  # YAML is a superset of JSON
    except (OSError, yaml.YAMLError) as e:
        raise SourceError(f"{path}: not a readable export (JSON or YAML): {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("schedule"), list):
        raise SourceError(f"{path}: not an export document (no schedule); write one with `pbt export`")
    return doc
