"""The ``Segment`` context a training program receives: contract fields, checkpoints, result report."""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .checkpoint import CheckpointReader, CheckpointWriter
from .contract import RESULT_MAX_BYTES, Contract, HyperValue, contract_from_env, parse_contract
from .errors import CheckpointNotFoundError, PbtWorkerError, ReportError
from .storage import Manifest, Storage, open_storage
from .storage.base import tmp_root

log = logging.getLogger("pbt_worker")

MAIN = "state"

#: The result key that counts the ``gc`` deletes that failed (docs/segment-contract.md): the driver
#: offers the segment's whole ``gc`` list to a later segment again. Only written when the count is > 0.
GC_FAILED = "gcFailed"


def error_result(message: str, permanent: bool = False, diverged: bool = False) -> dict[str, Any]:
    """``{"error": message}`` (plus ``"permanent": true`` or ``"diverged": true``), the message cut to fit
    the contract's 4096 bytes."""
    extra = {**({"permanent": True} if permanent else {}), **({"diverged": True} if diverged else {})}
    msg = message
    while len(json.dumps({"error": msg, **extra}).encode()) > RESULT_MAX_BYTES:
        over = len(json.dumps({"error": msg, **extra}).encode()) - RESULT_MAX_BYTES
        msg = msg[: max(0, len(msg) - over - 16)] + "..."
    return {"error": msg, **extra}


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _metric_value(name: str, value: Any) -> Any:
    """Metrics must survive strict JSON: non-finite floats become null (with a warning), not NaN."""
    if isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, int):
        return value
    if not isinstance(value, float) and hasattr(type(value), "__index__"):
        try:
            return operator.index(value)  # numpy integers (np.int64) stay integers
        except TypeError:  # a float tensor has __index__ but refuses it
            pass
    try:
        f = float(value)  # numpy / torch scalars
    except (TypeError, ValueError):
        raise ReportError(f"metric {name!r} must be a number, string or bool, got {type(value).__name__}") \
            from None
    if not math.isfinite(f):
        log.warning("metric %r is %s; reported as null", name, f)
        return None
    return f


class Segment:
    """One segment of one member: what to train, where to restore from and save to, where to report.

    Build it with :meth:`from_env` in a worker process, or ``Segment(contract_dict, storage)`` in an
    in-process driver. Attributes mirror the contract (``docs/segment-contract.md``).
    """

    def __init__(self, contract: Mapping[str, Any] | Contract, storage: Storage | None = None) -> None:
        c = contract if isinstance(contract, Contract) else parse_contract(contract, require_result=False)
        self.contract: Contract = c
        self.version = c.version
        self.training = c.training
        self.member = c.member
        self.index = c.segment
        self.hyperparameters: dict[str, HyperValue] = dict(c.hyperparameters)
        self.steps_start = c.steps_start
        self.steps_budget = c.steps_budget
        self.steps_end = c.steps_start + c.steps_budget
        self.restore_uri = c.restore
        self.checkpoint_uri = c.checkpoint
        self.result = c.result
        self.gc: tuple[str, ...] = c.gc
        self.record_uri = c.record
        self.started = time.time()
        self._storage = storage
        self._scratch: Path | None = None
        self._reader: CheckpointReader | None = None
        self._writers: list[CheckpointWriter] = []
        self.saved: Manifest | None = None
        #: The ``gc`` URIs whose delete failed after the save (the result's ``gcFailed`` counts them).
        self.gc_failed: list[str] = []
        #: The result dict last written by :meth:`report` (or an error dict); in-process drivers read it.
        self.last_result: dict[str, Any] | None = None

    @classmethod
    def from_env(cls, storage: Storage | None = None) -> Segment:
        """Parse and validate ``PBT_SEGMENT``; raises ``ContractError`` naming the bad field."""
        return cls(contract_from_env(), storage)

    # -- convenience -------------------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        """Number of steps to train in this segment (same as ``steps_budget``)."""
        return self.steps_budget

    @property
    def is_first(self) -> bool:
        """True on a member's first segment: there is nothing to restore."""
        return self.restore_uri is None

    def __repr__(self) -> str:
        return (f"Segment(training={self.training!r}, member={self.member}, segment={self.index}, "
                f"steps={self.steps_start}+{self.steps_budget}, hyperparameters={self.hyperparameters})")

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove scratch files from ``restore_file``/``restore_dir``/``restore()`` without ``dest``."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def storage_for(self, uri: str) -> Storage:
        return self._storage if self._storage is not None else open_storage(uri)

    def scratch_dir(self) -> Path:
        if self._scratch is None:
            prefix = f"pbt-{self.training}-m{self.member}-"
            environ = self._storage.environ if self._storage is not None else None
            self._scratch = Path(tempfile.mkdtemp(prefix=prefix, dir=tmp_root(environ)))
        return self._scratch

    def _meta(self) -> dict[str, Any]:
        return {"training": self.training, "member": self.member, "segment": self.index,
                "steps": self.steps_end, "hyperparameters": self.hyperparameters}

    # -- restore -----------------------------------------------------------------------------------------
    def restored(self) -> CheckpointReader | None:
        """Reader over the checkpoint to restore, or None on the first segment.

        Raises ``CheckpointNotFoundError`` when ``restore`` names a prefix that is not committed.
        """
        if self.restore_uri is None:
            return None
        if self._reader is None:
            try:
                self._reader = CheckpointReader(self.storage_for(self.restore_uri), self.restore_uri)
            except CheckpointNotFoundError as exc:
                # Only a segment that reported success is restored from: most likely it never saved.
                try:
                    leftovers = bool(self.storage_for(self.restore_uri).list(self.restore_uri))
                except Exception:
                    leftovers = False
                if leftovers:
                    why = ("It holds objects but no commit marker: the segment that wrote them never "
                           "committed them (a seg.checkpoint() writer used without `with` and without "
                           "ck.commit()), or its save was interrupted")
                else:
                    why = ("The segment that wrote this result reported success without a checkpoint: every "
                           "segment must call seg.save(...) (or save_file, save_dir, checkpoint) before it "
                           "returns, since the next segment and any member that copies it restore from it; "
                           "unless the checkpoint was deleted after it was written (by hand, or by a "
                           "lifecycle rule on the storage)")
                raise CheckpointNotFoundError(f"{exc}. {why}", exc.uri) from None
        return self._reader

    def restore(self, *, map_location: Any = "cpu", weights_only: bool | None = None) -> Any:
        """The state saved by the previous segment (None on the first segment).

        A checkpoint written by :meth:`save` returns the saved object (bytes, unpickled object, or
        ``torch.load`` result with ``map_location`` and ``weights_only`` applied); one written by
        :meth:`save_file` returns the local path of the restored file; :meth:`save_dir` the directory.
        """
        reader = self.restored()
        if reader is None:
            return None
        start = time.monotonic()
        if reader.main is None and reader.kind != "dir":
            raise PbtWorkerError(f"{self.restore_uri} holds several objects {reader.names}; "
                                 "use seg.restored().get_object(name)")
        value = reader.value(self.scratch_dir, map_location=map_location, weights_only=weights_only)
        log.debug("restored %s in %.3fs", self.restore_uri, time.monotonic() - start)
        return value

    def restore_file(self, name: str | None = None,
                     dest: str | os.PathLike[str] | None = None) -> Path | None:
        """Restore one file of the checkpoint (default: the one ``save_file`` stored) to ``dest``."""
        reader = self.restored()
        if reader is None:
            return None
        name = name or reader.main
        if name is None:
            raise PbtWorkerError(f"{self.restore_uri}: name the file to restore, one of {reader.names}")
        target = Path(dest) if dest is not None else self.scratch_dir() / Path(name).name
        return reader.get_file(name, target)

    def restore_dir(self, dest: str | os.PathLike[str] | None = None, name: str = "dir") -> Path | None:
        """Restore a directory stored by :meth:`save_dir` into ``dest`` (created); returns ``dest``."""
        reader = self.restored()
        if reader is None:
            return None
        target = Path(dest) if dest is not None else self.scratch_dir() / "restored"
        return reader.get_dir(target, name)

    # -- save --------------------------------------------------------------------------------------------
    def checkpoint(self) -> CheckpointWriter:
        """A writer for a checkpoint holding several named objects; commits (then runs ``gc``) on a clean
        ``with`` exit. Use it when one object per checkpoint is not enough."""
        if self.saved is not None:
            raise PbtWorkerError(f"{self.checkpoint_uri} was already saved by this segment; "
                                 "checkpoints are immutable (use seg.checkpoint() to save several objects)")
        writer = CheckpointWriter(self.storage_for(self.checkpoint_uri), self.checkpoint_uri, self._meta(),
                                  on_commit=self._committed)
        self._writers.append(writer)
        return writer

    def uncommitted(self) -> list[str]:
        """Names written through :meth:`checkpoint` writers that were never committed (no ``with``)."""
        if self.saved is not None:
            return []
        return sorted({n for w in self._writers if w.manifest is None for n in w.entries})

    def _committed(self, manifest: Manifest) -> None:
        self.saved = manifest
        self.collect_garbage()

    def save(self, obj: Any, *, encoding: str | None = None) -> str:
        """Save ``obj`` as this segment's checkpoint, atomically; returns the checkpoint URI.

        bytes are stored raw, objects containing torch tensors/modules via ``torch.save``, anything else
        with pickle (``encoding`` forces one of ``raw``/``pickle``/``torch``). After the commit, the
        prefixes listed in ``gc`` are deleted.
        """
        start = time.monotonic()
        with self.checkpoint() as ck:
            entry = ck.put_object(MAIN, obj, encoding)
            ck.commit(main=MAIN, kind="object")
        log.debug("saved %s (%d bytes, %s) in %.3fs", self.checkpoint_uri, entry.size, entry.encoding,
                  time.monotonic() - start)
        return self.checkpoint_uri

    def save_file(self, path: str | os.PathLike[str], name: str | None = None) -> str:
        """Save a local file (streamed, never read into memory) as this segment's checkpoint."""
        name = name or Path(path).name
        with self.checkpoint() as ck:
            ck.put_file(name, path)
            ck.commit(main=name, kind="file")
        return self.checkpoint_uri

    def save_dir(self, src: str | os.PathLike[str], name: str = "dir") -> str:
        """Save every file under a local directory as this segment's checkpoint."""
        with self.checkpoint() as ck:
            ck.put_dir(src, name)
            ck.commit(main=name, kind="dir")
        return self.checkpoint_uri

    def collect_garbage(self) -> None:
        """Delete the ``gc`` prefixes. Called after a successful save; failures are logged, not raised,
        because a leftover old checkpoint wastes space while a failed segment wastes a whole segment.
        They are not silent either: the result says how many failed (``gcFailed``) and the driver hands
        the list to a later segment. A result already reported is rewritten to say so, whichever order
        the program calls ``report()`` and ``save()`` in."""
        for uri in self.gc:
            try:
                self.storage_for(uri).delete(uri)
            except Exception as exc:
                self.gc_failed.append(uri)
                log.warning("gc: could not delete %s: %s; the result says so (%s) and a later segment "
                            "will retry the delete", uri, exc, GC_FAILED)
        if self.gc_failed and self.last_result is not None and "error" not in self.last_result:
            self._rewrite_result({**self.last_result, GC_FAILED: len(self.gc_failed)})

    # -- report ------------------------------------------------------------------------------------------
    def report(self, score: float, *, steps: int | None = None, metrics: Mapping[str, Any] | None = None,
               **more_metrics: Any) -> dict[str, Any]:
        """Write the result JSON (``{"score", "metrics", "steps"}``, at most 4096 bytes).

        ``steps`` defaults to ``steps_end``. Extra keyword arguments are metrics. A NaN/inf score means
        the segment failed: the result becomes ``{"error": ...}`` and ``ReportError`` is raised; so it is
        for a result over 4096 bytes (it could not be delivered as a termination message). ``gcFailed``
        counts the ``gc`` deletes that failed (collect_garbage); before the save, room is kept for it.
        """
        if isinstance(score, bool | str) or score is None:
            raise self._fail_report(f"score must be a number, got {score!r}")
        try:
            value = float(score)
        except (TypeError, ValueError):
            raise self._fail_report(f"score must be a number, got {type(score).__name__}") from None
        if not math.isfinite(value):
            raise self._fail_report(f"score is {value}: the segment diverged or failed", diverged=True)
        reached = self.steps_end if steps is None else steps
        if isinstance(reached, bool) or not isinstance(reached, int) or reached < 0:
            raise self._fail_report(f"steps must be a non-negative int, got {reached!r}")
        all_metrics = {**dict(metrics or {}), **more_metrics}
        clean = {str(k): _metric_value(str(k), v) for k, v in all_metrics.items()}
        result: dict[str, Any] = {"score": value, "metrics": clean, "steps": reached}
        if self.gc_failed:
            result[GC_FAILED] = len(self.gc_failed)
        text = json.dumps(result, allow_nan=False, separators=(",", ":"))
        size = len(text.encode())
        # Reported before the save: the deletes that follow may add GC_FAILED, so room for it is kept
        # now (the rewritten result must fit as well).
        reserve = len(f',"{GC_FAILED}":{len(self.gc)}') if self.gc and self.saved is None else 0
        if size + reserve > RESULT_MAX_BYTES:
            kept = f" ({reserve} bytes are kept for {GC_FAILED}, as the save comes after the report)" if reserve \
                else ""
            raise self._fail_report(
                f"result is {size} bytes, over the {RESULT_MAX_BYTES}-byte limit of the contract{kept} "
                f"(it travels as a Kubernetes termination message); report fewer or shorter metrics")
        self._write_result(text, result)
        return result

    def _fail_report(self, message: str, diverged: bool = False) -> ReportError:
        self.write_error(message, diverged=diverged)
        return ReportError(message)

    def write_error(self, message: str, *, permanent: bool = False, diverged: bool = False) -> None:
        """Record a failed segment (``{"error": message}``), truncated to fit 4096 bytes. `permanent`:
        running the segment again cannot succeed, so the driver fails the training instead of retrying.
        `diverged`: the score was not finite, so the driver explores from the best member's checkpoint
        instead of retrying the same hyperparameters."""
        doc = error_result(message, permanent, diverged)
        try:
            self._write_result(json.dumps(doc), doc)
        except OSError as exc:  # "if it can": the exit status still says the segment failed
            log.error("could not write the error result to %s: %s", self.result, exc)

    def record(self, result: Mapping[str, Any]) -> dict[str, Any]:
        """The segment's complete record (docs/worker.md, "Segment records"): the decision that started
        it, what it restored and saved, its result and its timings."""
        finished = time.time()
        return {
            "format": "pbt-segment-record", "version": 1,
            "training": self.training, "member": self.member, "segment": self.index,
            "decision": dict(self.contract.decision or {}),
            "hyperparameters": dict(self.hyperparameters),
            "restore": self.restore_uri, "checkpoint": self.checkpoint_uri if self.saved is not None else None,
            "steps": {"start": self.steps_start, "end": result.get("steps", self.steps_start)},
            "score": result.get("score"), "metrics": dict(result.get("metrics") or {}), "error": result.get("error"),
            **{flag: True for flag in ("permanent", "diverged") if result.get(flag) is True},
            "started": _iso(self.started), "finished": _iso(finished), "seconds": round(finished - self.started, 3),
        }

    def _write_record(self, result: Mapping[str, Any]) -> None:
        """Write the record next to the checkpoints, in one atomic put under a name per segment and
        attempt (a rerun of the same attempt, after a disruption, replaces it). A failure is logged:
        the driver has the result from the result file, and a segment is worth more than its record."""
        if self.record_uri is None:
            return
        prefix, key = self.record_uri.rsplit("/", 1)
        try:
            data = json.dumps(self.record(result), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
            self.storage_for(self.record_uri).put(prefix + "/", key, data)
        except Exception as exc:
            log.warning("could not write the segment record %s: %s", self.record_uri, exc)

    def _rewrite_result(self, result: dict[str, Any]) -> None:
        """Replace the result reported earlier (the record in storage keeps what it said: a record is
        about training, not about deletes)."""
        self.last_result = result
        try:
            self._write_result_file(json.dumps(result, allow_nan=False, separators=(",", ":")))
        except OSError as exc:
            log.error("could not rewrite the result %s with %s: %s", self.result, GC_FAILED, exc)

    def _write_result(self, text: str, result: dict[str, Any]) -> None:
        self.last_result = result
        self._write_record(result)
        self._write_result_file(text)

    def _write_result_file(self, text: str) -> None:
        if self.result is None:
            return
        # Written in place, not via rename: in Kubernetes the path is a mounted file
        # (/dev/termination-log) that cannot be replaced. Drivers read it only after the process exits.
        path = Path(self.result)
        if not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
