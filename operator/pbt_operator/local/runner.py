"""`pbt run`: drive the engine with a local executor, persist every step, resume after a kill.

Persistence is write-ahead: a suggestion is appended to `suggestions.jsonl` before it is dispatched,
and a finished segment to `results.jsonl` the moment it is told to the engine. Those two files are this
driver's journal; `core/policy.rebuild` turns them back into the engine, so a resumed run never repeats
a finished segment and makes exactly the decisions an uninterrupted run would. Admission and checkpoint
garbage collection follow the same driver policy as the operator (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import queue
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoints import checkpoint_uri, storage_root
from ..contract import build_contract
from ..core.display import counted
from ..core.engine import Engine
from ..core.policy import Rebuilt, admit, garbage_batch, rebuild, take_back
from ..core.types import Record, Ref, SegmentResult, Suggestion
from ..spec import TrainingSpec, trainer_index
from .durability import Barrier, fsync_enabled, sync_filesystems
from .executors import Executor, InlineExecutor, ProcessExecutor, segment_log
from .gpus import GpuError
from .gpus import plan as gpu_plan
from .results import write_outputs
from .runlock import RunFolderBusy, acquire, release

log = logging.getLogger(__name__)


# Inline segments (threads of this process) of an interrupted run that were still running when it
# stopped, by run folder: a thread cannot be stopped, and it goes on to save its segment's checkpoint, so
# a resume in the same process (a notebook's run(..., resume=True) right after Ctrl-C) would run the same
# segment again beside it, both writing one checkpoint.
_STILL_RUNNING: dict[Path, list[Any]] = {}


def wait_for_interrupted(run_dir: Path, note: Callable[[str], None]) -> None:
    """Before `run_dir` runs again (resumed, or deleted for a fresh start) in this process: wait for the
    segments of its interrupted run that are still running here (_STILL_RUNNING)."""
    import concurrent.futures as cf

    run_dir = run_dir.resolve()
    left = [f for f in _STILL_RUNNING.pop(run_dir, []) if not f.done()]
    if not left:
        return
    note(f"waiting for {counted(len(left), 'segment')} of the interrupted run, still running in this process, to finish "
         "(their results are not recorded: they run again)")
    try:
        cf.wait(left)
    except KeyboardInterrupt:
        _STILL_RUNNING[run_dir] = left
        raise


class RunError(RuntimeError):
    """A run that cannot start or continue: a manifest or setting that must not run (the message names
    the field, as `pbt run` prints it), a run folder that is busy, already used or not a run.
    `problems`: the message's problems one per line (a manifest's fields, from SpecError)."""

    def __init__(self, message: str, problems: Sequence[str] | None = None):
        super().__init__(message)
        self.problems = list(problems) if problems is not None else [message]


@dataclass
class RunSummary:
    run_dir: Path
    engine: Engine
    wall_seconds: float
    interrupted: bool = False
    # Checkpoints no segment was left to delete, deleted by the driver at the end (`_collect_at_end`),
    # and the URIs of those whose delete failed.
    collected_at_end: int = 0
    left_at_end: tuple[str, ...] = ()
    # The log of the attempt whose failure failed the training (its output, or an inline traceback).
    failure_log: Path | None = None
    # --resume of a failed training: how it had failed (the segment that failed it got another round).
    retried: str | None = None
    # Segment attempts this invocation started (a resume counts only its own, not the journal's), and
    # of them, those that finished and those that failed.
    ran: int = 0
    finished: int = 0
    failed: int = 0

    @property
    def best(self) -> Record | None:
        return self.engine.best


def spec_fingerprint(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_fingerprints(doc: Mapping[str, Any], overrides: Mapping[str, Any]) -> tuple[str, str]:
    """What `--resume` compares: the manifest and its overrides, less spec.parallelism, which a
    training may change at any time (`kubectl scale` on a cluster; more or fewer slots on a resume here):
    it decides how many segments run at once, never what the journal means. Then the fingerprint a
    run started by an older pbt stored (parallelism included), accepted for the same manifest."""
    spec = doc.get("spec")
    bare = {**doc, "spec": {k: v for k, v in spec.items() if k != "parallelism"}} if isinstance(spec, Mapping) else doc
    return (spec_fingerprint({"doc": bare, "overrides": {k: v for k, v in overrides.items() if k != "parallelism"}}),
            spec_fingerprint({"doc": doc, "overrides": overrides}))


class LocalRunner:
    def __init__(self, spec: TrainingSpec, run_dir: Path, *, resume: bool = False, fingerprint: str = "",
                 also_resumes: tuple[str, ...] = (),
                 progress: Callable[[Engine, dict[int, Suggestion], list[Suggestion]], None] | None = None,
                 plot: bool = True, storage: Any = None, started: Callable[[], None] | None = None,
                 gpus: str | None = None, gpus_per_member: int | None = None,
                 function: Callable[..., Any] | None = None, note: Callable[[str], None] | None = None):
        self.spec = spec
        # How a note reaches the user (the GPU plan's): `pbt run: ...` on stderr unless the caller says
        # otherwise (pbt_operator.run words it in its arguments' terms).
        self.note = note if note is not None else (lambda text: print(f"pbt run: {text}", file=sys.stderr))
        # A Python function to run instead of spec.worker's (pbt_operator.run(function=...)): inline, in
        # threads of this process; the spec's worker then says executor: inline (local/session.py).
        self.function = function
        self.gpus = gpus  # --gpus and --gpus-per-member (local/gpus.py)
        self.gpus_per_member = gpus_per_member
        self.gpu_slots: tuple[str, ...] = ()
        self.started = started  # called once the run folder is ready, before the first segment
        self.run_dir = run_dir.resolve()  # workers run in the manifest's folder: paths must be absolute
        self._lock: int | None = None  # the run folder's lock while run() runs (local/runlock.py)
        self.resume = resume
        self.fingerprint = fingerprint
        self.also_resumes = also_resumes  # older fingerprints of the same manifest (run_fingerprints)
        self.progress = progress
        self.plot = plot
        self.storage = storage
        self.root = storage_root(spec.storage.uri, spec.name, run_dir)
        # file:// checkpoints: one durability barrier per batch in persist() instead of fsyncs in every
        # save (local/durability.py); the workers are told to skip theirs.
        self.barrier = self.root.startswith("file://") and storage is None and fsync_enabled(dict(spec.worker.env))

    # -- persistence ------------------------------------------------------------------------------
    def _prepare(self) -> tuple[list[Record], dict[int, Suggestion]]:
        """The journal: every finished attempt in the order it was told, and each member's latest
        decision."""
        d = self.run_dir
        meta = d / "run.json"
        if meta.exists() and not self.resume:
            raise RunError(f"{d} already holds a run: pass --resume to continue it, or --fresh to start over")
        if self.resume and not meta.exists():
            raise RunError(f"--resume: {d} holds no run to resume")
        d.mkdir(parents=True, exist_ok=True)
        try:
            self._lock = acquire(d)  # before reading the journals: a running run appends to them
        except RunFolderBusy as e:
            raise RunError(str(e)) from None
        if self.resume:
            old = json.loads(meta.read_text())
            # The name is in every checkpoint URI: under another name nothing could be restored.
            if old.get("name") not in (None, self.spec.name):
                raise RunError(f"--resume: {d} holds the run {old['name']!r}, this run is named {self.spec.name!r}: "
                               f"pass --name {old['name']}")
            if self.fingerprint and old.get("fingerprint") not in (self.fingerprint, *self.also_resumes):
                raise RunError(f"--resume: the manifest (or --seed) changed since {d} was started "
                               f"(fingerprint {old.get('fingerprint')} != {self.fingerprint}); only "
                               f"spec.parallelism may change on a resume: undo the change, or use --fresh")
        else:
            meta.write_text(json.dumps({"name": self.spec.name, "fingerprint": self.fingerprint,
                                        "storage": self.root, "started": time.time()}, indent=2))
        if self.resume:
            for journal in ("results.jsonl", "suggestions.jsonl"):
                _drop_torn_tail(d / journal)
        records = [Record.from_dict(json.loads(line)) for line in _lines(d / "results.jsonl")]
        last: dict[int, Suggestion] = {}
        for line in _lines(d / "suggestions.jsonl"):
            s = Suggestion.from_dict(json.loads(line))
            last[s.member] = s
        return records, last

    def _executor(self) -> Executor:
        spec, w = self.spec, self.spec.worker
        base = spec.base_dir or Path.cwd()
        cwd = (base / w.working_dir) if w.working_dir else base
        # The workers' environment: spec.worker.env, and no fsync per checkpoint when the runner makes
        # file:// checkpoints durable once per batch (local/durability.py).
        env = {**w.env, "PBT_FILE_FSYNC": "0"} if self.barrier else dict(w.env)
        if self.function is not None or w.executor == "inline":
            fn = self.function if self.function is not None else w.function
            assert fn is not None
            storage = self.storage
            if storage is None and env and w.inline_pool != "processes":
                # The function runs in threads of this process: its segments' storage reads that
                # environment over this one, as a worker process would see it, without os.environ
                # changing under the caller's other threads (a process pool's children set it instead:
                # executors._child_init).
                storage = workers_storage(self.root, env)
            return InlineExecutor(fn, [str(cwd), str(base)], spec.parallelism, spec.objective.metric,
                                  w.inline_pool, storage=storage, log_dir=self.run_dir / "logs", env=env,
                                  note=self.note)
        command = list(w.command) or _template_command(spec)
        field = ("spec.worker.command" if w.command
                 else f"spec.template.spec.containers[{trainer_index(spec.template or {})}].command")
        return ProcessExecutor(command, env, cwd, self.run_dir / "logs", spec.objective.metric,
                               timeout=spec.segment.timeout_seconds, warm=w.warm, slots=spec.parallelism,
                               field=field, gpu_slots=self.gpu_slots)

    def _storage(self, uri: str) -> Any:
        """The store as the workers see it (spec.worker.env over this environment), for the storage calls
        the driver makes itself: the workers' storage settings (an endpoint, credentials) are often only
        in spec.worker.env."""
        return self.storage if self.storage is not None else workers_storage(uri, self.spec.worker.env)

    def _plan_gpus(self) -> None:
        """Cut this machine's GPUs into one slot per running segment (local/gpus.py); fewer slots than
        spec.parallelism run fewer segments at once, as a cluster with fewer GPUs would."""
        spec = self.spec
        try:
            plan, note = gpu_plan(spec.template, trainer_index(spec.template or {}), gpus=self.gpus,
                                  per_member=self.gpus_per_member, environ=os.environ)
        except GpuError as e:
            raise RunError(str(e)) from None
        if plan is not None and spec.worker.executor == "inline":
            # not "each running member gets its own GPU ...; but ...": the note said both, of one run
            who = "the function" if self.function is not None else "spec.worker.function"
            note = (f"no GPU slots for {who}: it runs in this process, where every member sees every GPU "
                    f"(there would be {counted(len(plan.slots), 'slot')} from {plan.source}: "
                    f"{plan.shown()}); set a spec.worker.command for one GPU per member")
            plan = None
        if plan is not None:
            self.gpu_slots = plan.slots
            if len(plan.slots) < spec.parallelism:
                note = f"{note}: {counted(len(plan.slots), 'segment')} at a time (spec.parallelism {spec.parallelism})"
                self.spec = dataclasses.replace(spec, parallelism=len(plan.slots))
        if note:
            self.note(note)

    def _check_storage(self) -> None:
        """Refuse a run whose s3:// checkpoint store cannot work at all (no such bucket, no credentials,
        access denied), before the run folder exists: every segment would fail alike, each retried and
        the member replaced, and the message would come from the workers' logs. A transient failure
        (an endpoint that does not answer now) only warns: it may pass."""
        if self.storage is not None or not self.root.startswith("s3://"):
            return
        from pbt_worker.errors import PermanentStorageError

        prefix = f"{self.root.rstrip('/')}/{self.spec.name}/"
        try:
            self._storage(prefix).exists(prefix)  # one GET: a resumed run's prefix may hold many objects
        except PermanentStorageError as e:
            raise RunError(f"spec.storage.uri: the checkpoint store {self.root} cannot be used: {e}") from None
        except Exception as e:  # transient (or unknown): the segments will see for themselves
            log.warning("could not reach the checkpoint store %s before the run (%s); trying anyway", prefix, e)

    def _collect_at_end(self, refs: list[Ref]) -> tuple[int, tuple[str, ...]]:
        """Delete the checkpoints that became garbage after the last segment started: segments delete
        old checkpoints (the contract's gc list), and none starts after the last results, so without
        this every run ended with its last generation's dead checkpoints still in storage (the digits
        example kept 36 checkpoints after its run). The operator cannot do the same (it holds no storage
        credentials: it reports them as status.leftoverCheckpoints); this driver runs where the workers
        do, with their storage settings (spec.worker.env over this process's environment). Returns how
        many were deleted and the URIs that could not be (the run still succeeds: they are only space)."""
        if not refs:
            return 0, ()
        uris = [checkpoint_uri(self.root, self.spec.name, r) for r in refs]
        failed: list[str] = []
        deleted = 0
        storage: Any = None
        for uri in uris:
            try:
                storage = storage if storage is not None else self._storage(uri)
                # A resumed run lists again what earlier segments already deleted: only what is
                # still there counts (a resumed finished run said 'deleted 10' and deleted none).
                if storage.list(uri):
                    storage.delete(uri)
                    deleted += 1
            except Exception as e:  # a leftover checkpoint is only space: say so, never fail the run
                log.warning("could not delete the old checkpoint %s: %s", uri, e)
                failed.append(uri)
        return deleted, tuple(failed)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        try:
            return self._run()
        finally:
            if self._lock is not None:
                release(self._lock)
                self._lock = None

    def _run(self) -> RunSummary:
        if self.spec.parallelism < 1:  # valid on a cluster (a paused training), meaningless here
            raise RunError("spec.parallelism: must be >= 1 for pbt run (got 0; 0 pauses a training on a cluster)")
        wait_for_interrupted(self.run_dir, self.note)
        self._plan_gpus()
        self._check_storage()  # first, like the executor: neither problem may leave a run folder
        try:
            executor = self._executor()  # an unimportable function, a command that is not there
        except ValueError as e:
            raise RunError(str(e)) from None
        records, decided = self._prepare()
        if self.started:
            self.started()
        rebuilt = rebuild(self.spec, records, decided)
        retried = None
        if self.resume and rebuilt.engine.failed:
            rebuilt, retried = _retry_failed(self.spec, records, decided, rebuilt)
        engine = rebuilt.engine
        done_before, failed_before = engine.done_count, engine.failure_count
        inbox: queue.Queue[tuple[Suggestion, SegmentResult] | None] = queue.Queue()  # None: a barrier completed
        running: dict[int, Suggestion] = {}
        t0 = time.perf_counter()
        interrupted = False
        ckpt_dir = Path(self.root[len("file://"):]) if self.barrier else None

        def sync() -> None:
            sync_filesystems([self.run_dir, ckpt_dir] if ckpt_dir else [self.run_dir])

        barrier = Barrier(sync if self.barrier else None, wake=lambda: inbox.put(None))
        made: dict[int, int] = {}  # member -> the batch (barrier number) its queued decision was written in
        with open(self.run_dir / "results.jsonl", "a") as res_f, open(self.run_dir / "suggestions.jsonl", "a") as sug_f:

            def log_suggestions(sugs: list[Suggestion]) -> None:
                for s in sugs:
                    sug_f.write(json.dumps(s.to_dict()) + "\n")
                    made[s.member] = barrier.requested + 1  # the batch persist() is about to close

            def persist() -> None:
                # Results before the decisions they caused: a resumed run must never find a decided
                # segment whose parent result is missing. Once per batch; the barrier that makes the
                # batch durable runs in the background (local/durability.py).
                res_f.flush()
                sug_f.flush()
                barrier.request()

            queued = engine.start()
            # fresh, or decided by the rebuild (initial segments of members that had none, owed decisions)
            log_suggestions([s for s in queued if decided.get(s.member) != s])
            for s in queued:
                made.setdefault(s.member, barrier.requested + 1)
            persist()
            dispatched = 0
            # Kept for the run's life, unlike the operator's (core/policy.still_listable): this engine
            # has no window, keeps every record (the outputs need them) and could list any collected
            # one again, so every entry still matters; the set holds a pair per record it already has.
            handed_out: set[Ref] = set()
            garbage: list[tuple[int, list[Ref]]] = []  # (barrier that makes deleting them safe, refs)
            handed: dict[int, list[Ref]] = {}  # member -> what its running segment was handed to delete
            try:
                while True:
                    admitted, queued = admit(engine, queued, len(running), self.spec.parallelism)
                    # Admission is the driver policy's; the runner only holds back an admitted segment
                    # decided from results whose barrier has not completed yet (it keeps its slot).
                    durable = barrier.durable  # once: the barrier's thread raises it meanwhile
                    held = [s for s in admitted if made.get(s.member, 0) > durable]
                    queued = held + queued
                    for sug in admitted:
                        if sug in held:
                            continue
                        if dispatched % self.spec.population == 0:  # a batch per population's worth of segments
                            # garbage by the engine's state now: every result it was told is flushed and
                            # its barrier requested; deleted only once that barrier completed
                            refs = garbage_batch(engine, handed_out, limit=None)
                            if refs:
                                garbage.append((barrier.requested, refs))
                        handed[sug.member] = [r for n, refs in garbage if n <= durable for r in refs]
                        garbage = [(n, refs) for n, refs in garbage if n > durable]
                        gc = [checkpoint_uri(self.root, self.spec.name, r) for r in handed[sug.member]]
                        contract = build_contract(self.spec.name, sug, self.root,
                                                  str(self.run_dir / "results" / f"m{sug.member:03d}.json"), gc)
                        running[sug.member] = sug
                        dispatched += 1
                        executor.submit(sug, contract, lambda s, r: inbox.put((s, r)))
                    if not running and not held:
                        break
                    if self.progress:
                        self.progress(engine, running, queued)
                    got = [_get(inbox)]
                    while not inbox.empty():  # everything that finished meanwhile: one flush for all
                        got.append(inbox.get_nowait())
                    barrier.check()
                    batch = [x for x in got if x is not None]
                    for sug, res in batch:
                        del running[sug.member]
                        # A segment that did not delete its list (it failed, so may never have saved,
                        # or its result's gcFailed says deletes failed) gives it back: the next batch
                        # hands it out again (the operator's reconcile.give_back does the same).
                        gave = handed.pop(sug.member, [])
                        if gave and (not res.ok or res.gc_failed):
                            take_back(engine, handed_out, gave)
                        new = engine.tell(res)
                        if not res.disrupted and engine.last is not None:
                            res_f.write(json.dumps(engine.last.to_dict()) + "\n")
                        new = [s for s in new if s not in queued]
                        log_suggestions(new)
                        queued = [q for q in queued if q.member not in {n.member for n in new}] + new
                    if batch:
                        persist()
            except KeyboardInterrupt:
                interrupted = True
                executor.shutdown(cancel=True)
                unfinished = executor.unfinished() if isinstance(executor, InlineExecutor) else []
                if unfinished:
                    _STILL_RUNNING[self.run_dir] = unfinished
            else:
                executor.shutdown(cancel=False)
            barrier.close()
        summary = RunSummary(self.run_dir, engine, time.perf_counter() - t0, interrupted, retried=retried,
                             ran=dispatched, finished=engine.done_count - done_before,
                             failed=engine.failure_count - failed_before)
        fatal = failed_attempt(engine.failed, engine.failures,
                               engine.failure.attempt if engine.failure is not None else None)
        if fatal is not None:
            log_path = segment_log(self.run_dir / "logs", fatal.suggestion)
            summary.failure_log = log_path if log_path.exists() else None
        if not interrupted:
            # Every result and decision is durable now (the barrier closed), so what they make garbage
            # is garbage for good: the batches not handed out yet, and what the last results freed.
            left = [r for _, refs in garbage for r in refs] + garbage_batch(engine, handed_out, limit=None)
            summary.collected_at_end, summary.left_at_end = self._collect_at_end(left)
        if self.progress:
            self.progress(engine, running, queued)
        if not interrupted:
            write_outputs(self.spec, engine, self.run_dir, self.root, plot=self.plot)
        return summary


def failed_attempt(failed: str | None, failures: Sequence[Record],
                   attempt: Sequence[int] | None = None) -> Record | None:
    """The attempt whose failure failed the training, not merely the last failure: segments running
    beside it may fail after it (the engine keeps the first reason), and their logs are not the one
    that explains the failure. `attempt` is the engine's (member, segment, attempt) for it
    (`Finish.attempt`, best.json's failedAttempt); a run folder written before that field existed has
    only `failed`, the engine's line, whose member and segment are read from its text."""
    if not failed or not failures:
        return None
    if attempt is not None:
        key = tuple(int(a) for a in attempt)
        found_record = next((r for r in reversed(failures)
                             if (r.member, r.segment, r.suggestion.attempt) == key), None)
        if found_record is not None:
            return found_record
    found = re.search(r"member (\d+) segment (\d+) failed", failed)
    if found is None:
        return failures[-1]
    ref = (int(found.group(1)), int(found.group(2)))
    return next((r for r in reversed(failures) if (r.member, r.segment) == ref), failures[-1])


def workers_storage(uri: str, env: Mapping[str, Any]) -> Any:
    """The store at `uri` as the workers reach it, for the storage calls made outside a segment (the
    runner's, `RunResult.load_best`'s) and an inline function's segments: `env` (a manifest's
    spec.worker.env) over this process's environment, read by the backend without changing os.environ,
    which other threads share (pbt_worker.storage.storage_with_env); the cached backend without env."""
    from pbt_worker.storage import open_storage, storage_with_env

    return storage_with_env(uri, {k: str(v) for k, v in env.items()}) if env else open_storage(uri)


def _retry_failed(spec: TrainingSpec, records: list[Record], decided: dict[int, Suggestion],
                  rebuilt: Rebuilt) -> tuple[Rebuilt, str | None]:
    """`--resume` of a training that failed (a segment used up its retries and its replacement's): the
    user fixed the worker, say, and expects it to go on, not to fail again at once and leave --fresh,
    every finished segment lost. Each failed attempt whose decision was never made (its member's latest
    decision is still that attempt: the one that failed the training, and any that ended after it) is
    retried, with its next attempt number, and the engine's failure rule then allows a new round of
    maxRetries + 1 attempts; every failure stays in the journal, so if that round fails too the training
    fails as before, and the next --resume gives it one more round."""
    retry = dict(decided)
    for r in records:
        cur = decided.get(r.member)
        if r.status == "failed" and cur is not None and cur.ref == r.ref and cur.attempt == r.suggestion.attempt:
            retry[r.member] = dataclasses.replace(cur, attempt=cur.attempt + 1)
    if retry == decided:
        return rebuilt, None
    again = rebuild(spec, records, retry)
    if again.engine.failed:
        return rebuilt, None
    return again, str(rebuilt.engine.failed)


def _get(inbox: queue.Queue[tuple[Suggestion, SegmentResult] | None]) -> tuple[Suggestion, SegmentResult] | None:
    # A timeout keeps the main thread responsive to Ctrl-C while waiting.
    while True:
        try:
            return inbox.get(timeout=0.5)
        except queue.Empty:
            continue


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline. `_lines` skips it anyway (that segment or
    decision is simply made again), but the resumed run appends to the file: its first line would be
    glued onto the torn one, and that whole line, a finished segment's record, lost to a later resume."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            json.loads(line)
        except ValueError:
            continue  # a line torn by a kill mid-write: that segment simply reruns
        out.append(line)
    return out


def _template_command(spec: TrainingSpec) -> list[str]:
    tpl = spec.template or {}
    containers = (tpl.get("spec") or {}).get("containers") or [{}]
    c = containers[min(trainer_index(tpl), len(containers) - 1)]  # the trainer, as on a cluster
    cmd = list(c.get("command") or []) + list(c.get("args") or [])
    if not cmd:
        raise RunError("spec.worker.command: is required for the process executor (the template's trainer "
                       "container has no command either)")
    return cmd
