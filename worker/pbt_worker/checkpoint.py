"""Writing and reading one checkpoint: object encodings, the attempt directory, the commit.

Layout of a checkpoint prefix ``P``::

    P/<attempt>/<name>     one object per logical name (attempt = random id of this save)
    P/_COMMITTED           manifest: name -> {key, size, sha256, encoding}, written last

Objects go under a fresh attempt directory so that two writers of the same prefix (a segment retried
after its pod was preempted mid-save, or a duplicate pod) never mix their objects: whichever marker is
written last references one complete, self-consistent set. Leftover attempt directories are not
restorable (no marker references them) and disappear when the prefix is deleted (``gc``).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import os
import pickle
import sys
import types
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, cast

from .errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    PbtWorkerError,
    PermanentStorageError,
    SaveError,
)
from .storage.base import HashingWriter, Manifest, ObjectEntry, Storage, check_key, spool_file, tmp_root

log = logging.getLogger("pbt_worker")

#: Objects below this size are read into memory in one request instead of through a temp file.
SMALL_OBJECT = 8 * 1024 * 1024
#: Parallel transfers when a checkpoint holds many files (a directory).
FILE_PARALLELISM = 8

ENCODINGS = ("raw", "pickle", "torch", "object")


#: How many values `looks_like_torch` looks at before it settles the question by a trial pickling
#: instead (which sees everything pickling would, at the cost of one pass over the data).
TORCH_WALK_LIMIT = 100_000

# Values that hold no tensor, or that pickle by reference (classes, functions, modules never pickle).
_LEAVES: tuple[type, ...] = (str, bytes, bytearray, int, float, complex, bool, type(None), range, slice, type,
                             types.FunctionType, types.BuiltinFunctionType, types.ModuleType)
_OBJECT_GETSTATE = getattr(object, "__getstate__", None)  # 3.11+
_END = object()


class _TorchFound(Exception):
    pass


def _torch_types() -> tuple[type, ...] | None:
    """The torch types whose pickles carry a device (tensors, modules, optimizers, storages), or None
    when torch is not imported (or only half imported: we are inside its import)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        found: list[type] = [torch.Tensor, torch.nn.Module, torch.optim.Optimizer]
    except AttributeError:
        return None
    for name in ("UntypedStorage", "TypedStorage"):
        kind = getattr(torch, name, None)
        if isinstance(kind, type):
            found.append(kind)
    return tuple(found)


def _plain_state(value: Any) -> dict[str, Any] | None:
    """The attributes pickling saves for an object of a plain class (a dataclass, a namespace): its
    ``__dict__`` when the class changes nothing about how it pickles; None otherwise."""
    kind = type(value)
    state = getattr(value, "__dict__", None)
    if (not isinstance(state, dict) or hasattr(kind, "__slots__")
            or kind.__reduce_ex__ is not object.__reduce_ex__ or kind.__reduce__ is not object.__reduce__
            or getattr(kind, "__getstate__", _OBJECT_GETSTATE) is not _OBJECT_GETSTATE):
        return None
    return state


def _pickle_meets(obj: Any, torch_types: tuple[type, ...]) -> bool:
    """Whether pickling ``obj`` meets a torch object: a pass of the pickler into a sink that stops at the
    first one. It sees what pickling sees (any object's state, at any depth); a state that cannot be
    pickled answers False (saving it fails either way, with the error that names the part)."""

    ndarray = getattr(sys.modules.get("numpy"), "ndarray", None)

    class Finder(pickle.Pickler):
        def reducer_override(self, value: Any) -> Any:
            if isinstance(value, torch_types):
                raise _TorchFound
            if ndarray is not None and isinstance(value, ndarray) and not value.dtype.hasobject:
                return (tuple, ())  # holds no tensor: skip serialising its data
            return NotImplemented

    try:
        Finder(_Discard(), protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except _TorchFound:
        return True
    except Exception:
        return False
    return False


def looks_like_torch(obj: Any, limit: int = TORCH_WALK_LIMIT) -> bool:
    """True if ``obj`` is or contains a torch tensor, module, optimizer or storage, at any depth: in dicts,
    lists, tuples and sets, and in the attributes of other objects (a dataclass holding tensors).

    Such a state is written with ``torch.save``: plain pickle records each tensor's device, and
    ``map_location`` could not move a CUDA checkpoint onto a CPU machine. Containers and plain objects'
    attributes are walked iteratively, each object once (cycles are safe); an object the walk cannot see
    into (its own ``__reduce__`` or ``__getstate__``, ``__slots__``), or more than ``limit`` values,
    leaves the answer to a trial pickling. Never imports torch: if the user's program has not imported
    it, the object cannot contain tensors.
    """
    torch_types = _torch_types()
    if torch_types is None:
        return False
    numpy = sys.modules.get("numpy")
    ndarray = getattr(numpy, "ndarray", None)
    generic = getattr(numpy, "generic", None)  # numpy scalars (np.int64 is not an int): no tensor inside
    # Iterators, not items: a list of ten million floats costs `limit` steps and no copy of the list.
    stack: list[Iterator[Any]] = [iter((obj,))]
    seen: set[int] = set()
    visited = 0
    opaque = False
    while stack:
        value = next(stack[-1], _END)
        if value is _END:
            stack.pop()
            continue
        visited += 1
        if visited > limit:
            return _pickle_meets(obj, torch_types)
        if isinstance(value, _LEAVES) or (generic is not None and isinstance(value, generic)):
            continue
        if isinstance(value, torch_types):
            return True
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            stack.append(itertools.chain.from_iterable(value.items()))
        elif isinstance(value, list | tuple | set | frozenset):
            stack.append(iter(value))
        elif ndarray is not None and isinstance(value, ndarray) and not value.dtype.hasobject:
            continue
        else:
            state = _plain_state(value)
            if state is None:
                opaque = True
            else:
                stack.append(iter(state.values()))
            continue
        if type(value) not in (dict, list, tuple, set, frozenset):  # a subclass: its attributes pickle too
            extra = getattr(value, "__dict__", None)
            if isinstance(extra, dict):
                stack.append(iter(extra.values()))
    return opaque and _pickle_meets(obj, torch_types)


class _Discard:
    """A write-only sink: trial pickling that costs no memory."""

    def write(self, data: Any) -> int:
        return len(data)


def _unpicklable_part(obj: Any, path: str, depth: int = 0) -> tuple[str, Any]:
    """Where in ``obj`` (dicts, lists, tuples) the first part that cannot be pickled sits, and that part.

    Called only after pickling failed; it recurses into containers and trial-pickles other values into
    a sink, so a large array costs time but no memory.
    """
    if depth < 8:
        items: Iterable[tuple[str, Any]] = ()
        if isinstance(obj, dict):
            items = ((f"{path}[{k!r}]", v) for k, v in obj.items())
        elif isinstance(obj, list | tuple):
            items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
        for sub_path, value in items:
            try:
                pickle.dump(value, _Discard(), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:
                return _unpicklable_part(value, sub_path, depth + 1)
    return path, obj


def choose_encoding(obj: Any) -> str:
    if isinstance(obj, bytes | bytearray | memoryview):
        return "raw"
    if looks_like_torch(obj):
        return "torch"
    return "pickle"


def torch_load(f: Any, map_location: Any = "cpu", weights_only: bool | None = None) -> Any:
    """``torch.load`` with safe defaults: tensors land on CPU, and the restricted ``weights_only``
    unpickler is tried first. With ``weights_only=None`` a checkpoint holding arbitrary classes (a whole
    ``nn.Module``) falls back to the full unpickler with a warning: checkpoints come from our own workers.
    """
    import torch  # lazily: the worker SDK must not pull torch into programs that do not use it

    if weights_only is not None:
        return torch.load(f, map_location=map_location, weights_only=weights_only)
    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        log.warning("weights_only torch.load refused this checkpoint (%s); loading it with the full "
                    "unpickler. Pass weights_only=True to forbid that.", str(exc).splitlines()[0])
        if hasattr(f, "seek"):
            f.seek(0)
        return torch.load(f, map_location=map_location, weights_only=False)


class CheckpointWriter:
    """Collects the objects of one checkpoint; nothing is visible until :meth:`commit`.

    Use as a context manager (``Segment.checkpoint()``): a clean exit commits, an exception commits
    nothing and leaves only unreferenced objects behind.
    """

    def __init__(self, storage: Storage, prefix: str, meta: dict[str, Any] | None = None,
                 on_commit: Callable[[Manifest], None] | None = None) -> None:
        self.storage = storage
        self.prefix = prefix
        self.meta = dict(meta or {})
        self.attempt = uuid.uuid4().hex[:12]
        self.entries: dict[str, ObjectEntry] = {}
        self.manifest: Manifest | None = None
        self._on_commit = on_commit

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None and self.manifest is None:
            self.commit()

    def _key(self, name: str) -> str:
        check_key(name, self.prefix)
        if self.manifest is not None:
            raise PermanentStorageError(f"{self.prefix} is already committed; checkpoints are immutable",
                                        self.prefix)
        if name in self.entries:
            raise PermanentStorageError(f"{self.prefix}: object {name!r} was already written", self.prefix)
        return f"{self.attempt}/{name}"

    def put_bytes(self, name: str, data: bytes | bytearray | memoryview) -> ObjectEntry:
        info = self.storage.put(self.prefix, self._key(name), data)
        entry = self.entries[name] = ObjectEntry(info.key, info.size, info.sha256, "raw")
        return entry

    def put_file(self, name: str, path: str | os.PathLike[str]) -> ObjectEntry:
        info = self.storage.put(self.prefix, self._key(name), path)
        entry = self.entries[name] = ObjectEntry(info.key, info.size, info.sha256, "raw")
        return entry

    def put_dir(self, src: str | os.PathLike[str], name: str = "dir") -> list[ObjectEntry]:
        """Store every regular file under ``src`` as ``<name>/<relative path>`` (empty dirs are not kept)."""
        root = Path(src)
        if not root.is_dir():
            raise FileNotFoundError(f"save_dir: {root} is not a directory")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        if not files:
            log.warning("save_dir: %s holds no files: %s%s/ is saved empty, and restoring it gives an empty "
                        "directory (was the training writing somewhere else?)", root, self.prefix, name)
        jobs = [(f"{name}/{p.relative_to(root).as_posix()}", p) for p in files]
        return self._parallel(lambda job: self.put_file(job[0], job[1]), jobs)

    def put_object(self, name: str, obj: Any, encoding: str | None = None) -> ObjectEntry:
        """Store a Python object: bytes raw, torch objects via ``torch.save``, anything else pickled.

        On ``mem://`` the object itself is kept (see ``storage/mem.py`` for the copy policy).
        """
        enc = encoding or ("object" if self.storage.holds_objects else choose_encoding(obj))
        if enc not in ENCODINGS:
            raise ValueError(f"unknown encoding {enc!r}; use one of {ENCODINGS}")
        key = self._key(name)
        if enc == "raw":
            if not isinstance(obj, bytes | bytearray | memoryview):
                raise TypeError(f"encoding 'raw' needs bytes, got {type(obj).__name__}")
            info = self.storage.put(self.prefix, key, obj)
        else:
            try:
                if enc == "object":  # mem:// keeps a deep copy, which fails where pickling fails
                    info = self.storage.put_object(self.prefix, key, obj)
                else:
                    info = self._put_serialised(key, obj, enc)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                error = self._unpicklable(key, obj, exc)
                if error is None:
                    raise
                raise error from exc
        entry = self.entries[name] = ObjectEntry(info.key, info.size, info.sha256, enc)
        return entry

    def _unpicklable(self, key: str, obj: Any, exc: Exception) -> SaveError | None:
        """The SaveError to raise when ``obj`` failed to serialise (or deepcopy) because part of it cannot
        be pickled; None when it pickles after all (the error came from elsewhere)."""
        try:
            pickle.dump(obj, _Discard(), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            pass
        else:
            return None
        name = key.split("/", 1)[-1]
        where, part = _unpicklable_part(obj, name)
        return SaveError(
            f"{self.prefix}: the object saved as {name!r} cannot be pickled: at {where}: "
            f"{type(part).__name__} ({exc}). A checkpoint holds data: tensors, arrays, numbers, strings "
            "and dicts/lists of them (model.state_dict(), optimizer.state_dict()); leave functions, "
            "lambdas, open files, generators and locks out of it, or rebuild them after restore()")

    def _put_serialised(self, key: str, obj: Any, enc: str) -> Any:
        # Serialise into a local spool file, hashing while writing, then let the backend stream it:
        # memory stays at one copy of the object however large the checkpoint is.
        spool = spool_file(".pbt-spool-", self.storage.spool_dir(self.prefix))
        if spool is None:  # no writable temp directory (read-only root filesystem): serialise in memory
            buf = io.BytesIO()
            self._serialise(obj, enc, HashingWriter(buf))
            return self.storage.put(self.prefix, key, buf.getbuffer())
        fd, path = spool
        writer: HashingWriter | None = None
        try:
            with open(fd, "wb", buffering=1024 * 1024) as raw:
                writer = HashingWriter(raw)
                self._serialise(obj, enc, writer)
        except Exception as exc:
            os.unlink(path)
            cause = writer.error if writer is not None and writer.error is not None else exc
            if not isinstance(cause, OSError):
                raise
            # ENOSPC, EDQUOT, EIO in the spool directory (torch.save turns them into a RuntimeError)
            raise PermanentStorageError(
                f"{self.prefix}: cannot serialise {key.split('/', 1)[-1]!r} into the spool file {path}: {cause}; "
                "free space on that volume (the spool directory is the checkpoint directory for file:// "
                "storage, else PBT_WORKER_TMPDIR or the system temp directory)", self.prefix) from exc
        except BaseException:
            os.unlink(path)
            raise
        assert writer is not None
        return self.storage.put_spooled(self.prefix, key, path, (writer.size, writer.hexdigest()))

    @staticmethod
    def _serialise(obj: Any, enc: str, writer: HashingWriter) -> None:
        if enc == "torch":
            import torch

            # torch.save writes and flushes only; its stubs ask for IO[bytes]. A cast, not an ignore:
            # mypy runs with and without torch installed, and an ignore is unused without it.
            torch.save(obj, cast(IO[bytes], writer))
        else:
            pickle.dump(obj, writer, protocol=pickle.HIGHEST_PROTOCOL)

    def _parallel(self, fn: Callable[[Any], Any], jobs: Iterable[Any]) -> list[Any]:
        jobs = list(jobs)
        if len(jobs) <= 1 or self.storage.holds_objects:
            return [fn(j) for j in jobs]
        with ThreadPoolExecutor(max_workers=min(FILE_PARALLELISM, len(jobs))) as pool:
            return list(pool.map(fn, jobs))

    def commit(self, main: str | None = None, kind: str = "multi") -> Manifest:
        """Write the commit marker; after this returns the checkpoint is restorable and immutable."""
        if self.manifest is not None:
            return self.manifest
        meta = dict(self.meta, kind=kind, attempt=self.attempt)
        self.manifest = self.storage.commit(self.prefix, self.entries, main=main, meta=meta)
        if self._on_commit is not None:
            self._on_commit(self.manifest)
        return self.manifest


class CheckpointReader:
    """Read access to one committed checkpoint. Every read is verified against the marker."""

    def __init__(self, storage: Storage, prefix: str, manifest: Manifest | None = None) -> None:
        self.storage = storage
        self.prefix = prefix
        found = manifest if manifest is not None else storage.manifest(prefix)
        if found is None:
            raise CheckpointNotFoundError(
                f"no committed checkpoint at {prefix} (never committed, e.g. its writer was killed "
                "mid-save, or already deleted)", prefix)
        self.manifest = found

    @property
    def names(self) -> list[str]:
        return sorted(self.manifest.objects)

    @property
    def kind(self) -> str:
        return str(self.manifest.meta.get("kind", "multi"))

    @property
    def main(self) -> str | None:
        return self.manifest.main

    def value(self, scratch: Callable[[], Path], *, map_location: Any = "cpu",
              weights_only: bool | None = None) -> Any:
        """What the checkpoint's one saved thing reads back as: the object `save` stored (bytes, an
        unpickled object, a `torch.load` result with `map_location` and `weights_only` applied), the
        local path of the file `save_file` stored, or the folder `save_dir` stored; files and folders
        are fetched under `scratch()` (called only when one is needed). `Segment.restore` and
        `pbt_operator.RunResult.load_best` both read through here."""
        if self.kind == "file" and self.main is not None:
            return self.get_file(self.main, scratch() / Path(self.main).name)
        if self.kind == "dir":
            return self.get_dir(scratch() / "restored", self.main or "dir")
        if self.main is not None:
            return self.get_object(self.main, map_location=map_location, weights_only=weights_only)
        raise PbtWorkerError(f"{self.prefix} holds several objects {self.names}; "
                             "read one with CheckpointReader.get_object(name)")

    def entry(self, name: str) -> ObjectEntry:
        try:
            return self.manifest.objects[name]
        except KeyError:
            raise KeyError(f"{self.prefix}: no object named {name!r}; it holds {self.names}") from None

    def get_bytes(self, name: str) -> bytes:
        e = self.entry(name)
        if e.encoding == "object":
            raise TypeError(f"{self.prefix}{name} holds a live object; use get_object")
        return self.storage.get_bytes(self.prefix, e.key, e.info())

    def get_file(self, name: str, dest: str | os.PathLike[str]) -> Path:
        e = self.entry(name)
        if e.encoding == "object":
            raise TypeError(f"{self.prefix}{name} holds a live object; use get_object")
        return self.storage.get_file(self.prefix, e.key, dest, e.info())

    def get_dir(self, dest: str | os.PathLike[str], name: str = "dir") -> Path:
        root = Path(dest)
        root.mkdir(parents=True, exist_ok=True)
        lead = name + "/"
        jobs = [n for n in self.names if n.startswith(lead)]
        if not jobs and name not in (self.main, None):
            raise KeyError(f"{self.prefix}: no directory named {name!r}")

        def fetch(n: str) -> Path:
            return self.get_file(n, root / n[len(lead):])

        if len(jobs) > 1 and not self.storage.holds_objects:
            with ThreadPoolExecutor(max_workers=min(FILE_PARALLELISM, len(jobs))) as pool:
                list(pool.map(fetch, jobs))
        else:
            for n in jobs:
                fetch(n)
        return root

    def get_object(self, name: str, map_location: Any = "cpu", weights_only: bool | None = None) -> Any:
        """Decode an object written by ``put_object`` (or the bytes of a raw object)."""
        e = self.entry(name)
        if e.encoding == "object":
            return self.storage.get_object(self.prefix, e.key)
        spool = None
        if e.size > SMALL_OBJECT and not self.storage.holds_objects:
            # Large objects stream to a temp file first: an HTTP body read into memory would be held twice
            # (the response chunks plus the joined result); the file is read back in one allocation.
            spool = spool_file("pbt-restore-", tmp_root(self.storage.environ))
        if spool is None:
            if e.encoding == "raw":
                return self.get_bytes(name)
            buf = io.BytesIO(self.get_bytes(name))
            return self._decode(e, buf, map_location, weights_only)
        fd, path = spool
        os.close(fd)
        try:
            self.get_file(name, path)
            with open(path, "rb") as f:
                if e.encoding == "raw":
                    return f.read()
                return self._decode(e, f, map_location, weights_only)
        finally:
            # A failed verification has already removed it: the error to raise is the one in flight.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _decode(self, e: ObjectEntry, f: Any, map_location: Any, weights_only: bool | None) -> Any:
        if e.encoding == "torch":
            # Not wrapped: an explicit weights_only=True refusal must surface as torch reports it.
            return torch_load(f, map_location=map_location, weights_only=weights_only)
        try:
            if e.encoding == "pickle":
                return pickle.load(f)
        except (pickle.UnpicklingError, EOFError) as exc:
            raise CheckpointCorruptError(f"{self.prefix}{e.key}: cannot decode {e.encoding}: {exc}",
                                         self.prefix + e.key) from exc
        raise CheckpointCorruptError(f"{self.prefix}{e.key}: unknown encoding {e.encoding!r}",
                                     self.prefix + e.key)
