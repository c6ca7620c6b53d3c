"""Both ends of the segment contract as the drivers see it (docs/segment-contract.md).

`build_contract` is what a driver hands a worker in `PBT_SEGMENT`; `parse_result` turns what the
worker wrote back (a result file locally, a termination message in Kubernetes) into a SegmentResult.
Worker output is untrusted: anything malformed fails only that segment, with a reason that says what
was wrong, and never raises into the driver.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from .checkpoints import checkpoint_uri, record_uri
from .core.display import shorten
from .core.types import DIVERGED_ERROR, NO_METRIC_ERROR, PERMANENT_ERROR, SegmentResult, Suggestion

CONTRACT_VERSION = 1
MAX_RESULT_BYTES = 4096
# The result key counting the contract's gc deletes that failed: the driver offers the gc list again.
GC_FAILED = "gcFailed"


def build_contract(
    training: str, sug: Suggestion, root: str, result_path: str, gc: Sequence[str] = (), record: bool = False
) -> dict[str, Any]:
    """`record`: ask the worker to write the segment's complete record to storage (the operator does:
    its member statuses keep only a window; `pbt run` keeps every record in results.jsonl)."""
    doc = {
        "version": CONTRACT_VERSION,
        "training": training,
        "member": sug.member,
        "segment": sug.segment,
        "hyperparameters": dict(sug.hyperparameters),
        "steps": {"start": sug.steps_start, "budget": sug.steps_budget},
        "restore": checkpoint_uri(root, training, sug.restore) if sug.restore is not None else None,
        "checkpoint": checkpoint_uri(root, training, sug.ref),
        "result": result_path,
        "gc": list(gc),
    }
    if record:
        doc["record"] = {"uri": record_uri(root, training, sug.member, sug.segment, sug.attempt),
                         "decision": sug.to_dict()}
    return doc


# The result's flags (docs/segment-contract.md) and the prefix each puts on the driver's error, by which
# the engine classifies it (core/types.py); the first flag set wins.
ERROR_FLAGS = (("permanent", PERMANENT_ERROR), ("diverged", DIVERGED_ERROR))


def flagged_prefix(doc: Any) -> str | None:
    """The prefix for a worker's error document whose `permanent` or `diverged` is true; None for neither."""
    return next((prefix for flag, prefix in ERROR_FLAGS if doc.get(flag) is True), None)


def parse_result(text: str | bytes | None, sug: Suggestion, metric: str = "score",
                 duration: float | None = None) -> SegmentResult:
    """Never raises: a bad result becomes a failed SegmentResult whose error names the problem."""

    def fail(why: str) -> SegmentResult:
        return SegmentResult(sug.member, sug.segment, None, sug.steps_start, {}, error=why, duration=duration)

    if text is None or (isinstance(text, (str, bytes)) and not text.strip()):
        return fail("worker wrote no result (did it call seg.report()?)")
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_RESULT_BYTES:
        return fail(f"result is {len(raw)} bytes; at most {MAX_RESULT_BYTES} are allowed")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        return fail(f"result is not JSON ({e.__class__.__name__}: {str(e)[:80]}): {raw[:60]!r}")
    if not isinstance(doc, dict):
        return fail(f"result must be a JSON object (got {type(doc).__name__})")
    if "error" in doc:
        prefix = flagged_prefix(doc) or "worker reported an error:"
        return fail(f"{prefix} {shorten(str(doc['error']), 500)}")
    unknown = set(doc) - {"score", "metrics", "steps", "version", GC_FAILED}
    if unknown:
        return fail(f"result has unexpected keys {sorted(unknown)}; allowed: score, metrics, steps, {GC_FAILED}")
    gc_failed = doc.get(GC_FAILED, 0)
    if isinstance(gc_failed, bool) or not isinstance(gc_failed, int) or gc_failed < 0:
        return fail(f"result.{GC_FAILED} must be a non-negative integer (got {str(gc_failed)[:40]!r})")
    metrics = doc.get("metrics") or {}
    if not isinstance(metrics, dict):
        return fail(f"result.metrics must be an object (got {type(metrics).__name__})")
    score = doc.get("score") if metric == "score" or metric not in metrics else metrics.get(metric)
    if score is None and metric != "score" and metric in metrics:
        # the worker SDK reports a non-finite metric as null: a loss that went NaN, not a missing metric
        return fail(f"{DIVERGED_ERROR} metric {metric!r} is null (the worker SDK reports a NaN or infinite "
                    f"value as null)")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        hint = ""
        if score is None:  # missing, not malformed: say what the worker did report
            reported = sorted(str(k) for k, v in metrics.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool))
            hint = "; the worker reported no number: report one (seg.report(score=...)) or return it"
            if reported:
                hint = (f"; the worker reported {', '.join(reported)}: report {metric!r} (seg.report(score=...)) "
                        f"or set spec.objective.metric to one of them")
        return fail(f"{NO_METRIC_ERROR} {metric!r} (got {score!r}){hint}")
    try:
        value = float(score)
    except OverflowError:  # a JSON integer beyond float range: raising here would hang the driver
        return fail(f"score is out of range ({str(score)[:40]}...)")
    if not math.isfinite(value):
        return fail(f"{DIVERGED_ERROR} score is {score} (not finite)")
    steps = doc.get("steps", sug.steps_start + sug.steps_budget)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < sug.steps_start:
        return fail(f"result.steps must be an integer >= {sug.steps_start} (got {steps!r})")
    return SegmentResult(sug.member, sug.segment, value, steps, metrics, duration=duration, gc_failed=gc_failed)
