"""Ways to run one segment on this machine.

`InlineExecutor` calls a Python function in this process (threads) or a process pool: no process start
per segment, so toy objectives and benchmarks reach thousands of segments per second.
`ProcessExecutor` runs the manifest's command as a subprocess with the real segment contract
(`PBT_SEGMENT`, a result file): exactly what a Kubernetes Job would run.
Both report each finished segment through a callback; neither decides anything.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib
import json
import math
import numbers
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ..contract import parse_result
from ..core.types import SegmentResult, Suggestion

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


def call_inline(fn: Callable[..., Any], contract: dict[str, Any], storage: Any = None) -> dict[str, Any]:
    from pbt_worker import Segment

    try:
        # A function that returns None is credited with what it reported: never with the result file
        # its member's previous segment left at the same path.
        Path(contract["result"]).unlink(missing_ok=True)
        seg = Segment(contract, storage=storage) if storage is not None else Segment(contract)
        out = fn(seg)
        return _result_from_return(out, contract)
    except Exception as e:  # a user's bug fails the segment, not the run
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        return {"error": tb[:1000]}


def _call_in_child(fn_ref: str, search_path: list[str], contract: dict[str, Any]) -> dict[str, Any]:
    return call_inline(resolve_function(fn_ref, search_path), contract)


def _to_result(sug: Suggestion, doc: dict[str, Any], metric: str, duration: float) -> SegmentResult:
    score = doc.get("score")
    if isinstance(score, float) and not math.isfinite(score):
        return SegmentResult(sug.member, sug.segment, None, sug.steps_start, error=f"score is {score}",
                             duration=duration)
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
    def __init__(self, fn_ref: str, search_path: list[str], workers: int, metric: str,
                 pool: str = "threads", storage: Any = None):
        self.metric = metric
        self.fn_ref = fn_ref
        self.search_path = search_path
        self.storage = storage
        self.fn = resolve_function(fn_ref, search_path)
        self.pool: cf.Executor
        if pool == "processes":
            self.pool = cf.ProcessPoolExecutor(max_workers=workers)
        else:
            self.pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pbt-inline")
        self.processes = pool == "processes"

    def submit(self, sug: Suggestion, contract: dict[str, Any], on_done: OnDone) -> None:
        t0 = time.perf_counter()
        if self.processes:
            fut = self.pool.submit(_call_in_child, self.fn_ref, self.search_path, contract)
        else:
            fut = self.pool.submit(call_inline, self.fn, contract, self.storage)

        def done(f: cf.Future[dict[str, Any]]) -> None:
            dt = time.perf_counter() - t0
            if f.cancelled():
                return
            exc = f.exception()
            doc = {"error": f"{type(exc).__name__}: {exc}"} if exc is not None else f.result()
            try:
                res = _to_result(sug, doc, self.metric, dt)
            except Exception as e:  # raising here would lose the result and leave the run waiting forever
                res = SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                    error=f"unreadable result: {type(e).__name__}: {e}"[:1000], duration=dt)
            on_done(sug, res)

        fut.add_done_callback(done)

    def shutdown(self, cancel: bool) -> None:
        self.pool.shutdown(wait=not cancel, cancel_futures=cancel)


class ProcessExecutor:
    """One subprocess per segment, in its own process group so Ctrl-C reaches us first and we stop
    the workers in order (SIGTERM, then SIGKILL after a grace period)."""

    def __init__(self, command: list[str], env: Mapping[str, str], cwd: Path, log_dir: Path, metric: str,
                 timeout: float | None = None, grace: float = 10.0):
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

    def submit(self, sug: Suggestion, contract: dict[str, Any], on_done: OnDone) -> None:
        env = {**os.environ, **self.env, "PBT_SEGMENT": json.dumps(contract)}
        # `python` in a manifest means the interpreter running pbt (its venv), not whatever is first on PATH.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        result_path = Path(contract["result"])
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"m{sug.member:03d}-s{sug.segment:05d}-a{sug.attempt}.log", "wb")  # noqa: SIM115 (closed by the waiter thread)
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(self.command, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            log.close()
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
            with self.lock:
                self.procs.pop(sug.ref, None)
            if self.stopping:
                return
            dt = time.perf_counter() - t0
            if timed_out:
                res = SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                    error=f"timed out after {self.timeout:g}s (spec.segment.timeoutSeconds)",
                                    duration=dt)
            else:
                text = result_path.read_bytes() if result_path.exists() else None
                res = parse_result(text, sug, self.metric, dt)
                if proc.returncode != 0 and res.ok:
                    res = SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                        error=f"exit code {proc.returncode} after reporting a result", duration=dt)
                elif proc.returncode != 0 and text is None:
                    tail = _tail(self.log_dir / f"m{sug.member:03d}-s{sug.segment:05d}-a{sug.attempt}.log")
                    res = SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                        error=f"exit code {proc.returncode}: {tail}", duration=dt)
            on_done(sug, res)

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
            finally:
                if got:
                    self.lock.release()
            threads = [threading.Thread(target=self._stop, args=(p,)) for p in procs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()


def _tail(path: Path, limit: int = 300) -> str:
    try:
        data = path.read_bytes()[-limit:].decode(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return data[-1] if data else "(no output)"
