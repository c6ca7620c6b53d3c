"""A warm worker: one Python interpreter that runs a training program segment after segment.

Starting an interpreter and importing torch costs seconds; a segment of a small model costs a fraction
of that. The local runner's process executor therefore starts, per slot, one long-lived

    python -m pbt_worker.warm JOBS_FD REPLIES_FD train.py ARGS...      (or ... -m package.module ARGS...)

and sends it one job per segment. Each job runs the program exactly as ``python train.py ARGS`` would,
as ``__main__``, with the segment's ``PBT_SEGMENT`` in ``os.environ``, its stdout and stderr (file
descriptors 1 and 2, so C extensions' output too) going to the segment's log, ``sys.argv``,
``sys.path[0]``, the working directory, the environment, the signal handlers, ``sys.stdout`` & co. and
the warning filters reset to what the worker started with. The program's exit status (``sys.exit``, an uncaught exception = 1) is sent back
on the replies pipe; the result file is the contract's, as for a fresh process. What carries over from
one segment to the next is only what Python caches per process: imported modules (torch, the user's
own modules) and :func:`pbt_worker.cached` values (datasets, compiled models). The driver retires a
worker whose segment failed, and kills (process group) one whose segment hangs past its timeout; a
program that calls ``os._exit`` or crashes ends only this worker, and the driver starts another.

Protocol (one JSON line each way): job ``{"env": {NAME: VALUE}, "log": PATH}``; reply ``{"exit": CODE}``.
End of input (the driver finished, or died) ends the worker. Standard library only.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import traceback
import warnings
from typing import Any

_SIGNALS = [s for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2,
                        signal.SIGALRM) if s is not None]


def _exit_code(exc: SystemExit) -> int:
    """What the interpreter would exit with for ``sys.exit(code)``."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
    try:  # C-level stdio buffers (printf from an extension), which a process exit would flush
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):
        pass


class _Program:
    """The target command after the interpreter: a script path or ``-m module``, plus its arguments."""

    def __init__(self, target: list[str]) -> None:
        if not target:
            raise SystemExit("pbt_worker.warm: no program given")
        if target[0] == "-m":
            if len(target) < 2:
                raise SystemExit("pbt_worker.warm: -m needs a module name")
            self.module: str | None = target[1]
            self.path = None
            self.argv = [target[1], *target[2:]]  # runpy puts the module's file into argv[0]
            self.path0 = os.getcwd()  # `python -m` puts the working directory first on sys.path
        else:
            self.module = None
            self.path = target[0]
            self.argv = list(target)
            self.path0 = os.path.dirname(os.path.abspath(target[0]))  # `python script.py`: the script's folder

    def run(self) -> None:
        if self.module is not None:
            runpy.run_module(self.module, run_name="__main__", alter_sys=True)
        else:
            assert self.path is not None
            runpy.run_path(self.path, run_name="__main__")


class _Reset:
    """The process state a fresh interpreter would have, captured at start and restored after each job."""

    def __init__(self, program: _Program) -> None:
        self.env = dict(os.environ)
        self.cwd = os.getcwd()
        self.path = [program.path0, *sys.path[1:]]
        self.handlers = {s: signal.getsignal(s) for s in _SIGNALS}
        self.streams = (sys.stdin, sys.stdout, sys.stderr)
        self.warning_filters = list(warnings.filters)
        self.stdout = os.dup(1)
        self.stderr = os.dup(2)
        for fd in (self.stdout, self.stderr):
            os.set_inheritable(fd, False)

    def before(self, program: _Program, env: dict[str, str], log_path: str) -> None:
        _flush_all()
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.environ.update(env)
        sys.argv = list(program.argv)
        sys.path[:] = self.path

    def after(self) -> None:
        _flush_all()
        sys.stdin, sys.stdout, sys.stderr = self.streams  # a program may have replaced them
        _flush_all()
        warnings.filters[:] = self.warning_filters  # type: ignore[index]  # a list at run time
        os.dup2(self.stdout, 1)
        os.dup2(self.stderr, 2)
        for s, h in self.handlers.items():
            try:
                signal.signal(s, h if h is not None else signal.SIG_DFL)
            except (OSError, ValueError, TypeError):
                pass
        if dict(os.environ) != self.env:
            os.environ.clear()
            os.environ.update(self.env)
        try:
            os.chdir(self.cwd)
        except OSError:
            pass
        sys.path[:] = self.path


def run_job(program: _Program, reset: _Reset, job: dict[str, Any]) -> int:
    reset.before(program, {str(k): str(v) for k, v in job.get("env", {}).items()}, job["log"])
    try:
        program.run()
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # what the interpreter would print before exiting 1
        traceback.print_exc()
        code = 1
    finally:
        reset.after()
    return code


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3:
        print("usage: python -m pbt_worker.warm JOBS_FD REPLIES_FD (SCRIPT | -m MODULE) [ARGS...]", file=sys.stderr)
        return 2
    jobs_fd, replies_fd = int(args[0]), int(args[1])
    for fd in (jobs_fd, replies_fd):  # a program's own subprocesses must not hold our pipes open
        os.set_inheritable(fd, False)
    program = _Program(args[2:])
    reset = _Reset(program)
    sys.path[:] = reset.path
    with os.fdopen(jobs_fd, "rb") as jobs, os.fdopen(replies_fd, "wb", buffering=0) as replies:
        for line in jobs:
            code = run_job(program, reset, json.loads(line))
            try:
                replies.write(json.dumps({"exit": code}).encode() + b"\n")
            except BrokenPipeError:  # the driver is gone: nobody waits for another segment
                return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
