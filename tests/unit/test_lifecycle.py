"""Lifecycle pieces around the reconcile plan: ownership by UID, API error classification, the checks and
dry-run objects used when a training is created, and refused Jobs recorded as failed attempts (which
the plan then handles under spec.failurePolicy). The API server side is in tests/e2e/test_lifecycle_cluster.py."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pbt_operator.core.types import Suggestion
from pbt_operator.kube import conditions as C
from pbt_operator.kube import lifecycle
from pbt_operator.kube.admission import MAX_NAME, cluster_problems, probe_job, probe_pod
from pbt_operator.kube.apierrors import classify
from pbt_operator.kube.builders import job_name, member_name
from pbt_operator.kube.ownership import ForeignChild, leftovers_message, owner_uids, split_owned
from pbt_operator.kube.reconcile import plan
from pbt_operator.spec import parse_spec
from test_reconcile import FakeCluster, training_obj


def obj(name: str, *owners: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": "u-" + name,
                         "ownerReferences": [{"uid": o, "name": "x", "kind": "K", "apiVersion": "v"} for o in owners]}}


def test_children_are_ours_only_through_owner_uids() -> None:
    mine, other = split_owned([obj("a", "t1"), obj("b", "t0"), obj("c"), obj("d", "t0", "t1")], ["t1", None])
    assert [o["metadata"]["name"] for o in mine] == ["a", "d"]
    assert [o["metadata"]["name"] for o in other] == ["b", "c"]
    assert owner_uids(obj("d", "t0", "t1")) == {"t0", "t1"}
    assert split_owned([obj("a", "t1")], []) == ([], [obj("a", "t1")])


def test_leftovers_message_names_what_is_left() -> None:
    assert leftovers_message({"PopulationMember": [], "Job": []}) is None
    msg = leftovers_message({"PopulationMember": ["x-m000", "x-m001", "x-m002", "x-m003"], "Job": ["x-m000-s00000-a0"]})
    assert msg is not None
    assert "4 PopulationMembers (x-m000, x-m001, x-m002 and 1 more)" in msg and "1 Job (" in msg
    assert "segment 0" in msg
    e = ForeignChild("Job", "x-m000-s00000-a0", {"u-old"})
    assert "x-m000-s00000-a0" in str(e) and "u-old" in str(e)


class FakeApiException(Exception):
    def __init__(self, status: int, body: Any, reason: str = ""):
        super().__init__(reason)
        self.status, self.body, self.reason = status, body, reason


def status_body(code: int, reason: str, message: str, causes: list[dict[str, str]] | None = None) -> str:
    return json.dumps({"kind": "Status", "status": "Failure", "code": code, "reason": reason, "message": message,
                       "details": {"causes": causes or []}})


def test_classify_tells_refusals_from_transient_errors() -> None:
    inv = classify(FakeApiException(422, status_body(422, "Invalid", "Job.batch \"x\" is invalid", [
        {"field": "spec.template.spec.containers[0].resources.limits[cpu]", "message": "Invalid value: \"lots\""}])))
    assert inv.refused and not inv.quota and inv.reason == "Invalid"
    assert "spec.template.spec.containers[0].resources.limits[cpu]: Invalid value: \"lots\"" in inv.message
    quota = classify(FakeApiException(403, status_body(403, "Forbidden", 'pods "x" is forbidden: exceeded quota: q, '
                                                                         "requested: pods=1, used: pods=0, limited: pods=0")))
    assert quota.refused and quota.quota and "exceeded quota" in quota.summary()
    hook = classify(FakeApiException(403, status_body(403, "Forbidden", 'admission webhook "p" denied the request')))
    assert hook.refused and not hook.quota
    rbac = classify(FakeApiException(403, status_body(403, "Forbidden", 'jobs.batch is forbidden: User "op" cannot '
                                                                        'create resource "jobs" in API group "batch"')))
    assert not rbac.refused  # the installation's problem: retried, not charged to the training
    young = classify(FakeApiException(403, status_body(403, "Forbidden", 'pods "x" is forbidden: error looking up '
                                                                         'service account ns/default: not found')))
    assert not young.refused
    gone = classify(FakeApiException(403, status_body(403, "Forbidden", 'jobs.batch "t-m002-s00001-a0" is forbidden: '
                                                                        "unable to create new content in namespace t7 "
                                                                        "because it is being terminated")))
    assert not gone.refused  # the namespace is going away: no failed attempt charged to a segment
    for code in (429, 500, 503, 504):
        assert not classify(FakeApiException(code, status_body(code, "TooManyRequests", "later"))).refused
    assert not classify(ConnectionResetError("reset")).refused
    assert classify(FakeApiException(400, b"not json", "Bad Request")).message == "Bad Request"


def test_a_refused_pass_is_a_warning_on_the_training_held_back_when_it_repeats() -> None:
    # A status write refused by a schema rule (or a webhook) was retried every 30 s with nothing but a
    # WARNING in the operator's log: `kubectl describe` showed nothing.
    from pbt_operator.kube.throttle import EventThrottle

    err = classify(FakeApiException(422, status_body(422, "Invalid", 'PopulationTraining.pbt.dev "t" is invalid: '
                                                                     "spec: Invalid value: spec.template is required")))
    ev = lifecycle.pass_refused(err)
    assert ev is not None and ev.target == "training" and ev.type == "Warning" and ev.reason == C.EV_WRITE_REFUSED
    assert "spec.template is required" in ev.message and "retried" in ev.message
    assert lifecycle.pass_refused(classify(ConnectionResetError("reset"))) is None  # transient: only retried
    assert lifecycle.pass_refused(classify(FakeApiException(503, status_body(503, "ServiceUnavailable", "x")))) is None
    throttle = EventThrottle()
    assert throttle.admit([ev], 0.0)[0] == [ev]
    assert throttle.admit([ev], 30.0)[0] == []  # the next retry, 30 s later: not another Event


def test_refused_this_generation_waits_for_an_edit() -> None:
    t = training_obj()
    assert not lifecycle.refused_this_generation(t)
    status, _ = lifecycle.invalid_spec(t, "spec.template.spec.containers[0].image: Required value", "2026-01-01T00:00:00Z")
    t["status"] = status
    assert lifecycle.refused_this_generation(t)  # no new dry run for the same spec
    t["metadata"]["generation"] += 1
    assert not lifecycle.refused_this_generation(t)  # edited: dry-run it again


def test_a_finished_training_is_looked_at_again_when_its_spec_is_edited() -> None:
    # The daemon of a finished training ended: raising budget.segments afterwards did nothing until the
    # operator restarted, and then it suddenly continued. Now it idles until the generation moves.
    c = FakeCluster(training_obj(budget={"segments": 1}))
    p = None
    for _ in range(50):
        p = c.reconcile()
        if p.done:
            break
        for job in c.running():
            c.finish(job)
    assert p is not None and p.done
    seen = lifecycle.generation_seen(p)
    assert seen == c.training["metadata"]["generation"]
    assert not lifecycle.edited_since(c.training, seen)
    c.training["metadata"]["generation"] += 1  # kubectl patch ... budget.segments: 2
    assert lifecycle.edited_since(c.training, seen)
    assert not lifecycle.edited_since(c.training, None)  # nothing to compare: idle, never a busy loop


def test_cluster_problems_name_the_field() -> None:
    def spec(**over: Any) -> Any:
        t = training_obj(**over)
        return parse_spec(t["spec"], name="toy")

    assert cluster_problems("toy", spec()) == []
    long = "a" * (MAX_NAME + 15)
    assert any(p.startswith("metadata.name: must be at most 40") for p in cluster_problems(long, spec()))
    mem = cluster_problems("toy", spec(storage={"uri": "mem://x/"}, worker={"executor": "inline", "function": "m:f"}))
    assert len(mem) == 1 and mem[0].startswith("spec.storage.uri: mem://")
    unmounted = cluster_problems("toy", spec(storage={"uri": "file:///data/ckpt"}))
    assert len(unmounted) == 1 and "mount a shared volume" in unmounted[0] and "/data/ckpt" in unmounted[0]
    t = training_obj(storage={"uri": "file:///data/ckpt"})
    t["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": "d", "mountPath": "/data"}]
    assert cluster_problems("toy", parse_spec(t["spec"], name="toy")) == []
    t["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [{"name": "d", "mountPath": "/dat"}]
    assert len(cluster_problems("toy", parse_spec(t["spec"], name="toy"))) == 1
    t = training_obj()
    t["spec"]["template"]["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "lots", "memory": "1Gi",
                                                                             "nvidia.com/gpu": 1},
                                                                  "requests": {"cpu": "500m"}}
    assert cluster_problems("toy", parse_spec(t["spec"], name="toy")) == [
        "spec.template.spec.containers[0].resources.limits[cpu]: 'lots' is not a quantity (e.g. 500m, 2, 1Gi)"]


def test_probe_objects_are_the_first_segment_as_it_will_run() -> None:
    t = training_obj()
    sp = parse_spec(t["spec"], name="toy", namespace="ns")
    job = probe_job(t, sp, "s3://bucket/runs")
    assert job["metadata"]["name"] == "toy-m000-s00000-a0"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-toy"
    c = FakeCluster(training_obj())
    c.reconcile()
    c.reconcile()
    real = c.jobs["toy-m000-s00000-a0"]
    assert job["spec"] == real["spec"]  # the dry run judges exactly what will be created
    assert real["spec"]["ttlSecondsAfterFinished"] == 900  # finished segment Jobs are cleaned up
    pod = probe_pod(job)
    assert pod["kind"] == "Pod" and pod["metadata"]["namespace"] == "ns"
    assert pod["spec"] == job["spec"]["template"]["spec"]
    assert pod["metadata"]["labels"]["pbt.dev/training"] == "toy"


def test_refused_job_is_a_failed_attempt_under_the_failure_policy() -> None:
    c = FakeCluster(training_obj(failurePolicy={"maxRetries": 1, "onExhausted": "fail"}))
    c.reconcile()
    p = c.reconcile()
    refused = next(j for j in p.create_jobs if j["metadata"]["name"] == "toy-m000-s00000-a0")
    del c.jobs[refused["metadata"]["name"]]  # the API server said no: it does not exist
    err = classify(FakeApiException(403, status_body(403, "Forbidden", "exceeded quota: gpus")))
    mname = member_name("toy", 0)
    st, ev = lifecycle.refused_segment(c.members[mname], None, refused, err, "2026-01-01T00:10:00Z")  # type: ignore[misc]
    assert ev.reason == C.EV_JOB_REFUSED and ev.target == mname and "exceeded quota: gpus" in ev.message
    assert st["history"][-1]["status"] == "failed" and st["history"][-1]["job"] == refused["metadata"]["name"]
    assert lifecycle.refused_segment(c.members[mname], st, refused, err, "t") is None  # recorded once
    c.members[mname]["status"] = st
    p = c.reconcile()
    retry = [j["metadata"]["name"] for j in p.create_jobs]
    assert retry == ["toy-m000-s00000-a1"]  # the plan retried it: attempt 1 (maxRetries 1)
    del c.jobs["toy-m000-s00000-a1"]
    st, _ = lifecycle.refused_segment(c.members[mname], None, p.create_jobs[0], err, "t")  # type: ignore[misc]
    c.members[mname]["status"] = st
    c.reconcile()
    assert c.training["status"]["phase"] == "Failed"  # onExhausted: fail
    assert "exceeded quota" in next(x for x in c.training["status"]["conditions"] if x["type"] == C.FAILED)["message"]


def test_refusal_of_an_outdated_job_is_ignored() -> None:
    c = FakeCluster(training_obj())
    c.reconcile()
    c.reconcile()
    job = c.jobs[job_name("toy", Suggestion(0, 0, {}, None, 0, 5, "start"))]
    member = c.members[member_name("toy", 0)]
    member["spec"]["segment"]["attempt"] = 1  # the member moved on
    assert lifecycle.refused_segment(member, None, job, classify(FakeApiException(422, "{}")), "t") is None


def test_conditions_for_waits_and_refusals() -> None:
    t = training_obj()
    st, evs = lifecycle.waiting_for_leftovers(t, "waiting for 2 PopulationMember(s)", "t1")
    assert st is not None and st["phase"] == "Pending" and [e.reason for e in evs] == [C.EV_NAME_CONFLICT]
    conds = {x["type"]: x for x in st["conditions"]}
    assert conds[C.READY]["status"] == "False" and conds[C.READY]["reason"] == C.NAME_CONFLICT
    t["status"] = st
    assert lifecycle.waiting_for_leftovers(t, "waiting for 2 PopulationMember(s)", "t2") == (None, [])

    t = training_obj()
    assert lifecycle.jobs_accepted(t, None, True, C.ACCEPTED, "ok", "t") is None  # nothing to recover from
    patch = lifecycle.jobs_accepted(t, None, False, C.QUOTA_EXCEEDED, "exceeded quota", "t")
    assert patch is not None
    t["status"] = patch
    assert lifecycle.jobs_accepted(t, None, False, C.QUOTA_EXCEEDED, "exceeded quota", "t") is None
    back = lifecycle.jobs_accepted(t, None, True, C.ACCEPTED, "ok", "t2")
    assert back is not None and next(x for x in back["conditions"] if x["type"] == C.JOBS_ACCEPTED)["status"] == "True"
    # after a refusal, JobsAccepted=True names the Job the API server took ("segment Jobs are accepted"
    # under the reason Accepted said nothing more)
    assert lifecycle.accepted_again(["toy-m000-s00001-a0"]) == (
        "the API server accepts this training's segment Jobs again: it created toy-m000-s00001-a0")
    assert lifecycle.accepted_again(["a", "b", "c"]).endswith("it created a and 2 more")
    assert lifecycle.accepted_again([]) == "the API server accepts this training's segment Jobs again"

    st, evs = lifecycle.invalid_spec(training_obj(), "spec.template...: Invalid value", "t")
    assert st["phase"] == "Failed" and [e.reason for e in evs] == [C.EV_INVALID]
    t = training_obj()
    t["status"] = st
    assert lifecycle.invalid_spec(t, "spec.template...: Invalid value", "t")[1] == []  # one Event, not one a pass


def test_plan_never_reads_a_foreign_member_as_its_own() -> None:
    """The handler hands the plan only owned members (api.World); a plan over none starts from 0."""
    t = training_obj()
    p = plan(t, [], [], [], "t")
    assert sorted(m["metadata"]["name"] for m in p.create_members) == [member_name("toy", i) for i in range(6)]
    assert all(m["metadata"]["ownerReferences"][0]["uid"] == "u-toy" for m in p.create_members)
    assert all(m["spec"]["segment"]["segment"] == 0 for m in p.create_members)


@pytest.mark.parametrize("code", [400, 413, 422])
def test_invalid_requests_are_refusals(code: int) -> None:
    assert classify(FakeApiException(code, status_body(code, "Invalid", "bad"))).refused


def test_job_and_pod_watches_select_our_labels_on_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import kopf
    from kopf._cogs.structs.references import Resource
    from pbt_operator.kube import builders
    from pbt_operator.kube.handlers import configure

    monkeypatch.setenv("PBT_METRICS_PORT", "0")
    monkeypatch.setenv("PBT_JOB_TTL_SECONDS", "0")
    monkeypatch.setattr(builders, "JOB_TTL_SECONDS", 900)
    settings = kopf.OperatorSettings()
    configure(settings=settings)
    assert builders.JOB_TTL_SECONDS is None  # 0: keep finished Jobs
    sel = settings.watching.label_selectors
    assert list(sel.collect(Resource("batch", "v1", "jobs"))) == ["pbt.dev/training"]
    assert list(sel.collect(Resource("", "v1", "pods"))) == ["pbt.dev/training"]
    assert not list(sel.collect(Resource("pbt.dev", "v1alpha1", "populationtrainings")))


def test_watch_handlers_success_lines_leave_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the watch handlers' success lines go: the daemon's, and every failure, stay."""
    import logging

    import kopf
    from pbt_operator.kube.handlers import configure

    monkeypatch.setenv("PBT_METRICS_PORT", "0")
    log = logging.getLogger("kopf.objects")
    monkeypatch.setattr(log, "filters", [])
    configure(settings=kopf.OperatorSettings())
    configure(settings=kopf.OperatorSettings())  # a second start adds no second filter
    assert len(log.filters) == 1
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep()
    log.addHandler(keep)
    monkeypatch.setattr(log, "level", logging.INFO)
    try:
        for line in ("Handler 'job-events' succeeded.", "Handler 'pod-events' succeeded.",
                     "Handler 'training-events' succeeded.", "Handler 'reconcile' succeeded.",
                     "Handler 'job-events' failed with an exception and will try again in 60 seconds: boom"):
            log.info(line)
    finally:
        log.removeHandler(keep)
    assert seen == ["Handler 'reconcile' succeeded.",
                    "Handler 'job-events' failed with an exception and will try again in 60 seconds: boom"]


def test_finished_training_is_not_ready() -> None:
    """API conventions: once finished, Ready is False (nothing runs); Succeeded says how it ended."""
    import random

    from test_reconcile import drive

    c = FakeCluster(training_obj())
    drive(c, random.Random(1))
    conds = {x["type"]: x for x in c.training["status"]["conditions"]}
    assert c.training["status"]["phase"] == "Succeeded"
    assert conds[C.SUCCEEDED]["status"] == "True" and conds[C.READY]["status"] == "False"
    assert conds[C.READY]["reason"] == C.COMPLETED


def test_members_at_a_synchronous_barrier_are_waiting_not_done() -> None:
    c = FakeCluster(training_obj(mode="synchronous", population=4, parallelism=4))
    c.reconcile()
    c.reconcile()
    first = c.running()[0]
    c.finish(first)
    c.reconcile()
    mname = first["metadata"]["ownerReferences"][0]["name"]
    assert c.members[mname]["status"]["phase"] == "Waiting"  # generation 0 not finished by the others
    others = [m for n, m in c.members.items() if n != mname]
    assert {m["status"]["phase"] for m in others} == {"Running"}
    for job in c.running():
        c.finish(job)
    c.reconcile()
    assert {m["status"]["phase"] for m in c.members.values()} <= {"Running", "Queued"}  # all decided again


def test_history_entries_leave_out_defaults_and_read_back_the_same() -> None:
    from pbt_operator.core.types import Record
    from pbt_operator.kube.builders import record_entry

    first = Record(Suggestion(2, 0, {"lr": 0.1}, None, 0, 5, "start", reason="initial sample"), 0.5, 5)
    later = Record(Suggestion(2, 3, {"lr": 0.12}, (1, 2), 15, 5, "exploit", score_before=0.4, donor=1,
                              reason="exploit: ...", attempt=1), None, 15, {"loss": 2.0}, "failed", "boom", 3.5)
    for rec in (first, later):
        entry = record_entry(rec, "2026-01-01T00:00:00Z", "j")
        assert Record.from_dict(entry) == rec
        assert entry["finishedAt"] == "2026-01-01T00:00:00Z" and entry["job"] == "j"
    small = record_entry(first, "t", "j")
    assert not {"donor", "score_before", "attempt", "restore"} & set(small["suggestion"])
    assert not {"metrics", "error", "duration"} & set(small)
    assert len(json.dumps(small)) < len(json.dumps({**first.to_dict(), "finishedAt": "t", "job": "j"}))
