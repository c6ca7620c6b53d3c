"""What a segment Job is doing before and while it trains, as pure functions of the Job, its pods and
a few Events: why it waits, when its deadline falls, and whether the operator must stop it.

Why a module of its own: on an autoscaled, queued cluster a segment spends real time between its Job's
creation and its trainer's start (a queue's admission, a node being provisioned, an image pull). That
time must neither count as training time nor pass unexplained, and none of it needs the API server to
decide: the reconcile pass reads the objects and applies what these functions return.

The segment timeout is enforced by the Job controller itself, through `spec.activeDeadlineSeconds`,
which counts from the Job's `status.startTime` (its admission, for a queued Job). The operator moves that
deadline once the trainer container starts (`desired_deadline`): to the time already spent plus
`spec.segment.timeoutSeconds`. So waiting never counts, and a segment is still stopped on time when
the operator is down. Before the start, the deadline is `spec.segment.pendingTimeoutSeconds` (or none).
The Job's `pbt.dev/deadline` annotation says which of the two is set, so a DeadlineExceeded failure
names the right cause.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.display import shorten
from ..spec import DEFAULT_CONTAINER, KUEUE_QUEUE_LABEL, SegmentSpec
from . import conditions as C

DEADLINE_ANNOTATION = "pbt.dev/deadline"  # "pending", or "running <trainer startedAt>"
# Voluntary disruption: node autoscalers' consolidation and drains leave pods with these alone.
DO_NOT_DISRUPT = {"karpenter.sh/do-not-disrupt": "true",
                  "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
IMAGE_ERRORS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable",
                "SignatureValidationFailed")
CONTAINER_ERRORS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError", "PreCreateHookError",
                    "PreStartHookError")
# Events that say a node autoscaler is providing a node for an unschedulable pod.
NODE_COMING_EVENTS = ("Nominated", "TriggeredScaleUp")
TERMINAL = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")


@dataclass(frozen=True)
class Waiting:
    """Why a created segment is not training yet."""

    reason: str  # a conditions.* waiting reason
    message: str
    since: str | None = None  # when this wait began (the Job's or the pod's creation)

    def to_dict(self) -> dict[str, Any]:
        d = {"reason": self.reason, "message": shorten(self.message, 1000)}
        if self.since:
            d["since"] = self.since
        return d


def _cond(obj: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def job_finished(job: Mapping[str, Any]) -> bool:
    return any((_cond(job, t) or {}).get("status") == "True" for t in TERMINAL)


def parse_time(ts: object) -> datetime.datetime | None:
    if not isinstance(ts, str) or not ts:
        return None
    try:
        return datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None


def _created(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("creationTimestamp") or "")


def active_pods(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Pods that may still run, oldest first: not finished and not being deleted."""
    out = [p for p in pods if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
           and not (p.get("metadata") or {}).get("deletionTimestamp")]
    return sorted(out, key=_created)


def named_trainer(pod: Mapping[str, Any]) -> str | None:
    """The trainer container's name in a segment pod: the default-container annotation the Job's template
    carries, else the container holding the contract; None when neither says."""
    name = ((pod.get("metadata") or {}).get("annotations") or {}).get(DEFAULT_CONTAINER)
    if name:
        return str(name)
    for c in (pod.get("spec") or {}).get("containers") or []:
        if any(e.get("name") == "PBT_SEGMENT" for e in c.get("env") or []):
            return str(c.get("name"))
    return None


def trainer_name(pod: Mapping[str, Any]) -> str | None:
    """The trainer container of a segment pod (`named_trainer`), else the first container."""
    containers = (pod.get("spec") or {}).get("containers") or []
    return named_trainer(pod) or (containers[0].get("name") if containers else None)


def trainer_started_at(pod: Mapping[str, Any]) -> str | None:
    """When the trainer container started, or None."""
    name = trainer_name(pod)
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") != name:
            continue
        state = cs.get("state") or {}
        for key in ("running", "terminated"):
            started = (state.get(key) or {}).get("startedAt")
            if started:
                return str(started)
    return None


def started(job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the segment trains now: its newest active pod's trainer container has started."""
    if job is None or job_finished(job):
        return False
    act = active_pods(pods)
    return bool(act) and trainer_started_at(act[-1]) is not None


def _events_for(uid: str | None, events: Sequence[Mapping[str, Any]], reasons: Sequence[str]) -> list[Mapping[str, Any]]:
    if not uid:
        return []
    found = [e for e in events if (e.get("involvedObject") or {}).get("uid") == uid and e.get("reason") in reasons]
    return sorted(found, key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""))


def waiting_of(job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]],
               events: Sequence[Mapping[str, Any]] = ()) -> Waiting | None:
    """Why the segment of `job` has not started training; None when it trains or has finished (or
    has no Job: a segment waiting for a free slot is `queued`, a different thing)."""
    if job is None or job_finished(job):
        return None
    meta = job.get("metadata") or {}
    if (job.get("spec") or {}).get("suspend"):
        queue = (meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL)
        if queue:
            return Waiting(C.WAITING_FOR_ADMISSION,
                           f"waiting for Kueue to admit its Job from LocalQueue {queue!r} (quota); "
                           f"kubectl get workloads -n {meta.get('namespace', 'NS')} shows why", _created(job))
        return Waiting(C.JOB_SUSPENDED, "its Job is suspended (spec.suspend on the Job)", _created(job))
    act = active_pods(pods)
    if not act:
        failed = _events_for(meta.get("uid"), events, ("FailedCreate",))
        since = str((job.get("status") or {}).get("startTime") or _created(job))
        if failed:
            return Waiting(C.FAILED_CREATE, f"the Job controller cannot create its pod: {failed[-1].get('message', '')}",
                           since)
        return Waiting(C.WAITING_FOR_POD, "the Job controller has not created its pod yet", since)
    pod = act[-1]
    if trainer_started_at(pod) is not None:
        return None
    since = _created(pod)
    sched = _cond(pod, "PodScheduled")
    node = (pod.get("spec") or {}).get("nodeName")
    if not node:
        if sched is not None and sched.get("status") == "False":
            msg = str(sched.get("message") or "no node fits the pod")
            if sched.get("reason") == "SchedulingGated":
                return Waiting(C.SCHEDULING_GATED, f"the pod has scheduling gates: {msg}", since)
            coming = _events_for((pod.get("metadata") or {}).get("uid"), events, NODE_COMING_EVENTS)
            if coming:
                return Waiting(C.WAITING_FOR_NODE, f"{coming[-1].get('message', 'a node is being added')} "
                                                   f"(scheduler: {msg})", since)
            return Waiting(C.UNSCHEDULABLE, msg, since)
        return Waiting(C.STARTING, "waiting for the scheduler", since)
    statuses = [*((pod.get("status") or {}).get("initContainerStatuses") or []),
                *((pod.get("status") or {}).get("containerStatuses") or [])]
    for cs in statuses:
        w = (cs.get("state") or {}).get("waiting") or {}
        why = str(w.get("reason") or "")
        detail = f"container {cs.get('name')}: {why}: {w.get('message') or ''}".rstrip(": ")
        if why in IMAGE_ERRORS:
            return Waiting(C.IMAGE_PULL_ERROR, f"{detail} (image {cs.get('image', '?')})", since)
        if why in CONTAINER_ERRORS:
            return Waiting(C.CONTAINER_ERROR, detail, since)
    doing = next((str(((cs.get("state") or {}).get("waiting") or {}).get("reason")) for cs in statuses
                  if ((cs.get("state") or {}).get("waiting") or {}).get("reason")), "starting")
    return Waiting(C.STARTING, f"scheduled on node {node}; {doing}", since)


TRANSIENT = (C.STARTING, C.WAITING_FOR_POD)
TRANSIENT_SECONDS = 20.0
# Waits that a Job's pod tells (what the scheduler, a node autoscaler or the kubelet says about it).
POD_WAITS = (C.SCHEDULING_GATED, C.UNSCHEDULABLE, C.WAITING_FOR_NODE, C.IMAGE_PULL_ERROR, C.CONTAINER_ERROR,
             C.STARTING)


def kept_waiting(w: Waiting | None, recorded: Mapping[str, Any] | None, job: Mapping[str, Any]) -> Waiting | None:
    """The wait to record for a segment this pass: `w` (waiting_of), except that a moment without a
    pod (WAITING_FOR_POD) keeps the member's recorded wait for a pod of the same Job.

    Why: a Job that had a pod and has none is between states. At the pending deadline the Job
    controller deletes the pod before it marks the Job failed, and a pass in between would otherwise
    record "has not created its pod yet" as the reason, which the PendingTimeout failure then quotes
    instead of the scheduler's message; a pod evicted before it started is replaced by one that waits
    for the same thing. The recorded wait is this Job's when it began at or after the Job's creation
    (a pod's creation); waits about the Job itself (a queue's admission) end when it has no pod yet."""
    if w is None or w.reason != C.WAITING_FOR_POD or not recorded or recorded.get("reason") not in POD_WAITS:
        return w
    since, created = parse_time(recorded.get("since")), parse_time(_created(job))
    if since is None or created is None or since < created:
        return w
    return Waiting(str(recorded["reason"]), str(recorded.get("message") or ""), str(recorded["since"]))


def notable(w: Waiting, now: str) -> bool:
    """Whether a wait is worth reporting: every wait except the few seconds any segment spends between
    its Job's creation and its trainer's start (recording those would cost writes and Events on every
    segment and say nothing). Starting or waiting for a pod longer than that (a slow image pull, a Job
    controller that cannot create the pod) is reported."""
    if w.reason not in TRANSIENT:
        return True
    t0, t1 = parse_time(w.since), parse_time(now)
    return t0 is not None and t1 is not None and (t1 - t0).total_seconds() >= TRANSIENT_SECONDS


def events_wanted(jobs: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """Field selectors of the Events that can explain a wait in this pass (none in the common case):
    the Job controller's FailedCreate when an admitted Job has no pod, a node autoscaler's Nominated
    (Karpenter) or TriggeredScaleUp (Cluster Autoscaler) when a pod is unschedulable."""
    out: list[str] = []
    podless = False
    for j in jobs:
        if job_finished(j) or (j.get("spec") or {}).get("suspend") or not (j.get("status") or {}).get("startTime"):
            continue
        if not int((j.get("status") or {}).get("active") or 0) and not (j.get("status") or {}).get("ready"):
            podless = True
    if podless:
        out.append("involvedObject.kind=Job,reason=FailedCreate")
    if any((_cond(p, "PodScheduled") or {}).get("status") == "False" for p in active_pods(pods)):
        out += [f"involvedObject.kind=Pod,reason={r}" for r in NODE_COMING_EVENTS]
    return out


# -- deadlines ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Deadline:
    seconds: int | None  # the Job's activeDeadlineSeconds (None: no deadline)
    annotation: str  # DEADLINE_ANNOTATION's value


def initial_deadline(seg: SegmentSpec) -> Deadline:
    """What a new segment Job carries: only the pending timeout (from its start, i.e. its admission);
    the training timeout is set once the trainer starts."""
    return Deadline(seg.pending_timeout_seconds, "pending")


def _seconds_between(t0: str | None, t1: str | None) -> int | None:
    a, b = parse_time(t0), parse_time(t1)
    if a is None or b is None:
        return None
    return max(0, math.ceil((b - a).total_seconds()))


def desired_deadline(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], seg: SegmentSpec) -> Deadline | None:
    """The deadline `job` should carry now; None when it carries it already (or nothing can be said:
    no start time yet, no active pod, a finished Job).

    Trainer running: the time from the Job's start to the trainer's start, plus timeoutSeconds. Waiting
    for a pod that replaces a disrupted one: the time to that pod's creation plus pendingTimeoutSeconds
    (the old trainer's deadline must not run on while the segment waits again).
    """
    if job_finished(job):
        return None
    job_start = (job.get("status") or {}).get("startTime")
    act = active_pods(pods)
    if not job_start or not act:
        return None
    pod = act[-1]
    begun = trainer_started_at(pod)
    if begun is not None:
        before = _seconds_between(job_start, begun)
        if before is None:
            return None
        want = Deadline(before + seg.timeout_seconds if seg.timeout_seconds else None, f"running {begun}")
    else:
        replaced = len(pods) > len(act)  # an earlier pod of this Job ended (a disruption: backoffLimit is 0)
        if not replaced:
            return None  # the initial deadline stands
        before = _seconds_between(job_start, _created(pod))
        if before is None:
            return None
        want = Deadline(before + seg.pending_timeout_seconds if seg.pending_timeout_seconds else None,
                        f"pending {_created(pod)}")
    have = Deadline((job.get("spec") or {}).get("activeDeadlineSeconds"),
                    str(((job.get("metadata") or {}).get("annotations") or {}).get(DEADLINE_ANNOTATION, "")))
    if have == want or (have.seconds is None and want.seconds is None):
        return None  # (without any deadline the annotation is not worth a write)
    return want


def deadline_patch(d: Deadline) -> dict[str, Any]:
    """A JSON merge patch setting the deadline (null removes it)."""
    return {"metadata": {"annotations": {DEADLINE_ANNOTATION: d.annotation}},
            "spec": {"activeDeadlineSeconds": d.seconds}}


def deadline_error(job: Mapping[str, Any], seg: SegmentSpec, last_waiting: Mapping[str, Any] | None = None) -> str:
    """The failure message of a Job the Job controller stopped at its deadline."""
    kind = str(((job.get("metadata") or {}).get("annotations") or {}).get(DEADLINE_ANNOTATION, ""))
    if kind.startswith("pending"):
        why = ""
        if last_waiting:
            why = f"; it was waiting: {last_waiting.get('reason')}: {last_waiting.get('message', '')}"
        return (f"{C.PENDING_TIMEOUT}: the trainer did not start within spec.segment.pendingTimeoutSeconds "
                f"({seg.pending_timeout_seconds} s){why}")
    if kind.startswith("running"):
        return (f"{C.DEADLINE_EXCEEDED}: timed out: the trainer ran longer than spec.segment.timeoutSeconds "
                f"({seg.timeout_seconds} s, counted from the container's start); the Job was stopped")
    return f"{C.DEADLINE_EXCEEDED}: timed out (the Job's activeDeadlineSeconds); the Job was stopped"


def disruptions(pods: Sequence[Mapping[str, Any]]) -> int:
    """Pods of one Job that ended by a disruption (the Job's pod failure policy ignores them)."""
    return sum(1 for p in pods if (_cond(p, "DisruptionTarget") or {}).get("status") == "True")


def disrupted_pods(job_name: str, pods: Sequence[Mapping[str, Any]], recorded: Sequence[str] = ()) -> list[str]:
    """The disrupted pods of one Job as "JOB/POD-UID", the ones recorded in the member's status before
    included: a pod evicted through the Eviction API is deleted, so counting only the pods still listed
    would let a Job be disrupted without limit."""
    seen = {r for r in recorded if isinstance(r, str) and r.startswith(f"{job_name}/")}
    for p in pods:
        if (_cond(p, "DisruptionTarget") or {}).get("status") == "True":
            seen.add(f"{job_name}/{(p.get('metadata') or {}).get('uid') or (p.get('metadata') or {}).get('name')}")
    return sorted(seen)


def disruption_error(n: int, cap: int) -> str:
    times = "once" if n == 1 else f"{n} times"
    return (f"{C.TOO_MANY_DISRUPTIONS}: its pod was disrupted {times} (preemption, eviction or node loss), "
            f"more than spec.failurePolicy.maxDisruptions ({cap})")


# -- the training's view --------------------------------------------------------------------------
def summarize(waiting: Mapping[int, Waiting]) -> tuple[str, str]:
    """(reason, message) for the SegmentsStarted condition when segments wait: the most common reason
    (problems before normal waits), and for each reason the members and the first message."""
    by: dict[str, list[int]] = {}
    for m, w in sorted(waiting.items()):
        by.setdefault(w.reason, []).append(m)
    order = sorted(by, key=lambda r: (r not in C.WAITING_PROBLEMS, -len(by[r]), r))
    parts = []
    for r in order:
        ms = by[r]
        first = waiting[ms[0]]
        who = ", ".join(f"m{m:03d}" for m in ms[:5]) + (f" and {len(ms) - 5} more" if len(ms) > 5 else "")
        parts.append(f"{len(ms)} {r} ({who}): {first.message}")
    return order[0], "; ".join(parts)


__all__ = [
    "DEADLINE_ANNOTATION",
    "DO_NOT_DISRUPT",
    "Deadline",
    "Waiting",
    "active_pods",
    "deadline_error",
    "deadline_patch",
    "desired_deadline",
    "disruption_error",
    "disruptions",
    "events_wanted",
    "initial_deadline",
    "job_finished",
    "kept_waiting",
    "notable",
    "started",
    "summarize",
    "trainer_started_at",
    "waiting_of",
]
