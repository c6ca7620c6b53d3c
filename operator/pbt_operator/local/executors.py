"""Ways to run one segment on this machine.

`InlineExecutor` calls a Python function in this process (threads) or a process pool: no process start
per segment, so toy objectives and benchmarks reach thousands of segments per second.
`ProcessExecutor` runs the manifest's command with the real segment contract (`PBT_SEGMENT`, a result
file, the exit status): exactly what a Kubernetes Job would run, in a fresh process per segment or, for a
`python SCRIPT` command by default, in warm interpreters that run segment after segment (`warm.py`).
Both report each finished segment through a callback; neither decides anything.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import json
import math
import numbers
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..contract import GC_FAILED, parse_result
from ..core.display import shorten
from ..core.types import DIVERGED_ERROR, SegmentResult, Suggestion
from .gpus import ENV as GPU_ENV
from .gpus import GpuSlots
from .warm import WarmWorker, python_for, warm_target

OnDone = Callable[[Suggestion, SegmentResult], None]


class Executor(Protocol):
    def submit(self, sug: Suggestion, contract: dict[str, Any], on_done: OnDone) -> None: ...

    def shutdown(self, cancel: bool) -> None: ...


def resolve_function(ref: str, search_path: list[str]) -> Callable[..., Any]:
    """Import `module:function`, looking in the manifest's folder first."""
    for p in reversed(search_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    mod_name, _, fn_name = ref.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"spec.worker.function: cannot import module {mod_name!r}: {e}") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"spec.worker.function: module {mod_name!r} has no function {fn_name!r}")
    return fn


def _result_from_return(out: Any, contract: Mapping[str, Any]) -> dict[str, Any]:
    """An inline function may return a score, a dict like the result file, or None after
    calling seg.report() itself."""
    if out is None:
        try:
            with open(contract["result"]) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"error": "function returned None and reported no result"}
    if isinstance(out, numbers.Real) and not isinstance(out, bool):  # numpy scalars too
        return {"score": float(out), "steps": contract["steps"]["start"] + contract["steps"]["budget"]}
    if isinstance(out, Mapping):
        d = dict(out)
        if "metrics" not in d:  # flat: score and steps are what the result file calls them, the rest metrics
            flat = {"score": d.pop("score", None), "metrics": d}
            if "steps" in d:
                flat["steps"] = d.pop("steps")
            d = flat
        d.setdefault("steps", contract["steps"]["start"] + contract["steps"]["budget"])
        return d
    return {"error": f"function returned {type(out).__name__}; expected a number, a dict or None"}


def segment_log(log_dir: Path, sug: Suggestion) -> Path:
    """The log of one segment attempt: its output (process executor), or its traceback (inline)."""
    return log_dir / f"m{sug.member:03d}-s{sug.segment:05d}-a{sug.attempt}.log"


def _returned_over_reported(seg: Any, doc: Mapping[str, Any]) -> str | None:
    """What to tell the user when the function called seg.report(score) and then returned another
    score: the returned one counts (what a function returns is its result), so the reported one is lost
    from the journal, though the segment's record in storage keeps it. None when they agree."""
    reported = (seg.last_result or {}).get("score")
    returned = doc.get("score")
    if (not isinstance(reported, numbers.Real) or not isinstance(returned, numbers.Real)
            or isinstance(returned, bool) or "error" in doc or not math.isfinite(float(returned))
            or float(returned) == float(reported)):
        return None
    return (f"member {seg.member} segment {seg.index}: the function called seg.report(score={float(reported)!r}) "
            f"and returned {float(returned)!r}: the returned score counts. Return None after seg.report(...), "
            "or return the score without reporting it (said once per run)")


def call_inline(fn: Callable[..., Any], contract: dict[str, Any], storage: Any = None,
                log: Path | None = None) -> tuple[dict[str, Any], str | None]:
    """Run one segment of `fn`: its result document, and a note when the function both reported a
    score and returned a different one (`_returned_over_reported`)."""
    from pbt_worker import PermanentError, Segment
    from pbt_worker.segment import error_result

    seg = None
    try:
        # A function that returns None is credited with what it reported: never with the result file
        # its member's previous segment left at the same path.
        Path(contract["result"]).unlink(missing_ok=True)
        seg = Segment(contract, storage=storage) if storage is not None else Segment(contract)
        out = fn(seg)
        doc = _result_from_return(out, contract)
        if seg.gc_failed and "error" not in doc:  # a returned result knows nothing of the deletes
            doc[GC_FAILED] = len(seg.gc_failed)
        return doc, (_returned_over_reported(seg, doc) if out is not None else None)
    except Exception as e:  # a user's bug fails the segment, not the run
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        if log is not None:  # the one line above names no file or line: the whole traceback goes here
            try:
                log.parent.mkdir(parents=True, exist_ok=True)
                log.write_text(traceback.format_exc())
            except OSError:
                pass
        said = seg.last_result if seg is not None else None
        if said is not None and said.get("diverged") is True:  # seg.report(nan) raised out of the function
            return dict(said), None
        return error_result(shorten(tb, 1000), permanent=isinstance(e, PermanentError)), None


def _child_init(env: Mapping[str, str]) -> None:
    """A process pool's child: the workers' environment (spec.worker.env, and PBT_FILE_FSYNC=0 when the
    runner makes checkpoints durable per batch) over its own (no other thread of the caller shares it)."""
    if env:
        from pbt_worker.storage import reset_storage_cache

        os.environ.update(env)
        reset_storage_cache()  # a forked child may hold the parent's backend, built before this


def _call_in_child(fn_ref: str, search_path: list[str], contract: dict[str, Any],
                   log: Path | None = None) -> tuple[dict[str, Any], str | None]:
    return call_inline(resolve_function(fn_ref, search_path), contract, log=log)


def _to_result(sug: Suggestion, doc: dict[str, Any], metric: str, duration: float) -> SegmentResult:
    score = doc.get("score")
    if isinstance(score, float) and not math.isfinite(score):
        return SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                             error=f"{DIVERGED_ERROR} score is {score}", duration=duration)
    metrics = doc.get("metrics")
    for name, value in (metrics.items() if isinstance(metrics, Mapping) else ()):
        try:
            json.dumps(value, default=_json_scalar)
        except (TypeError, ValueError):  # name it: the bare TypeError said only 'ndarray is not a number'
            return SegmentResult(sug.member, sug.segment, None, sug.steps_start, duration=duration,
                                 error=f"metric {name!r} must be a number, string or bool (got "
                                       f"{type(value).__name__}); report .item() of a scalar tensor or array")
    return parse_result(json.dumps(doc, allow_nan=True, default=_json_scalar), sug, metric, duration)


def _json_scalar(o: Any) -> Any:
    """numpy / torch scalars in a returned dict become plain numbers (as the worker SDK's report() does)."""
    item = getattr(o, "item", None)
    if callable(item):
        try:
            v = item()
        except (TypeError, ValueError):
            v = None
        if isinstance(v, (int, float, str, bool)):
            return v
    raise TypeError(f"{type(o).__name__} is not a number, string or bool")


class InlineExecutor:
    """`fn_ref` is spec.worker.function (`module:function`, imported here, or in each child of a process
    pool), or the Python function itself (`pbt_operator.run(function=...)`: threads only, since a
    notebook's function cannot be imported by another process)."""

    def __init__(self, fn_ref: str | Callable[..., Any], search_path: list[str], workers: int, metric: str,
                 pool: str = "threads", storage: Any = None,
                 log_dir: Path | None = None, env: Mapping[str, str] | None = None,
                 note: Callable[[str], None] | None = None):
        self.metric = metric
        # How a note reaches the user (the runner's: `pbt run: ...` or `pbt_operator.run: ...` on stderr).
        self.note = note if note is not None else (lambda text: print(f"pbt run: {text}", file=sys.stderr))
        self._told_returned_over_reported = False
        self._note_lock = threading.Lock()
        self.log_dir = log_dir
        self.fn_ref = fn_ref
        self.search_path = search_path
        self.storage = storage
        self.fn = fn_ref if callable(fn_ref) else resolve_function(fn_ref, search_path)
        self.pool: cf.Executor
        if pool == "processes":
            if callable(fn_ref):
                raise ValueError("spec.worker.pool: a Python function runs in threads (pool: threads); "
                                 "processes need spec.worker.function: module:function")
            self.pool = cf.ProcessPoolExecutor(max_workers=workers, initializer=_child_init,
                                               initargs=(dict(env or {}),))
        else:
            self.pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pbt-inline")
        self.processes = pool == "processes"
        self.pending: set[cf.Future[tuple[dict[str, Any], str | None]]] = set()  # not done (see unfinished)

    def unfinished(self) -> list[cf.Future[tuple[dict[str, Any], str | None]]]:
        """Segments still running: after `shutdown(cancel=True)` a thread cannot be stopped, and goes on
        to save its checkpoint (local/runner.py waits for them before the same folder runs again)."""
        return [f for f in list(self.pending) if not f.done()]

    def submit(self, sug: Suggestion, contract: dict[str, Any], on_done: OnDone) -> None:
        t0 = time.perf_counter()
        log = segment_log(self.log_dir, sug) if self.log_dir is not None else None
        if self.processes:
            assert isinstance(self.fn_ref, str)
            fut = self.pool.submit(_call_in_child, self.fn_ref, self.search_path, contract, log)
        else:
            fut = self.pool.submit(call_inline, self.fn, contract, self.storage, log)
        self.pending.add(fut)

        def done(f: cf.Future[tuple[dict[str, Any], str | None]]) -> None:
            self.pending.discard(f)
            dt = time.perf_counter() - t0
            if f.cancelled():
                return
            exc = f.exception()
            doc, said = ({"error": f"{type(exc).__name__}: {exc}"}, None) if exc is not None else f.result()
            if said is not None:
                self._tell_once(said)
            try:
                res = _to_result(sug, doc, self.metric, dt)
            except Exception as e:  # raising here would lose the result and leave the run waiting forever
                res = SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                    error=shorten(f"unreadable result: {type(e).__name__}: {e}", 1000), duration=dt)
            on_done(sug, res)

        fut.add_done_callback(done)

    def _tell_once(self, text: str) -> None:
        with self._note_lock:
            if self._told_returned_over_reported:
                return
            self._told_returned_over_reported = True
        self.note(text)

    def shutdown(self, cancel: bool) -> None:
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


def command_problem(command: Sequence[str], cwd: Path, path: str,
                    field: str = "spec.worker.command") -> str | None:
    """What makes `command` (the manifest's `field`) unable to start in `cwd` with this PATH, before any
    segment tries it: a folder, program or `python SCRIPT` that is not there. Every segment would fail
    the same way, each retried, and the message would not say which field to fix."""
    if not cwd.is_dir():
        return f"spec.worker.workingDir: {cwd} is not a folder (relative paths start at the manifest's folder)"
    prog = command[0]
    if os.sep in prog:
        found = prog if os.path.isabs(prog) else str(cwd / prog)
        if not (os.path.isfile(found) and os.access(found, os.X_OK)):
            where = "" if os.path.isabs(prog) else f" (looked in {cwd})"
            return f"{field}: {prog!r} is not an executable file{where}"
    elif shutil.which(prog, path=path) is None:
        return f"{field}: {prog!r} is not a program on PATH"
    rest = list(command[1:])
    if re.fullmatch(r"python(\d+(\.\d+)*)?", os.path.basename(prog)) and rest and not rest[0].startswith("-"):
        script = Path(rest[0]) if os.path.isabs(rest[0]) else cwd / rest[0]
        if not script.is_file():
            where = "" if os.path.isabs(rest[0]) else f" in {cwd} (the manifest's folder, or spec.worker.workingDir)"
            return f"{field}: the script {rest[0]!r} does not exist{where}"
    return None


class ProcessExecutor:
    """The manifest's command with the real segment contract, in its own process group so Ctrl-C
    reaches us first and we stop the workers in order (SIGTERM, then SIGKILL after a grace period).

    Warm (the default, `spec.worker.warm`): a `python SCRIPT` / `python -m MODULE` command runs in a pool
    of long-lived interpreters (`local/warm.py`, `pbt_worker.warm`), at most `slots` of them, each
    running segment after segment; a segment that fails, crashes or times out takes its worker with it
    and the next segment starts a new one. Cold (`warm=False`, or any other command): a fresh process
    per segment. Both read the same result file and exit status, so a segment means the same either way.

    `gpu_slots` (local/gpus.py): each segment process, or each warm worker for its life, runs with one
    slot's CUDA_VISIBLE_DEVICES and gives it back once it has exited.
    """

    def __init__(self, command: list[str], env: Mapping[str, str], cwd: Path, log_dir: Path, metric: str,
                 timeout: float | None = None, grace: float = 10.0, *, warm: bool = False, slots: int = 1,
                 field: str = "spec.worker.command", gpu_slots: Sequence[str] = ()):
        self.command = command
        self.env = dict(env)
        self.cwd = cwd
        self.log_dir = log_dir
        self.metric = metric
        self.timeout = timeout
        self.grace = grace
        self.procs: dict[tuple[int, int], subprocess.Popen[bytes]] = {}
        self.lock = threading.Lock()
        self.stopping = False
        problem = command_problem(command, cwd, self._base_env()["PATH"], field)
        if problem:  # before the run folder exists: a typo must not cost retries and a run to --fresh
            raise ValueError(problem)
        self.warm_target = warm_target(command, cwd) if warm else None
        if warm and self.warm_target is None:
            print(f"pbt run: spec.worker.command {command} is not `python SCRIPT` or `python -m MODULE`: "
                  "each segment gets a fresh process (spec.worker.warm: false says so without this note)",
                  file=sys.stderr)
        self.slots = max(1, slots)
        self.idle: list[WarmWorker] = []
        self.live: set[WarmWorker] = set()
        self.started_workers = 0
        self.gpus = GpuSlots(gpu_slots) if gpu_slots else None
        self.gpu_of: dict[WarmWorker, str] = {}

    def _take_gpu(self) -> str | None:
        # Never waits in practice for more than a retiring worker's exit: the runner starts at most as
        # many segments at once as there are slots.
        return self.gpus.take(timeout=self.grace + 30.0) if self.gpus is not None else None

    def _give_gpu(self, slot: str | None) -> None:
        if slot is not None and self.gpus is not None:
            self.gpus.give(slot)

    def _base_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        # `python` in a manifest means the interpreter running pbt (its venv), not whatever is first on PATH.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        return env

    def _log_path(self, sug: Suggestion) -> Path:
        return segment_log(self.log_dir, sug)

    def _outcome(self, sug: Suggestion, returncode: int, result_path: Path, dt: float) -> SegmentResult:
        """What a segment that ended with `returncode` produced: the same rules warm or cold."""
        text = result_path.read_bytes() if result_path.exists() else None
        res = parse_result(text, sug, self.metric, dt)
        if returncode != 0 and res.ok:
            res = SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                error=f"exit code {returncode} after reporting a result", duration=dt)
        elif returncode != 0 and text is None:
            tail = _tail(self._log_path(sug))
            res = SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                error=f"exit code {returncode}: {tail}", duration=dt)
        return res

    def _timed_out(self, sug: Suggestion, dt: float) -> SegmentResult:
        return SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                             error=f"timed out after {self.timeout:g}s (spec.segment.timeoutSeconds)", duration=dt)

    def submit(self, sug: Suggestion, contract: dict[str, Any], on_done: OnDone) -> None:
        result_path = Path(contract["result"])
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.warm_target is not None:
            self._submit_warm(sug, contract, on_done, result_path)
            return
        env = {**self._base_env(), "PBT_SEGMENT": json.dumps(contract)}
        try:
            gpu = self._take_gpu()
        except TimeoutError as e:
            on_done(sug, SegmentResult(sug.member, sug.segment, None, sug.steps_start, error=f"cannot start: {e}"))
            return
        if gpu is not None:
            env[GPU_ENV] = gpu
        log = open(self._log_path(sug), "wb")  # noqa: SIM115 (closed by the waiter thread)
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(self.command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            log.close()
            self._give_gpu(gpu)
            on_done(sug, SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                       error=f"cannot start {self.command[0]!r}: {e}"))
            return
        with self.lock:
            self.procs[sug.ref] = proc

        def wait() -> None:
            timed_out = False
            try:
                proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                self._stop(proc)
            finally:
                log.close()
                self._give_gpu(gpu)
            with self.lock:
                self.procs.pop(sug.ref, None)
            if self.stopping:
                return
            dt = time.perf_counter() - t0
            res = self._timed_out(sug, dt) if timed_out else self._outcome(sug, proc.returncode, result_path, dt)
            on_done(sug, res)

        threading.Thread(target=wait, name=f"pbt-seg-{sug.member}-{sug.segment}", daemon=True).start()

    # -- warm workers -----------------------------------------------------------------------------
    def _start_worker(self) -> WarmWorker:
        assert self.warm_target is not None
        env = self._base_env()
        gpu = self._take_gpu()  # TimeoutError is an OSError: the segment fails as "cannot start"
        if gpu is not None:
            env[GPU_ENV] = gpu  # for the worker's life: CUDA reads it once, when it initialises
        with self.lock:
            self.started_workers += 1
            n = self.started_workers
        try:
            worker = WarmWorker(python_for(self.command[0], env["PATH"]), self.warm_target, env, self.cwd,
                                self.log_dir / f"worker-{n:03d}.log")
        except BaseException:
            self._give_gpu(gpu)
            raise
        with self.lock:
            self.live.add(worker)
            if gpu is not None:
                self.gpu_of[worker] = gpu
        return worker

    def _hand_to_worker(self, contract: dict[str, Any], log_path: Path) -> WarmWorker:
        """An idle worker (a new one if none is idle, or if the idle one died meanwhile) now running
        the segment."""
        with self.lock:
            worker = self.idle.pop() if self.idle else None
        payload = {"PBT_SEGMENT": json.dumps(contract)}
        if worker is not None:
            try:
                worker.send(payload, log_path)
                return worker
            except OSError:  # it died while idle
                self._drop(worker)
        worker = self._start_worker()
        try:
            worker.send(payload, log_path)
        except OSError as e:  # it could not even start (a broken interpreter, no pbt_worker)
            code = worker.returncode(self.grace)
            self._drop(worker)
            _copy_tail(worker.log, log_path)
            raise OSError(f"the worker exited with code {code} before its first segment: {_tail(log_path)}") from e
        return worker

    def _drop(self, worker: WarmWorker, *, kill: bool = False) -> None:
        with self.lock:
            self.live.discard(worker)
        if kill:
            worker.kill(self.grace)
        else:
            worker.retire(self.grace)
        worker.close()
        with self.lock:
            gpu = self.gpu_of.pop(worker, None)
        self._give_gpu(gpu)  # only now: the process that held the GPU has exited

    def _submit_warm(self, sug: Suggestion, contract: dict[str, Any], on_done: OnDone, result_path: Path) -> None:
        log_path = self._log_path(sug)
        log_path.write_bytes(b"")
        t0 = time.perf_counter()
        try:
            worker = self._hand_to_worker(contract, log_path)
        except OSError as e:
            on_done(sug, SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                       error=f"cannot start {self.command[0]!r}: {e}"))
            return

        def wait() -> None:
            try:
                code = worker.wait(self.timeout)
            except TimeoutError:
                if self.stopping:
                    return
                self._drop(worker, kill=True)
                if not self.stopping:
                    on_done(sug, self._timed_out(sug, time.perf_counter() - t0))
                return
            if self.stopping:
                return
            if code is None:  # the worker itself ended: a crash, os._exit, a signal
                code = worker.returncode(self.grace)
                if code == 0:
                    code = 1  # it exited without answering: never a clean segment end
                self._drop(worker)
                if _empty(log_path):
                    _copy_tail(worker.log, log_path)
            elif code != 0:
                # A failed program may have left its interpreter in any state: the next segment
                # gets a fresh one, as a fresh process per segment would.
                threading.Thread(target=self._drop, args=(worker,), daemon=True).start()
            else:
                with self.lock:
                    keep = len(self.idle) < self.slots and not self.stopping
                    if keep:
                        self.idle.append(worker)
                if not keep:
                    threading.Thread(target=self._drop, args=(worker,), daemon=True).start()
            if self.stopping:
                return
            on_done(sug, self._outcome(sug, code, result_path, time.perf_counter() - t0))

        threading.Thread(target=wait, name=f"pbt-seg-{sug.member}-{sug.segment}", daemon=True).start()

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=self.grace)
        except (ProcessLookupError, PermissionError):
            pass
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    def shutdown(self, cancel: bool) -> None:
        if cancel:
            self.stopping = True
            # Ctrl-C raises in the main thread wherever it is, possibly between `submit` taking the
            # lock and the `with` block that would release it: never wait for the lock forever here
            # (copying the dict is atomic under the GIL either way).
            got = self.lock.acquire(timeout=2.0)
            try:
                procs = list(self.procs.values())
                workers = list(self.live)
                self.live.clear()
                self.idle.clear()
            finally:
                if got:
                    self.lock.release()
            threads = [threading.Thread(target=self._stop, args=(p,)) for p in procs]
            threads += [threading.Thread(target=w.kill, args=(self.grace,)) for w in workers]
        else:
            with self.lock:
                workers = list(self.live)
                self.live.clear()
                self.idle.clear()
            threads = [threading.Thread(target=w.retire, args=(self.grace,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return True


def _copy_tail(src: Path, dst: Path, limit: int = 4000) -> None:
    """A worker that died before its segment could write anything (a bad interpreter, a missing
    pbt_worker) said why in its own log: put that where the segment's error message looks."""
    try:
        dst.write_bytes(src.read_bytes()[-limit:])
    except OSError:
        pass


def _tail(path: Path, limit: int = 300) -> str:
    """The log's last line, at most ``limit`` characters: shortened at its end, so that an exception's
    type and first words (what a user needs) survive a long message."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            data = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    if not data:
        return "(no output)"
    return shorten(data[-1], limit)
