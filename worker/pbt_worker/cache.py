"""Per-process caches that outlive a segment.

A warm worker (``pbt run``'s default process executor) and the inline executor run many segments in
one process, and re-execute a training script's top level for each: a module-level ``_DATA = None``
starts empty again every segment. Values kept here stay for the life of the process, so a dataset is
loaded, or a model compiled, once per worker instead of once per segment:

    from pbt_worker import cached
    x, y = cached("digits", load_digits_tensors)      # built on first use in this process, then reused

A fresh process per segment (``worker.warm: false``, a Kubernetes Job) simply builds the value every
time, so a program behaves the same either way. Callers must treat cached values as read-only: another
segment (or, inline, another thread) gets the very same object.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")

_values: dict[Hashable, Any] = {}
_locks: dict[Hashable, threading.Lock] = {}
_guard = threading.Lock()


def cached(key: Hashable, factory: Callable[[], T]) -> T:
    """The value stored under ``key`` in this process, built by ``factory()`` the first time.

    Thread-safe: concurrent first calls for one key build it once (others wait); different keys build
    in parallel. A factory that raises stores nothing, so the next call tries again.
    """
    try:
        return _values[key]
    except KeyError:
        pass
    with _guard:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _values:
            _values[key] = factory()
        return _values[key]


def cache_clear(key: Hashable | None = None) -> None:
    """Forget one cached value, or all of them (e.g. to free memory between experiments)."""
    with _guard:
        if key is None:
            _values.clear()
        else:
            _values.pop(key, None)
