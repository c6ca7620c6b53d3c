"""The storage interface every backend implements, plus the commit-marker format.

A checkpoint is a *prefix* holding objects and, once complete, one ``_COMMITTED`` marker. The marker is
the single source of truth: it is written last, lists every object with its size and sha256, and readers
consult nothing else. That gives atomic visibility on stores without rename (S3) and integrity checks on
restore without trusting listings, which are only eventually consistent on some S3-compatible stores.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

from ..errors import CheckpointCorruptError, PermanentStorageError

MARKER = "_COMMITTED"
MANIFEST_FORMAT = "pbt-checkpoint"
MANIFEST_VERSION = 1
CHUNK = 1024 * 1024

Source = bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes]


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key relative to the checkpoint prefix, byte size and sha256 (hex)."""

    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ObjectEntry:
    """A manifest entry: where a logical object lives and how it was encoded (see ``checkpoint.py``)."""

    key: str
    size: int
    sha256: str
    encoding: str = "raw"

    def info(self) -> ObjectInfo:
        return ObjectInfo(self.key, self.size, self.sha256)


@dataclass(frozen=True)
class Manifest:
    """Content of the ``_COMMITTED`` marker."""

    objects: dict[str, ObjectEntry]
    main: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0

    def to_json(self) -> bytes:
        doc = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "created": self.created,
            "main": self.main,
            "objects": {
                name: {"key": e.key, "size": e.size, "sha256": e.sha256, "encoding": e.encoding}
                for name, e in self.objects.items()
            },
            "meta": self.meta,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, uri: str) -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("format") != MANIFEST_FORMAT or doc.get("version") != MANIFEST_VERSION:
                raise ValueError(f"unknown format/version {doc.get('format')!r}/{doc.get('version')!r}")
            objects = {
                str(name): ObjectEntry(str(o["key"]), int(o["size"]), str(o["sha256"]), str(o["encoding"]))
                for name, o in doc["objects"].items()
            }
            return cls(objects, doc.get("main"), dict(doc.get("meta") or {}), float(doc.get("created", 0.0)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointCorruptError(f"{uri}{MARKER}: unreadable commit marker: {exc}", uri) from None


def tmp_root(environ: Mapping[str, str] | None = None) -> str | None:
    """Where serialised checkpoints are spooled (``PBT_WORKER_TMPDIR``, else the system default), read
    from ``environ`` (default: this process's environment)."""
    return (os.environ if environ is None else environ).get("PBT_WORKER_TMPDIR") or None


_warned_no_tmp = False


def spool_file(prefix: str, directory: str | None) -> tuple[int, str] | None:
    """``tempfile.mkstemp`` in ``directory``, or None when no temp directory is writable.

    A container with a read-only root filesystem and no volume at /tmp (what the `restricted` Pod
    Security Standard encourages) has none: callers then keep the data in memory instead of failing the
    segment. Warns once, naming the fix for large checkpoints.
    """
    global _warned_no_tmp
    try:
        return tempfile.mkstemp(prefix=prefix, dir=directory)
    except OSError as exc:  # FileNotFoundError("No usable temporary directory"), EROFS, EACCES
        if not _warned_no_tmp:
            _warned_no_tmp = True
            logging.getLogger("pbt_worker").warning(
                "no writable temp directory (%s): checkpoints are buffered in memory; for large checkpoints "
                "mount an emptyDir at /tmp or set PBT_WORKER_TMPDIR to a writable volume", exc)
        return None


def check_prefix(prefix: str) -> None:
    if not prefix.endswith("/"):
        raise PermanentStorageError(f"checkpoint URI must end with '/': {prefix!r}", prefix)


def check_key(key: str, prefix: str) -> None:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts) or key == MARKER:
        raise PermanentStorageError(f"invalid object name {key!r} under {prefix}", prefix + key)


def verify(uri: str, expect: ObjectInfo | None, size: int, sha256: str) -> None:
    """Raise ``CheckpointCorruptError`` if what was read differs from the manifest."""
    if expect is None:
        return
    if size != expect.size:
        raise CheckpointCorruptError(f"{uri}: size {size} differs from the commit marker's {expect.size}",
                                     uri)
    if sha256 != expect.sha256:
        raise CheckpointCorruptError(f"{uri}: sha256 {sha256} differs from the commit marker's", uri)


class HashingReader:
    """File-like wrapper computing sha256 and size of everything read through it (one pass, streaming)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self._hash.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class HashingWriter:
    """File-like wrapper computing sha256 and size of everything written through it.

    Serialisers (pickle, torch.save) write through it into a local file, so the checksum is known the
    moment serialisation ends, without a second read of a possibly multi-GiB file.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._hash = hashlib.sha256()
        self.size = 0
        #: The first OSError of a write (a full disk): torch.save reports it only as an opaque RuntimeError.
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.size += view.nbytes
        try:
            self._raw.write(view)
        except OSError as exc:
            self.error = self.error or exc
            raise
        return view.nbytes

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class Storage(ABC):
    """A checkpoint store addressed by URI prefixes (``file:///d/``, ``s3://bucket/p/``, ``mem://ns/``).

    Methods take full prefix URIs, so one instance serves every bucket/directory of its scheme; obtain
    instances with :func:`pbt_worker.storage.open_storage`, which caches them.
    """

    scheme: ClassVar[str]
    #: True when the backend can hold live Python objects (``put_object``), skipping serialisation.
    holds_objects: ClassVar[bool] = False
    #: The environment this backend was configured from and reads ``PBT_WORKER_TMPDIR`` from; None: this
    #: process's (``open_storage``). See :func:`pbt_worker.storage.storage_with_env`.
    environ: Mapping[str, str] | None = None

    @property
    def env(self) -> Mapping[str, str]:
        return os.environ if self.environ is None else self.environ

    # -- objects ---------------------------------------------------------------------------------------
    @abstractmethod
    def put(self, prefix: str, key: str, source: Source, known: tuple[int, str] | None = None) -> ObjectInfo:
        """Store ``source`` (bytes, a local file path, or a readable binary file object) at prefix+key.

        Streams: a file is never loaded into memory whole. Returns size and sha256 of what was stored.
        ``known`` = (size, sha256) of a path source, when the caller already computed it while writing the
        file, spares the backend a second hashing pass.
        """

    def spool_dir(self, prefix: str) -> str | None:
        """Directory for a temp file that will be handed to :meth:`put_spooled` (None: system default)."""
        return tmp_root(self.environ)

    def put_spooled(self, prefix: str, key: str, path: str, known: tuple[int, str]) -> ObjectInfo:
        """Store a local temp file whose size and sha256 are known, then remove it (the backend owns it)."""
        try:
            return self.put(prefix, key, path, known=known)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @abstractmethod
    def get_bytes(self, prefix: str, key: str, expect: ObjectInfo | None = None) -> bytes:
        """Read a (small) object into memory, verifying it against ``expect`` when given."""

    @abstractmethod
    def get_file(self, prefix: str, key: str, dest: str | os.PathLike[str],
                 expect: ObjectInfo | None = None) -> Path:
        """Stream an object to the local file ``dest`` (atomically replaced), verifying it."""

    def put_object(self, prefix: str, key: str, obj: Any) -> ObjectInfo:
        raise NotImplementedError(f"{self.scheme}:// cannot hold live objects")

    def get_object(self, prefix: str, key: str) -> Any:
        raise NotImplementedError(f"{self.scheme}:// cannot hold live objects")

    # -- commit protocol -------------------------------------------------------------------------------
    @abstractmethod
    def _write_marker(self, prefix: str, data: bytes) -> None: ...

    @abstractmethod
    def _read_marker(self, prefix: str) -> bytes | None: ...

    def commit(self, prefix: str, objects: Mapping[str, ObjectEntry], main: str | None = None,
               meta: Mapping[str, Any] | None = None) -> Manifest:
        """Make the checkpoint visible: write the marker listing ``objects``. Must be called last."""
        check_prefix(prefix)
        manifest = Manifest(dict(objects), main, dict(meta or {}), time.time())
        self._write_marker(prefix, manifest.to_json())
        return manifest

    def manifest(self, prefix: str) -> Manifest | None:
        """The commit marker of ``prefix``, or None when the checkpoint is not (or no longer) committed."""
        check_prefix(prefix)
        data = self._read_marker(prefix)
        return None if data is None else Manifest.from_json(data, prefix)

    def exists(self, prefix: str) -> bool:
        """Is there a *committed* checkpoint at ``prefix``? Uncommitted leftovers do not count."""
        check_prefix(prefix)
        return self._read_marker(prefix) is not None

    @abstractmethod
    def delete(self, prefix: str) -> None:
        """Delete a checkpoint: the marker first (so it stops being restorable at once), then the rest.

        Idempotent: deleting a missing prefix is not an error.
        """

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Keys (relative to ``prefix``) of everything stored under it, marker and leftovers included."""
