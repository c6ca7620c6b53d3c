"""Condition types and reasons, in one place (Kubernetes API conventions: adjective or past-tense
types, CamelCase reasons), and the one function that sets a condition."""

from __future__ import annotations

from typing import Any

from ..core import types as core_types
from ..core.display import shorten

#: The API server's limits: a condition's message is cut at 1024 characters, an Event's at 1000 (ours,
#: below the server's 1 KiB note limit). Cut with shorten(), so a cut message ends with "...".
CONDITION_MESSAGE_MAX = 1024
EVENT_MESSAGE_MAX = 1000


def condition_message(message: str) -> str:
    """`message` as a condition stores it: compare a stored message with this, not with the text."""
    return shorten(message, CONDITION_MESSAGE_MAX)


def event_message(message: str) -> str:
    return shorten(message, EVENT_MESSAGE_MAX)

# Types
READY = "Ready"
PROGRESSING = "Progressing"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
# False while the API server refuses this training's children (a segment Job refused as invalid, over
# quota or by an admission webhook; a child's name held by another owner); True again once one is
# accepted. Absent until the first refusal. The reconcile plan never writes it.
JOBS_ACCEPTED = "JobsAccepted"
SEGMENTS_STARTED = "SegmentsStarted"  # False while a created segment waits (admission, node, image...)

# Reasons
SEGMENTS_RUNNING = "SegmentsRunning"
WAITING_FOR_SLOTS = "WaitingForSlots"
INVALID_SPEC = "InvalidSpec"
COMPLETED = "Completed"
NOT_FINISHED = "NotFinished"
NO_FAILURE = "NoFailure"
ACCEPTED = "Accepted"
JOB_REFUSED = "JobRefused"
QUOTA_EXCEEDED = "QuotaExceeded"
NAME_CONFLICT = "NameConflict"
# How a training ended is the engine's typed outcome (core/types.py Finish): its reason (TargetReached,
# PatienceExhausted, BudgetExhausted, SegmentFailed) becomes the Succeeded/Failed condition's reason.
SEGMENT_FAILED = core_types.SEGMENT_FAILED
SUSPENDED = "Suspended"  # spec.suspend: true
SCALED_TO_ZERO = "ScaledToZero"  # spec.parallelism: 0
ALL_STARTED = "AllStarted"

# Why a created segment has not started training (member status.waiting.reason, the SegmentsStarted
# condition's reason, and the reason of the Event that announces it).
WAITING_FOR_ADMISSION = "WaitingForAdmission"  # its Job waits in a Kueue queue (quota)
JOB_SUSPENDED = "JobSuspended"  # its Job was suspended by someone else
WAITING_FOR_POD = "WaitingForPod"  # the Job controller has not created the pod (yet)
FAILED_CREATE = "FailedCreate"  # the Job controller cannot create the pod (quota, admission webhook...)
UNSCHEDULABLE = "Unschedulable"  # the scheduler's message says why
WAITING_FOR_NODE = "WaitingForNode"  # unschedulable, and a node autoscaler is adding a node for it
SCHEDULING_GATED = "SchedulingGated"
IMAGE_PULL_ERROR = "ImagePullError"
CONTAINER_ERROR = "ContainerError"  # the container cannot be created (missing Secret/ConfigMap...)
STARTING = "Starting"  # scheduled; pulling the image, running init containers
WAITING_PROBLEMS = (FAILED_CREATE, UNSCHEDULABLE, IMAGE_PULL_ERROR, CONTAINER_ERROR)  # Warning, not Normal

# Segment failures the operator names (the start of the failure's message)
DEADLINE_EXCEEDED = "DeadlineExceeded"  # the trainer ran past spec.segment.timeoutSeconds
PENDING_TIMEOUT = "PendingTimeout"  # it did not start within spec.segment.pendingTimeoutSeconds
TOO_MANY_DISRUPTIONS = "TooManyDisruptions"  # disrupted more than failurePolicy.maxDisruptions times

# Event reasons
EV_MEMBER_CREATED = "MemberCreated"
EV_EXPLOITED = "Exploited"
EV_EXPLORED = "Explored"
EV_SEGMENT_FAILED = "SegmentFailed"
EV_SEGMENT_RETRIED = "SegmentRetried"
EV_MEMBER_REPLACED = "MemberReplaced"
EV_DISRUPTED = "SegmentDisrupted"
EV_COMPLETED = "Completed"
EV_FAILED = "TrainingFailed"
EV_INVALID = "InvalidSpec"
EV_JOB_REFUSED = "JobRefused"
EV_NAME_CONFLICT = "NameConflict"
EV_SEGMENT_STOPPED = "SegmentStopped"  # the operator deleted a segment Job (finished, suspended, scaled down)
EV_SUSPENDED = "Suspended"
EV_RESUMED = "Resumed"
EV_CHECKPOINTS_LEFT = "CheckpointsLeft"  # the training ended with collectable checkpoints no segment deleted
EV_CHECKPOINT_DELETE_FAILED = "CheckpointDeleteFailed"  # a segment saved but some of its gc deletes failed
EV_WRITE_REFUSED = "WriteRefused"  # the API server refused a pass's write (a webhook, a schema rule): it retries
# An installed CRD is not the one this operator was generated with (kube/crdcheck.py): posted once per
# training per operator start, with the command that installs the right ones.
EV_CRD_OUTDATED = "CRDOutdated"


def set_condition(conditions: list[dict[str, Any]] | None, type_: str, status: bool, reason: str, message: str,
                  now: str, generation: int | None = None) -> list[dict[str, Any]]:
    """Return a new list with `type_` set. lastTransitionTime only moves when the status flips, so
    watchers can tell how long a condition has held."""
    out = [dict(c) for c in (conditions or [])]
    st = "True" if status else "False"
    for c in out:
        if c.get("type") == type_:
            if c.get("status") != st:
                c["lastTransitionTime"] = now
            c.update(status=st, reason=reason, message=condition_message(message))
            if generation is not None:
                c["observedGeneration"] = generation
            return out
    new: dict[str, Any] = {"type": type_, "status": st, "reason": reason, "message": condition_message(message),
                           "lastTransitionTime": now}
    if generation is not None:
        new["observedGeneration"] = generation
    out.append(new)
    return out
