"""Where checkpoints live: one immutable prefix per (member, segment).

Both drivers name checkpoints with this function, so a run's files look the same whether it ran
under `pbt run` or in a cluster, and `pbt export` can find them from a status record alone.
"""

from __future__ import annotations

import re
from pathlib import Path

from .core.types import Ref

_REF = re.compile(r"/m(\d{3,})/(\d{5,})/$")


def storage_root(uri: str | None, training: str, run_dir: Path) -> str:
    """The storage URI a run writes under; file:// paths are made absolute against `run_dir`'s cwd."""
    if uri is None:
        return (run_dir / "checkpoints").resolve().as_uri()
    if uri.startswith("file://"):
        path = Path(uri[len("file://"):])
        return path.resolve().as_uri() if not path.is_absolute() else path.as_uri()
    return uri.rstrip("/")


def checkpoint_uri(root: str, training: str, ref: Ref) -> str:
    member, segment = ref
    return f"{root.rstrip('/')}/{training}/m{member:03d}/{segment:05d}/"


def checkpoint_ref(root: str, training: str, uri: str) -> Ref | None:
    """The (member, segment) whose checkpoint_uri under `root` and `training` is `uri`; None for any
    other URI (another root after a spec edit, a foreign string), so that a caller never mistakes one."""
    m = _REF.search(uri)
    if m is None:
        return None
    ref = (int(m.group(1)), int(m.group(2)))
    return ref if checkpoint_uri(root, training, ref) == uri else None


def record_uri(root: str, training: str, member: int, segment: int, attempt: int) -> str:
    """Where a segment's worker writes its complete record: beside the checkpoints, under `records/`
    (not inside the checkpoint prefix, which garbage collection deletes)."""
    return f"{records_prefix(root, training)}m{member:03d}/{segment:05d}-a{attempt}.json"


def records_prefix(root: str, training: str) -> str:
    return f"{root.rstrip('/')}/{training}/records/"
