"""One reconcile pass of a PopulationTraining, as a pure function of what the API server holds.

`plan(training, members, jobs, pods, now)` returns every write to make: members to create, member
spec and status patches, Jobs to create, the training's status, and Events. The state it reads is
the whole state, this driver's journal: member specs hold the decided next segment (written before
its Job exists), member statuses hold finished segments (written before the next decision). The
engine is rebuilt from them by the driver policy (core/policy.py), which re-tells any finished
segment whose decision was not persisted yet and so reproduces exactly the decisions an
uninterrupted operator would have made: a kill -9 at any point loses nothing and repeats nothing.

`plan` is a sequence of phases over one `Pass`, each a function with its own unit tests:
parse_training (or invalid_spec), rebuild_pass, tell_finished_jobs, decision_events, write_members,
admit_segments (which also stops segment Jobs, sets deadlines and finds why segments wait, through the
pure functions of kube/segments.py), write_member_statuses, finish_pass. docs/architecture.md puts them
in context.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..checkpoints import checkpoint_ref, checkpoint_uri
from ..contract import parse_result
from ..core.display import counted, describe_change, fmt_value, shorten
from ..core.engine import Counters, Engine
from ..core.policy import Decision, Journaled, admit, garbage_batch, rebuild, still_listable, take_back
from ..core.types import Record, Ref, SegmentResult, Suggestion, diverged, permanent_failure
from ..spec import SpecError, TrainingSpec, parse_spec
from . import conditions as C
from . import segments as S
from .builders import (
    LABEL_MEMBER,
    LABEL_SEGMENT,
    LABEL_TRAINING,
    build_job,
    build_member,
    job_gc,
    job_name,
    member_name,
    member_status,
    pod_selector,
    record_entry,
    segment_job_name,
)
from .mergepatch import stored_form

# Each member's status keeps its newest HISTORY_WINDOW finished segments (and the failed attempts of
# the segments it is on), each with the engine's totals after it: what decisions and a rebuild need
# (docs/operator.md, "Bounded member state"). The complete record of every segment is written by the
# worker to storage, where `pbt status` and `pbt export` read it.
HISTORY_WINDOW = 32


@dataclass
class EventSpec:
    target: str  # "training" or a member name
    type: str  # Normal | Warning
    reason: str
    message: str

    def __post_init__(self) -> None:
        # Every Event's message fits, cut the one way (ending with "..."), wherever it was built.
        self.message = C.event_message(self.message)


@dataclass
class Plan:
    create_members: list[dict[str, Any]] = field(default_factory=list)
    member_specs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> spec.segment
    member_statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    create_jobs: list[dict[str, Any]] = field(default_factory=list)
    patch_jobs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> merge patch (deadlines)
    delete_jobs: list[tuple[str, str]] = field(default_factory=list)  # (name, uid): stopped segments, after all else
    status: dict[str, Any] = field(default_factory=dict)
    status_changed: bool = True  # False: `status` equals what the training already has (no write)
    # The statuses as read (member name -> status without conditions; the training's): api.apply writes
    # merge patches against them, deleting the keys a new status no longer has (kube/mergepatch.py).
    prior_members: dict[str, dict[str, Any]] = field(default_factory=dict)
    prior_status: dict[str, Any] = field(default_factory=dict)
    events: list[EventSpec] = field(default_factory=list)
    # Checkpoints handed to Jobs for deletion: what the daemon passed in, plus this pass's hand-outs,
    # less what Jobs gave back and what no rebuild can list again (forget_collected: bounded by the windows).
    collected: set[tuple[int, int]] = field(default_factory=set)
    # What `collected` held when the pass began: checkpoints handed to Jobs that exist. A member's
    # status.uncollected keeps the rest, including those this pass hands out (its Job may not get created).
    handed_before: frozenset[tuple[int, int]] = frozenset()
    handed: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # Job to create -> what it deletes
    done: bool = False
    spec: TrainingSpec | None = None
    engine: Engine | None = None  # the engine after this pass (kept across passes: EngineCache)
    versions: dict[str, str] = field(default_factory=dict)  # member -> resourceVersion after our writes (api.apply)
    rebuilt: bool = False  # this pass rebuilt the engine (no valid EngineCache): metrics
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
        trainer = S.named_trainer(p)
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
        if not ok and any((p.get("status") or {}).get("phase") not in ("Succeeded", "Failed") for p in mine):
            # The Job says its pod succeeded, but the pod as read has not finished: a pass lists Jobs
            # and pods concurrently, so the pod may have been read just before it terminated and the
            # Job just after. The next pass (its update wakes the daemon) reads the result.
            return None
        msg = ok[-1].get("message") if ok else None
        if msg is None:
            return SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                 error=NO_RESULT)
        return parse_result(msg, sug, metric)
    reason = (failed or {}).get("reason", "")
    if reason == "DeadlineExceeded":
        return SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                             error="timed out (spec.segment.timeoutSeconds); the Job was stopped")
    if terminated:
        t = terminated[-1][1]
        msg = (t.get("message") or "").strip()
        said = parse_result(msg, sug, metric).error
        if permanent_failure(said) or diverged(said):  # the worker's word, classified by how it starts
            return SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                 error=f"{said} (exit code {t.get('exitCode')})")
        why = t.get("reason") or ""
        # the kubelet's reason says what the exit code cannot (OOMKilled, ContainerCannotRun, ...)
        head = f"exit code {t.get('exitCode')}" + (f" ({why})" if why and why not in ("Error", "Completed") else "")
        return SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                             error=f"{head}: {failure_text(msg) or why}")
    return SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                         error=f"Job failed: {reason} {(failed or {}).get('message', '')}".strip())


# A trainer that exits 0 without writing its result: say what it must do, not only what is missing.
NO_RESULT = ("Job completed but its pod left no termination message: the trainer exited 0 without writing its "
             "result JSON ({\"score\": ...}) to the `result` path of PBT_SEGMENT (the pbt_worker SDK does it: "
             "seg.report(score=...); see docs/segment-contract.md)")


def failure_text(msg: str, limit: int = 300) -> str:
    """A failed trainer's termination message, shortened for member histories and conditions. The
    worker SDK reports {"error": "<Type>: <message>"}: its head says what failed, so it is kept (cut at
    the end); anything else (a log tail, a traceback) keeps its end, where the error is. Keeping the
    last 300 characters of the JSON cut "PermanentStorageError: ... not found" down to "ed, e.g. its
    writer was killed mid-save, ...\"}"."""
    try:
        report = json.loads(msg)
    except ValueError:
        report = None
    if isinstance(report, dict) and isinstance(report.get("error"), str):
        text = report["error"].strip()
        return shorten(text, limit)
    return shorten(msg, limit, keep_end=True)


POD_JOB_LABEL = "batch.kubernetes.io/job-name"  # set on every pod by the Job controller
# Above this many current Jobs the selectors would make URLs of several KiB: read by training instead.
MAX_SELECTED_JOBS = 200


def world_selectors(training: str, members: Sequence[Mapping[str, Any]]) -> tuple[str | None, str | None]:
    """Label selectors for the Jobs and pods a pass over these members can need (None: none at all).

    A pass only looks at the Jobs of the members' current segments (and their retries), and at those
    Jobs' pods: listing every finished Job and pod of the training instead made each pass's reads,
    mostly JSON decoding, grow with the whole history. Members whose status says their current segment
    has no Job yet (phase Queued: the status is written before any Job of its pass) or is already
    finished (completedSegment) need none. Jobs are selected by member and segment number (every attempt
    of a current segment; other Jobs in that cross product come along, harmlessly), pods by their Job's
    name. A member whose segment does not parse selects everything: the pass then reports it as it
    always did.
    """
    base = f"{LABEL_TRAINING}={training}"
    names: list[str] = []
    segments: set[int] = set()
    indices: set[int] = set()
    for m in members:
        seg = (m.get("spec") or {}).get("segment")
        if not seg:
            continue
        try:
            member, segment, attempt = (int(seg[k]) if k in seg else 0 for k in ("member", "segment", "attempt"))
            if "member" not in seg or "segment" not in seg:
                raise KeyError("member/segment")
        except (TypeError, ValueError, KeyError):
            return base, base
        st = m.get("status") or {}
        done = st.get("completedSegment")
        if st.get("phase") == "Queued" or (isinstance(done, int) and done >= segment):
            continue
        names.append(segment_job_name(training, member, segment, attempt))
        segments.add(segment)
        indices.add(member)
    if not names:
        return None, None
    if len(names) > MAX_SELECTED_JOBS:
        return base, base
    return (f"{base},{LABEL_MEMBER} in ({','.join(str(i) for i in sorted(indices))}),"
            f"{LABEL_SEGMENT} in ({','.join(str(k) for k in sorted(segments))})",
            f"{base},{POD_JOB_LABEL} in ({','.join(sorted(names))})")


TERMINAL_JOB_CONDITIONS = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")


events_wanted = S.events_wanted


def job_event_matters(event_type: str | None, job: Mapping[str, Any]) -> bool:
    """Whether a watch event on a segment Job can change a pass's outcome: it ended, went away, or is
    suspended (waiting for a queue's admission, which the pass reports). Its creation is the operator's
    own doing, and the Job controller's bookkeeping updates (active counts, pod finalizers) decide
    nothing; waking a pass for each was most of the passes."""
    if event_type == "DELETED":
        return True
    if (job.get("spec") or {}).get("suspend"):
        return True
    return any(_cond_true(job, t) for t in TERMINAL_JOB_CONDITIONS)


def pod_event_matters(event_type: str | None, pod: Mapping[str, Any]) -> bool:
    """Whether a watch event on a segment pod can change a pass's outcome: it finished (a success
    is read at once, without waiting for the Job), was marked as disrupted, went away, its trainer
    started (its timeout starts counting then), or it is stuck (unschedulable, image or container
    errors: the pass reports why)."""
    if event_type == "DELETED":
        return True
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return True
    if _cond_true(pod, "DisruptionTarget") is not None:
        return True
    if S.trainer_started_at(pod) is not None:
        return True
    if any(c.get("type") == "PodScheduled" and c.get("status") == "False" for c in status.get("conditions") or []):
        return True
    return any(((cs.get("state") or {}).get("waiting") or {}).get("reason") in S.IMAGE_ERRORS + S.CONTAINER_ERRORS
               for cs in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])])


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


@dataclass
class Pass:
    """One reconcile pass: what it read, the rebuilt engine, and what the phases found so far.

    The phases of `plan` run in order over one Pass; each reads what earlier ones left here and adds
    its writes to `out`."""

    training: Mapping[str, Any]
    spec: TrainingSpec
    root: str
    now: str
    out: Plan
    engine: Engine
    by_index: dict[int, Mapping[str, Any]]  # member index -> PopulationMember
    histories: dict[int, list[dict[str, Any]]]  # member index -> status.history as read (not to be modified)
    current: dict[int, Suggestion]  # member index -> spec.segment as read (its latest persisted decision; empty
    # with the previous pass's engine, which holds them already)
    jobs_by_name: dict[str, Mapping[str, Any]]
    pods_of: dict[str, list[Mapping[str, Any]]]
    new_members: list[Suggestion] = field(default_factory=list)  # members to create, with their first segment
    decided: dict[int, Decision] = field(default_factory=dict)  # each member's latest decision this pass
    told: set[str] = field(default_factory=set)  # Jobs whose outcome was told this pass
    new_history: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    rewritten: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # entries the rebuild absorbed anew
    events: Sequence[Mapping[str, Any]] = ()  # Events that explain waits (segments.events_wanted)
    running: int = 0
    waiting: list[Suggestion] = field(default_factory=list)
    live: dict[int, Mapping[str, Any]] = field(default_factory=dict)  # member -> its current Job, not finished
    waits: dict[int, S.Waiting] = field(default_factory=dict)  # member -> why its created segment waits
    disrupted: dict[int, list[str]] = field(default_factory=dict)  # member -> its Job's disrupted pods
    cached: bool = False  # the engine came from the previous pass (EngineCache)
    # Members some of whose checkpoints a Job gave back this pass (give_back): their status.uncollected
    # is rewritten
    gave_back: set[int] = field(default_factory=set)
    outcome_before: Any = None  # (outcome, failure) at the start of a cached pass

    @property
    def name(self) -> str:
        return str(self.training["metadata"]["name"])

    def decide(self, decisions: Sequence[Decision]) -> None:
        for d in decisions:
            self.decided[d.suggestion.member] = d

    def disrupted_pods(self, jname: str, m_idx: int) -> list[str]:
        recorded = ((self.by_index.get(m_idx) or {}).get("status") or {}).get("disruptedPods") or []
        return S.disrupted_pods(jname, self.pods_of.get(jname, []), recorded)

    def result(self, jname: str, job: Mapping[str, Any], sug: Suggestion) -> SegmentResult | None:
        """The segment's result read from its Job and pods; None while it runs."""
        last_waiting = ((self.by_index.get(sug.member) or {}).get("status") or {}).get("waiting")
        return segment_outcome(job, self.pods_of.get(jname, []), sug, self.spec, last_waiting,
                               len(self.disrupted_pods(jname, sug.member)))


def segment_outcome(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], sug: Suggestion, spec: TrainingSpec,
                    last_waiting: Mapping[str, Any] | None = None, disrupted: int | None = None) -> SegmentResult | None:
    """job_outcome, plus what only the operator can name: which deadline stopped the Job (the trainer's
    timeout or the pending timeout), and a segment disrupted more often than failurePolicy allows
    (the Job would rerun it forever; the pass stops that Job)."""
    res = job_outcome(job, pods, sug, spec.objective.metric)
    if res is not None and (_cond_true(job, "Failed") or _cond_true(job, "FailureTarget") or {}).get("reason") == \
            "DeadlineExceeded":
        return dataclasses.replace(res, error=S.deadline_error(job, spec.segment, last_waiting))
    if res is None:
        n = S.disruptions(pods) if disrupted is None else disrupted
        if n > spec.failure_policy.max_disruptions:
            return SegmentResult(sug.member, sug.segment, None, sug.steps_start,
                                 error=S.disruption_error(n, spec.failure_policy.max_disruptions))
    hint = credentials_hint(res.error, spec.storage.credentials_secret) if res is not None and res.error else None
    if res is not None and hint:
        return dataclasses.replace(res, error=f"{res.error} ({hint})")
    return res


CREDENTIAL_ERRORS = ("credentials", "InvalidAccessKeyId", "SignatureDoesNotMatch")


def credentials_hint(error: str, secret: str | None) -> str | None:
    """For a segment that failed for want of storage credentials, where they come from on a cluster. The
    Secret's keys reach the pod as optional references, so a Secret that is missing (or named wrong, or
    in another namespace) starts the pod all the same and the worker only says it found no credentials."""
    if not any(e in error for e in CREDENTIAL_ERRORS):
        return None
    if secret:
        return (f"spec.storage.credentialsSecret is {secret!r}: check that this Secret exists in the training's "
                "namespace and holds AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    return ("spec.storage.credentialsSecret is not set: name a Secret holding AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or give the pod credentials another way (a service account role)")


@dataclass
class EngineCache:
    """A training's engine kept in memory from one pass to the next, so that a pass costs what its
    active members cost rather than a rebuild from every member's history. Valid while the training
    is the same object at the same generation (uid, metadata.generation: a spec edit rebuilds) and
    every member is exactly as the last pass left it (resourceVersion, from our own writes' answers):
    any other writer, a member created or deleted, a failed write or a restart means a rebuild from
    the bounded histories, which gives this very engine (core/policy.rebuild)."""

    uid: str | None
    generation: int | None
    versions: dict[str, str]
    engine: Engine

    def engine_for(self, training: Mapping[str, Any], members: Sequence[Mapping[str, Any]]) -> Engine | None:
        meta = training["metadata"]
        if (self.uid, self.generation) != (meta.get("uid"), meta.get("generation")):
            return None
        if {str(m["metadata"]["name"]): str(m["metadata"].get("resourceVersion")) for m in members} != self.versions:
            return None
        return self.engine


def next_cache(training: Mapping[str, Any], members: Sequence[Mapping[str, Any]], p: Plan) -> EngineCache | None:
    """The cache after a pass whose writes all succeeded: the members as read, with the versions our
    writes returned (None when the pass created members or has no engine)."""
    if p.engine is None or p.create_members or p.done:
        return None
    versions = {str(m["metadata"]["name"]): str(m["metadata"].get("resourceVersion")) for m in members}
    versions.update(p.versions)
    meta = training["metadata"]
    return EngineCache(meta.get("uid"), meta.get("generation"), versions, p.engine)


def plan(training: Mapping[str, Any], members: Sequence[Mapping[str, Any]], jobs: Sequence[Mapping[str, Any]],
         pods: Sequence[Mapping[str, Any]], now: str, collected: set[tuple[int, int]] | None = None,
         events: Sequence[Mapping[str, Any]] = (), cache: EngineCache | None = None) -> Plan:
    """`cache`: the engine the previous pass left (EngineCache), used when still valid. The pass
    changes that engine in place: a caller that does not apply the plan in full must drop the cache."""
    out = Plan(collected=set(collected or ()), handed_before=frozenset(collected or ()))
    try:
        spec, root = parse_training(training)
    except SpecError as e:
        return invalid_spec(training, e, now, out)
    out.spec = spec
    engine = cache.engine_for(training, members) if cache is not None else None
    out.rebuilt = engine is None
    p = rebuild_pass(training, spec, root, members, jobs, pods, now, out, engine)
    out.engine = p.engine
    p.events = events
    tell_finished_jobs(p)
    out.events += decision_events(p)
    write_members(p)
    admit_segments(p)
    write_member_statuses(p)
    finish_pass(p)
    forget_collected(p)
    return out


def parse_training(training: Mapping[str, Any]) -> tuple[TrainingSpec, str]:
    """The spec and the storage root, or SpecError for anything that cannot run in Kubernetes."""
    meta = training["metadata"]
    raw = training.get("spec")
    try:
        spec = parse_spec(raw, name=meta["name"], namespace=meta.get("namespace"))
    except SpecError as e:
        if isinstance(raw, Mapping) and raw.get("template") is None:
            # parse_spec speaks for `pbt run`, where a missing template asks for spec.worker.command; on a
            # cluster spec.worker is refused, so that advice sent users to a field they may not use.
            raise SpecError([NO_TEMPLATE] + [p for p in e.problems if not p.startswith("spec.worker.command:")]) from None
        raise
    root = storage_root(spec)
    if spec.template is None:
        raise SpecError([NO_TEMPLATE])
    return spec, root


NO_TEMPLATE = "spec.template: is required in Kubernetes (a pod template with the training container)"


def invalid_spec(training: Mapping[str, Any], e: SpecError, now: str, out: Plan) -> Plan:
    """A training whose spec does not parse: Failed with every problem in the conditions, one Event
    when it becomes so, and nothing else touched. Not `done`: the daemon stays and the next edit of
    the spec is parsed again, so a fixed spec starts (or, edited mid-run, resumes) the training. Done,
    the daemon ended and a `kubectl apply` of the fix changed nothing: the training stayed Failed with
    the old message until it was deleted and created again."""
    generation = training["metadata"].get("generation")
    old = dict(training.get("status") or {})
    conds = list(old.get("conditions") or [])
    msg = "; ".join(e.problems)
    out.status = {
        **old, "phase": "Failed", "observedGeneration": generation,
        "conditions": _set_all(conds, now, generation, ready=(False, C.INVALID_SPEC, msg),
                               progressing=(False, C.INVALID_SPEC, msg), succeeded=(False, C.INVALID_SPEC, msg),
                               failed=(True, C.INVALID_SPEC, msg)),
    }
    out.status_changed = stored_form(out.status) != old
    out.prior_status = old
    if (_cond_true(training, C.FAILED) or {}).get("reason") != C.INVALID_SPEC:
        out.events.append(EventSpec("training", "Warning", C.EV_INVALID, msg))
    return out


def rebuild_pass(training: Mapping[str, Any], spec: TrainingSpec, root: str, members: Sequence[Mapping[str, Any]],
                 jobs: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]], now: str, out: Plan,
                 engine: Engine | None = None) -> Pass:
    """Read this driver's journal (member statuses hold finished segments, member specs the latest
    decisions) and rebuild the engine from it with the driver policy; members that do not exist yet
    (a fresh training, a member deleted by hand, a crash between creates) are created with their
    first segment. `engine`: the previous pass's engine, still valid (EngineCache): no rebuild, nothing
    owed, and only the members that can change get a status computed."""
    by_index: dict[int, Mapping[str, Any]] = {int(m["spec"]["index"]): m for m in members}
    histories = {i: (m.get("status") or {}).get("history") or [] for i, m in by_index.items()}
    if engine is not None:
        p = Pass(training, spec, root, now, out, engine, by_index, histories, {},
                 {j["metadata"]["name"]: j for j in jobs}, pods_by_job(pods), cached=True)
        p.outcome_before = (engine.outcome, engine.failure)
        return p
    current: dict[int, Suggestion] = {}
    for i, m in by_index.items():
        seg = (m.get("spec") or {}).get("segment")
        if seg:
            current[i] = Suggestion.from_dict(seg)
    evicted = {i: Record.from_dict(b) for i, m in by_index.items()
               if isinstance(b := (m.get("status") or {}).get("evictedBest"), dict)}
    rebuilt = rebuild(spec, journal_order(h for hs in histories.values() for h in hs), current, HISTORY_WINDOW,
                      evicted, retained_checkpoints(training), uncollected_checkpoints(by_index))
    p = Pass(training, spec, root, now, out, rebuilt.engine, by_index, histories, current,
             {j["metadata"]["name"]: j for j in jobs}, pods_by_job(pods))
    p.new_members = [s for s in rebuilt.started if s.member not in by_index]
    p.decide(rebuilt.decisions)
    jobs_of = {(h["suggestion"]["member"], h["suggestion"]["segment"], h["suggestion"].get("attempt", 0),
                h.get("status", "done")): h for hs in histories.values() for h in hs}
    for rec, counters in rebuilt.retold:
        old = jobs_of.get((rec.member, rec.segment, rec.suggestion.attempt, rec.status)) or {}
        p.rewritten.setdefault(rec.member, []).append(
            history_entry(rec, str(old.get("finishedAt") or now), str(old.get("job") or job_name(p.name, rec.suggestion)),
                          counters))
    return p


def retained_checkpoints(training: Mapping[str, Any]) -> list[tuple[int, int]]:
    """status.retainedCheckpoints: the checkpoints that left their members' windows while still live
    (Engine.evicted_live), as [member, segment] pairs; entries that do not parse are skipped."""
    out = []
    for item in (training.get("status") or {}).get("retainedCheckpoints") or []:
        try:
            m, seg = item
            out.append((int(m), int(seg)))
        except (TypeError, ValueError):
            continue
    return out


def collected_after(p: Plan, refused: Iterable[str]) -> set[Ref]:
    """What counts as handed out once the plan is applied: the plan's `collected`, less what it handed
    to Jobs the API server refused (they will never delete it). The daemon replaces its set with this
    (the plan may also have given some back, give_back, and forgotten some, forget_collected)."""
    out = set(p.collected)
    for name in refused:
        out.difference_update(p.handed.get(name, ()))
    return out


def forget_collected(p: Pass) -> None:
    """Bound the memory of what was handed out for deletion (`Plan.collected`, which the daemon keeps
    across passes): keep only what the engine can still list as garbage and what the members' statuses,
    as this pass leaves them, still hold in status.uncollected (a rebuilt engine gets those back);
    core/policy.still_listable says why forgetting the rest never leaks a checkpoint nor hands one out
    twice. Last in the pass: leftovers reads the whole set. Without it the set grew by one entry per
    collected checkpoint for the training's life (1,000 members x 1,000 segments: 1M refs, copied twice
    per pass: benchmarks/README.md, "Operator scale")."""
    out = p.out
    persisted: list[Ref] = []
    for m_idx, mobj in p.by_index.items():
        st = out.member_statuses.get(member_name(p.name, m_idx))
        if st is None:
            st = mobj.get("status") or {}
        persisted += [(m_idx, seg) for seg in st.get("uncollected") or [] if isinstance(seg, int)]
    out.collected = still_listable(p.engine, out.collected, persisted)


def uncollected_checkpoints(by_index: Mapping[int, Mapping[str, Any]]) -> list[tuple[int, int]]:
    """Each member's status.uncollected: its checkpoints that left its window and were not yet handed
    to a Job for deletion (live ones, or garbage), as segment numbers; entries that do not parse are
    skipped. A rebuilt engine gets them as it gets status.retainedCheckpoints: it keeps the live ones
    and hands out the rest."""
    out = []
    for i, m in sorted(by_index.items()):
        for seg in (m.get("status") or {}).get("uncollected") or []:
            if isinstance(seg, int) and not isinstance(seg, bool) and seg >= 0:
                out.append((i, seg))
    return out


def history_entry(rec: Record, finished_at: str, job: str, counters: Counters) -> dict[str, Any]:
    """A member status history entry: the compact record and the engine's totals right after it."""
    return {**record_entry(rec, finished_at, job), "counters": counters.to_dict()}


def journal_order(entries: Iterable[Mapping[str, Any]]) -> list[Journaled]:
    """History entries in the order the engine absorbed them: by their totals' sequence number; entries
    without one (written before bounded histories, or a refused Job's attempt that was never absorbed)
    first, in completion order (then member index), as they always were."""
    def key(h: Mapping[str, Any]) -> tuple[Any, ...]:
        seq = (h.get("counters") or {}).get("seq")
        sug = h["suggestion"]
        return (seq is not None, seq or 0, h.get("finishedAt", ""), sug["member"], sug["segment"], sug.get("attempt", 0))

    out = []
    for h in sorted(entries, key=key):
        c = h.get("counters")
        out.append(Journaled(Record.from_dict(h), Counters.from_dict(c) if isinstance(c, dict) else None))
    return out


def tell_finished_jobs(p: Pass) -> None:
    """Tell the engine every pending segment whose Job ended, in completion order (then member index),
    the order a rebuild after a crash uses too; record each in its member's new history entries."""
    engine, out = p.engine, p.out
    for _ in range(4):  # a told result may decide a retry whose Job already exists (after a crash)
        outcomes = []
        for m_idx, sug, jname, job in pending_jobs(p):
            if jname in p.told:
                continue
            res = p.result(jname, job, sug)
            if res is None:
                continue
            finished_at = (job.get("status") or {}).get("completionTime") or p.now
            outcomes.append((finished_at, m_idx, sug, res, jname))
        if not outcomes:
            break
        for finished_at, m_idx, sug, res, jname in sorted(outcomes, key=lambda o: (o[0], o[1])):
            p.told.add(jname)
            new = engine.tell(res)
            if not res.disrupted and engine.last is not None and engine.last.ref == sug.ref:
                p.new_history.setdefault(m_idx, []).append(history_entry(engine.last, finished_at, jname,
                                                                         engine.counters()))
            out.finished += int(res.ok)
            secs = None if res.disrupted else job_seconds(p.jobs_by_name[jname], finished_at, p.pods_of.get(jname, ()))
            if secs is not None:
                out.segment_seconds.append(secs)
            if not res.ok and not res.disrupted:
                give_back(p, p.jobs_by_name[jname])
            elif res.gc_failed:
                gc_failed(p, m_idx, sug, res.gc_failed, p.jobs_by_name[jname])
            if not res.ok:
                out.events.append(EventSpec(member_name(p.name, m_idx), "Warning", C.EV_SEGMENT_FAILED,
                                            f"segment {sug.segment} attempt {sug.attempt} failed: {res.error}"))
            p.decide([Decision(s, sug) for s in new])


def pending_jobs(p: Pass) -> list[tuple[int, Suggestion, str, Mapping[str, Any]]]:
    """(member, its pending segment, Job name, Job) for each Job read that runs a pending segment, by
    member index. Walks the Jobs read (the running segments') rather than every pending segment: at a
    large population most members wait in the queue with no Job."""
    out = []
    for jname, job in p.jobs_by_name.items():
        try:
            m_idx = int(((job.get("metadata") or {}).get("labels") or {}).get(LABEL_MEMBER, ""))
        except ValueError:
            continue
        sug = p.engine.pending.get(m_idx)
        if sug is not None and job_name(p.name, sug) == jname:
            out.append((m_idx, sug, jname, job))
    return sorted(out, key=lambda o: o[0])


def decision_events(p: Pass) -> list[EventSpec]:
    """One Event per decision this pass (two for an exploit: the copy, and the new hyperparameters)."""
    events = []
    for d in p.decided.values():
        s = d.suggestion
        mname = member_name(p.name, s.member)
        if d.retry:  # a retry repeats its decision (exploit, replace...): do not announce it again
            events.append(EventSpec(mname, "Warning", C.EV_SEGMENT_RETRIED, retried_message(s, p.spec)))
        elif s.kind == "exploit" and s.donor is not None:
            events.append(EventSpec(mname, "Normal", C.EV_EXPLOITED,
                                    f"member {s.member} copies member {s.donor} checkpoint s{s.restore[1] if s.restore else '?'} "
                                    f"(score {s.score_before}): {s.exploit_reason}"))
            donor = p.engine.latest.get(s.donor)
            donor_hp = donor.suggestion.hyperparameters if donor is not None else {}
            events.append(EventSpec(mname, "Normal", C.EV_EXPLORED,
                                    f"{describe_change(donor_hp, s.hyperparameters)} ({s.explore_reason})"))
        elif s.kind == "replace":
            events.append(EventSpec(mname, "Warning", C.EV_MEMBER_REPLACED, s.reason))
        elif s.kind == "continue" and d.cause.member == s.member and s.hyperparameters != d.cause.hyperparameters:
            # PB2's retune of a member that keeps its weights (Pb2Settings.retune): announced like an explore
            events.append(EventSpec(mname, "Normal", C.EV_EXPLORED,
                                    f"{describe_change(d.cause.hyperparameters, s.hyperparameters)} ({s.reason})"))
    return events


def write_members(p: Pass) -> None:
    """Create missing members with their first segment; patch the spec of every member whose latest
    decision changed (written before its Job exists: the decision is persisted first)."""
    out = p.out
    for s in p.new_members:
        out.create_members.append(build_member(p.training, s))
        out.events.append(EventSpec("training", "Normal", C.EV_MEMBER_CREATED,
                                    f"member {s.member} created: {describe_change({}, s.hyperparameters)}"))
    # With the previous pass's engine, only this pass's decisions can differ from the member specs.
    candidates = [m for m in p.decided if m in p.engine.pending] if p.cached else list(p.engine.pending)
    for m_idx in candidates:
        s = p.engine.pending[m_idx]
        if m_idx in p.by_index:
            d = s.to_dict()
            if (p.by_index[m_idx].get("spec") or {}).get("segment") != d:
                out.member_specs[member_name(p.name, m_idx)] = d


def admit_segments(p: Pass) -> None:
    """Count the segments whose Jobs run, stop the Jobs that must stop (stop_segments), note why
    created segments wait and move deadlines (watch_segments), start waiting ones up to parallelism
    (driver policy; none while suspended), and hand the first started Job a batch of checkpoints to
    delete."""
    engine, out, spec = p.engine, p.out, p.spec
    with_job = set()
    for m_idx, sug, jname, job in pending_jobs(p):
        with_job.add(m_idx)
        if jname not in p.told and p.result(jname, job, sug) is None:
            p.running += 1
            p.live[m_idx] = job
            p.disrupted[m_idx] = p.disrupted_pods(jname, m_idx)
    waiting = [sug for m_idx, sug in engine.pending.items() if m_idx not in with_job]
    stopped = stop_segments(p)
    if engine.finish or engine.failure:
        for m_idx in stopped:
            engine.cancel(m_idx)
    watch_segments(p)
    to_start, p.waiting = admit(engine, waiting, p.running, 0 if spec.suspend else spec.parallelism)
    gc: list[Ref] = []
    if to_start:
        gc = garbage_batch(engine, out.collected)
    gc_uris = [checkpoint_uri(p.root, p.name, r) for r in gc]
    for i, s in enumerate(to_start):
        mobj = p.by_index.get(s.member)
        if mobj is None:
            continue  # created this pass; its Job follows next pass, once the member has a uid
        if i == 0 and gc:
            out.handed[job_name(p.name, s)] = gc
        out.create_jobs.append(build_job(p.training, mobj, s, p.root, gc_uris if i == 0 else [], spec.template or {},
                                         spec.storage.credentials_secret, spec.segment, queue_name=spec.queue_name,
                                         job_labels=spec.job_labels, job_annotations=spec.job_annotations))
        out.started.append(job_name(p.name, s))
    p.running += len(out.create_jobs)


def give_back(p: Pass, job: Mapping[str, Any]) -> int:
    """Put a Job's delete list (its contract's gc) back among the checkpoints to hand out, when the Job
    did not delete it: it will never save (its attempt failed: the worker deletes only after its own
    save, which may not have happened; or it was stopped: stop_segments), or it saved but some deletes
    failed (its result's gcFailed: gc_failed). Deleting twice is harmless; a checkpoint counted as
    handed out to a Job that deleted nothing stays in storage for good (core/policy.take_back). Those
    outside the window also go to their members' status.uncollected (write_member_statuses), so that a
    restart forgets none. Returns how many checkpoints the Job had been handed."""
    uris = job_gc(job)
    refs = [r for u in uris if (r := checkpoint_ref(p.root, p.name, u)) is not None]
    if refs:
        take_back(p.engine, p.out.collected, refs)
        p.out.handed_before = p.out.handed_before.difference(refs)
        p.gave_back.update(m for m, _ in refs)
    return len(uris)


def gc_failed(p: Pass, m_idx: int, sug: Suggestion, failed: int, job: Mapping[str, Any]) -> None:
    """A segment that saved but could not delete some of its delete list (the worker's result says how
    many, not which: it must fit a termination message) gives the whole list back (give_back): the next
    segment that starts deletes them, or, at the end, status.leftoverCheckpoints counts them. A Warning
    Event names the member and the count; the pod log names the checkpoints and the error."""
    handed = give_back(p, job)
    p.out.events.append(EventSpec(member_name(p.name, m_idx), "Warning", C.EV_CHECKPOINT_DELETE_FAILED, (
        f"segment {sug.segment} could not delete {failed} of the {counted(handed, 'old checkpoint')} it was handed "
        "(its pod log says which and why): they are handed to the next segment that starts")))


def stop_segments(p: Pass) -> list[int]:
    """Delete the segment Jobs that must stop (their members): all of them once the training has
    finished (they would hold GPUs for results nobody reads); under spec.suspend those not training
    yet (they have done no work) and, with onSuspend: stop, the training ones too (they rerun from the
    same checkpoint on resume); above spec.parallelism the newest of those not training yet (a
    scale-down never throws away work); and an unfinished Job of a segment recorded as failed (too many
    disruptions: told this pass, or a crash came between recording and stopping it). Deletes go out
    last (api.apply), after every record they depend on."""
    out, spec = p.out, p.spec
    live = p.live
    started = {m for m, j in live.items() if S.started(j, p.pods_of.get(j["metadata"]["name"], []))}
    why: dict[int, str] = {}
    if p.engine.finish or p.engine.failure:
        why = {m: "the training has finished" for m in live}
    elif spec.suspend:
        why = {m: "the training is suspended" for m in live if m not in started or spec.segment.on_suspend == "stop"}
    elif len(live) > spec.parallelism:
        idle = sorted((m for m in live if m not in started),
                      key=lambda m: (str(live[m]["metadata"].get("creationTimestamp") or ""), m), reverse=True)
        why = {m: f"spec.parallelism is {spec.parallelism} and it had not started"
               for m in idle[:len(live) - spec.parallelism]}
    for m_idx, reason in why.items():
        job = live.pop(m_idx)
        give_back(p, job)
        out.delete_jobs.append((job["metadata"]["name"], str(job["metadata"].get("uid", ""))))
        out.events.append(EventSpec(member_name(p.name, m_idx), "Normal", C.EV_SEGMENT_STOPPED,
                                    f"segment Job {job['metadata']['name']} stopped: {reason}"))
        p.running -= 1
    failed = {str(h.get("job")) for hs in (*p.histories.values(), *p.new_history.values()) for h in hs
              if h.get("status") == "failed"} - {job_name(p.name, s) for s in p.engine.pending.values()}
    out.delete_jobs += _failed_but_running(p.jobs_by_name.values(), p.by_index, failed,
                                           {n for n, _ in out.delete_jobs})
    return list(why)


def watch_segments(p: Pass) -> None:
    """For each segment Job still running: why it waits, if it does (worth reporting: kube/segments.py
    notable; a moment without a pod keeps the wait its pod had: kept_waiting), and its deadline moved to
    the trainer's start when that has changed."""
    for m_idx, job in p.live.items():
        jpods = p.pods_of.get(job["metadata"]["name"], [])
        recorded = ((p.by_index.get(m_idx) or {}).get("status") or {}).get("waiting")
        w = S.kept_waiting(S.waiting_of(job, jpods, p.events), recorded, job)
        if w is not None and S.notable(w, p.now):  # (a few seconds of starting are not worth a write)
            p.waits[m_idx] = w
        d = S.desired_deadline(job, jpods, p.spec.segment)
        if d is not None:
            p.out.patch_jobs[job["metadata"]["name"]] = S.deadline_patch(d)


def spec_suggestion(member: Mapping[str, Any]) -> Suggestion | None:
    """The member's latest decision as its spec records it: what `kubectl get pbtm` shows for a member
    that has neither a finished nor a pending segment (the training ended while its first segment ran,
    or that segment failed), rather than empty columns. None if it does not parse."""
    try:
        return Suggestion.from_dict(member["spec"]["segment"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def write_member_statuses(p: Pass) -> None:
    """Each member's status: its history with this pass's results, phase (Pending while its Job waits,
    with why), disruptions; written only when it changed. A newly disrupted pod gets a Warning, a new
    reason to wait an Event (a Warning for problems)."""
    engine, out = p.engine, p.out
    created = {j["metadata"]["name"] for j in out.create_jobs}
    for m_idx, mobj in p.by_index.items():
        if not changing(p, m_idx, created):
            continue
        hist = bounded_history(engine, m_idx, p.histories.get(m_idx, []),
                               p.rewritten.get(m_idx, []) + p.new_history.get(m_idx, []))
        cur_sug = engine.pending.get(m_idx)
        if cur_sug is not None:
            has_job = m_idx in p.live or job_name(p.name, cur_sug) in created
            phase = ("Pending" if m_idx in p.waits else "Running") if has_job else "Queued"
        else:
            phase = member_phase_idle(p.spec, engine, m_idx)
        dp = p.disrupted.get(m_idx) or []
        extra: dict[str, Any] = {"disruptions": len(dp), "disruptedPods": dp} if dp else {}
        if m_idx in p.waits:
            extra["waiting"] = p.waits[m_idx].to_dict()
        if m_idx in engine.evicted_best:
            best = record_entry(engine.evicted_best[m_idx], "", "")
            extra["evictedBest"] = {k: v for k, v in best.items() if k not in ("finishedAt", "job")}
        # Checkpoints that left the window are in no history: written with the history that drops
        # them (one write), so that no restart forgets one before a Job has it to delete. Only a pass
        # that changes the history rewrites the list (entries handed out since stay until then: one
        # more delete after a restart, not one more write per pass).
        uncollected = (mobj.get("status") or {}).get("uncollected")
        if m_idx in p.new_history or m_idx in p.rewritten or m_idx in p.gave_back:
            uncollected = sorted({seg for m, seg in (*engine.evicted_live, *engine.evicted_garbage)
                                  if m == m_idx and (m, seg) not in out.handed_before})
        if uncollected:
            extra["uncollected"] = uncollected
        sug = cur_sug or (engine.latest[m_idx].suggestion if m_idx in engine.latest else None)
        st = member_status(sug or spec_suggestion(mobj), hist, phase, extra)
        old = {k: v for k, v in (mobj.get("status") or {}).items() if k != "conditions"}
        if old.get("disruptions") and "disruptions" not in st:
            st["disruptions"] = old["disruptions"]
        if stored_form(st) != old:
            out.member_statuses[member_name(p.name, m_idx)] = st
            out.prior_members[member_name(p.name, m_idx)] = old
        wait = p.waits.get(m_idx)
        if wait is not None and wait.reason not in S.TRANSIENT and wait.reason != (old.get("waiting") or {}).get("reason"):
            out.events.append(EventSpec(member_name(p.name, m_idx),
                                        "Warning" if wait.reason in C.WAITING_PROBLEMS else "Normal", wait.reason,
                                        f"segment {cur_sug.segment if cur_sug else '?'} waits: {wait.message}"))
        if set(dp) - set(old.get("disruptedPods") or []):
            out.events.append(EventSpec(member_name(p.name, m_idx), "Warning", C.EV_DISRUPTED,
                                        f"segment {cur_sug.segment if cur_sug else '?'} pod disrupted (preemption, eviction or "
                                        "node loss): it reruns from the same checkpoint, not counted as a failure"))


def changing(p: Pass, m_idx: int, created: set[str]) -> bool:
    """Whether a member's status can differ from what it holds: always after a rebuild; with the
    previous pass's engine, only for members with a result, a decided segment, a wait or a disruption,
    or all of them when the training's outcome changed (phases follow it)."""
    if not p.cached or (p.engine.outcome, p.engine.failure) != p.outcome_before:
        return True
    old = p.by_index[m_idx].get("status") or {}
    if (m_idx in p.new_history or m_idx in p.decided or m_idx in p.waits or m_idx in p.live or m_idx in p.disrupted
            or m_idx in p.gave_back or not old or old.get("waiting") or old.get("phase") in ("Running", "Pending")):
        return True
    sug = p.engine.pending.get(m_idx)
    if sug is None:
        return old.get("phase") == "Queued"  # cancelled (the training ended)
    return job_name(p.name, sug) in created  # a queued segment that starts now


def bounded_history(engine: Engine, member: int, read: Sequence[Mapping[str, Any]],
                    new: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A member's history as the engine holds it: the entries read, with those written anew this pass
    (new results, and entries the rebuild absorbed again) in place of their old selves, less what left
    the window (done segments the engine no longer keeps, failed attempts it no longer counts)."""
    def ident(h: Mapping[str, Any]) -> tuple[Any, ...]:
        sug = h["suggestion"]
        return (sug["segment"], sug.get("attempt", 0), h.get("status", "done"))

    fresh = {ident(h) for h in new}
    failed = {(f.segment, f.suggestion.attempt) for f in engine.failures if f.member == member}
    out = []
    for h in [*(h for h in read if ident(h) not in fresh), *new]:
        seg, attempt, status = ident(h)
        if (status == "done" and (member, seg) in engine.records) or (status != "done" and (seg, attempt) in failed):
            out.append(dict(h))
    return out


def finish_pass(p: Pass) -> None:
    """The training's status (written only when it changed), one Event when the training ends, and one
    when it is paused or resumed."""
    engine, out = p.engine, p.out
    old_status = p.training.get("status") or {}
    out.done = engine.done
    out.status = training_status(p.spec, engine, old_status, p.now, p.training["metadata"].get("generation"),
                                 p.running - len(p.waits), len(p.waiting), p.root, p.waits)
    left = leftovers(p, old_status)
    if left is not None:
        out.status["leftoverCheckpoints"] = left
    out.status_changed = stored_form(out.status) != old_status
    out.prior_status = dict(old_status)
    paused = p.spec.suspend or p.spec.parallelism == 0
    if paused != (old_status.get("phase") == "Suspended") and not out.done and (paused or old_status):
        why = "spec.suspend is true" if p.spec.suspend else "spec.parallelism is 0"
        out.events.append(EventSpec("training", "Normal", C.EV_SUSPENDED if paused else C.EV_RESUMED,
                                    f"training paused: {why}" if paused else resumed_message(p.spec, out.status)))
    fin = engine.outcome
    if out.done and fin is not None and old_status.get("phase") not in ("Succeeded", "Failed") and left:
        out.events.append(EventSpec("training", "Normal", C.EV_CHECKPOINTS_LEFT, (
            f"{counted(left['count'], 'checkpoint')} no segment deleted {'is' if left['count'] == 1 else 'are'} left "
            f"under {left['prefix']} (no segment starts "
            "any more; the operator has no storage credentials): status.leftoverCheckpoints lists them, "
            "docs/operator.md says how to remove them")))
    if out.done and fin is not None and old_status.get("phase") not in ("Succeeded", "Failed"):
        if engine.failure:
            out.events.append(EventSpec("training", "Warning", C.EV_FAILED, str(fin)))
        else:
            b = engine.best
            # str(fin): "BudgetExhausted: every member trained 20 segments", not "budget exhausted" alone
            out.events.append(EventSpec("training", "Normal", C.EV_COMPLETED,
                                        f"{fin}; best member {b.member if b else '-'} score "
                                        f"{fmt_value(b.score) if b else '-'}"))


LEFTOVERS_LISTED = 20  # URIs in status.leftoverCheckpoints (the count is exact)


def leftovers(p: Pass, old_status: Mapping[str, Any]) -> dict[str, Any] | None:
    """Once the training has ended: the checkpoints that are collectable but that no segment was handed
    to delete (deletes ride on starting segments, and none starts any more), as status.leftoverCheckpoints:
    how many, the training's prefix and the first LEFTOVERS_LISTED URIs. Computed in the pass that ends
    the training, with this operator's memory of what it handed out, and kept as written afterwards (a
    restarted operator no longer knows which were deleted). None while it runs or when none are left."""
    if not p.engine.done:
        return None
    if old_status.get("phase") in ("Succeeded", "Failed"):
        old = old_status.get("leftoverCheckpoints")
        return dict(old) if isinstance(old, dict) else None
    refs = p.engine.garbage(exclude=p.out.collected)
    if not refs:
        return None
    return {"count": len(refs), "prefix": f"{p.root.rstrip('/')}/{p.name}/",
            "uris": [checkpoint_uri(p.root, p.name, r) for r in refs[:LEFTOVERS_LISTED]]}


def member_phase_idle(spec: TrainingSpec, engine: Engine, member: int) -> str:
    """The phase of a member with no segment decided: Failed with the training, Done once it trained its
    budget or the training ended, and otherwise Waiting (at a synchronous generation barrier, for the
    other members to finish this generation); showing those as Done mid-run misled users."""
    if engine.failure is not None:
        return "Failed"
    last = engine.latest.get(member)
    if engine.outcome is not None or (last is not None and last.segment + 1 >= spec.budget.segments):
        return "Done"
    return "Waiting"


def job_seconds(job: Mapping[str, Any], finished_at: str, pods: Iterable[Mapping[str, Any]] = ()) -> float | None:
    """A segment Job's duration: status.startTime to `finished_at` (its completionTime, or the time the
    pass saw its pod succeed). The pass can see the pod succeed before the Job controller's status write
    that sets startTime reaches it (the Job is read from a watch, and that write follows the pod's
    creation), so then the earliest pod start stands in: the same instant to within the controller's hop.
    None when neither is known or a timestamp does not parse."""
    start = (job.get("status") or {}).get("startTime") or min(
        (str(t) for t in ((pod.get("status") or {}).get("startTime") for pod in pods) if t), default=None)
    if not start:
        return None
    try:
        t0, t1 = (datetime.datetime.fromisoformat(str(t).replace("Z", "+00:00")) for t in (start, finished_at))
    except ValueError:
        return None
    return max(0.0, (t1 - t0).total_seconds())


def _failed_but_running(jobs: Iterable[Mapping[str, Any]], members: Mapping[int, Mapping[str, Any]], failed: set[str],
                        already: set[str]) -> list[tuple[str, str]]:
    """Unfinished Jobs of our members whose segment is recorded as failed and no longer current. (A Job
    whose pod succeeded is recorded as done before the Job controller marks it Complete: never one of
    these.)"""
    uids = {str(m["metadata"].get("uid")) for m in members.values() if m["metadata"].get("uid")}
    out = []
    for j in jobs:
        meta = j["metadata"]
        owners = {str(o.get("uid")) for o in meta.get("ownerReferences") or []}
        if meta["name"] not in failed or meta["name"] in already or not owners & uids or S.job_finished(j) \
                or meta.get("deletionTimestamp"):
            continue
        out.append((meta["name"], str(meta.get("uid", ""))))
    return out


# Messages of conditions and Events that have no news of their own to tell: they say what the reason
# does not (how far along, what ends it, what happens next), instead of restating it ("no failure"
# under NoFailure, "training in progress" under NotFinished, "training resumed" under Resumed).
def not_finished_message(spec: TrainingSpec, done: int, total: int) -> str:
    """Succeeded=False (NotFinished) while it runs: how far along, and what ends it."""
    b = spec.budget
    ends = [f"every member has trained {b.segments} segment{'s' if b.segments != 1 else ''} (spec.budget.segments)"]
    if b.target_score is not None:
        ends.append(f"a member reaches {b.target_score:g} (spec.budget.targetScore)")
    if b.patience is not None:
        ends.append(f"the best score has not improved for {counted(b.patience, 'generation')} (spec.budget.patience)")
    return f"{done}/{total} segments done; it ends when " + ", or ".join(ends)


def no_failure_message(spec: TrainingSpec, failures: int, finished: bool = False) -> str:
    """Failed=False (NoFailure): how many attempts failed so far, and what a failure leads to."""
    so_far = ("no segment attempt failed" if not failures
              else f"{failures} segment attempt{'s' if failures != 1 else ''} failed, none fatal")
    if finished:
        return so_far
    fp = spec.failure_policy
    # replace: the replacement gets one round of its own, and fails the training if it fails it too
    # (core/engine.py), which "then its member is replaced" left out
    then = ("its member is replaced, and the training fails if the replacement fails as often"
            if fp.on_exhausted == "replace" else "the training fails")
    retried = (f"is retried {fp.max_retries} time{'s' if fp.max_retries != 1 else ''} (spec.failurePolicy.maxRetries)"
               if fp.max_retries else "is not retried (spec.failurePolicy.maxRetries: 0)")
    return f"{so_far}; a failed segment {retried}, then {then} (onExhausted: {fp.on_exhausted})"


def retried_message(s: Suggestion, spec: TrainingSpec) -> str:
    """The SegmentRetried Event: which attempt runs, from what, and the policy that allows it (the
    SegmentFailed Event just before it says why the last one failed)."""
    r = spec.failure_policy.max_retries
    return (f"segment {s.segment} runs again as attempt {s.attempt}, from the same checkpoint with the same "
            f"hyperparameters (spec.failurePolicy.maxRetries: {r})")


def all_started_message(spec: TrainingSpec, running: int) -> str:
    """SegmentsStarted=True: how many segments run out of how many may at once (spec.parallelism, at
    most one per member); after a scale-down, segments that had started go on above the new number."""
    at_once = min(spec.parallelism, spec.population)
    if at_once > 0 and running <= at_once:
        return f"{running} of {counted(at_once, 'segment')} running (spec.parallelism), none waiting to start"
    return f"{counted(running, 'segment')} running (spec.parallelism {spec.parallelism}), none waiting to start"


def resumed_message(spec: TrainingSpec, status: Mapping[str, Any]) -> str:
    """The Resumed Event: what starts now."""
    at_once = f"{counted(spec.parallelism, 'segment')} {'runs' if spec.parallelism == 1 else 'run'}"
    return (f"training resumed: up to {at_once} at once again (spec.parallelism); "
            f"{status.get('segmentsDone', 0)}/{status.get('segmentsTotal', 0)} segments done")


def _set_all(conds: list[dict[str, Any]], now: str, gen: int | None, **kv: tuple[bool, str, str]) -> list[dict[str, Any]]:
    names = {"ready": C.READY, "progressing": C.PROGRESSING, "succeeded": C.SUCCEEDED, "failed": C.FAILED}
    for key, (status, reason, msg) in kv.items():
        conds = C.set_condition(conds, names[key], status, reason, msg, now, gen)
    return conds


def training_status(spec: TrainingSpec, engine: Engine, old: Mapping[str, Any], now: str, generation: int | None,
                    running: int, queued: int, root: str,
                    waits: Mapping[int, S.Waiting] | None = None) -> dict[str, Any]:
    """The training's status. `running`: segments training (or just created), `waits`: created
    segments that wait for something worth reporting (admission, a node, the scheduler, an image)."""
    st = engine.state()
    best = engine.best
    conds = list(old.get("conditions") or [])
    fin = engine.outcome
    if engine.failure is not None:
        phase = "Failed"
        reason, msg = engine.failure.reason, str(engine.failure)
        conds = _set_all(conds, now, generation, ready=(False, reason, msg), progressing=(False, reason, msg),
                         succeeded=(False, reason, msg), failed=(True, reason, msg))
    elif fin is not None:
        phase = "Succeeded"
        # An early stop's message starts with its reason ("TargetReached: member 3 scored ..."), as ever.
        reason, msg = fin.reason, engine.finished or fin.message
        # Ready is False once finished (API conventions: nothing is running or served any more);
        # Succeeded=True says how it ended.
        conds = _set_all(conds, now, generation, ready=(False, C.COMPLETED, msg), progressing=(False, reason, msg),
                         succeeded=(True, reason, msg),
                         failed=(False, C.NO_FAILURE, no_failure_message(spec, engine.failure_count, True)))
    elif spec.suspend or spec.parallelism == 0:
        phase = "Suspended"
        reason = C.SUSPENDED if spec.suspend else C.SCALED_TO_ZERO
        msg = (f"{'spec.suspend is true' if spec.suspend else 'spec.parallelism is 0'}: no segment starts; "
               f"{running} still running, {st.done_segments}/{st.total_segments} done")
        conds = _set_all(conds, now, generation, ready=(False, reason, msg), progressing=(False, reason, msg),
                         succeeded=(False, C.NOT_FINISHED, not_finished_message(spec, st.done_segments, st.total_segments)),
                         failed=(False, C.NO_FAILURE, no_failure_message(spec, engine.failure_count)))
    else:
        phase = "Running"
        msg = (f"{counted(running, 'segment')} running, {len(waits or {})} waiting to start, {queued} queued, "
               f"{st.done_segments}/{st.total_segments} done")
        if not waits:
            ready = (True, C.SEGMENTS_RUNNING if running else C.WAITING_FOR_SLOTS, msg)
        else:
            reason, why = S.summarize(waits)
            if running:  # some segments train: Ready, and the ones that cannot start say why here too
                ready = (True, C.SEGMENTS_RUNNING, f"{msg}: {why}")
            else:  # nothing trains and something waits: not Ready, and say why
                ready = (False, reason, f"{msg}: {why}")
        conds = _set_all(conds, now, generation, ready=ready, progressing=(True, ready[1], ready[2]),
                         succeeded=(False, C.NOT_FINISHED, not_finished_message(spec, st.done_segments, st.total_segments)),
                         failed=(False, C.NO_FAILURE, no_failure_message(spec, engine.failure_count)))
    if waits:
        w_reason, w_msg = S.summarize(waits)
        conds = C.set_condition(conds, C.SEGMENTS_STARTED, False, w_reason, w_msg, now, generation)
    else:
        conds = C.set_condition(conds, C.SEGMENTS_STARTED, True, C.ALL_STARTED,
                                all_started_message(spec, running), now, generation)
    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": generation,
        "conditions": conds,
        "generation": st.done_segments // max(1, spec.population),
        "segmentsDone": st.done_segments,
        "segmentsTotal": st.total_segments,
        "running": running,
        "waiting": len(waits or {}),
        "queued": queued,
        "selector": pod_selector(spec.name),
        "failures": engine.failure_count,
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
    if engine.evicted_live:
        # What a restarted operator cannot learn from the member windows: checkpoints that left them
        # while live, to delete once they are not. At most ~population + 1 are live at once (pending
        # restores and the best); the bound only guards the object's size.
        status["retainedCheckpoints"] = [[m, seg] for m, seg in engine.evicted_live[-2 * max(1, spec.population):]]
    return status


__all__ = ["EventSpec", "Pass", "Plan", "admit_segments", "decision_events", "events_wanted", "finish_pass",
           "invalid_spec", "job_event_matters", "job_outcome", "no_failure_message", "not_finished_message",
           "parse_training", "plan", "pod_event_matters", "pods_by_job", "rebuild_pass", "resumed_message",
           "retried_message", "segment_outcome", "stop_segments", "tell_finished_jobs", "training_status",
           "watch_segments", "world_selectors", "write_member_statuses", "write_members"]
