"""Segments on autoscaled and queued clusters: why a created segment waits, when its deadline falls,
which Jobs a pass stops, and what the Job builder adds for Kueue and node autoscalers. Pure functions
and single reconcile passes over hand-made Jobs and pods; tests/e2e/test_segments_cluster.py runs the same on
a real control plane."""

from __future__ import annotations

import copy
from typing import Any

from pbt_operator.core.types import Suggestion
from pbt_operator.kube import conditions as C
from pbt_operator.kube import segments as S
from pbt_operator.kube.builders import build_job
from pbt_operator.kube.reconcile import job_event_matters, plan, pod_event_matters
from pbt_operator.spec import SegmentSpec, parse_spec

T0 = "2026-01-01T00:00:00Z"


def at(seconds: int) -> str:
    return f"2026-01-01T00:{seconds // 60:02d}:{seconds % 60:02d}Z"


def job(name: str = "t-m000-s00000-a0", *, start: str | None = T0, suspend: bool = False, queue: str | None = None,
        conditions: list[dict[str, Any]] | None = None, deadline: int | None = None, annotation: str = "pending",
        uid: str = "j1", owner: str = "u-t-m000", member: int = 0) -> dict[str, Any]:
    labels = {"pbt.dev/training": "t", "pbt.dev/member": str(member), "pbt.dev/segment": "0"}
    if queue:
        labels["kueue.x-k8s.io/queue-name"] = queue
    j: dict[str, Any] = {
        "metadata": {"name": name, "namespace": "ns", "uid": uid, "labels": labels, "creationTimestamp": T0,
                     "annotations": {S.DEADLINE_ANNOTATION: annotation},
                     "ownerReferences": [{"kind": "PopulationMember", "uid": owner, "name": "x"}]},
        "spec": {"suspend": suspend},
        "status": {"conditions": conditions or []},
    }
    if start:
        j["status"]["startTime"] = start
    if deadline is not None:
        j["spec"]["activeDeadlineSeconds"] = deadline
    return j


def pod(jobname: str = "t-m000-s00000-a0", *, created: str = T0, node: str | None = None,
        scheduled: dict[str, Any] | None = None, waiting: dict[str, Any] | None = None, started: str | None = None,
        phase: str = "Pending", disrupted: bool = False, uid: str = "p1") -> dict[str, Any]:
    conds = []
    if scheduled is not None:
        conds.append({"type": "PodScheduled", **scheduled})
    if disrupted:
        conds.append({"type": "DisruptionTarget", "status": "True"})
    state: dict[str, Any] = {"waiting": waiting or {"reason": "ContainerCreating"}}
    if started:
        state = {"running": {"startedAt": started}}
    return {"metadata": {"name": jobname + "-x" + uid, "uid": uid, "creationTimestamp": created,
                         "labels": {"batch.kubernetes.io/job-name": jobname, "job-name": jobname,
                                    "pbt.dev/training": "t"}},
            "spec": {"nodeName": node, "containers": [{"name": "train"}, {"name": "sidecar"}]},
            "status": {"phase": phase, "conditions": conds,
                       "containerStatuses": [{"name": "train", "image": "reg/img:1", "state": state},
                                             {"name": "sidecar", "state": {"running": {"startedAt": T0}}}]}}


# -- why a segment waits ------------------------------------------------------------------------
def test_a_job_in_a_kueue_queue_waits_for_admission() -> None:
    w = S.waiting_of(job(start=None, suspend=True, queue="gpus"), [])
    assert w is not None and w.reason == C.WAITING_FOR_ADMISSION and "'gpus'" in w.message
    w = S.waiting_of(job(start=None, suspend=True), [])
    assert w is not None and w.reason == C.JOB_SUSPENDED


def test_unschedulable_pod_carries_the_schedulers_message() -> None:
    msg = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    p = pod(scheduled={"status": "False", "reason": "Unschedulable", "message": msg})
    w = S.waiting_of(job(), [p])
    assert w == S.Waiting(C.UNSCHEDULABLE, msg, T0)
    # a node autoscaler that says it is adding a node turns it into waiting for a node
    ev = {"involvedObject": {"uid": "p1"}, "reason": "Nominated", "message": "Pod should schedule on: nodeclaim/gpu-x",
          "lastTimestamp": at(3)}
    other = {**ev, "involvedObject": {"uid": "someone-else"}}
    assert S.waiting_of(job(), [p], [other]) == S.Waiting(C.UNSCHEDULABLE, msg, T0)
    w = S.waiting_of(job(), [p], [ev])
    assert w is not None and w.reason == C.WAITING_FOR_NODE and "nodeclaim/gpu-x" in w.message and msg in w.message


def test_image_and_container_errors_and_starting() -> None:
    sched = {"status": "True"}
    w = S.waiting_of(job(), [pod(node="n1", scheduled=sched, waiting={"reason": "ImagePullBackOff",
                                                                      "message": "Back-off pulling image"})])
    assert w is not None and w.reason == C.IMAGE_PULL_ERROR and "reg/img:1" in w.message and "Back-off" in w.message
    w = S.waiting_of(job(), [pod(node="n1", scheduled=sched, waiting={"reason": "CreateContainerConfigError",
                                                                      "message": 'secret "s3" not found'})])
    assert w is not None and w.reason == C.CONTAINER_ERROR and 'secret "s3"' in w.message
    w = S.waiting_of(job(), [pod(node="n1", scheduled=sched)])
    assert w is not None and w.reason == C.STARTING and "n1" in w.message
    assert not S.notable(w, at(5)) and S.notable(w, at(25))  # a slow start becomes worth reporting


def test_job_without_pod_reports_failed_create_from_events() -> None:
    j = job()
    w = S.waiting_of(j, [])
    assert w is not None and w.reason == C.WAITING_FOR_POD
    ev = {"involvedObject": {"uid": "j1"}, "reason": "FailedCreate", "lastTimestamp": at(2),
          "message": 'pods "x" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=1'}
    w = S.waiting_of(j, [], [ev])
    assert w is not None and w.reason == C.FAILED_CREATE and "exceeded quota" in w.message
    assert S.notable(w, at(1))
    assert S.events_wanted([j], []) == ["involvedObject.kind=Job,reason=FailedCreate"]


def test_training_or_finished_segments_do_not_wait() -> None:
    assert S.waiting_of(job(), [pod(node="n1", started=at(4), phase="Running")]) is None
    done = job(conditions=[{"type": "Complete", "status": "True"}])
    assert S.waiting_of(done, [pod(node="n1", phase="Succeeded")]) is None
    assert S.waiting_of(None, []) is None


def test_events_are_read_only_when_they_can_explain_a_wait() -> None:
    running = job()
    running["status"]["active"] = 1
    assert S.events_wanted([running], [pod(node="n1", started=at(1), phase="Running")]) == []
    unsched = pod(scheduled={"status": "False", "reason": "Unschedulable", "message": "no"})
    assert S.events_wanted([running], [unsched]) == ["involvedObject.kind=Pod,reason=Nominated",
                                                     "involvedObject.kind=Pod,reason=TriggeredScaleUp"]
    assert S.events_wanted([job(start=None, suspend=True, queue="q")], []) == []


def test_summary_puts_problems_first_and_names_members() -> None:
    waits = {0: S.Waiting(C.WAITING_FOR_ADMISSION, "queue q"), 1: S.Waiting(C.WAITING_FOR_ADMISSION, "queue q"),
             3: S.Waiting(C.UNSCHEDULABLE, "0/2 nodes are available")}
    reason, msg = S.summarize(waits)
    assert reason == C.UNSCHEDULABLE
    assert msg.startswith("1 Unschedulable (m003): 0/2 nodes") and "2 WaitingForAdmission (m000, m001)" in msg


# -- deadlines -------------------------------------------------------------------------------------
SEG = SegmentSpec(steps=1, timeout_seconds=30, pending_timeout_seconds=600)


def test_timeout_counts_from_the_trainers_start() -> None:
    assert S.initial_deadline(SEG) == S.Deadline(600, "pending")
    j = job(deadline=600)
    assert S.desired_deadline(j, [pod(node="n1", scheduled={"status": "True"})], SEG) is None  # still pending
    # the trainer started 61 s after the Job (a node was provisioned): 61 + 30
    d = S.desired_deadline(j, [pod(node="n1", started=at(61), phase="Running")], SEG)
    assert d == S.Deadline(91, f"running {at(61)}")
    assert S.deadline_patch(d) == {"metadata": {"annotations": {S.DEADLINE_ANNOTATION: f"running {at(61)}"}},
                                   "spec": {"activeDeadlineSeconds": 91}}
    done = job(deadline=91, annotation=f"running {at(61)}")
    assert S.desired_deadline(done, [pod(node="n1", started=at(61), phase="Running")], SEG) is None
    # without a timeout the pending deadline goes away once the trainer runs
    d = S.desired_deadline(j, [pod(node="n1", started=at(61), phase="Running")], SegmentSpec(pending_timeout_seconds=60))
    assert d == S.Deadline(None, f"running {at(61)}") and S.deadline_patch(d)["spec"]["activeDeadlineSeconds"] is None
    # nothing set at all: nothing to write
    assert S.desired_deadline(job(), [pod(node="n1", started=at(61), phase="Running")], SegmentSpec()) is None


def test_a_rerun_after_a_disruption_gets_a_fresh_deadline() -> None:
    j = job(deadline=40, annotation=f"running {at(10)}")
    gone = pod(node="n1", started=at(10), phase="Failed", disrupted=True, uid="p1")
    again = pod(created=at(50), uid="p2", scheduled={"status": "False", "reason": "Unschedulable", "message": "no"})
    d = S.desired_deadline(j, [gone, again], SEG)
    assert d == S.Deadline(650, f"pending {at(50)}")  # waiting again: the pending timeout, from the new pod
    assert S.desired_deadline(j, [gone, again], SegmentSpec(timeout_seconds=30)) == S.Deadline(None, f"pending {at(50)}")
    d = S.desired_deadline(j, [gone, pod(created=at(50), uid="p2", node="n2", started=at(70), phase="Running")], SEG)
    assert d == S.Deadline(100, f"running {at(70)}")
    assert S.disruptions([gone, again]) == 1


def test_deadline_errors_name_the_cause() -> None:
    failed = [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]
    run = S.deadline_error(job(conditions=failed, annotation=f"running {at(5)}"), SEG)
    assert run.startswith("DeadlineExceeded: ") and "timeoutSeconds (30 s" in run
    pend = S.deadline_error(job(conditions=failed), SEG, {"reason": "Unschedulable", "message": "0/2 nodes"})
    assert pend.startswith("PendingTimeout: ") and "(600 s)" in pend and "Unschedulable: 0/2 nodes" in pend


# -- the Job builder -------------------------------------------------------------------------------
TRAINING = {"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining",
            "metadata": {"name": "t", "namespace": "ns", "uid": "u-t"}}
MEMBER = {"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationMember", "metadata": {"name": "t-m000", "uid": "u-m"}}
SUG = Suggestion(0, 0, {"lr": 0.1}, None, 0, 5, "start")
TEMPLATE = {"metadata": {"annotations": {"karpenter.sh/do-not-disrupt": "false"}},
            "spec": {"containers": [{"name": "train", "image": "x"}]}}


def test_job_in_a_queue_is_created_suspended_with_the_queue_label() -> None:
    j = build_job(TRAINING, MEMBER, SUG, "s3://b/p", [], TEMPLATE, None, SEG, queue_name="gpus",
                  job_labels={"team": "a"}, job_annotations={"note": "x"})
    assert j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus" and j["spec"]["suspend"] is True
    assert j["metadata"]["labels"]["team"] == "a" and j["metadata"]["labels"]["pbt.dev/training"] == "t"
    assert j["metadata"]["annotations"] == {"note": "x", S.DEADLINE_ANNOTATION: "pending"}
    assert j["spec"]["activeDeadlineSeconds"] == 600  # the pending timeout only; the timeout comes at the start
    plain = build_job(TRAINING, MEMBER, SUG, "s3://b/p", [], TEMPLATE, None, SegmentSpec(timeout_seconds=30))
    assert "suspend" not in plain["spec"] and "activeDeadlineSeconds" not in plain["spec"]
    # the queue label given through jobMetadata works the same
    via = build_job(TRAINING, MEMBER, SUG, "s3://b/p", [], TEMPLATE, None, SEG,
                    job_labels={"kueue.x-k8s.io/queue-name": "gpus"})
    assert via["spec"]["suspend"] is True


def test_segment_pods_ask_not_to_be_disrupted_unless_told_otherwise() -> None:
    bare = {"spec": {"containers": [{"name": "train", "image": "x"}]}}
    trainer = {"kubectl.kubernetes.io/default-container": "train"}
    j = build_job(TRAINING, MEMBER, SUG, "s3://b/p", [], bare, None, SEG)
    assert j["spec"]["template"]["metadata"]["annotations"] == {**S.DO_NOT_DISRUPT, **trainer}
    j = build_job(TRAINING, MEMBER, SUG, "s3://b/p", [], TEMPLATE, None, SEG)  # the template's choice wins
    assert j["spec"]["template"]["metadata"]["annotations"] == {
        "karpenter.sh/do-not-disrupt": "false", "cluster-autoscaler.kubernetes.io/safe-to-evict": "false", **trainer}
    off = build_job(TRAINING, MEMBER, SUG, "s3://b/p", [], bare, None, SegmentSpec(protect_from_disruption=False))
    assert off["spec"]["template"]["metadata"]["annotations"] == trainer


# -- whole passes ----------------------------------------------------------------------------------
def training_obj(**over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "population": 2, "parallelism": 2, "seed": 1, "segment": {"steps": 5, "timeoutSeconds": 30},
        "budget": {"segments": 3, "targetScore": 0.9},
        "hyperparameters": {"h": {"type": "float", "min": 0.0, "max": 1.0}},
        "storage": {"uri": "s3://bucket/runs"},
        "template": {"spec": {"containers": [{"name": "train", "image": "x", "command": ["python", "w.py"]}]}},
    }
    spec.update(over)
    return {"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining",
            "metadata": {"name": "t", "namespace": "ns", "uid": "u-t", "generation": 1}, "spec": spec}


def started_world(**over: Any) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """A training after two passes: members created, one Job per member created (not yet running)."""
    t = training_obj(**over)
    p = plan(t, [], [], [], T0)
    members = []
    for m in p.create_members:
        m = copy.deepcopy(m)
        m["metadata"]["uid"] = "u-" + m["metadata"]["name"]
        members.append(m)
    p = plan(t, members, [], [], at(1))
    jobs = []
    for i, j in enumerate(p.create_jobs):
        j = copy.deepcopy(j)
        j["metadata"].update(uid=f"j{i}", creationTimestamp=at(1))
        j["status"] = {} if j["spec"].get("suspend") else {"startTime": at(1)}
        jobs.append(j)
    for m in members:
        m["status"] = p.member_statuses.get(m["metadata"]["name"], {})
    t["status"] = p.status
    return t, members, jobs


def running_pod(j: dict[str, Any], started: str, uid: str) -> dict[str, Any]:
    return pod(j["metadata"]["name"], node="n1", started=started, phase="Running", uid=uid)


def test_pass_sets_the_deadline_from_the_trainers_start_and_reports_waits() -> None:
    t, members, jobs = started_world()
    msg = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    pods = [running_pod(jobs[0], at(40), "p0"),
            pod(jobs[1]["metadata"]["name"], uid="p1", scheduled={"status": "False", "reason": "Unschedulable",
                                                                   "message": msg})]
    p = plan(t, members, jobs, pods, at(45))
    assert p.patch_jobs == {jobs[0]["metadata"]["name"]: S.deadline_patch(S.Deadline(39 + 30, f"running {at(40)}"))}
    st = p.status
    assert st["running"] == 1 and st["waiting"] == 1 and st["selector"] == "pbt.dev/training=t"
    cond = next(c for c in st["conditions"] if c["type"] == C.SEGMENTS_STARTED)
    assert cond["status"] == "False" and cond["reason"] == C.UNSCHEDULABLE and msg in cond["message"]
    ready = next(c for c in st["conditions"] if c["type"] == C.READY)
    assert ready["status"] == "True"  # one segment trains
    m1 = p.member_statuses["t-m001"]
    assert m1["phase"] == "Pending" and m1["waiting"]["reason"] == C.UNSCHEDULABLE and m1["waiting"]["message"] == msg
    ev = [e for e in p.events if e.reason == C.UNSCHEDULABLE]
    assert len(ev) == 1 and ev[0].target == "t-m001" and ev[0].type == "Warning" and msg in ev[0].message
    # nothing trains: Ready=False with the reason, not "SegmentsRunning"
    pods[0] = pod(jobs[0]["metadata"]["name"], uid="p0", scheduled={"status": "False", "reason": "Unschedulable",
                                                                     "message": msg})
    p = plan(t, members, jobs, pods, at(45))
    ready = next(c for c in p.status["conditions"] if c["type"] == C.READY)
    assert ready["status"] == "False" and ready["reason"] == C.UNSCHEDULABLE and msg in ready["message"]


def test_segments_that_cannot_be_scheduled_say_why_on_the_training_even_while_others_train() -> None:
    """Three of four members' pods are Unschedulable: the training's Ready and Progressing messages
    said only "1 segments running, 3 waiting to start, ..." (the why was on the members and in
    SegmentsStarted alone, which `kubectl get pbt` does not show)."""
    t, members, jobs = started_world(population=4, parallelism=4)
    msg = "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."
    unsched = {"status": "False", "reason": "Unschedulable", "message": msg}
    pods = [running_pod(jobs[0], at(40), "p0"),
            *(pod(j["metadata"]["name"], uid=f"p{i}", scheduled=unsched) for i, j in enumerate(jobs) if i)]
    st = plan(t, members, jobs, pods, at(45)).status
    conds = {c["type"]: c for c in st["conditions"]}
    assert st["phase"] == "Running" and st["running"] == 1 and st["waiting"] == 3
    ready, progressing = conds[C.READY], conds[C.PROGRESSING]
    assert ready["status"] == "True" and ready["reason"] == C.SEGMENTS_RUNNING  # one segment trains
    assert ready["message"] == ("1 segment running, 3 waiting to start, 0 queued, 0/12 done: "
                                f"3 Unschedulable (m001, m002, m003): {msg}"), ready
    assert progressing["message"] == ready["message"]
    assert conds[C.SEGMENTS_STARTED]["reason"] == C.UNSCHEDULABLE
    # all four wait: not Ready, with the scheduler's reason (what `kubectl get pbt -o wide` shows as REASON)
    pods[0] = pod(jobs[0]["metadata"]["name"], uid="p0", scheduled=unsched)
    st = plan(t, members, jobs, pods, at(45)).status
    ready = next(c for c in st["conditions"] if c["type"] == C.READY)
    assert st["phase"] == "Running" and st["running"] == 0 and st["waiting"] == 4
    assert ready["status"] == "False" and ready["reason"] == C.UNSCHEDULABLE
    assert ready["message"].endswith(f"4 Unschedulable (m000, m001, m002, m003): {msg}"), ready


def test_timed_out_segment_fails_with_deadline_exceeded() -> None:
    t, members, jobs = started_world(failurePolicy={"maxRetries": 0, "onExhausted": "fail"})
    j = jobs[0]
    j["metadata"]["annotations"][S.DEADLINE_ANNOTATION] = f"running {at(40)}"
    j["status"]["conditions"] = [{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]
    p = plan(t, members, jobs, [], at(80))
    assert p.status["phase"] == "Failed"
    failed = next(c for c in p.status["conditions"] if c["type"] == C.FAILED)
    assert "DeadlineExceeded: timed out: the trainer ran longer than spec.segment.timeoutSeconds (30 s" in failed["message"]
    assert [(n, u) for n, u in p.delete_jobs] == [(jobs[1]["metadata"]["name"], "j1")]  # the other one stops


def test_reaching_the_target_stops_the_running_segments() -> None:
    t, members, jobs = started_world(population=3, parallelism=3)
    pods = [running_pod(j, at(5), f"p{i}") for i, j in enumerate(jobs)]
    done = jobs[0]
    done["status"].update(conditions=[{"type": "Complete", "status": "True"}], completionTime=at(9))
    pods[0] = pod(done["metadata"]["name"], node="n1", phase="Succeeded", uid="p0")
    pods[0]["status"]["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 0, "startedAt": at(5),
                                                                         "message": '{"score": 0.95, "steps": 5}'}}
    p = plan(t, members, jobs, pods, at(10))
    assert p.done and p.status["phase"] == "Succeeded"
    assert sorted(p.delete_jobs) == [(jobs[1]["metadata"]["name"], "j1"), (jobs[2]["metadata"]["name"], "j2")]
    assert not p.create_jobs
    assert {e.reason for e in p.events} >= {C.EV_SEGMENT_STOPPED, C.EV_COMPLETED}


def test_suspend_withdraws_waiting_segments_and_finishes_or_stops_running_ones() -> None:
    for mode, stopped in (("finish", ["j1"]), ("stop", ["j0", "j1"])):
        t, members, jobs = started_world(segment={"steps": 5, "onSuspend": mode})
        t["spec"]["suspend"] = True
        pods = [running_pod(jobs[0], at(5), "p0")]
        p = plan(t, members, jobs, pods, at(10))
        assert sorted(u for _, u in p.delete_jobs) == stopped, mode
        assert p.status["phase"] == "Suspended" and not p.create_jobs and not p.done
        ready = next(c for c in p.status["conditions"] if c["type"] == C.READY)
        assert ready["status"] == "False" and ready["reason"] == C.SUSPENDED
        # resumed: the stopped segments' Jobs come back under the same names (same checkpoint, same attempt)
        t["spec"]["suspend"] = False
        t["status"] = p.status
        left = [j for j in jobs if j["metadata"]["uid"] not in stopped]
        p2 = plan(t, members, left, pods, at(20))
        assert sorted(j["metadata"]["name"] for j in p2.create_jobs) == sorted(
            j["metadata"]["name"] for j in jobs if j["metadata"]["uid"] in stopped)
        assert any(e.reason == C.EV_RESUMED for e in p2.events)


def test_scaling_to_zero_pauses_and_scaling_down_withdraws_only_unstarted_segments() -> None:
    t, members, jobs = started_world(population=3, parallelism=3)
    pods = [running_pod(jobs[0], at(5), "p0")]
    t["spec"]["parallelism"] = 1
    p = plan(t, members, jobs, pods, at(10))
    assert sorted(u for _, u in p.delete_jobs) == ["j1", "j2"]
    t["spec"]["parallelism"] = 0
    p = plan(t, members, jobs[:1], pods, at(11))
    assert p.delete_jobs == [] and p.status["phase"] == "Suspended" and p.status["running"] == 1
    assert parse_spec(t["spec"], name="t").parallelism == 0


def test_disruptions_beyond_the_cap_fail_the_segment_and_stop_its_job() -> None:
    t, members, jobs = started_world(failurePolicy={"maxRetries": 1, "maxDisruptions": 1})
    name = jobs[0]["metadata"]["name"]
    gone = [pod(name, node="n1", started=at(3), phase="Failed", disrupted=True, uid=f"d{i}") for i in range(2)]
    p = plan(t, members, jobs, gone[:1], at(10))
    assert not p.delete_jobs and p.member_statuses["t-m000"]["disruptions"] == 1
    p = plan(t, members, jobs, gone, at(11))
    assert (name, "j0") in p.delete_jobs
    assert p.member_specs["t-m000"]["attempt"] == 1  # retried under the failure policy
    failure = [e for e in p.events if e.reason == C.EV_SEGMENT_FAILED]
    assert failure and "TooManyDisruptions" in failure[0].message and "maxDisruptions (1)" in failure[0].message


def test_disruptions_are_counted_across_pods_the_eviction_api_deleted() -> None:
    t, members, jobs = started_world(failurePolicy={"maxRetries": 0, "onExhausted": "fail", "maxDisruptions": 1})
    name = jobs[0]["metadata"]["name"]
    first = pod(name, node="n1", started=at(3), phase="Failed", disrupted=True, uid="d0")
    p = plan(t, members, jobs, [first], at(10))
    assert p.member_statuses["t-m000"]["disruptedPods"] == [f"{name}/d0"]
    assert [e.reason for e in p.events if e.target == "t-m000"] == [C.EV_DISRUPTED]
    members[0]["status"] = p.member_statuses["t-m000"]
    # the first pod is gone (deleted by the eviction), a second one is disrupted: 2 > 1
    p = plan(t, members, jobs, [pod(name, node="n1", started=at(12), phase="Failed", disrupted=True, uid="d1")], at(20))
    assert p.status["phase"] == "Failed" and (name, "j0") in p.delete_jobs
    assert "TooManyDisruptions: its pod was disrupted 2 times" in next(
        c["message"] for c in p.status["conditions"] if c["type"] == C.FAILED)


def test_a_failed_segments_job_left_running_by_a_crash_is_stopped() -> None:
    t, members, jobs = started_world()
    old = job("t-m000-s00000-a9", uid="old", owner="u-t-m000")
    p = plan(t, members, [*jobs, old], [], at(5))
    assert not p.delete_jobs  # not recorded as failed: nothing to stop
    members[0]["status"]["history"] = [{"suggestion": {
        "member": 0, "segment": 0, "hyperparameters": {"h": 0.5}, "restore": None, "steps_start": 0,
        "steps_budget": 5, "kind": "start", "reason": "x", "attempt": 9}, "status": "failed", "job": "t-m000-s00000-a9",
        "score": None, "steps_end": 0, "error": "TooManyDisruptions: ...", "finishedAt": at(4)}]
    p = plan(t, members, [*jobs, old], [], at(5))
    assert ("t-m000-s00000-a9", "old") in p.delete_jobs
    stranger = job("t-m000-s00000-a9", uid="x", owner="u-other")  # not one of our members: left alone
    assert all(u != "x" for _, u in plan(t, members, [*jobs, stranger], [], at(5)).delete_jobs)


def test_a_succeeded_job_is_never_stopped_before_it_is_marked_complete() -> None:
    t, members, jobs = started_world(budget={"segments": 1})
    pods = []
    for i, j in enumerate(jobs):  # both pods succeeded; the Job controller has not marked the Jobs yet
        p = pod(j["metadata"]["name"], node="n1", phase="Succeeded", uid=f"p{i}")
        p["status"]["containerStatuses"][0]["state"] = {"terminated": {"exitCode": 0, "startedAt": at(3),
                                                                       "message": '{"score": 0.5, "steps": 5}'}}
        pods.append(p)
    p = plan(t, members, jobs, pods, at(6))
    assert p.done and p.status["phase"] == "Succeeded" and not p.delete_jobs
    for m in members:
        m["status"] = p.member_statuses[m["metadata"]["name"]]
    assert not plan(t, members, jobs, pods, at(7)).delete_jobs


def test_queued_job_waits_for_admission_and_wakes_the_operator() -> None:
    t, members, jobs = started_world(queueName="gpus")
    assert all(j["spec"]["suspend"] is True for j in jobs)
    p = plan(t, members, jobs, [], at(5))
    assert p.status["waiting"] == 2 and p.status["running"] == 0
    assert {m["waiting"]["reason"] for m in p.member_statuses.values()} == {C.WAITING_FOR_ADMISSION}
    assert job_event_matters("ADDED", jobs[0])
    assert pod_event_matters("MODIFIED", running_pod(jobs[0], at(5), "p"))
    assert pod_event_matters("MODIFIED", pod(scheduled={"status": "False", "reason": "Unschedulable"}))
    assert not pod_event_matters("MODIFIED", pod(node="n1", scheduled={"status": "True"}))


def test_pending_timeout_names_the_wait_its_pod_had_not_the_moment_after_its_deletion() -> None:
    """At the pending deadline the Job controller deletes the pod first and marks the Job failed
    (FailureTarget) in a later write: a pass in between sees the Job without an active pod. That
    moment must not replace what the member waited for, so the PendingTimeout failure still quotes
    the scheduler (it quoted "WaitingForPod: the Job controller has not created its pod yet")."""
    t, members, jobs = started_world(segment={"steps": 5, "timeoutSeconds": 30, "pendingTimeoutSeconds": 25},
                                     failurePolicy={"maxRetries": 0, "onExhausted": "fail"})
    msg = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    pods = [pod(j["metadata"]["name"], uid=f"p{i}", created=at(1),
                scheduled={"status": "False", "reason": "Unschedulable", "message": msg}) for i, j in enumerate(jobs)]

    def written(p: Any) -> None:  # the pass's member statuses, as the next pass reads them
        for m in members:
            m["status"] = p.member_statuses.get(m["metadata"]["name"], m.get("status") or {})
        t["status"] = p.status

    p = plan(t, members, jobs, pods, at(10))
    assert {m["waiting"]["reason"] for m in p.member_statuses.values()} == {C.UNSCHEDULABLE}
    written(p)
    # the deadline (26 s after the Job's start): the pods are being deleted, the Jobs not yet marked
    for pd in pods:
        pd["metadata"]["deletionTimestamp"] = at(27)
    p = plan(t, members, jobs, pods, at(27))
    assert all(m["status"]["waiting"]["reason"] == C.UNSCHEDULABLE for m in members if m["metadata"]["name"]
               not in p.member_statuses) and all(st["waiting"]["reason"] == C.UNSCHEDULABLE
                                                 for st in p.member_statuses.values())
    assert not [e for e in p.events if e.reason == C.UNSCHEDULABLE]  # no second Warning for the same wait
    written(p)
    # ... gone, and the next pass sees the Jobs failed at their deadline
    for j in jobs:
        j["status"]["conditions"] = [{"type": "FailureTarget", "status": "True", "reason": "DeadlineExceeded"}]
    p = plan(t, members, jobs, [], at(28))
    assert p.status["phase"] == "Failed"
    failed = next(c for c in p.status["conditions"] if c["type"] == C.FAILED)["message"]
    assert "PendingTimeout" in failed and "pendingTimeoutSeconds (25 s)" in failed, failed
    assert f"it was waiting: {C.UNSCHEDULABLE}: {msg}" in failed, failed


def test_a_podless_moment_keeps_only_a_wait_of_the_same_jobs_pod() -> None:
    """kept_waiting: a wait for the Job's pod (scheduler, node, image, starting) outlives the moment
    the pod is gone; a queue's admission, a wait recorded before this Job, and any wait with a pod do not."""
    j = job(start=at(5))
    j["metadata"]["creationTimestamp"] = at(4)
    podless = S.waiting_of(j, [])
    assert podless is not None and podless.reason == C.WAITING_FOR_POD
    unsched = {"reason": C.UNSCHEDULABLE, "message": "0/2 nodes", "since": at(6)}
    assert S.kept_waiting(podless, unsched, j) == S.Waiting(C.UNSCHEDULABLE, "0/2 nodes", at(6))
    starting = {"reason": C.STARTING, "message": "scheduled on node n1; ContainerCreating", "since": at(6)}
    assert S.kept_waiting(podless, starting, j) == S.Waiting(C.STARTING, starting["message"], at(6))
    assert S.kept_waiting(podless, {**unsched, "since": at(3)}, j) == podless  # an earlier Job's pod
    assert S.kept_waiting(podless, {"reason": C.UNSCHEDULABLE, "message": "x"}, j) == podless  # whose, unknown
    admission = {"reason": C.WAITING_FOR_ADMISSION, "message": "queue", "since": at(4)}
    assert S.kept_waiting(podless, admission, j) == podless  # admitted now: that wait is over
    assert S.kept_waiting(podless, None, j) == podless
    scheduled = S.Waiting(C.STARTING, "scheduled on node n1; ContainerCreating", at(6))
    assert S.kept_waiting(scheduled, unsched, j) == scheduled  # a pod tells its own state
    assert S.kept_waiting(None, unsched, j) is None  # the trainer started
