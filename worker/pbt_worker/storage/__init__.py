"""Checkpoint storage backends, chosen by URI scheme.

``open_storage(uri)`` returns a cached backend instance: ``file://`` (:class:`FileStorage`), ``s3://``
(:class:`~pbt_worker.storage.s3.S3Storage`, imports boto3 only when first used) and ``mem://``
(:class:`MemStorage`, one shared store per process).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

from ..errors import PermanentStorageError
from .base import MARKER, Manifest, ObjectEntry, ObjectInfo, Storage
from .file import FileStorage
from .mem import MemStorage

__all__ = [
    "MARKER",
    "FileStorage",
    "Manifest",
    "MemStorage",
    "ObjectEntry",
    "ObjectInfo",
    "Storage",
    "mem_storage",
    "open_storage",
    "reset_storage_cache",
    "storage_with_env",
]

_lock = threading.Lock()
_cache: dict[str, Storage] = {}
_MEM = MemStorage()


def mem_storage() -> MemStorage:
    """The process-wide ``mem://`` store."""
    return _MEM


def open_storage(uri: str) -> Storage:
    """Return the backend for ``uri``'s scheme.

    Instances are cached per scheme because they are stateless apart from connection pools (an S3 client
    costs tens of milliseconds to build) and ``mem://`` must be shared for checkpoints to be found again.
    The S3 backend reads its configuration (endpoint, credentials, region) from the environment when it is
    first opened; call :func:`reset_storage_cache` after changing those variables.
    """
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise PermanentStorageError(f"not a storage URI (expected file://, s3:// or mem://): {uri!r}", uri)
    if scheme == "mem":
        return _MEM
    with _lock:
        backend = _cache.get(scheme)
        if backend is None:
            if scheme == "file":
                backend = FileStorage()
            elif scheme == "s3":
                from .s3 import S3Storage

                backend = S3Storage()
            else:
                raise PermanentStorageError(
                    f"unsupported storage scheme {scheme!r} in {uri!r} (use file://, s3:// or mem://)", uri
                )
            _cache[scheme] = backend
        return backend


def storage_with_env(uri: str, env: Mapping[str, str]) -> Storage:
    """A new backend for ``uri``'s scheme (not cached) configured from ``env`` over this process's
    environment, read instead of ``os.environ``, which stays as it is: for a driver whose segments run
    in its own threads but should see another environment (``pbt_operator.run(function=...)`` applies
    ``spec.worker.env`` so). ``mem://`` is the one process-wide store whatever ``env`` says."""
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise PermanentStorageError(f"not a storage URI (expected file://, s3:// or mem://): {uri!r}", uri)
    environ = {**os.environ, **env}
    if scheme == "mem":
        return _MEM
    if scheme == "file":
        return FileStorage(environ=environ)
    if scheme == "s3":
        from .s3 import S3Storage

        return S3Storage(environ=environ)
    raise PermanentStorageError(f"unsupported storage scheme {scheme!r} in {uri!r} (use file://, s3:// or mem://)",
                                uri)


def reset_storage_cache() -> None:
    """Drop cached backends so the next ``open_storage`` re-reads the environment."""
    with _lock:
        _cache.clear()
