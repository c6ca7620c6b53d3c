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
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable
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
