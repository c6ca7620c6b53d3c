"""``mem://`` storage: a process-local, thread-safe dict store for the local runner's inline executor.

The inline executor runs thousands of tiny segments per second in one process, so a save/restore must cost
microseconds: live objects are stored as objects, never pickled.

Copy policy (why): a stored checkpoint must stay immutable even though the training function keeps
mutating its state after ``save`` and several members may restore (exploit) the same checkpoint.
So ``put_object`` stores a private ``copy.deepcopy`` and ``get_object`` hands out another deep copy.
Known-immutable values (None, bool, int, float, complex, str, bytes, and tuples/frozensets of those)
are shared without copying, which keeps the common case (a few scalars, a tuple) at microseconds.
Bytes-like puts are stored as ``bytes`` (immutable) and hashed like any other backend.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from ..errors import CheckpointCorruptError
from .base import (
    CHUNK,
    MARKER,
    Manifest,
    ObjectEntry,
    ObjectInfo,
    Source,
    Storage,
    check_key,
    check_prefix,
    verify,
)

_ATOMS = (type(None), bool, int, float, complex, str, bytes)


def _immutable(obj: Any, depth: int = 0) -> bool:
    if isinstance(obj, _ATOMS):
        return True
    if isinstance(obj, tuple | frozenset) and depth < 4:
        return all(_immutable(x, depth + 1) for x in obj)
    return False


def _copy(obj: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy`` with a fast path for plain dicts/lists of atoms (the usual inline state).

    Shares ``memo`` with ``copy.deepcopy``, so aliasing and cycles are preserved exactly as deepcopy
    would preserve them, and anything else (arrays, tensors, custom classes) is deep-copied as usual.
    """
    t = type(obj)
    if t in _ATOMS:
        return obj
    found = memo.get(id(obj))
    if found is not None:
        return found
    if t is dict:
        d: dict[Any, Any] = {}
        memo[id(obj)] = d
        memo.setdefault(id(memo), []).append(obj)  # keep-alive, as deepcopy does
        for k, v in obj.items():
            d[k] = _copy(v, memo)
        return d
    if t is list:
        lst: list[Any] = []
        memo[id(obj)] = lst
        memo.setdefault(id(memo), []).append(obj)
        lst.extend(_copy(v, memo) for v in obj)
        return lst
    if _immutable(obj):
        return obj
    return copy.deepcopy(obj, memo)


def private_copy(obj: Any) -> Any:
    """Return ``obj`` itself when it is known-immutable, else a deep copy."""
    return obj if type(obj) in _ATOMS else _copy(obj, {})


class MemStorage(Storage):
    """All ``mem://`` URIs of the process share one instance (see :func:`open_storage`)."""

    scheme: ClassVar[str] = "mem"
    holds_objects: ClassVar[bool] = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, Any]] = {}
        self._markers: dict[str, Manifest] = {}

    def put(self, prefix: str, key: str, source: Source, known: tuple[int, str] | None = None) -> ObjectInfo:
        check_prefix(prefix)
        check_key(key, prefix)
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
        elif isinstance(source, str | os.PathLike):
            data = Path(source).read_bytes()
        else:
            parts = []
            while chunk := source.read(CHUNK):
                parts.append(chunk)
            data = b"".join(parts)
        info = ObjectInfo(key, len(data), hashlib.sha256(data).hexdigest())
        with self._lock:
            self._objects.setdefault(prefix, {})[key] = data
        return info

    def put_object(self, prefix: str, key: str, obj: Any) -> ObjectInfo:
        check_prefix(prefix)
        stored = private_copy(obj)
        with self._lock:
            self._objects.setdefault(prefix, {})[key] = stored
        return ObjectInfo(key, 0, "")

    def _lookup(self, prefix: str, key: str) -> Any:
        with self._lock:
            try:
                return self._objects[prefix][key]
            except KeyError:
                raise CheckpointCorruptError(f"{prefix}{key}: object listed in the marker is missing",
                                             prefix + key) from None

    def get_object(self, prefix: str, key: str) -> Any:
        return private_copy(self._lookup(prefix, key))

    def get_bytes(self, prefix: str, key: str, expect: ObjectInfo | None = None) -> bytes:
        data = self._lookup(prefix, key)
        if not isinstance(data, bytes):
            raise CheckpointCorruptError(f"{prefix}{key}: holds a live object, not bytes", prefix + key)
        verify(prefix + key, expect, len(data), hashlib.sha256(data).hexdigest())
        return data

    def get_file(self, prefix: str, key: str, dest: str | os.PathLike[str],
                 expect: ObjectInfo | None = None) -> Path:
        data = self.get_bytes(prefix, key, expect)
        path = Path(dest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    # The marker is kept as a Manifest object: no JSON round trip on the hot path.
    def commit(self, prefix: str, objects: Mapping[str, ObjectEntry], main: str | None = None,
               meta: Mapping[str, Any] | None = None) -> Manifest:
        check_prefix(prefix)
        manifest = Manifest(dict(objects), main, dict(meta or {}), 0.0)
        with self._lock:
            self._markers[prefix] = manifest
        return manifest

    def manifest(self, prefix: str) -> Manifest | None:
        with self._lock:
            return self._markers.get(prefix)

    def exists(self, prefix: str) -> bool:
        with self._lock:
            return prefix in self._markers

    def _write_marker(self, prefix: str, data: bytes) -> None:
        manifest = Manifest.from_json(data, prefix)
        with self._lock:
            self._markers[prefix] = manifest

    def _read_marker(self, prefix: str) -> bytes | None:
        manifest = self.manifest(prefix)
        return None if manifest is None else manifest.to_json()

    def delete(self, prefix: str) -> None:
        with self._lock:
            self._markers.pop(prefix, None)
            self._objects.pop(prefix, None)

    def list(self, prefix: str) -> list[str]:
        with self._lock:
            keys = list(self._objects.get(prefix, {}))
            if prefix in self._markers:
                keys.append(MARKER)
        return sorted(keys)

    def clear(self) -> None:
        """Forget everything (tests, or a local runner starting a fresh training in the same process)."""
        with self._lock:
            self._objects.clear()
            self._markers.clear()
