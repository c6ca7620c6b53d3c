"""The driver's side of a warm worker (`pbt_worker.warm`): start one, hand it a segment, wait for its
exit status with the segment's timeout, and end it.

A warm worker is one `python -m pbt_worker.warm` per slot that runs the manifest's `python SCRIPT` (or
`python -m MODULE`) as `__main__` for each segment, so torch and the dataset load once per slot instead
of once per segment. Everything that decides what a finished segment means (result file, exit status,
timeout) stays in `ProcessExecutor`, shared with the fresh-process path.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

_PYTHON = re.compile(r"python(\d+(\.\d+)*)?")


def warm_target(command: Sequence[str], cwd: Path) -> list[str] | None:
    """`[SCRIPT, ARGS...]` or `[-m, MODULE, ARGS...]` when `command` is a plain Python program start,
    else None (the command then gets a fresh process per segment: a shell script, `python -c`,
    interpreter options whose effect a shared interpreter could not reproduce)."""
    if len(command) < 2 or not _PYTHON.fullmatch(os.path.basename(command[0])):
        return None
    rest = list(command[1:])
    if rest[0] == "-m":
        return rest if len(rest) >= 2 and not rest[1].startswith("-") else None
    if rest[0].startswith("-"):
        return None
    script = Path(rest[0]) if os.path.isabs(rest[0]) else cwd / rest[0]
    return rest if script.is_file() else None


class WarmWorker:
    """One long-lived interpreter; used by one segment at a time (the executor keeps the pool)."""

    def __init__(self, python: str, target: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path):
        jobs_r, self._jobs_w = os.pipe()
        self._replies_r, replies_w = os.pipe()
        try:
            with open(log, "ab") as out:
                # Its own session, like a fresh segment process: Ctrl-C reaches the runner first, and a
                # hung segment is stopped with everything it started (killpg).
                self.proc = subprocess.Popen(
                    [python, "-m", "pbt_worker.warm", str(jobs_r), str(replies_w), *target],
                    cwd=cwd, env=dict(env), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    pass_fds=(jobs_r, replies_w), start_new_session=True)
        except BaseException:
            for fd in (self._jobs_w, self._replies_r):
                os.close(fd)
            raise
        finally:
            os.close(jobs_r)
            os.close(replies_w)
        self.log = log
        self.segments = 0
        self._jobs: IO[bytes] | None = os.fdopen(self._jobs_w, "wb", buffering=0)
        self._buf = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, env: Mapping[str, str], log: Path) -> None:
        """Start a segment; OSError (BrokenPipeError) if the worker has died since its last segment."""
        if self._jobs is None:
            raise BrokenPipeError("worker retired")
        self._jobs.write(json.dumps({"env": dict(env), "log": str(log)}).encode() + b"\n")
        self.segments += 1

    def wait(self, timeout: float | None) -> int | None:
        """The segment's exit status; None if the worker ended without answering (crash, os._exit,
        a signal). Raises TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self._replies_r, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not sel.select(left):
                    raise TimeoutError
                try:
                    chunk = os.read(self._replies_r, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    return None
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            return int(json.loads(line)["exit"])
        except (ValueError, KeyError, TypeError):
            return None

    def retire(self, grace: float) -> None:
        """End a worker that is not running a segment: closing its job pipe makes it exit; one that
        does not within `grace` seconds is killed."""
        self._close_jobs()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill(0.0)
        self.close()

    def kill(self, grace: float) -> None:
        """SIGTERM to the worker's process group, SIGKILL after `grace` seconds (a hung segment, Ctrl-C)."""
        self._close_jobs()
        try:
            if grace > 0:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=grace)
                    return
                except subprocess.TimeoutExpired:
                    pass
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()

    def returncode(self, grace: float) -> int:
        """The exit status of a worker that stopped answering (it closed its pipe: it is exiting)."""
        try:
            return self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill(grace)
            return self.proc.wait()

    def _close_jobs(self) -> None:
        jobs, self._jobs = self._jobs, None
        if jobs is not None:
            try:
                jobs.close()
            except OSError:
                pass

    def close(self) -> None:
        """Release the reply pipe; only for the thread that waits on it (or when none does)."""
        if self._replies_r >= 0:
            try:
                os.close(self._replies_r)
            except OSError:
                pass
            self._replies_r = -1


def python_for(command0: str, path: str) -> str:
    """The interpreter `command[0]` names, resolved on the segment's PATH (the runner's venv first)."""
    return shutil.which(command0, path=path) or command0
