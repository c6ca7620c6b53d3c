"""One `pbt run` per run folder at a time.

Two runs of one folder (`--resume` in a second terminal, a CI retry while the first still runs) would
append to the same journals and delete each other's checkpoints as garbage; `--fresh` would delete the
folder under a running run. The running `pbt run` holds an advisory lock (flock) on a file in the folder
for its whole life; the kernel drops it when the process dies however it dies, so a killed run never
leaves a stale lock. `pbt status` reads the same lock to tell a run that is still going from one that
was interrupted."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".pbt-run.lock"


class RunFolderBusy(Exception):
    def __init__(self, run_dir: Path, pid: int | None):
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"{run_dir} is in use by another pbt run ({who}): wait for it to end or stop it "
                         "(Ctrl-C, or kill -TERM), then run this again")
        self.pid = pid


def _pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def acquire(run_dir: Path) -> int:
    """Lock `run_dir` for this process; the returned descriptor holds the lock until `release`."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _pid(fd)
        os.close(fd)
        raise RunFolderBusy(run_dir, pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(fd: int) -> None:
    os.close(fd)  # closing the last descriptor drops the flock


def holder(run_dir: Path) -> int | None:
    """The pid of the `pbt run` running `run_dir` now (0 when its pid is unknown), or None when none
    is. Never creates the lock file."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _pid(fd) or 0
    finally:
        os.close(fd)
    return None
