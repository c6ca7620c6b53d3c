"""Pure builders for the objects the operator creates: members, segment Jobs, status documents.

No API calls here: every function takes plain dicts and returns plain dicts, so each is unit tested
on its own and the handlers stay a few lines long.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..contract import build_contract
from ..core.display import fmt_hp
from ..core.types import Record, Suggestion
from ..spec import DEFAULT_CONTAINER, KUEUE_QUEUE_LABEL, SegmentSpec, trainer_index
from .crds import API_VERSION
from .segments import DEADLINE_ANNOTATION, DO_NOT_DISRUPT, initial_deadline

LABEL_TRAINING = "pbt.dev/training"
LABEL_MEMBER = "pbt.dev/member"
LABEL_SEGMENT = "pbt.dev/segment"
LABEL_ATTEMPT = "pbt.dev/attempt"
TERMINATION_LOG = "/dev/termination-log"
# Finished segment Jobs, and their pods with them, are deleted this long after they end (the TTL-after-
# finished controller), so a long training does not keep thousands. By then the operator has long
# recorded the segment in its member's status and never reads the Job again; only an operator stopped
# for longer than this, between a pod's success and that record, would find the Job gone and run the
# segment again (from the same checkpoint). None keeps them. Set from PBT_JOB_TTL_SECONDS at startup.
JOB_TTL_SECONDS: int | None = 900
# The pod's main container (kubectl logs/exec pick it): here, the trainer. A template with sidecars names
# its trainer with this annotation; without it the first container is the trainer. Results are read from
# the trainer's status by this name, never by the order of the container statuses.
AWS_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


def member_name(training: str, index: int) -> str:
    return f"{training}-m{index:03d}"


def job_name(training: str, sug: Suggestion) -> str:
    """Deterministic: the same decision always maps to the same Job, so a create after a crash is a
    409 (already done), never a second run of the segment."""
    return segment_job_name(training, sug.member, sug.segment, sug.attempt)


def segment_job_name(training: str, member: int, segment: int, attempt: int) -> str:
    """`job_name` from the numbers alone (a pass selecting Jobs by name parses no hyperparameters)."""
    return f"{training}-m{member:03d}-s{segment:05d}-a{attempt}"


def pod_selector(training: str) -> str:
    """The label selector of a training's segment pods: the scale subresource's status.selector, which
    an HPA or KEDA uses to find the pods whose metrics they read."""
    return f"{LABEL_TRAINING}={training}"


def owner_reference(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def build_member(training: Mapping[str, Any], sug: Suggestion) -> dict[str, Any]:
    name = training["metadata"]["name"]
    return {
        "apiVersion": API_VERSION,
        "kind": "PopulationMember",
        "metadata": {
            "name": member_name(name, sug.member),
            "namespace": training["metadata"]["namespace"],
            "labels": {LABEL_TRAINING: name, LABEL_MEMBER: str(sug.member)},
            "ownerReferences": [owner_reference(training)],
        },
        "spec": {"training": name, "index": sug.member, "segment": sug.to_dict()},
    }


def build_job(training: Mapping[str, Any], member: Mapping[str, Any], sug: Suggestion, root: str,
              gc: Sequence[str], template: Mapping[str, Any], credentials_secret: str | None,
              segment: SegmentSpec, *, queue_name: str | None = None, job_labels: Mapping[str, str] | None = None,
              job_annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The segment's Job: the user's pod template untouched (GPU requests, node selectors,
    tolerations, priority class), plus the contract in PBT_SEGMENT, storage credentials referenced
    from the user's Secret (the operator never reads it), no API token, and a pod failure policy
    under which a disruption reruns the pod from the same checkpoint without counting as a failure.

    For autoscaled and queued clusters: the pod asks node autoscalers not to disrupt it voluntarily
    (unless spec.segment.protectFromDisruption is false; the template's own annotations win); a Job
    in a Kueue queue (spec.queueName or the queue label in spec.jobMetadata) is created suspended, so
    that Kueue's admission, not the operator, starts it even where Kueue's webhook does not default
    it; and the only deadline at creation is the pending timeout: the training timeout is set when
    the trainer starts (segments.desired_deadline), so waiting never counts as training."""
    tname = training["metadata"]["name"]
    contract = build_contract(tname, sug, root, TERMINATION_LOG, gc, record=True)
    labels = {LABEL_TRAINING: tname, LABEL_MEMBER: str(sug.member), LABEL_SEGMENT: str(sug.segment),
              LABEL_ATTEMPT: str(sug.attempt)}
    pod = copy.deepcopy(dict(template))
    idx = trainer_index(pod)
    meta = dict(pod.get("metadata") or {})
    meta["labels"] = {**(meta.get("labels") or {}), **labels}
    if segment.protect_from_disruption:
        meta["annotations"] = {**DO_NOT_DISRUPT, **(meta.get("annotations") or {})}
    pspec = dict(pod.get("spec") or {})
    pspec["restartPolicy"] = "Never"
    pspec["automountServiceAccountToken"] = False
    containers = [dict(c) for c in pspec.get("containers") or []]
    main = containers[idx]
    if main.get("name"):
        meta["annotations"] = {**(meta.get("annotations") or {}), DEFAULT_CONTAINER: main["name"]}
    pod["metadata"] = meta
    env = [e for e in main.get("env") or [] if e.get("name") != "PBT_SEGMENT"]
    env.append({"name": "PBT_SEGMENT", "value": json.dumps(contract, separators=(",", ":"))})
    if credentials_secret:
        have = {e.get("name") for e in env}
        for key in AWS_KEYS:
            if key not in have:
                env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": credentials_secret, "key": key,
                                                                         "optional": True}}})
    main["env"] = env
    main.setdefault("terminationMessagePath", TERMINATION_LOG)
    main.setdefault("terminationMessagePolicy", "FallbackToLogsOnError")
    containers[idx] = main
    pspec["containers"] = containers
    pod["spec"] = pspec
    job_meta_labels = {**(job_labels or {}), **labels}
    if queue_name:
        job_meta_labels[KUEUE_QUEUE_LABEL] = queue_name
    deadline = initial_deadline(segment)
    job: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(tname, sug),
            "namespace": training["metadata"]["namespace"],
            "labels": job_meta_labels,
            "annotations": {**(job_annotations or {}), DEADLINE_ANNOTATION: deadline.annotation},
            "ownerReferences": [owner_reference(member)],
        },
        "spec": {
            "backoffLimit": 0,
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [0]}},
            ]},
            "template": pod,
        },
    }
    if deadline.seconds:
        job["spec"]["activeDeadlineSeconds"] = deadline.seconds
    if job_meta_labels.get(KUEUE_QUEUE_LABEL):
        job["spec"]["suspend"] = True
    if JOB_TTL_SECONDS:
        job["spec"]["ttlSecondsAfterFinished"] = JOB_TTL_SECONDS
    return job


def job_gc(job: Mapping[str, Any]) -> list[str]:
    """The checkpoint prefixes a segment Job was handed to delete (its contract's `gc`, build_job): what
    a Job that never saved must give back. [] for anything that does not read as a contract."""
    try:
        for c in job["spec"]["template"]["spec"]["containers"]:
            for e in c.get("env") or []:
                if e.get("name") == "PBT_SEGMENT":
                    gc = json.loads(e["value"]).get("gc")
                    return [u for u in gc if isinstance(u, str)] if isinstance(gc, list) else []
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    return []


def member_status(sug: Suggestion | None, history: Sequence[Mapping[str, Any]], phase: str,
                  extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What `kubectl get pbtm` shows: current segment, latest score, hyperparameters, parent."""
    done = [h for h in history if h.get("status") == "done"]
    last = done[-1] if done else None
    st: dict[str, Any] = {"phase": phase, "history": list(history)}
    if sug is not None:
        st["segment"] = sug.segment
        st["summary"] = fmt_hp(sug.hyperparameters, 60)
        st["parent"] = f"m{sug.restore[0]}/s{sug.restore[1]}" if sug.restore else "-"
    if last is not None:
        st["score"] = last.get("score")
        st["completedSegment"] = last["suggestion"]["segment"]
    st.update(extra or {})
    return st


# Fields a history entry leaves out while they hold their default: Record.from_dict and
# Suggestion.from_dict read a missing one as exactly that default, so an entry means the same, smaller.
_SUGGESTION_DEFAULTS = {"score_before": None, "donor": None, "attempt": 0, "restore": None}
_RECORD_DEFAULTS: dict[str, Any] = {"metrics": {}, "error": None, "duration": None}


def record_entry(rec: Record, finished_at: str, job: str) -> dict[str, Any]:
    """One finished segment in a member's status history, without the fields at their defaults (every
    segment adds an entry, and the member object holds them all)."""
    d = rec.to_dict()
    d["suggestion"] = {k: v for k, v in d["suggestion"].items()
                       if k not in _SUGGESTION_DEFAULTS or v != _SUGGESTION_DEFAULTS[k]}
    for k, default in _RECORD_DEFAULTS.items():
        if d.get(k) == default:
            del d[k]
    d["finishedAt"] = finished_at
    d["job"] = job
    return d
