"""The common loop around a user's training function: build the segment, call, report, fail cleanly."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from .contract import ENV_VAR
from .errors import ContractError, PermanentError, ReportError
from .segment import Segment, error_result

log = logging.getLogger("pbt_worker")

TrainFn = Callable[[Segment], Any]
_warned_returned_over_reported = False


def _warn_returned_over_reported(reported: float, returned: float) -> None:
    """Once per process: the function called seg.report(score) and returned another score, which
    replaced the reported one (what a function returns is its result)."""
    global _warned_returned_over_reported
    if not _warned_returned_over_reported:
        _warned_returned_over_reported = True
        log.warning("the training function called seg.report(score=%r) and returned %r: the returned score "
                    "counts. Return None after seg.report(...), or return the score without reporting it",
                    reported, returned)


def execute(train_fn: TrainFn, seg: Segment) -> dict[str, Any]:
    """Run ``train_fn(seg)`` and report its outcome; never raises for failures of the training function.

    ``train_fn`` returns a score (number), a dict of ``report`` keyword arguments (``score`` required,
    e.g. ``{"score": acc, "loss": l}``), or None after calling ``seg.report`` itself. Any exception
    becomes ``{"error": "<Type>: <message>"}``. Returns the result dict that was written, which is what
    an in-process driver (the local runner's inline executor) consumes; it never exits the process.
    """
    try:
        value = train_fn(seg)
        reported = (seg.last_result or {}).get("score")
        if value is None:
            if seg.last_result is None:
                raise ReportError("the training function returned None without calling seg.report()")
        elif isinstance(value, Mapping):
            if "score" not in value:
                raise ReportError(f"the training function returned a dict without 'score': {sorted(value)}")
            seg.report(**dict(value))
        else:
            seg.report(score=value)
        returned = (seg.last_result or {}).get("score")
        if value is not None and reported is not None and returned is not None and returned != reported:
            _warn_returned_over_reported(reported, returned)
        if seg.saved is None:
            pending = seg.uncommitted()
            if pending:
                # Objects were written but never committed: the program meant to save and the
                # checkpoint is lost (a writer used without `with`): fail now, not at the next restore.
                raise ReportError(
                    f"seg.checkpoint() wrote {pending} to {seg.checkpoint_uri} but never committed them: use "
                    "`with seg.checkpoint() as ck:` (it commits when the block ends) or call ck.commit()")
            log.warning("segment %s/m%d/%d reported a score but saved no checkpoint to %s; a later segment "
                        "that calls seg.restore() will fail: call seg.save(state) before returning",
                        seg.training, seg.member, seg.index, seg.checkpoint_uri)
    except ReportError as exc:
        if seg.last_result is None or "error" not in seg.last_result:
            seg.write_error(str(exc))
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}"
        log.error("segment %s/m%d/%d failed: %s\n%s", seg.training, seg.member, seg.index, detail,
                  traceback.format_exc())
        seg.write_error(detail, permanent=isinstance(exc, PermanentError))
    except (KeyboardInterrupt, SystemExit) as exc:
        # The process is going away; leave a reason unless the function already reported success.
        if seg.last_result is None or (isinstance(exc, SystemExit) and exc.code not in (0, None)):
            seg.write_error(f"{type(exc).__name__}: {exc}")
        raise
    assert seg.last_result is not None
    return seg.last_result


def run(train_fn: TrainFn) -> NoReturn:
    """Entry point for a worker process: ``pbt_worker.run(train)`` at the bottom of a training script.

    Reads ``PBT_SEGMENT``, calls ``train_fn(seg)``, writes the result and exits 0, or writes
    ``{"error": ...}`` and exits 1. A contract this worker refuses exits 2, after writing a permanent
    error to the contract's result path where it can find one: a driver newer than the worker's image
    would get the same refusal on every retry.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        seg = Segment.from_env()
    except Exception as exc:
        print(f"pbt_worker: {exc}", file=sys.stderr)
        if isinstance(exc, ContractError):
            _report_refusal(f"{type(exc).__name__}: {exc}")
        sys.exit(2)
    with seg:
        result = execute(train_fn, seg)
    sys.exit(1 if "error" in result else 0)


def _report_refusal(message: str) -> None:
    """Write a refused contract's permanent error to its `result` path, if the contract is JSON that
    names one: the driver then fails the training at once, naming the refusal, instead of retrying.
    Best effort: a contract that is not even JSON says nothing about where a result would go."""
    try:
        doc = json.loads(os.environ.get(ENV_VAR) or "")
    except ValueError:
        return
    path = doc.get("result") if isinstance(doc, dict) else None
    if not isinstance(path, str) or not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as f:  # in place: /dev/termination-log cannot be replaced
            f.write(json.dumps(error_result(message, permanent=True)))
    except OSError as exc:
        print(f"pbt_worker: could not write the error result to {path}: {exc}", file=sys.stderr)
