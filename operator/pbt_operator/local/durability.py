"""One durability barrier per batch of finished segments, instead of several fsyncs per checkpoint.

With `file://` checkpoints a worker left to itself makes each save durable on its own: fsync the
object, fsync the marker, fsync the folder (three journal commits), plus one per garbage-collected
checkpoint, while the runner's journal (`results.jsonl`) was only flushed. Under `pbt run` the runner
knows exactly when durability matters: before it acts on a finished segment (starts the decision it
caused, or hands out a `gc` list that deletes the checkpoint the segment restored from). So its workers
write checkpoints without fsync (`PBT_FILE_FSYNC=0`) and the runner, once per batch of finished segments,
after writing their results and the decisions they caused, makes the filesystems holding the
checkpoints and the journal durable with one `syncfs` each. A machine crash before that barrier loses
at most results whose decisions never started, and their checkpoints, all of which simply rerun from
the previous checkpoint (still there: it is only deleted by a decision started after the barrier). After
it, the results, their checkpoints and the decisions are all on disk, which is more than before, when a
durable deletion could outlive the result that made it safe.

The barrier runs off the critical path (`Barrier`): the runner numbers its batches, hands each to a
background thread that syncs (coalescing the batches that piled up meanwhile into one sync), and keeps
running what is already durable. A segment decided in batch `g` starts only once barrier `g` has
completed; one decided long ago (in asynchronous mode, usually the next member to run) starts at
once, while the newest batch is still being synced. Checkpoints become garbage because of results,
so a garbage batch computed after batch `g` is handed out only once barrier `g` has completed too.

Why `syncfs` and not an fsync of just the files the batch wrote (`fsync_tree`, kept for the
comparison): measured by benchmarks/sync_cost.py (benchmarks/README.md), one `syncfs` was as cheap as
the same batch's seven fsyncs per segment from parallel threads or cheaper on a quiet and on a busy
filesystem, and several times cheaper with several segments per batch; on ext4 an fsync commits the
whole journal transaction, others' data included, anyway.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from pathlib import Path

_libc = None


def _syncfs(fd: int) -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        fn = _libc.syncfs
    except (OSError, AttributeError):  # not Linux: sync everything (slower, same guarantee)
        os.sync()
        return
    if fn(fd) != 0:
        os.sync()


def fsync_enabled(env: dict[str, str] | None = None) -> bool:
    """`PBT_FILE_FSYNC=0` (scratch runs) turns durability off for the workers and the runner alike."""
    value = (env or {}).get("PBT_FILE_FSYNC", os.environ.get("PBT_FILE_FSYNC"))
    return value is None or value.strip().lower() not in ("0", "false", "no", "off", "")


def sync_filesystems(paths: Iterable[Path]) -> None:
    """Make everything written so far on the filesystems holding `paths` durable: one `syncfs` per
    distinct filesystem (a path that does not exist yet counts as its nearest existing parent)."""
    seen: set[int] = set()
    for p in paths:
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            dev = os.fstat(fd).st_dev
            if dev not in seen:
                seen.add(dev)
                _syncfs(fd)
        finally:
            os.close(fd)


def _fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # deleted meanwhile (a temporary name, garbage collected): nothing to keep
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folders: Iterable[Path], fds: Iterable[int], root: Path, pool: Executor | None = None) -> None:
    """Make durable just what a batch wrote: every file in each of `folders` (new checkpoints), each
    folder and its parents up to `root` (their entries), and the open files `fds` (the journal).
    With `pool`, the fsyncs run in its threads (a filesystem commits concurrent fsyncs together)."""
    paths: set[Path] = set()
    for folder in folders:
        try:
            paths.update(e.path for e in os.scandir(folder) if e.is_file(follow_symlinks=False))  # type: ignore[misc]
        except FileNotFoundError:
            continue
        p = folder
        while p not in paths and (p == root or root in p.parents):
            paths.add(p)
            p = p.parent
    jobs: list[Callable[[], None]] = [lambda fd=fd: os.fdatasync(fd) for fd in fds]  # type: ignore[misc]
    jobs += [lambda p=p: _fsync_path(Path(p)) for p in paths]  # type: ignore[misc]
    if pool is None:
        for job in jobs:
            job()
    else:
        for f in [pool.submit(job) for job in jobs]:
            f.result()


class Barrier:
    """Numbered durability barriers, synced by one background thread.

    `request()` (call it after flushing what the batch wrote) returns the batch's number; `durable`
    is the highest number whose writes are known to be on disk. Requests that arrive while a sync
    runs are covered together by the next one: everything flushed before a sync starts is durable
    when it returns. `wake` is called (on the barrier's thread) after each completed sync, so a
    driver waiting for results can also wait for durability. With `sync=None` (no durability
    wanted: `mem://`, `PBT_FILE_FSYNC=0`) every request is durable at once.
    """

    def __init__(self, sync: Callable[[], None] | None, wake: Callable[[], None] = lambda: None):
        self._sync = sync
        self._wake = wake
        self._cond = threading.Condition()
        self.requested = 0
        self.durable = 0
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def request(self) -> int:
        with self._cond:
            self.requested += 1
            if self._sync is None:
                self.durable = self.requested
                return self.requested
            if self._error is not None:
                raise self._error
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="pbt-durability", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return self.requested

    def _loop(self) -> None:
        assert self._sync is not None
        while True:
            with self._cond:
                while self.requested == self.durable and not self._closed:
                    self._cond.wait()
                if self.requested == self.durable:
                    return
                target = self.requested
            try:
                self._sync()
            except BaseException as e:  # re-raised in the driver's thread
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                self._wake()
                return
            with self._cond:
                self.durable = target
                self._cond.notify_all()
            self._wake()

    def check(self) -> None:
        """Re-raise, in the caller's thread, a sync that failed."""
        if self._error is not None:
            raise self._error

    def wait(self, number: int | None = None) -> None:
        """Block until barrier `number` (default: the latest requested) has completed."""
        with self._cond:
            target = self.requested if number is None else number
            while self.durable < target and self._error is None:
                self._cond.wait()
        self.check()

    def close(self) -> None:
        """Wait for every requested barrier, then stop the thread."""
        try:
            self.wait()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            if self._thread is not None:
                self._thread.join()
