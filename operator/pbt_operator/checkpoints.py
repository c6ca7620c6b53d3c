"""Where checkpoints live: one immutable prefix per (member, segment).

Both drivers name checkpoints with this function, so a run's files look the same whether it ran
under `pbt run` or in a cluster, and `pbt export` can find them from a status record alone.
"""

from __future__ import annotations

from pathlib import Path

from .core.types import Ref


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


def record_uri(root: str, training: str, member: int, segment: int, attempt: int) -> str:
    """Where a segment's worker writes its complete record: beside the checkpoints, under `records/`
    (not inside the checkpoint prefix, which garbage collection deletes)."""
    return f"{records_prefix(root, training)}m{member:03d}/{segment:05d}-a{attempt}.json"


def records_prefix(root: str, training: str) -> str:
    return f"{root.rstrip('/')}/{training}/records/"
