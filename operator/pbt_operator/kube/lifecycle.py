"""Pure status documents for what happens around the reconcile plan rather than inside it: a training
that may not start yet (leftovers of an earlier training of its name), a spec the cluster refuses
(dry run), and segment Jobs the API server refused while running.

A refused Job is recorded as a failed attempt of its segment in the member's history, exactly as if
the segment had run and failed: the next pass tells it to the engine, which then follows
spec.failurePolicy (retry, then replace the member or fail the training). Nothing else has to know.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..core.display import shorten
from ..core.types import Record, Suggestion
from . import conditions as C
from .apierrors import ApiError
from .builders import LABEL_ATTEMPT, LABEL_MEMBER, LABEL_SEGMENT, record_entry
from .reconcile import EventSpec


def _conds(training: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list((training.get("status") or {}).get("conditions") or [])


def _cond(conds: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any]:
    return next((c for c in conds if c.get("type") == type_), {})


def invalid_spec(training: Mapping[str, Any], message: str, now: str) -> tuple[dict[str, Any], list[EventSpec]]:
    """Failed with reason InvalidSpec (the same conditions the plan writes for a spec it cannot parse),
    and a Warning Event the first time."""
    gen = (training.get("metadata") or {}).get("generation")
    conds = _conds(training)
    already = _cond(conds, C.FAILED).get("reason") == C.INVALID_SPEC and _cond(conds, C.FAILED).get("status") == "True"
    for type_, value in ((C.READY, False), (C.PROGRESSING, False), (C.SUCCEEDED, False), (C.FAILED, True)):
        conds = C.set_condition(conds, type_, value, C.INVALID_SPEC, message, now, gen)
    status = {"phase": "Failed", "observedGeneration": gen, "conditions": conds}
    events = [] if already else [EventSpec("training", "Warning", C.EV_INVALID, message)]
    return status, events


def waiting_for_leftovers(training: Mapping[str, Any], message: str, now: str
                          ) -> tuple[dict[str, Any] | None, list[EventSpec]]:
    """Pending, Ready=False and Progressing=False with reason NameConflict while an earlier training's
    children are still there; (None, []) when that is already what the training says."""
    gen = (training.get("metadata") or {}).get("generation")
    conds = _conds(training)
    ready = _cond(conds, C.READY)
    if ready.get("reason") == C.NAME_CONFLICT and ready.get("message") == C.condition_message(message):
        return None, []
    for type_ in (C.READY, C.PROGRESSING):
        conds = C.set_condition(conds, type_, False, C.NAME_CONFLICT, message, now, gen)
    status = {"phase": "Pending", "observedGeneration": gen, "conditions": conds}
    return status, [EventSpec("training", "Warning", C.EV_NAME_CONFLICT, message)]


def jobs_accepted(training: Mapping[str, Any], status: Mapping[str, Any] | None, ok: bool, reason: str,
                  message: str, now: str) -> dict[str, Any] | None:
    """The training's conditions with JobsAccepted set, as a status patch; None when nothing changes.
    `status` is the status this pass just wrote (or None: the training's own)."""
    gen = (training.get("metadata") or {}).get("generation")
    conds = list((status or training.get("status") or {}).get("conditions") or [])
    cur = _cond(conds, C.JOBS_ACCEPTED)
    if ok and cur.get("status") != "False":
        return None  # absent or already True: nothing to say
    if cur and cur.get("status") == ("True" if ok else "False") and cur.get("reason") == reason \
            and cur.get("message") == C.condition_message(message):
        return None
    return {"conditions": C.set_condition(conds, C.JOBS_ACCEPTED, ok, reason, message, now, gen)}


def accepted_again(job_names: Sequence[str]) -> str:
    """JobsAccepted=True after a refusal (the condition is only written then): which Job the API server
    took, rather than "segment Jobs are accepted" under the reason Accepted."""
    if not job_names:
        return "the API server accepts this training's segment Jobs again"
    more = f" and {len(job_names) - 1} more" if len(job_names) > 1 else ""
    return f"the API server accepts this training's segment Jobs again: it created {job_names[0]}{more}"


def refusal_reason(err: ApiError) -> str:
    return C.QUOTA_EXCEEDED if err.quota else C.JOB_REFUSED


def refused_segment(member: Mapping[str, Any], member_status: Mapping[str, Any] | None, job: Mapping[str, Any],
                    err: ApiError, now: str) -> tuple[dict[str, Any], EventSpec] | None:
    """A failed attempt for the segment whose Job was refused, appended to the member's history (a
    status patch), and the Warning Event. None when the member's current segment is no longer that Job's
    (a later pass already moved on)."""
    seg = (member.get("spec") or {}).get("segment")
    labels = (job.get("metadata") or {}).get("labels") or {}
    if not seg:
        return None
    sug = Suggestion.from_dict(seg)
    if (str(sug.member), str(sug.segment), str(sug.attempt)) != (
            labels.get(LABEL_MEMBER), labels.get(LABEL_SEGMENT), labels.get(LABEL_ATTEMPT)):
        return None
    st = dict(member_status if member_status is not None else member.get("status") or {})
    history = list(st.get("history") or [])
    jname = job["metadata"]["name"]
    if any(h.get("job") == jname for h in history):
        return None
    error = f"the API server refused the segment Job: {err.summary()}"
    rec = Record(sug, None, sug.steps_start, status="failed", error=shorten(error, C.EVENT_MESSAGE_MAX))
    st["history"] = [*history, record_entry(rec, now, jname)]
    ev = EventSpec(member["metadata"]["name"], "Warning", C.EV_JOB_REFUSED,
                   f"segment {sug.segment} attempt {sug.attempt}: {error}")
    return st, ev


__all__ = ["accepted_again", "invalid_spec", "jobs_accepted", "refusal_reason", "refused_segment", "waiting_for_leftovers"]


def refused_this_generation(training: Mapping[str, Any]) -> bool:
    """Marked InvalidSpec for the spec as it is now (status.observedGeneration is the object's
    generation): the dry run would say the same again, so the daemon waits for an edit instead."""
    meta = training.get("metadata") or {}
    status = training.get("status") or {}
    failed = _cond(_conds(training), C.FAILED)
    return (failed.get("status") == "True" and failed.get("reason") == C.INVALID_SPEC
            and status.get("observedGeneration") is not None and status.get("observedGeneration") == meta.get("generation"))


def generation_seen(plan: Any) -> int | None:
    """The spec generation a finished pass decided on (its status's observedGeneration)."""
    status = getattr(plan, "status", None) or {}
    gen = status.get("observedGeneration")
    return gen if isinstance(gen, int) else None


def edited_since(training: Mapping[str, Any], seen: int | None) -> bool:
    """Whether the training's spec changed after the pass that found it finished: a finished training's
    daemon idles until then, so an edit (a raised budget.segments) is acted on at once, as an operator
    restart would. Without a generation to compare, nothing counts (it idles until a restart)."""
    gen = (training.get("metadata") or {}).get("generation")
    return seen is not None and gen is not None and gen != seen


def pass_refused(err: ApiError) -> EventSpec | None:
    """A Warning on the training for a reconcile pass that the API server refused (not a transient
    error): an admission webhook or a schema rule saying no to a status or member write. The pass is
    retried with back-off either way; without this, the only trace was a WARNING in the operator's log
    every 30 s while `kubectl describe` showed nothing. (Refused Jobs are reported as failed attempts;
    this is for everything else.)"""
    if not err.refused or err.quota:
        return None
    return EventSpec("training", "Warning", C.EV_WRITE_REFUSED,
                     f"the API server refused a write of this training's reconcile pass, which is retried with "
                     f"back-off until it passes: {err.summary()}")
