"""One reconcile pass of a PopulationTraining, as a pure function of what the API server holds.

`plan(training, members, jobs, pods, now)` returns every write to make: members to create, member
spec and status patches, Jobs to create, the training's status, and Events. The state it reads is
the whole state: member specs hold the decided next segment (written before its Job exists), member
statuses hold finished segments (written before the next decision). Rebuilding the engine from them
and re-telling any finished segment whose decision was not persisted yet reproduces exactly the
decisions an uninterrupted operator would have made, so a kill -9 at any point loses nothing and
repeats nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..checkpoints import checkpoint_uri
from ..contract import parse_result
from ..core.engine import Engine
from ..core.explore import describe_change
from ..core.types import Record, SegmentResult, Suggestion
from ..local.runner import pick_next
from ..spec import SpecError, TrainingSpec, parse_spec
from . import conditions as C
from .builders import (
    LABEL_SEGMENT,
    LABEL_TRAINING,
    build_job,
    build_member,
    job_name,
    member_name,
    member_status,
    record_entry,
    trainer_name,
)


@dataclass
class EventSpec:
    target: str  # "training" or a member name
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    create_members: list[dict[str, Any]] = field(default_factory=list)
    member_specs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> spec.segment
    member_statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    create_jobs: list[dict[str, Any]] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)
    status_changed: bool = True  # False: `status` equals what the training already has (no write)
    events: list[EventSpec] = field(default_factory=list)
    collected: set[tuple[int, int]] = field(default_factory=set)
    done: bool = False
    spec: TrainingSpec | None = None
    started: list[str] = field(default_factory=list)  # job names created this pass (metrics)
    finished: int = 0  # segments that finished with a score this pass (metrics)
    segment_seconds: list[float] = field(default_factory=list)  # Job startTime -> completion, this pass (metrics)


def storage_root(spec: TrainingSpec) -> str:
    uri = spec.storage.uri
    if uri is None:
        raise SpecError(["spec.storage.uri: is required in Kubernetes (s3://BUCKET/PREFIX)"])
    return uri.rstrip("/")


def _cond_true(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def job_outcome(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], sug: Suggestion,
                metric: str) -> SegmentResult | None:
    """None while the Job runs; otherwise the segment's result read from the termination message."""
    complete = _cond_true(job, "Complete") or _cond_true(job, "SuccessCriteriaMet")
    failed = _cond_true(job, "Failed") or _cond_true(job, "FailureTarget")
    name = job["metadata"]["name"]
    mine = [p for p in pods if (p.get("metadata", {}).get("labels") or {}).get("job-name") == name
            or any(o.get("name") == name for o in p.get("metadata", {}).get("ownerReferences") or [])]
    terminated = []
    for p in mine:
        # only the trainer's status counts: sidecars write termination messages and exit codes too,
        # and the kubelet orders container statuses by name, not as the template lists them
        trainer = trainer_name(p)
        for cs in (p.get("status") or {}).get("containerStatuses") or []:
            t = (cs.get("state") or {}).get("terminated")
            if t and (trainer is None or cs.get("name") == trainer):
                terminated.append((p, t))
    if not complete and not failed:
        # A pod that succeeded decides its Job (backoffLimit 0, one completion): reading it directly
        # saves the Job controller's batching delay (about a second) on every segment. Failures
        # still wait for the Job, whose pod failure policy tells a disruption from a real failure.
        succeeded = [t for p, t in terminated if (p.get("status") or {}).get("phase") == "Succeeded"
                     and t.get("exitCode") == 0]
        if not succeeded:
            return None
        complete = {"type": "Complete"}
    if complete:
        ok = [t for _, t in terminated if t.get("exitCode") == 0]
        msg = ok[-1].get("message") if ok else None
        if msg is None:
            return SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                 error="Job completed but its pod left no termination message")
        return parse_result(msg, sug, metric)
    reason = (failed or {}).get("reason", "")
    if reason == "DeadlineExceeded":
        return SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                             error="timed out (spec.segment.timeoutSeconds); the Job was stopped")
    if terminated:
        t = terminated[-1][1]
        msg = (t.get("message") or "").strip()
        why = t.get("reason") or ""
        # the kubelet's reason says what the exit code cannot (OOMKilled, ContainerCannotRun, ...)
        head = f"exit code {t.get('exitCode')}" + (f" ({why})" if why and why not in ("Error", "Completed") else "")
        return SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                             error=f"{head}: {msg[-300:] or why}")
    return SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                         error=f"Job failed: {reason} {(failed or {}).get('message', '')}".strip())


POD_JOB_LABEL = "batch.kubernetes.io/job-name"  # set on every pod by the Job controller
# Above this many current Jobs the selectors would make URLs of several KiB: read by training instead.
MAX_SELECTED_JOBS = 200


def world_selectors(training: str, members: Sequence[Mapping[str, Any]]) -> tuple[str | None, str | None]:
    """Label selectors for the Jobs and pods a pass over these members can need (None: none at all).

    A pass only looks at the Jobs of the members' current segments (and their retries), and at those
    Jobs' pods: listing every finished Job and pod of the training instead made each pass's reads,
    mostly JSON decoding, grow with the whole history. Jobs are selected by segment number (every
    attempt of a current segment; other members' Jobs with those numbers come along, harmlessly),
    pods by their Job's name. A member whose segment does not parse selects everything: the pass
    then reports it as it always did.
    """
    base = f"{LABEL_TRAINING}={training}"
    names: list[str] = []
    segments: set[int] = set()
    for m in members:
        seg = (m.get("spec") or {}).get("segment")
        if not seg:
            continue
        try:
            sug = Suggestion.from_dict(seg)
        except (TypeError, ValueError, KeyError):
            return base, base
        names.append(job_name(training, sug))
        segments.add(int(sug.segment))
    if not names:
        return None, None
    if len(names) > MAX_SELECTED_JOBS:
        return base, base
    return (f"{base},{LABEL_SEGMENT} in ({','.join(str(k) for k in sorted(segments))})",
            f"{base},{POD_JOB_LABEL} in ({','.join(sorted(names))})")


TERMINAL_JOB_CONDITIONS = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")


def job_event_matters(event_type: str | None, job: Mapping[str, Any]) -> bool:
    """Whether a watch event on a segment Job can change a pass's outcome: it ended, or it went
    away. Its creation is the operator's own doing, and the Job controller's bookkeeping updates
    (active counts, pod finalizers) decide nothing; waking a pass for each was most of the passes."""
    if event_type == "DELETED":
        return True
    return any(_cond_true(job, t) for t in TERMINAL_JOB_CONDITIONS)


def pod_event_matters(event_type: str | None, pod: Mapping[str, Any]) -> bool:
    """Whether a watch event on a segment pod can change a pass's outcome: it finished (a success
    is read at once, without waiting for the Job), was marked as disrupted, or went away."""
    if event_type == "DELETED":
        return True
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return True
    return _cond_true(pod, "DisruptionTarget") is not None


def pods_by_job(pods: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Pods grouped by the Job that owns them (label, or owner reference for pods without it)."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for p in pods:
        meta = p.get("metadata") or {}
        labels = meta.get("labels") or {}
        owners = {labels.get(POD_JOB_LABEL), labels.get("job-name")}
        owners |= {o.get("name") for o in meta.get("ownerReferences") or [] if o.get("kind", "Job") == "Job"}
        for owner in owners - {None}:
            out.setdefault(str(owner), []).append(p)
    return out


def _result_of(rec: Record) -> SegmentResult:
    return SegmentResult(rec.member, rec.segment, rec.score, rec.steps_end, rec.metrics,
                         error=rec.error if rec.status != "done" else None, duration=rec.duration)


def plan(training: Mapping[str, Any], members: Sequence[Mapping[str, Any]], jobs: Sequence[Mapping[str, Any]],
         pods: Sequence[Mapping[str, Any]], now: str, collected: set[tuple[int, int]] | None = None) -> Plan:
    out = Plan(collected=set(collected or ()))
    meta = training["metadata"]
    name = meta["name"]
    generation = meta.get("generation")
    old_status = training.get("status") or {}
    conds = list(old_status.get("conditions") or [])
    try:
        spec = parse_spec(training.get("spec"), name=name, namespace=meta.get("namespace"))
        root = storage_root(spec)
        if spec.template is None:
            raise SpecError(["spec.template: is required in Kubernetes (a pod template with the training container)"])
    except SpecError as e:
        msg = "; ".join(e.problems)
        out.status = {
            "phase": "Failed", "observedGeneration": generation,
            "conditions": _set_all(conds, now, generation, ready=(False, C.INVALID_SPEC, msg),
                                   progressing=(False, C.INVALID_SPEC, msg), succeeded=(False, C.INVALID_SPEC, msg),
                                   failed=(True, C.INVALID_SPEC, msg)),
        }
        if (_cond_true(training, C.FAILED) or {}).get("reason") != C.INVALID_SPEC:
            out.events.append(EventSpec("training", "Warning", C.EV_INVALID, msg[:1000]))
        out.done = True
        return out
    out.spec = spec

    by_index: dict[int, Mapping[str, Any]] = {}
    for m in members:
        by_index[int(m["spec"]["index"])] = m
    histories: dict[int, list[dict[str, Any]]] = {i: list((m.get("status") or {}).get("history") or [])
                                                  for i, m in by_index.items()}

    # -- rebuild the engine ---------------------------------------------------------------------
    entries = sorted((h for hs in histories.values() for h in hs),
                     key=lambda h: (h.get("finishedAt", ""), h["suggestion"]["member"], h["suggestion"]["segment"],
                                    h["suggestion"].get("attempt", 0)))
    current: dict[int, Suggestion] = {}
    for i, m in by_index.items():
        seg = (m.get("spec") or {}).get("segment")
        if seg:
            current[i] = Suggestion.from_dict(seg)
    to_tell: list[Record] = []
    records: list[Record] = []
    for h in entries:
        rec = Record.from_dict(h)
        cur = current.get(rec.member)
        if cur is not None and cur.ref == rec.ref and cur.attempt == rec.suggestion.attempt:
            to_tell.append(rec)  # finished, but its decision was never persisted: tell it again
        else:
            records.append(rec)
    engine = Engine(spec, records, current.values())
    new_members: list[Suggestion] = []
    if not by_index:
        new_members = engine.start()
    else:
        missing = [i for i in range(spec.population) if i not in by_index]
        if missing:  # a member deleted by hand, or a crash between creates: recreate from the start
            fresh = Engine(spec).start()
            for s in fresh:
                if s.member in missing:
                    engine.pending[s.member] = s
                    new_members.append(s)
    decided: dict[int, Suggestion] = {}
    retried: set[int] = set()  # members whose decision is a retry of the segment that just failed

    def note(s: Suggestion, failed: Suggestion) -> None:
        decided[s.member] = s
        if s.member == failed.member and dataclasses.replace(s, attempt=failed.attempt) == failed:
            retried.add(s.member)
        else:
            retried.discard(s.member)

    for rec in to_tell:
        for s in engine.tell(_result_of(rec)):
            note(s, rec.suggestion)

    # -- read finished Jobs ---------------------------------------------------------------------
    # Results are told in completion order (then member index), the same order a rebuild after a
    # crash uses, so both paths make the same decisions.
    jobs_by_name = {j["metadata"]["name"]: j for j in jobs}
    pods_of = pods_by_job(pods)
    told: set[str] = set()
    new_history: dict[int, list[dict[str, Any]]] = {}
    for _ in range(4):  # a told result may decide a retry whose Job already exists (after a crash)
        outcomes = []
        for m_idx, sug in engine.pending.items():
            jname = job_name(name, sug)
            job = jobs_by_name.get(jname)
            if job is None or jname in told:
                continue
            res = job_outcome(job, pods_of.get(jname, []), sug, spec.objective.metric)
            if res is not None:
                finished_at = (job.get("status") or {}).get("completionTime") or now
                outcomes.append((finished_at, m_idx, sug, res, jname))
        if not outcomes:
            break
        for finished_at, m_idx, sug, res, jname in sorted(outcomes, key=lambda o: (o[0], o[1])):
            told.add(jname)
            new = engine.tell(res)
            if not res.disrupted and engine.last is not None and engine.last.ref == sug.ref:
                new_history.setdefault(m_idx, []).append(record_entry(engine.last, finished_at, jname))
            out.finished += int(res.ok)
            secs = None if res.disrupted else job_seconds(jobs_by_name[jname], finished_at)
            if secs is not None:
                out.segment_seconds.append(secs)
            if not res.ok:
                out.events.append(EventSpec(member_name(name, m_idx), "Warning", C.EV_SEGMENT_FAILED,
                                            f"segment {sug.segment} attempt {sug.attempt} failed: {res.error}"[:1000]))
            for s in new:
                note(s, sug)

    # -- events for decisions -------------------------------------------------------------------
    for s in decided.values():
        mname = member_name(name, s.member)
        if s.member in retried:  # a retry repeats its decision (exploit, replace...): do not announce it again
            out.events.append(EventSpec(mname, "Warning", C.EV_SEGMENT_RETRIED,
                                        f"segment {s.segment} retried (attempt {s.attempt})"))
        elif s.kind == "exploit" and s.donor is not None:
            out.events.append(EventSpec(mname, "Normal", C.EV_EXPLOITED,
                                        f"member {s.member} copies member {s.donor} checkpoint s{s.restore[1] if s.restore else '?'} "
                                        f"(score {s.score_before}): {s.reason.split('; explore')[0]}"))
            donor_hp = next((r.suggestion.hyperparameters for r in [engine.latest.get(s.donor)] if r), {})
            out.events.append(EventSpec(mname, "Normal", C.EV_EXPLORED,
                                        f"{describe_change(donor_hp, s.hyperparameters)} ({s.reason.split('explore: ')[-1]})"))
        elif s.kind == "replace":
            out.events.append(EventSpec(mname, "Warning", C.EV_MEMBER_REPLACED, s.reason[:1000]))

    # -- members: create / patch ------------------------------------------------------------------
    for s in new_members:
        out.create_members.append(build_member(training, s))
        out.events.append(EventSpec("training", "Normal", C.EV_MEMBER_CREATED,
                                    f"member {s.member} created: {describe_change({}, s.hyperparameters)}"))
    for m_idx, s in engine.pending.items():
        prev = current.get(m_idx)
        if m_idx in by_index and (prev is None or prev.to_dict() != s.to_dict()):
            out.member_specs[member_name(name, m_idx)] = s.to_dict()

    # -- admit segments up to parallelism -------------------------------------------------------
    waiting: list[Suggestion] = []
    running = 0
    disruptions: dict[int, int] = {}
    for m_idx, sug in engine.pending.items():
        jname = job_name(name, sug)
        job = jobs_by_name.get(jname)
        if job is None:
            waiting.append(sug)
        elif jname not in told and job_outcome(job, pods_of.get(jname, []), sug, spec.objective.metric) is None:
            running += 1
            disruptions[m_idx] = _disruptions(job, pods_of.get(jname, []))
    finished = engine.finished or engine.failed
    if finished:
        for s in waiting:
            engine.cancel(s.member)
        waiting = []
    slots = max(0, spec.parallelism - running)
    to_start: list[Suggestion] = []
    while waiting and len(to_start) < slots:
        s = pick_next(waiting)
        waiting.remove(s)
        to_start.append(s)
    gc_uris: list[str] = []
    if to_start:
        engine.collected = set(out.collected)
        refs = engine.garbage()[:64]  # the rest stay uncollected and come up again next time
        out.collected |= set(refs)
        gc_uris = [checkpoint_uri(root, name, r) for r in refs]
    for i, s in enumerate(to_start):
        mobj = by_index.get(s.member)
        if mobj is None:
            continue  # created this pass; its Job follows next pass, once the member has a uid
        out.create_jobs.append(build_job(training, mobj, s, root, gc_uris if i == 0 else [], spec.template or {},
                                         spec.storage.credentials_secret, spec.segment.timeout_seconds))
        out.started.append(job_name(name, s))
    running += len(out.create_jobs)

    # -- member statuses --------------------------------------------------------------------------
    for m_idx, mobj in by_index.items():
        hist = histories.get(m_idx, []) + new_history.get(m_idx, [])
        cur_sug = engine.pending.get(m_idx)
        if cur_sug is not None:
            has_job = job_name(name, cur_sug) in jobs_by_name or any(
                j["metadata"]["name"] == job_name(name, cur_sug) for j in out.create_jobs)
            phase = "Running" if has_job else "Queued"
        else:
            phase = "Failed" if engine.failed else "Done"
        extra = {"disruptions": disruptions[m_idx]} if disruptions.get(m_idx) else {}
        st = member_status(cur_sug or (engine.latest[m_idx].suggestion if m_idx in engine.latest else None),
                           hist, phase, extra)
        old = {k: v for k, v in (mobj.get("status") or {}).items() if k != "conditions"}
        if old.get("disruptions") and "disruptions" not in st:
            st["disruptions"] = old["disruptions"]
        if st != old:
            out.member_statuses[member_name(name, m_idx)] = st
        if disruptions.get(m_idx, 0) > int(old.get("disruptions") or 0):
            out.events.append(EventSpec(member_name(name, m_idx), "Warning", C.EV_DISRUPTED,
                                        f"segment {cur_sug.segment if cur_sug else '?'} pod disrupted (preemption, eviction or "
                                        "node loss): it reruns from the same checkpoint, not counted as a failure"))

    # -- training status ------------------------------------------------------------------------
    out.done = engine.done
    out.status = training_status(spec, engine, old_status, now, generation, running, len(waiting), root)
    out.status_changed = out.status != old_status
    if out.done and old_status.get("phase") not in ("Succeeded", "Failed"):
        if engine.failed:
            out.events.append(EventSpec("training", "Warning", C.EV_FAILED, engine.failed))
        else:
            b = engine.best
            out.events.append(EventSpec("training", "Normal", C.EV_COMPLETED,
                                        f"{engine.finished or 'budget exhausted'}; best member {b.member if b else '-'} "
                                        f"score {b.score if b else '-'}"))
    return out


def job_seconds(job: Mapping[str, Any], finished_at: str) -> float | None:
    """A segment Job's duration: status.startTime to `finished_at` (its completionTime, or the time the
    pass saw its pod succeed). None when the Job has no start time or a timestamp does not parse."""
    start = (job.get("status") or {}).get("startTime")
    if not start:
        return None
    try:
        t0, t1 = (datetime.datetime.fromisoformat(str(t).replace("Z", "+00:00")) for t in (start, finished_at))
    except ValueError:
        return None
    return max(0.0, (t1 - t0).total_seconds())


def _disruptions(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> int:
    name = job["metadata"]["name"]
    n = 0
    for p in pods:
        if (p.get("metadata", {}).get("labels") or {}).get("job-name") != name:
            continue
        if _cond_true(p, "DisruptionTarget"):
            n += 1
    return n


def _set_all(conds: list[dict[str, Any]], now: str, gen: int | None, **kv: tuple[bool, str, str]) -> list[dict[str, Any]]:
    names = {"ready": C.READY, "progressing": C.PROGRESSING, "succeeded": C.SUCCEEDED, "failed": C.FAILED}
    for key, (status, reason, msg) in kv.items():
        conds = C.set_condition(conds, names[key], status, reason, msg, now, gen)
    return conds


def training_status(spec: TrainingSpec, engine: Engine, old: Mapping[str, Any], now: str, generation: int | None,
                    running: int, queued: int, root: str) -> dict[str, Any]:
    st = engine.state()
    best = engine.best
    conds = list(old.get("conditions") or [])
    if engine.failed:
        phase = "Failed"
        conds = _set_all(conds, now, generation, ready=(False, C.SEGMENT_FAILED, engine.failed),
                         progressing=(False, C.SEGMENT_FAILED, engine.failed),
                         succeeded=(False, C.SEGMENT_FAILED, engine.failed), failed=(True, C.SEGMENT_FAILED, engine.failed))
    elif engine.done:
        phase = "Succeeded"
        reason = (engine.finished or "").split(":")[0] or C.BUDGET_EXHAUSTED
        msg = engine.finished or f"every member trained {spec.budget.segments} segments"
        conds = _set_all(conds, now, generation, ready=(True, C.COMPLETED, msg), progressing=(False, reason, msg),
                         succeeded=(True, reason, msg), failed=(False, C.NO_FAILURE, "no failure"))
    else:
        phase = "Running"
        reason = C.SEGMENTS_RUNNING if running else C.WAITING_FOR_SLOTS
        msg = f"{running} segments running, {queued} queued, {st.done_segments}/{st.total_segments} done"
        conds = _set_all(conds, now, generation, ready=(True, reason, msg), progressing=(True, reason, msg),
                         succeeded=(False, C.NOT_FINISHED, "training in progress"),
                         failed=(False, C.NO_FAILURE, "no failure"))
    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "conditions": conds,
        "generation": st.done_segments // max(1, spec.population),
        "segmentsDone": st.done_segments,
        "segmentsTotal": st.total_segments,
        "running": running,
        "queued": queued,
        "failures": len(engine.failures),
    }
    if best is not None:
        status["best"] = {
            "member": best.member, "memberName": f"{spec.name}-m{best.member:03d}", "segment": best.segment,
            "score": best.score, "steps": best.steps_end,
            "hyperparameters": dict(best.suggestion.hyperparameters),
            "checkpoint": checkpoint_uri(root, spec.name, best.ref),
        }
    if engine.done and best is not None:
        status["schedule"] = engine.schedule(best.ref)
    return status


__all__ = ["EventSpec", "Plan", "job_event_matters", "job_outcome", "plan", "pod_event_matters", "pods_by_job",
           "training_status", "world_selectors"]
