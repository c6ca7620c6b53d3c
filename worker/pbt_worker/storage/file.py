"""``file://`` storage: a directory per checkpoint on a local or shared (NFS) filesystem.

Every object and the marker are written to a temporary name and ``os.replace``-d into place, so a killed
writer leaves at worst a ``*.tmp-*`` file that no manifest references.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, ClassVar
from urllib.parse import unquote, urlparse

from ..errors import CheckpointCorruptError, PermanentStorageError
from .base import (
    CHUNK,
    MARKER,
    ObjectInfo,
    Source,
    Storage,
    check_key,
    check_prefix,
    verify,
)


def _env_flag(name: str, default: bool, environ: Mapping[str, str] = os.environ) -> bool:
    value = environ.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off", "")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to open directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class FileStorage(Storage):
    """Checkpoints as directories. ``fsync`` (default on; env ``PBT_FILE_FSYNC=0`` turns it off) makes a
    committed checkpoint survive a machine crash, not just a process kill."""

    scheme: ClassVar[str] = "file"

    def __init__(self, fsync: bool | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.environ = environ
        self.fsync = _env_flag("PBT_FILE_FSYNC", True, self.env) if fsync is None else fsync

    # -- paths -----------------------------------------------------------------------------------------
    @staticmethod
    def path_of(prefix: str) -> Path:
        check_prefix(prefix)
        parsed = urlparse(prefix)
        if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
            raise PermanentStorageError(f"not a local file:// URI (file:///abs/path/): {prefix!r}", prefix)
        path = unquote(parsed.path)
        if not os.path.isabs(path):
            raise PermanentStorageError(f"file:// URI must hold an absolute path: {prefix!r}", prefix)
        return Path(path)

    def _target(self, prefix: str, key: str) -> Path:
        check_key(key, prefix)
        return self.path_of(prefix) / key

    def _atomic_write(self, target: Path, fill: Callable[[], Iterable[bytes | memoryview]],
                      fsync: bool | None = None) -> tuple[int, str]:
        """Write via ``fill(file)`` into a temp sibling, fsync, rename. Returns size and sha256."""
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        h = hashlib.sha256()
        size = 0
        try:
            try:
                out = open(tmp, "wb")  # noqa: SIM115 (closed by the with below)
            except FileNotFoundError:  # the folder is usually there already: mkdir only when it is not
                target.parent.mkdir(parents=True, exist_ok=True)
                out = open(tmp, "wb")  # noqa: SIM115
            with out:
                for chunk in fill():
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                if self.fsync if fsync is None else fsync:
                    os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return size, h.hexdigest()

    # -- objects ---------------------------------------------------------------------------------------
    def spool_dir(self, prefix: str) -> str | None:
        # Spool inside the checkpoint directory so put_spooled is a rename, not a copy.
        directory = self.path_of(prefix)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PermanentStorageError(f"cannot create {prefix}: {exc}", prefix) from exc
        return str(directory)

    def put_spooled(self, prefix: str, key: str, path: str, known: tuple[int, str]) -> ObjectInfo:
        target = self._target(prefix, key)
        try:
            if self.fsync:
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)  # same filesystem (spool_dir): atomic and free
        except OSError:
            return super().put_spooled(prefix, key, path, known)
        return ObjectInfo(key, known[0], known[1])

    def put(self, prefix: str, key: str, source: Source, known: tuple[int, str] | None = None) -> ObjectInfo:
        target = self._target(prefix, key)
        if isinstance(source, bytes | bytearray | memoryview):
            data = source

            def fill() -> Iterator[bytes | memoryview]:
                yield memoryview(data).cast("B")
        elif isinstance(source, str | os.PathLike):
            path = source

            def fill() -> Iterator[bytes | memoryview]:
                with open(path, "rb") as f:
                    while chunk := f.read(CHUNK):
                        yield chunk
        else:
            stream: IO[bytes] = source

            def fill() -> Iterator[bytes | memoryview]:
                while chunk := stream.read(CHUNK):
                    yield chunk
        try:
            size, sha = self._atomic_write(target, fill)
        except OSError as exc:
            raise PermanentStorageError(f"cannot write {prefix}{key}: {exc}", prefix + key) from exc
        return ObjectInfo(key, size, sha)

    def get_bytes(self, prefix: str, key: str, expect: ObjectInfo | None = None) -> bytes:
        target = self._target(prefix, key)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{prefix}{key}: object listed in the marker is missing",
                                         prefix + key) from None
        verify(prefix + key, expect, len(data), hashlib.sha256(data).hexdigest())
        return data

    def get_file(self, prefix: str, key: str, dest: str | os.PathLike[str],
                 expect: ObjectInfo | None = None) -> Path:
        source = self._target(prefix, key)
        dest_path = Path(dest)
        if not source.is_file():
            raise CheckpointCorruptError(f"{prefix}{key}: object listed in the marker is missing",
                                         prefix + key)

        def fill() -> Iterator[bytes | memoryview]:
            with open(source, "rb") as f:
                while chunk := f.read(CHUNK):
                    yield chunk

        # A restored copy is scratch space: no need to make it durable.
        size, sha = self._atomic_write(dest_path, fill, fsync=False)
        try:
            verify(prefix + key, expect, size, sha)
        except CheckpointCorruptError:
            dest_path.unlink(missing_ok=True)
            raise
        return dest_path

    # -- commit protocol -------------------------------------------------------------------------------
    def _write_marker(self, prefix: str, data: bytes) -> None:
        directory = self.path_of(prefix)

        def fill() -> Iterator[bytes | memoryview]:
            yield data

        self._atomic_write(directory / MARKER, fill)
        if self.fsync:
            _fsync_dir(directory)

    def _read_marker(self, prefix: str) -> bytes | None:
        try:
            return (self.path_of(prefix) / MARKER).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def delete(self, prefix: str) -> None:
        directory = self.path_of(prefix)
        (directory / MARKER).unlink(missing_ok=True)
        if self.fsync and directory.exists():
            _fsync_dir(directory)
        shutil.rmtree(directory, ignore_errors=True)

    def list(self, prefix: str) -> list[str]:
        directory = self.path_of(prefix)
        if not directory.is_dir():
            return []
        return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
