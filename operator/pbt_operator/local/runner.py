"""`pbt run`: drive the engine with a local executor, persist every step, resume after a kill.

Persistence is write-ahead: a suggestion is appended to `suggestions.jsonl` before it is dispatched,
and a finished segment to `results.jsonl` the moment it is told to the engine. Those two files are this
driver's journal; `core/policy.rebuild` turns them back into the engine, so a resumed run never repeats
a finished segment and makes exactly the decisions an uninterrupted run would. Admission and checkpoint
garbage collection follow the same driver policy as the operator (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import json
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoints import checkpoint_uri, storage_root
from ..contract import build_contract
from ..core.engine import Engine
from ..core.policy import admit, garbage_batch, rebuild
from ..core.types import Record, Ref, SegmentResult, Suggestion
from ..spec import TrainingSpec
from .durability import Barrier, fsync_enabled, sync_filesystems
from .executors import Executor, InlineExecutor, ProcessExecutor
from .results import write_outputs


class RunError(RuntimeError):
    pass


@dataclass
class RunSummary:
    run_dir: Path
    engine: Engine
    wall_seconds: float
    interrupted: bool = False

    @property
    def best(self) -> Record | None:
        return self.engine.best


def spec_fingerprint(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class LocalRunner:
    def __init__(self, spec: TrainingSpec, run_dir: Path, *, resume: bool = False, fingerprint: str = "",
                 progress: Callable[[Engine, dict[int, Suggestion], list[Suggestion]], None] | None = None,
                 plot: bool = True, storage: Any = None):
        self.spec = spec
        self.run_dir = run_dir.resolve()  # workers run in the manifest's folder: paths must be absolute
        self.resume = resume
        self.fingerprint = fingerprint
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
        if self.resume:
            old = json.loads(meta.read_text())
            if self.fingerprint and old.get("fingerprint") != self.fingerprint:
                raise RunError(f"--resume: the manifest changed since {d} was started "
                               f"(fingerprint {old.get('fingerprint')} != {self.fingerprint}); use --fresh")
        else:
            meta.write_text(json.dumps({"name": self.spec.name, "fingerprint": self.fingerprint,
                                        "storage": self.root, "started": time.time()}, indent=2))
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
        if w.executor == "inline":
            assert w.function is not None
            return InlineExecutor(w.function, [str(cwd), str(base)], spec.parallelism, spec.objective.metric,
                                  w.inline_pool, storage=self.storage, file_fsync=not self.barrier)
        command = list(w.command) or _template_command(spec)
        env = {**w.env, "PBT_FILE_FSYNC": "0"} if self.barrier else dict(w.env)
        return ProcessExecutor(command, env, cwd, self.run_dir / "logs", spec.objective.metric,
                               timeout=spec.segment.timeout_seconds, warm=w.warm, slots=spec.parallelism)

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> RunSummary:
        if self.spec.parallelism < 1:  # valid on a cluster (a paused training), meaningless here
            raise RunError("spec.parallelism: must be >= 1 for pbt run (got 0; 0 pauses a training on a cluster)")
        try:
            executor = self._executor()  # first: an unimportable function must not leave a run folder
        except ValueError as e:
            raise RunError(str(e)) from None
        records, decided = self._prepare()
        rebuilt = rebuild(self.spec, records, decided)
        engine = rebuilt.engine
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
            handed_out: set[Ref] = set()
            garbage: list[tuple[int, list[str]]] = []  # (barrier that makes deleting them safe, uris)
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
                                garbage.append((barrier.requested,
                                                [checkpoint_uri(self.root, self.spec.name, r) for r in refs]))
                        gc = [u for n, uris in garbage if n <= durable for u in uris]
                        garbage = [(n, uris) for n, uris in garbage if n > durable]
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
            else:
                executor.shutdown(cancel=False)
            barrier.close()
        summary = RunSummary(self.run_dir, engine, time.perf_counter() - t0, interrupted)
        if self.progress:
            self.progress(engine, running, queued)
        if not interrupted:
            write_outputs(self.spec, engine, self.run_dir, self.root, plot=self.plot)
        return summary


def _get(inbox: queue.Queue[tuple[Suggestion, SegmentResult] | None]) -> tuple[Suggestion, SegmentResult] | None:
    # A timeout keeps the main thread responsive to Ctrl-C while waiting.
    while True:
        try:
            return inbox.get(timeout=0.5)
        except queue.Empty:
            continue


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
    c = (tpl.get("spec") or {}).get("containers", [{}])[0]
    cmd = list(c.get("command") or []) + list(c.get("args") or [])
    if not cmd:
        raise RunError("spec.worker.command: is required for the process executor (the template's first "
                       "container has no command either)")
    return cmd
