"""The operator's reconcile plan, driven against an in-memory stand-in for the API server.

The stand-in applies each Plan's writes in the operator's order and finishes Jobs with a toy worker
whose score depends on the restored checkpoint, so exploits that copy only hyperparameters would
show. Crashes are simulated by applying only a prefix of a plan's writes. The real API server path
is covered by tests/e2e.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
import re
from typing import Any

import pytest
from pbt_operator.core.display import counted
from pbt_operator.core.types import Suggestion
from pbt_operator.kube import conditions as C
from pbt_operator.kube.builders import DEFAULT_CONTAINER, LABEL_TRAINING, job_name, member_name
from pbt_operator.kube.mergepatch import apply_merge_patch, merge_patch
from pbt_operator.kube.reconcile import MAX_SELECTED_JOBS, job_outcome, next_cache, plan, world_selectors

CKPT = re.compile(r"/m(\d{3})/(\d{5})/$")


def training_obj(**spec_over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "population": 6, "parallelism": 3, "mode": "asynchronous", "seed": 3,
        "segment": {"steps": 5}, "budget": {"segments": 4},
        "hyperparameters": {"h0": {"type": "float", "min": 0.0, "max": 1.0},
                            "h1": {"type": "float", "min": 0.0, "max": 1.0}},
        "storage": {"uri": "s3://bucket/runs"},
        "template": {"spec": {"containers": [{"name": "w", "image": "x", "command": ["python", "w.py"],
                                              "resources": {"limits": {"nvidia.com/gpu": 1}}}],
                              "tolerations": [{"key": "gpu", "operator": "Exists"}],
                              "nodeSelector": {"pool": "gpu"}}},
    }
    spec.update(spec_over)
    return {"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining",
            "metadata": {"name": "toy", "namespace": "ns", "uid": "u-toy", "generation": 1}, "spec": spec}


def matches(selector: str, labels: dict[str, str]) -> bool:
    """The label-selector forms the operator sends: `k=v` and `k in (a,b)`, comma-joined."""
    for term in re.findall(r"[^,(]+\([^)]*\)|[^,]+", selector):
        if " in (" in term:
            key, values = term.split(" in (")
            if labels.get(key.strip()) not in values.rstrip(")").split(","):
                return False
        else:
            key, value = term.split("=")
            if labels.get(key) != value:
                return False
    return True


class FakeCluster:
    def __init__(self, training: dict[str, Any], select: bool = False, cache: bool = False):
        """`select`: each pass reads only the Jobs and pods `world_selectors` asks for, as the
        operator does; otherwise it gets everything. `cache`: passes reuse the previous pass's engine
        (reconcile.EngineCache) as the operator's daemon does; members get resourceVersions."""
        self.select = select
        self.use_cache = cache
        self.cache: Any = None
        self.rv = 0
        self.training = training
        self.members: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.ckpt: dict[tuple[int, int], float] = {}
        self.clock = 0
        self.max_running = 0
        self.events: list[Any] = []
        self.collected: set[tuple[int, int]] = set()
        self.read_sizes: list[tuple[int, int]] = []
        self.status_writes = 0  # member status patches

    def now(self) -> str:
        self.clock += 1
        return f"2026-01-01T00:{self.clock // 60:02d}:{self.clock % 60:02d}Z"

    def apply(self, p: Any, limit: int | None = None) -> None:
        """Apply the writes in the operator's order; `limit` stops after that many (a crash)."""
        writes: list[Any] = []
        for m in p.create_members:
            writes.append(("member", m))
        for name, st in p.member_statuses.items():
            writes.append(("mstatus", name, st))
        for name, seg in p.member_specs.items():
            writes.append(("mspec", name, seg))
        for j in p.create_jobs:
            writes.append(("job", j))
        writes.append(("status", p.status))
        for w in writes[:limit]:
            if w[0] == "member":
                m = copy.deepcopy(w[1])
                m["metadata"]["uid"] = "u-" + m["metadata"]["name"]
                self.members.setdefault(m["metadata"]["name"], m)
            elif w[0] == "mstatus":  # a merge patch, as the operator sends it (kube/mergepatch.py)
                self.members[w[1]]["status"] = apply_merge_patch(self.members[w[1]].get("status"), merge_patch(
                    p.prior_members.get(w[1]) or {}, copy.deepcopy(w[2]), keep=("conditions",)))
                self.status_writes += 1
                self.bump(self.members[w[1]], p)
            elif w[0] == "mspec":
                self.members[w[1]]["spec"]["segment"] = copy.deepcopy(w[2])
                self.bump(self.members[w[1]], p)
            elif w[0] == "job":
                self.jobs.setdefault(w[1]["metadata"]["name"], copy.deepcopy(w[1]))
            else:
                self.training["status"] = apply_merge_patch(self.training.get("status"),
                                                            merge_patch(p.prior_status, copy.deepcopy(w[1])))
        if limit is None:
            self.events += p.events
            self.collected = set(p.collected)  # replaced, as the daemon does: a plan may give some back

    def bump(self, member: dict[str, Any], p: Any) -> None:
        """A write's new resourceVersion, as the API server's answer gives it to the operator."""
        self.rv += 1
        member["metadata"]["resourceVersion"] = str(self.rv)
        p.versions[member["metadata"]["name"]] = str(self.rv)

    def running(self) -> list[dict[str, Any]]:
        return [j for j in self.jobs.values() if not (j.get("status") or {}).get("conditions")]

    def finish(self, job: dict[str, Any], fail: bool = False, result: dict[str, Any] | None = None) -> None:
        """`result`: more keys for the result the worker writes (its termination message)."""
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        c = json.loads(env["PBT_SEGMENT"])
        before = 0.0
        if c["restore"]:
            mm = CKPT.search(c["restore"])
            assert mm, c["restore"]
            before = self.ckpt[(int(mm.group(1)), int(mm.group(2)))]  # KeyError = restoring a missing ckpt
        hp = c["hyperparameters"]
        score = before + 0.1 * hp["h0"] + 0.2 * hp["h1"]
        self.ckpt[(c["member"], c["segment"])] = score
        t = self.now()
        term: dict[str, Any]
        if fail:
            term = {"exitCode": 1, "message": "Traceback: boom"}
            job["status"] = {"conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]}
        else:
            term = {"exitCode": 0, "message": json.dumps({"score": score, "steps": c["steps"]["start"] + 5,
                                                          **(result or {})})}
            job["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "completionTime": t}
        self.pods.append({"metadata": {"name": job["metadata"]["name"] + "-p", "labels": {
            "job-name": job["metadata"]["name"], "batch.kubernetes.io/job-name": job["metadata"]["name"],
            LABEL_TRAINING: "toy"}},
            "status": {"containerStatuses": [{"state": {"terminated": term}}]}})

    def reconcile(self, limit: int | None = None) -> Any:
        members, jobs, pods = list(self.members.values()), list(self.jobs.values()), self.pods
        if self.select:
            job_sel, pod_sel = world_selectors("toy", members)
            jobs = [j for j in jobs if job_sel is not None and matches(job_sel, j["metadata"]["labels"])]
            pods = [q for q in pods if pod_sel is not None and matches(pod_sel, q["metadata"]["labels"])]
            self.read_sizes.append((len(jobs), len(pods)))
        cache, self.cache = self.cache, None
        p = plan(self.training, members, jobs, pods, self.now(), self.collected, cache=cache)
        self.apply(p, limit)
        if self.use_cache and limit is None:
            self.cache = next_cache(self.training, members, p)
        self.max_running = max(self.max_running, len(self.running()))
        return p


def drive(cluster: FakeCluster, rng: random.Random, crash_every: int = 0, fail_jobs: set[str] | None = None,
          max_passes: int = 2000) -> None:
    for i in range(max_passes):
        limit = None
        if crash_every and i % crash_every == crash_every - 1:
            limit = rng.randint(0, 4)
        p = cluster.reconcile(limit)
        if limit is None and p.done:
            return
        running = cluster.running()
        if running and not p.create_members:
            job = rng.choice(running)
            cluster.finish(job, fail=job["metadata"]["name"] in (fail_jobs or set()))
    raise AssertionError("training did not finish")


def segments(cluster: FakeCluster) -> list[tuple[int, int]]:
    return sorted((int(j["metadata"]["labels"]["pbt.dev/member"]), int(j["metadata"]["labels"]["pbt.dev/segment"]))
                  for j in cluster.jobs.values())


@pytest.mark.parametrize("mode", ["asynchronous", "synchronous"])
def test_runs_to_success_within_parallelism(mode: str) -> None:
    c = FakeCluster(training_obj(mode=mode))
    drive(c, random.Random(0))
    st = c.training["status"]
    assert st["phase"] == "Succeeded"
    conds = {x["type"]: x for x in st["conditions"]}
    assert conds[C.SUCCEEDED]["status"] == "True" and conds[C.FAILED]["status"] == "False"
    assert c.max_running <= 3
    # every (member, segment) ran exactly once
    segs = segments(c)
    assert segs == sorted({(m, k) for m in range(6) for k in range(4)})
    assert st["best"]["score"] == max(c.ckpt.values())
    assert st["schedule"][-1]["score"] == st["best"]["score"]
    assert any(e.reason == C.EV_EXPLOITED for e in c.events)
    assert len(c.members) == 6
    for m in c.members.values():
        assert m["status"]["phase"] == "Done"
        assert len([h for h in m["status"]["history"] if h["status"] == "done"]) == 4


def test_jobs_keep_template_and_carry_contract() -> None:
    c = FakeCluster(training_obj(storage={"uri": "s3://bucket/runs", "credentialsSecret": "s3"}))
    c.reconcile()
    c.reconcile()
    assert len(c.jobs) == 3
    job = c.jobs[job_name("toy", Suggestion(0, 0, {}, None, 0, 5, "start"))]
    pod = job["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3"
    contract = json.loads(env["PBT_SEGMENT"]["value"])
    assert contract["checkpoint"] == "s3://bucket/runs/toy/m000/00000/" and contract["restore"] is None
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "Ignore" and rules[0]["onPodConditions"][0]["type"] == "DisruptionTarget"
    assert job["metadata"]["ownerReferences"][0]["name"] == member_name("toy", 0)


def test_synchronous_crashes_give_the_same_result_as_an_uninterrupted_run() -> None:
    ref = FakeCluster(training_obj(mode="synchronous"))
    drive(ref, random.Random(1))
    for seed in range(3):
        c = FakeCluster(training_obj(mode="synchronous"))
        drive(c, random.Random(100 + seed), crash_every=3)
        assert segments(c) == segments(ref)  # nothing lost, nothing repeated
        assert c.training["status"]["best"] == ref.training["status"]["best"]
        assert c.training["status"]["schedule"] == ref.training["status"]["schedule"]


def test_asynchronous_crashes_lose_and_repeat_nothing() -> None:
    for seed in range(3):
        c = FakeCluster(training_obj())
        drive(c, random.Random(seed), crash_every=2)
        assert c.training["status"]["phase"] == "Succeeded"
        assert segments(c) == sorted({(m, k) for m in range(6) for k in range(4)})


@pytest.mark.parametrize("mode", ["asynchronous", "synchronous"])
def test_selective_reads_decide_exactly_as_full_reads(mode: str) -> None:
    """Reading only the current segments' Jobs and pods changes nothing: with crashes and failures,
    the same segments run once each and the same best member and schedule come out."""
    bad = {"toy-m001-s00002-a0"}
    ref = FakeCluster(training_obj(mode=mode))
    drive(ref, random.Random(7), crash_every=3, fail_jobs=bad)
    sel = FakeCluster(training_obj(mode=mode), select=True)
    drive(sel, random.Random(7), crash_every=3, fail_jobs=bad)
    assert sorted(sel.jobs) == sorted(ref.jobs)
    assert sel.training["status"]["best"] == ref.training["status"]["best"]
    assert sel.training["status"]["schedule"] == ref.training["status"]["schedule"]
    assert sel.training["status"]["failures"] == ref.training["status"]["failures"] == 1
    # ... while reading far less than everything once the history has grown
    late_jobs, late_pods = sel.read_sizes[-1]
    assert len(sel.jobs) == 6 * 4 + 1 and late_pods <= 6 and late_jobs < len(sel.jobs) // 2


def test_world_selectors() -> None:
    def member(i: int, seg: int, attempt: int = 0, **status: Any) -> dict[str, Any]:
        sug = Suggestion(member=i, segment=seg, hyperparameters={"h0": 0.1}, restore=None, steps_start=0,
                         steps_budget=5, kind="start", attempt=attempt)
        return {"spec": {"segment": sug.to_dict()}, "status": status}

    assert world_selectors("toy", []) == (None, None)
    jobs, pods = world_selectors("toy", [member(0, 3), member(1, 2, attempt=1, phase="Running"), member(2, 3),
                                         member(3, 4, phase="Queued"), member(4, 5, completedSegment=5),
                                         member(5, 6, completedSegment=5, phase="Pending")])
    assert jobs == f"{LABEL_TRAINING}=toy,pbt.dev/member in (0,1,2,5),pbt.dev/segment in (2,3,6)"
    assert pods == (f"{LABEL_TRAINING}=toy,batch.kubernetes.io/job-name in "
                    "(toy-m000-s00003-a0,toy-m001-s00002-a1,toy-m002-s00003-a0,toy-m005-s00006-a0)")
    queued = [member(i, 1, phase="Queued") for i in range(MAX_SELECTED_JOBS + 1)]
    assert world_selectors("toy", [*queued, member(999, 1)])[1] == \
        f"{LABEL_TRAINING}=toy,batch.kubernetes.io/job-name in (toy-m999-s00001-a0)"
    many = [member(i, 1) for i in range(MAX_SELECTED_JOBS + 1)]
    assert world_selectors("toy", many) == (f"{LABEL_TRAINING}=toy", f"{LABEL_TRAINING}=toy")
    broken = [member(0, 1), {"spec": {"segment": {"member": 0}}}]
    assert world_selectors("toy", broken) == (f"{LABEL_TRAINING}=toy", f"{LABEL_TRAINING}=toy")


def test_failed_segment_is_retried_then_replaced() -> None:
    c = FakeCluster(training_obj(failurePolicy={"maxRetries": 1, "onExhausted": "replace"}))
    bad = {"toy-m002-s00001-a0", "toy-m002-s00001-a1"}
    drive(c, random.Random(0), fail_jobs=bad)
    assert c.training["status"]["phase"] == "Succeeded"
    assert "toy-m002-s00001-a2" in c.jobs  # the replacement
    reasons = [e.reason for e in c.events]
    assert C.EV_SEGMENT_FAILED in reasons and C.EV_MEMBER_REPLACED in reasons


def test_retry_of_an_exploit_is_announced_as_a_retry_not_a_second_exploit() -> None:
    base = FakeCluster(training_obj())
    drive(base, random.Random(0))
    m, k = next((h["suggestion"]["member"], h["suggestion"]["segment"]) for mo in base.members.values()
                for h in mo["status"]["history"] if h["suggestion"]["kind"] == "exploit")
    mname = f"toy-m{m:03d}"
    c = FakeCluster(training_obj())
    drive(c, random.Random(0), fail_jobs={f"toy-m{m:03d}-s{k:05d}-a0"})
    assert c.training["status"]["phase"] == "Succeeded" and f"toy-m{m:03d}-s{k:05d}-a1" in c.jobs
    mine = [e for e in c.events if e.target == mname]
    assert [e.reason for e in mine].count(C.EV_SEGMENT_RETRIED) == 1
    exploited = [e.reason for e in base.events if e.target == mname].count(C.EV_EXPLOITED)
    assert [e.reason for e in mine].count(C.EV_EXPLOITED) == exploited  # the retry is not a new exploit


def test_failure_policy_fail_marks_training_failed() -> None:
    c = FakeCluster(training_obj(failurePolicy={"maxRetries": 0, "onExhausted": "fail"}))
    drive(c, random.Random(0), fail_jobs={"toy-m001-s00000-a0"})
    st = c.training["status"]
    assert st["phase"] == "Failed"
    failed = next(x for x in st["conditions"] if x["type"] == C.FAILED)
    assert failed["status"] == "True" and failed["reason"] == C.SEGMENT_FAILED and "member 1" in failed["message"]


def test_members_stopped_before_finishing_a_segment_still_show_their_hyperparameters() -> None:
    # When the training failed (or reached its target) while members were on their first segment, those
    # members had no finished segment and no pending one: `kubectl get pbtm` showed an empty
    # HYPERPARAMETERS column for exactly the members a user wants to look at.
    c = FakeCluster(training_obj(failurePolicy={"maxRetries": 0, "onExhausted": "fail"}))
    drive(c, random.Random(0), fail_jobs={"toy-m001-s00000-a0"})
    assert c.training["status"]["phase"] == "Failed"
    for name, m in c.members.items():
        st = m["status"]
        assert st.get("summary", "").startswith("h0="), (name, st)
        assert "segment" in st


def test_invalid_spec_is_a_failed_condition_naming_the_field() -> None:
    c = FakeCluster(training_obj(exploit={"fraction": 0.9}))
    p = c.reconcile()
    assert not p.done and not p.create_members
    failed = next(x for x in c.training["status"]["conditions"] if x["type"] == C.FAILED)
    assert failed["reason"] == C.INVALID_SPEC and "spec.exploit.fraction" in failed["message"]


def edit_spec(c: FakeCluster, **spec: Any) -> None:
    c.training["spec"].update(spec)
    c.training["metadata"]["generation"] += 1


def test_a_spec_fixed_by_an_edit_starts_the_training() -> None:
    # An InvalidSpec plan was `done`: the daemon ended, and `kubectl apply` of the fixed manifest left the
    # training Failed with the old message until it was deleted and created again.
    c = FakeCluster(training_obj(exploit={"fraction": 0.9}))
    c.reconcile()
    assert c.training["status"]["phase"] == "Failed" and not c.members
    assert not c.reconcile().status_changed  # nothing edited: the next look writes nothing
    edit_spec(c, exploit={"fraction": 0.25})
    drive(c, random.Random(0))
    st = c.training["status"]
    assert st["phase"] == "Succeeded", st
    failed = next(x for x in st["conditions"] if x["type"] == C.FAILED)
    assert failed["status"] == "False"
    assert [e.reason for e in c.events].count(C.EV_INVALID) == 1


def test_a_spec_broken_and_fixed_mid_run_resumes_where_it_was() -> None:
    c = FakeCluster(training_obj())
    for _ in range(6):
        c.reconcile()
        if c.running():
            c.finish(c.running()[0])
    done_before = sum(len(m["status"].get("history") or []) for m in c.members.values())
    assert done_before > 0
    template = copy.deepcopy(c.training["spec"]["template"])
    edit_spec(c, template={"spec": {"containers": []}})
    p = c.reconcile()
    assert not p.done and not p.create_jobs and c.training["status"]["phase"] == "Failed"
    assert "best" in c.training["status"] or "generation" in c.training["status"]  # the report so far is kept
    edit_spec(c, template=template)
    drive(c, random.Random(1))
    assert c.training["status"]["phase"] == "Succeeded"
    for m in c.members.values():
        done = [h for h in m["status"]["history"] if h["status"] == "done"]
        assert [h["suggestion"]["segment"] for h in done] == list(range(4))


def test_a_training_without_template_is_told_to_give_one_not_spec_worker() -> None:
    # parse_spec's advice for `pbt run` ("spec.worker.command: is required ... or give spec.template")
    # named a field the CRD refuses on a cluster.
    obj = training_obj()
    del obj["spec"]["template"]
    c = FakeCluster(obj)
    p = c.reconcile()
    assert not p.done and not p.create_members
    failed = next(x for x in c.training["status"]["conditions"] if x["type"] == C.FAILED)
    assert failed["reason"] == C.INVALID_SPEC
    assert failed["message"].startswith("spec.template: is required in Kubernetes"), failed["message"]
    assert "spec.worker" not in failed["message"]


def test_parallelism_change_takes_effect() -> None:
    c = FakeCluster(training_obj(parallelism=1))
    c.reconcile()
    c.reconcile()
    assert len(c.running()) == 1
    c.training["spec"]["parallelism"] = 4
    c.reconcile()
    assert len(c.running()) == 4


def test_hostile_termination_messages_fail_only_that_segment() -> None:
    sug = Suggestion(0, 0, {"h0": 0.5}, None, 0, 5, "start")
    job = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    for msg, why in [("not json", "not JSON"), ("x" * 5000, "bytes"), ('{"score": NaN}', "not finite"),
                     ('{"score": 1, "evil": 2}', "unexpected keys"), ("[1]", "JSON object")]:
        pod = {"metadata": {"labels": {"job-name": "j"}},
               "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 0, "message": msg}}}]}}
        res = job_outcome(job, [pod], sug, "score")
        assert res is not None and not res.ok and why in (res.error or ""), (msg[:20], res)


def test_a_pod_read_before_it_finished_waits_for_the_next_pass_not_a_failure() -> None:
    """A pass lists Jobs and pods concurrently: a Job complete with its pod still running as read is a
    stale read of the pod, not a segment without a result; a pod that finished without one, or none at
    all, still fails the attempt."""
    sug = Suggestion(0, 0, {"h0": 0.5}, None, 0, 5, "start")
    job = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    meta = {"labels": {"job-name": "j"}, "annotations": {DEFAULT_CONTAINER: "w"}}
    running = {"metadata": meta, "status": {"phase": "Running", "containerStatuses": [
        {"name": "w", "state": {"running": {"startedAt": "2026-12-01T00:00:00Z"}}}]}}
    assert job_outcome(job, [running], sug, "score") is None
    done = {"metadata": meta, "status": {"phase": "Succeeded", "containerStatuses": [
        {"name": "w", "state": {"terminated": {"exitCode": 0, "message": '{"score": 0.5}'}}}]}}
    res = job_outcome(job, [done], sug, "score")
    assert res is not None and res.ok and res.score == 0.5
    silent = {"metadata": meta, "status": {"phase": "Succeeded", "containerStatuses": [
        {"name": "w", "state": {"terminated": {"exitCode": 0}}}]}}
    for pods in ([silent], []):
        res = job_outcome(job, pods, sug, "score")
        assert res is not None and not res.ok and "no termination message" in (res.error or ""), pods


def test_lastTransitionTime_kept_when_status_unchanged() -> None:
    c = FakeCluster(training_obj())
    c.reconcile()
    c.reconcile()
    t1 = {x["type"]: x["lastTransitionTime"] for x in c.training["status"]["conditions"]}
    c.reconcile()
    t2 = {x["type"]: x["lastTransitionTime"] for x in c.training["status"]["conditions"]}
    assert t1 == t2


def test_a_pass_with_nothing_new_leaves_the_training_status_alone() -> None:
    c = FakeCluster(training_obj())
    c.reconcile()  # creates members
    c.reconcile()  # creates Jobs
    c.reconcile()
    again = c.reconcile()
    assert again.status == c.training["status"] and not again.status_changed
    c.finish(c.running()[0])
    assert c.reconcile().status_changed  # a finished segment changes the counters


def test_only_watch_events_that_can_change_a_pass_wake_it() -> None:
    from pbt_operator.kube.reconcile import job_event_matters, pod_event_matters

    def cond(t: str, status: str = "True") -> dict[str, Any]:
        return {"type": t, "status": status}

    running_job = {"status": {"active": 1, "conditions": []}}
    assert not job_event_matters("ADDED", {"metadata": {}})
    assert not job_event_matters("MODIFIED", running_job)
    assert not job_event_matters("MODIFIED", {"status": {"conditions": [cond("Suspended", "False")]}})
    assert not job_event_matters("MODIFIED", {"status": {"conditions": [cond("Complete", "False")]}})
    for t in ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget"):
        assert job_event_matters("MODIFIED", {"status": {"conditions": [cond(t)]}}), t
    assert job_event_matters("DELETED", running_job)
    assert job_event_matters(None, {"status": {"conditions": [cond("Complete")]}})  # kopf's initial listing

    assert not pod_event_matters("ADDED", {"status": {"phase": "Pending"}})
    assert not pod_event_matters("MODIFIED", {"status": {"phase": "Running", "conditions": [cond("Ready")]}})
    assert pod_event_matters("MODIFIED", {"status": {"phase": "Succeeded"}})
    assert pod_event_matters("MODIFIED", {"status": {"phase": "Failed"}})
    assert pod_event_matters("MODIFIED", {"status": {"phase": "Running", "conditions": [cond("DisruptionTarget")]}})
    assert not pod_event_matters("MODIFIED", {"status": {"phase": "Running", "conditions": [cond("DisruptionTarget", "False")]}})
    assert pod_event_matters("DELETED", {"status": {"phase": "Running"}})


def test_sidecars_the_trainer_is_named_by_the_default_container_annotation() -> None:
    sidecar = {"name": "log-shipper", "image": "s", "command": ["sleep", "1"]}
    trainer = {"name": "trainer", "image": "x", "command": ["python", "w.py"]}
    native = {"name": "proxy", "image": "p", "restartPolicy": "Always"}
    tmpl = {"metadata": {"annotations": {DEFAULT_CONTAINER: "trainer"}},
            "spec": {"initContainers": [native], "containers": [sidecar, trainer]}}
    c = FakeCluster(training_obj(template=tmpl))
    c.reconcile()
    c.reconcile()
    job = c.jobs[job_name("toy", Suggestion(0, 0, {}, None, 0, 5, "start"))]
    pod = job["spec"]["template"]
    assert pod["metadata"]["annotations"][DEFAULT_CONTAINER] == "trainer"
    by_name = {ct["name"]: ct for ct in pod["spec"]["containers"]}
    assert "PBT_SEGMENT" in {e["name"] for e in by_name["trainer"]["env"]}
    assert "env" not in by_name["log-shipper"] and [ct["name"] for ct in pod["spec"]["containers"]] == [
        "log-shipper", "trainer"]
    assert pod["spec"]["initContainers"] == [native]
    # without the annotation the first container is the trainer, and the Job says so
    c = FakeCluster(training_obj())
    c.reconcile()
    c.reconcile()
    job = c.jobs[job_name("toy", Suggestion(0, 0, {}, None, 0, 5, "start"))]
    assert job["spec"]["template"]["metadata"]["annotations"][DEFAULT_CONTAINER] == "w"


def test_the_result_comes_from_the_trainer_by_name_in_any_status_order() -> None:
    sug = Suggestion(0, 0, {"h0": 0.5}, None, 0, 5, "start")
    job = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    trainer = {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": '{"score": 0.5}'}}}
    sidecar = {"name": "a-sidecar", "state": {"terminated": {"exitCode": 0, "message": '{"score": -999}'}}}
    for statuses in ([sidecar, trainer], [trainer, sidecar]):
        pod = {"metadata": {"labels": {"job-name": "j"}, "annotations": {DEFAULT_CONTAINER: "trainer"}},
               "status": {"phase": "Succeeded", "containerStatuses": statuses}}
        res = job_outcome(job, [pod], sug, "score")
        assert res is not None and res.ok and res.score == 0.5, res
        # also before the Job controller marks the Job complete (the pod decides)
        res = job_outcome({"metadata": {"name": "j"}, "status": {}}, [pod], sug, "score")
        assert res is not None and res.score == 0.5


def test_an_oom_killed_trainer_fails_the_segment_with_the_kubelets_reason() -> None:
    sug = Suggestion(0, 0, {"h0": 0.5}, None, 0, 5, "start")
    job = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Failed", "status": "True",
                                                                  "reason": "PodFailurePolicy"}]}}
    pod = {"metadata": {"labels": {"job-name": "j"}, "annotations": {DEFAULT_CONTAINER: "w"}},
           "status": {"phase": "Failed", "containerStatuses": [
               {"name": "w", "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled",
                                                      "message": "allocating 512 MiB"}}}]}}
    res = job_outcome(job, [pod], sug, "score")
    assert res is not None and not res.ok
    assert res.error == "exit code 137 (OOMKilled): allocating 512 MiB"
    pod["status"]["containerStatuses"][0]["state"]["terminated"].update(reason="Error", message="")
    res = job_outcome(job, [pod], sug, "score")
    assert res is not None and res.error == "exit code 137: Error"


def test_a_long_worker_error_keeps_its_head_and_a_log_tail_keeps_its_end() -> None:
    # The worker SDK's {"error": "<Type>: <message>"} was cut to its last 300 characters, which dropped
    # the error type and what was missing ("exit code 1: ed, e.g. its writer was killed mid-save, ...").
    sug = Suggestion(2, 1, {"h0": 0.5}, (0, 0), 10, 10, "continue")
    job = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Failed", "status": "True",
                                                                  "reason": "PodFailurePolicy"}]}}
    err = "PermanentStorageError: no committed checkpoint at file:///ckpt/t/m000/00000/: " + "why " * 100

    def outcome(message: str) -> str:
        pod = {"metadata": {"labels": {"job-name": "j"}}, "status": {"phase": "Failed", "containerStatuses": [
            {"name": "w", "state": {"terminated": {"exitCode": 1, "reason": "Error", "message": message}}}]}}
        res = job_outcome(job, [pod], sug, "score")
        assert res is not None and not res.ok and res.error is not None
        return res.error

    text = outcome(json.dumps({"error": err}))
    assert text.startswith("exit code 1: PermanentStorageError: no committed checkpoint at file:///ckpt/"), text
    assert text.endswith("...") and len(text) <= len("exit code 1: ") + 300
    assert outcome(json.dumps({"error": "ValueError: bad"})) == "exit code 1: ValueError: bad"
    tail = "Traceback (most recent call last):\n" + "  frame\n" * 80 + "RuntimeError: CUDA out of memory"
    assert outcome(tail).endswith("RuntimeError: CUDA out of memory")


def test_a_trainer_that_says_its_failure_is_permanent_keeps_that_word_first() -> None:
    """The engine fails the training at once on a permanent error, recognised by how the error starts: the
    exit code must not go in front of it. A missing metric in a failed pod's message stays a failure."""
    from pbt_operator.core.types import permanent_failure

    sug = Suggestion(0, 3, {"h0": 0.5}, (0, 2), 30, 10, "continue")
    job = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Failed", "status": "True",
                                                                  "reason": "PodFailurePolicy"}]}}

    def outcome(message: str, code: int) -> str:
        pod = {"metadata": {"labels": {"job-name": "j"}}, "status": {"phase": "Failed", "containerStatuses": [
            {"name": "w", "state": {"terminated": {"exitCode": code, "reason": "Error", "message": message}}}]}}
        res = job_outcome(job, [pod], sug, "score")
        assert res is not None and not res.ok and res.error is not None
        return res.error

    refused = json.dumps({"error": "ContractError: PBT_SEGMENT: field 'version' is 2", "permanent": True})
    text = outcome(refused, 2)
    assert text == "worker reported a permanent error: ContractError: PBT_SEGMENT: field 'version' is 2 (exit code 2)"
    assert permanent_failure(text)
    nan = json.dumps({"error": "score is nan: the segment diverged or failed", "diverged": True})
    assert outcome(nan, 1) == "diverged: score is nan: the segment diverged or failed (exit code 1)"
    for plain in (json.dumps({"error": "ContractError: PBT_SEGMENT: field 'version' is 2"}),
                  json.dumps({"error": "x", "permanent": "yes"}), "pbt_worker: PBT_SEGMENT is not valid JSON"):
        assert not permanent_failure(outcome(plain, 2)), plain


def test_a_segment_without_storage_credentials_names_the_secret_to_check() -> None:
    # A missing credentialsSecret starts the pod all the same (its keys are optional references): the
    # worker only said "no usable AWS credentials ... set AWS_ACCESS_KEY_ID", for a user who had.
    from pbt_operator.kube.reconcile import segment_outcome
    from pbt_operator.spec import parse_spec

    sug = Suggestion(0, 0, {"h0": 0.5}, None, 0, 5, "start")
    job = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Failed", "status": "True",
                                                                  "reason": "PodFailurePolicy"}]}}
    err = ("PermanentStorageError: upload s3://bucket/p/t/m000/00000/x/state failed: no usable AWS credentials "
           "(Unable to locate credentials); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    pod = {"metadata": {"labels": {"job-name": "j"}}, "status": {"phase": "Failed", "containerStatuses": [
        {"name": "w", "state": {"terminated": {"exitCode": 1, "message": json.dumps({"error": err})}}}]}}
    raw = training_obj()["spec"]
    with_secret = parse_spec({**raw, "storage": {"uri": "s3://bucket/p", "credentialsSecret": "s3-creds"}}, name="t")
    res = segment_outcome(job, [pod], sug, with_secret)
    assert res is not None and res.error is not None
    assert "no usable AWS credentials" in res.error and "credentialsSecret is 's3-creds'" in res.error
    res = segment_outcome(job, [pod], sug, parse_spec(raw, name="t"))
    assert res is not None and res.error is not None and "credentialsSecret is not set" in res.error
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = '{"error": "KeyError: h0"}'
    res = segment_outcome(job, [pod], sug, with_secret)
    assert res is not None and res.error == "exit code 1: KeyError: h0"  # no hint where it does not apply


def test_a_trainer_that_exits_0_without_a_result_is_told_how_to_report() -> None:
    # "Job completed but its pod left no termination message" said what was missing, not what to do.
    sug = Suggestion(0, 0, {"h0": 0.5}, None, 0, 5, "start")
    job = {"metadata": {"name": "j"}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    pod = {"metadata": {"labels": {"job-name": "j"}}, "status": {"phase": "Succeeded", "containerStatuses": [
        {"name": "w", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}}
    res = job_outcome(job, [pod], sug, "score")
    assert res is not None and not res.ok and res.error is not None
    assert "seg.report(score=...)" in res.error and "docs/segment-contract.md" in res.error


@pytest.mark.parametrize("mode", ["asynchronous", "synchronous"])
def test_bounded_member_history_decides_as_an_unbounded_one_through_crashes(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A member status keeps its newest HISTORY_WINDOW segments: with a window of 4 over 24 segments
    and a crash every third pass (every pass rebuilds from those windows), the same Jobs run once each,
    with the same best and totals, as with a window that holds everything; the member objects stop
    growing."""
    import pbt_operator.kube.reconcile as R

    spec = {"mode": mode, "population": 4, "budget": {"segments": 24}, "parallelism": 2}
    monkeypatch.setattr(R, "HISTORY_WINDOW", 10_000)
    ref = FakeCluster(training_obj(**spec))
    drive(ref, random.Random(5), crash_every=3, fail_jobs={"toy-m001-s00003-a0"}, max_passes=5000)
    monkeypatch.setattr(R, "HISTORY_WINDOW", 4)
    c = FakeCluster(training_obj(**spec))
    sizes: list[int] = []
    orig = c.apply

    def apply(p: Any, limit: int | None = None) -> None:
        orig(p, limit)
        sizes.append(max((len(json.dumps(m)) for m in c.members.values()), default=0))

    c.apply = apply  # type: ignore[method-assign]
    drive(c, random.Random(5), crash_every=3, fail_jobs={"toy-m001-s00003-a0"}, max_passes=5000)
    assert sorted(c.jobs) == sorted(ref.jobs)
    st, rst = c.training["status"], ref.training["status"]
    assert st["phase"] == rst["phase"] == "Succeeded"
    assert st["best"] == rst["best"]
    assert (st["segmentsDone"], st["failures"]) == (rst["segmentsDone"], rst["failures"]) == (96, 1)
    assert st["schedule"] == rst["schedule"][-len(st["schedule"]):] and len(st["schedule"]) < len(rst["schedule"])
    for m in c.members.values():
        done = [h for h in m["status"]["history"] if h["status"] == "done"]
        assert len(done) == 4 and all("counters" in h for h in done)
        assert m["status"]["completedSegment"] == 23
    assert max(sizes[len(sizes) // 2:]) <= max(sizes[: len(sizes) // 2]) * 1.2  # flat, not growing
    assert max(len(json.dumps(m)) for m in ref.members.values()) > 2 * max(sizes)


def test_results_read_the_full_history_from_storage_and_say_when_they_cannot(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Member statuses keep a window of 4 of 10 segments; the workers' records in storage hold all of
    them. `pbt status`/`export` (results_source) read storage and show the whole history and schedule;
    with storage unreadable they show the window, with exact totals and best, and say what is missing."""
    import pbt_operator.kube.reconcile as R
    from pbt_operator import results_source as RS
    from pbt_worker import Segment

    monkeypatch.setattr(R, "HISTORY_WINDOW", 4)
    c = FakeCluster(training_obj(population=3, budget={"segments": 10}, storage={"uri": tmp_path.as_uri()}))
    finish = c.finish

    def finish_and_record(job: dict[str, Any], fail: bool = False) -> None:
        finish(job, fail)
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        contract = dict(json.loads(env["PBT_SEGMENT"]), result=str(tmp_path / "result.json"))
        seg = Segment(contract)
        term = c.pods[-1]["status"]["containerStatuses"][0]["state"]["terminated"]
        seg.save(b"weights")
        seg.report(json.loads(term["message"])["score"])

    c.finish = finish_and_record  # type: ignore[method-assign]
    drive(c, random.Random(3))
    members = list(c.members.values())
    window = RS.from_cluster_objects(c.training, members)
    assert len(window.done) == 3 * 4 and window.engine.done_count == 30
    full = RS.with_storage_records(RS.from_cluster_objects(c.training, members), members)
    assert full.note is None and len(full.done) == 30 and full.engine.done_count == 30
    assert full.best is not None and window.best is not None and full.best.ref == window.best.ref
    schedule = full.export_document()["schedule"]
    assert schedule[0]["steps_start"] == 0 and schedule[0]["segment"] == 0  # back to a first segment
    assert all(a["steps_end"] == b["steps_start"] for a, b in itertools.pairwise(schedule))
    assert len(schedule) > 4
    assert window.export_document()["schedule"] == schedule[-len(window.export_document()["schedule"]):]

    def unreachable(prefix: str, threads: int = 16) -> Any:
        raise PermissionError("AccessDenied")

    monkeypatch.setattr(RS, "storage_records", unreachable)
    partial = RS.with_storage_records(RS.from_cluster_objects(c.training, members), members)
    assert partial.note is not None and "AccessDenied" in partial.note and "records/" in partial.note
    assert len(partial.done) == 12 and partial.engine.done_count == 30 and partial.best == window.best


@pytest.mark.parametrize("mode", ["asynchronous", "synchronous"])
def test_an_engine_kept_across_passes_decides_and_writes_as_a_rebuild_each_pass(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Passes that reuse the previous pass's engine (dropped after a crash, a failure or a foreign
    write) write exactly what passes that rebuild from the bounded histories write, while rebuilding
    only after the crashes; an edited member (another writer) invalidates the cache."""
    import pbt_operator.kube.reconcile as R

    monkeypatch.setattr(R, "HISTORY_WINDOW", 4)
    rebuilds = []
    real = R.rebuild
    monkeypatch.setattr(R, "rebuild", lambda *a, **k: rebuilds.append(1) or real(*a, **k))
    spec = {"mode": mode, "population": 5, "budget": {"segments": 12}, "parallelism": 3}
    runs = []
    for cache in (False, True):
        rebuilds.clear()
        c = FakeCluster(training_obj(**spec), cache=cache)
        drive(c, random.Random(11), crash_every=7, fail_jobs={"toy-m002-s00004-a0"}, max_passes=5000)
        runs.append((c, len(rebuilds)))
    (plain, n_plain), (cached, n_cached) = runs
    assert sorted(cached.jobs) == sorted(plain.jobs)
    assert cached.training["status"] == plain.training["status"]
    for name, m in plain.members.items():
        assert cached.members[name]["status"] == m["status"] and cached.members[name]["spec"] == m["spec"]
    assert n_cached < n_plain / 3, (n_cached, n_plain)
    # another writer's change to a member: the next pass rebuilds
    c = FakeCluster(training_obj(**spec), cache=True)
    for _ in range(4):
        c.reconcile()
    assert c.cache is not None
    some = next(iter(c.members.values()))
    some["metadata"]["resourceVersion"] = "edited"
    rebuilds.clear()
    c.reconcile()
    assert rebuilds == [1]


def test_a_population_larger_than_the_selector_limit_still_reads_only_running_segments() -> None:
    """Population 210 (over MAX_SELECTED_JOBS), parallelism 4: queued members and finished ones select
    no Job, so every pass reads about the running segments' Jobs and pods, not all 420 Jobs."""
    c = FakeCluster(training_obj(population=MAX_SELECTED_JOBS + 10, parallelism=4, budget={"segments": 2}),
                    select=True, cache=True)
    drive(c, random.Random(2), max_passes=5000)
    assert c.training["status"]["phase"] == "Succeeded" and len(c.jobs) == 2 * (MAX_SELECTED_JOBS + 10)
    assert max(j for j, _ in c.read_sizes[5:]) <= 8 and max(p for _, p in c.read_sizes[5:]) <= 4


def test_retained_checkpoints_go_through_the_training_status_to_a_rebuilt_engine(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """status.retainedCheckpoints (checkpoints that left their windows while live) is what a rebuilt
    engine starts from: one that is no longer live is handed to the next Job to delete and leaves the
    list. Here a restart (no engine kept, nothing remembered as handed out) finds [0, 0] in the list."""
    import pbt_operator.kube.reconcile as R

    monkeypatch.setattr(R, "HISTORY_WINDOW", 2)
    c = FakeCluster(training_obj(population=3, budget={"segments": 8}, parallelism=2))
    rng = random.Random(2)
    while min((m.get("status") or {}).get("completedSegment", -1) for m in c.members.values() or [{}]) < 3:
        p = c.reconcile()
        running = c.running()
        if running and not p.create_members:
            c.finish(rng.choice(running))
    c.collected, c.cache = set(), None
    c.training["status"]["retainedCheckpoints"] = [[0, 0], ["x"]]  # one that does not parse is skipped
    assert R.retained_checkpoints(c.training) == [(0, 0)]
    handed: list[str] = []
    for _ in range(6):
        p = c.reconcile()
        for j in p.create_jobs:
            env = {e["name"]: e.get("value") for e in j["spec"]["template"]["spec"]["containers"][0]["env"]}
            handed += json.loads(env["PBT_SEGMENT"])["gc"]
        running = c.running()
        if running:
            c.finish(rng.choice(running))
    assert any(u.endswith("/m000/00000/") for u in handed), handed
    assert [0, 0] not in (c.training["status"].get("retainedCheckpoints") or [])


def test_status_writes_delete_what_the_new_status_no_longer_has(monkeypatch: pytest.MonkeyPatch) -> None:
    """Statuses go out as merge patches: a key the new status leaves out (an older evictedBest's fields
    at their defaults in the newer one, a cleared wait) must be deleted, or the stored status never
    equals the computed one and every pass writes it again. With a window of 4 over 24 segments (the
    evicted best changes), member status writes stay under two per segment (its result; its start when
    it was queued), and each stored evictedBest is exactly the engine's."""
    import pbt_operator.kube.reconcile as R
    from pbt_operator.kube.builders import record_entry

    monkeypatch.setattr(R, "HISTORY_WINDOW", 4)
    c = FakeCluster(training_obj(population=4, budget={"segments": 24}, parallelism=2), cache=True)
    drive(c, random.Random(4), max_passes=5000)
    assert c.training["status"]["phase"] == "Succeeded"
    assert c.status_writes <= 2 * 96, c.status_writes  # (234 when dropped keys were left behind)
    p = c.reconcile()
    assert p.engine is not None and p.engine.evicted_best
    for m, rec in p.engine.evicted_best.items():
        want = {k: v for k, v in record_entry(rec, "", "").items() if k not in ("finishedAt", "job")}
        assert c.members[member_name("toy", m)]["status"]["evictedBest"] == want


def test_merge_patch_deletes_dropped_keys_at_every_level() -> None:
    old = {"phase": "Pending", "waiting": {"reason": "Starting", "since": "t"}, "evictedBest": {
        "score": 1.0, "suggestion": {"segment": 3, "donor": 2, "restore": [2, 2]}}, "conditions": [1]}
    new = {"phase": "Running", "evictedBest": {"score": 2.0, "suggestion": {"segment": 5, "restore": [0, 4]}}}
    patch = merge_patch(old, new, keep=("conditions",))
    assert patch == {"phase": "Running", "waiting": None, "evictedBest": {
        "score": 2.0, "suggestion": {"segment": 5, "restore": [0, 4], "donor": None}}}
    assert apply_merge_patch(old, patch) == {**new, "conditions": [1]}
    assert apply_merge_patch(old, new) != {**new, "conditions": [1]}  # what a plain patch left behind


class StoredCluster(FakeCluster):
    """A FakeCluster with storage: a segment that ends well has saved its checkpoint, then deleted the
    contract's `gc` list (the worker's order, worker/pbt_worker/segment.py). `crashes`: that many
    passes that hand a Job checkpoints to delete are cut off right after the member status writes
    (results persisted, decisions and Jobs not: the dangerous moment), and the operator restarts (no
    engine kept, nothing remembered as handed out)."""

    def __init__(self, training: dict[str, Any], crashes: int = 0, cache: bool = False):
        super().__init__(training, cache=cache)
        self.stored: set[tuple[int, int]] = set()
        self.crashes = crashes
        self.restarts = 0

    def apply(self, p: Any, limit: int | None = None) -> None:
        if limit is None and self.crashes and any(self.gc_of(j) for j in p.create_jobs):
            self.crashes -= 1
            super().apply(p, len(p.create_members) + len(p.member_statuses))
            self.restarts += 1
            return
        super().apply(p, limit)

    def reconcile(self, limit: int | None = None) -> Any:
        restarts = self.restarts
        p = super().reconcile(limit)
        if self.restarts != restarts:
            self.collected, self.cache = set(), None
        return p

    @staticmethod
    def gc_of(job: dict[str, Any]) -> list[tuple[int, int]]:
        env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        found = [CKPT.search(u) for u in json.loads(env["PBT_SEGMENT"])["gc"]]
        return [(int(mm.group(1)), int(mm.group(2))) for mm in found if mm]

    def finish(self, job: dict[str, Any], fail: bool = False, result: dict[str, Any] | None = None,
               gc_fails: bool = False) -> None:
        """`gc_fails`: the worker saved, but every delete of its gc list failed, and its result says so."""
        gc = self.gc_of(job)
        super().finish(job, fail, {"gcFailed": len(gc)} if gc_fails and gc else result)
        if not fail:
            labels = job["metadata"]["labels"]
            self.stored.add((int(labels["pbt.dev/member"]), int(labels["pbt.dev/segment"])))
            if not gc_fails:
                self.stored -= set(gc)


def promised(c: StoredCluster, window: int) -> set[tuple[int, int]]:
    """What storage must still hold once the training ended (docs/operator.md, "Bounded member
    state"), from the Jobs' contracts, not the operator's engine: each member's latest checkpoint and
    the best, and their ancestors (restore links) as far as the members' windows reach."""
    restore: dict[tuple[int, int], tuple[int, int] | None] = {}
    for j in c.jobs.values():
        env = {e["name"]: e.get("value") for e in j["spec"]["template"]["spec"]["containers"][0]["env"]}
        k = json.loads(env["PBT_SEGMENT"])
        mm = CKPT.search(k["restore"]) if k["restore"] else None
        restore[(k["member"], k["segment"])] = (int(mm.group(1)), int(mm.group(2))) if mm else None
    latest = {m: max(s for mm, s in c.ckpt if mm == m) for m, _ in c.ckpt}
    in_window = {r for r in c.ckpt if r[1] > latest[r[0]] - window}
    keep: set[tuple[int, int]] = set()
    for ref in [*((m, s) for m, s in latest.items()), max(c.ckpt, key=lambda r: c.ckpt[r])]:
        cur: tuple[int, int] | None = ref
        while cur is not None and cur not in keep and (cur == ref or cur in in_window):
            keep.add(cur)
            cur = restore.get(cur) if cur in in_window else None
    return keep


@pytest.mark.parametrize("cache", [False, True])
def test_a_restart_between_persisting_results_and_starting_jobs_leaks_no_checkpoint(
        monkeypatch: pytest.MonkeyPatch, cache: bool) -> None:
    """Checkpoints that left their members' windows are known to the engine only: before they were
    persisted with the member (status.uncollected), a restart after the member status writes and
    before the Job that was to delete them forgot them for good. With a window of 2 (4: the
    significance test's) over 12 segments and a restart at each of 8 such moments: storage ends with
    what the docs promise to keep, and what else is left (made collectable by the last results, when no
    Job starts to delete it) is still known to a restarted operator, which would hand it out."""
    import pbt_operator.kube.reconcile as R

    monkeypatch.setattr(R, "HISTORY_WINDOW", 2)
    c = StoredCluster(training_obj(population=3, budget={"segments": 12}, parallelism=2), crashes=8, cache=cache)
    drive(c, random.Random(1), max_passes=5000)
    assert c.training["status"]["phase"] == "Succeeded" and c.restarts == 8
    c.collected, c.cache = set(), None
    p = c.reconcile()
    assert p.engine is not None
    keep = promised(c, p.engine.window or 0)
    assert keep <= c.stored, sorted(keep - c.stored)  # nothing a member or the best needs was deleted
    known = set(p.engine.garbage())
    assert not known & keep
    assert c.stored - keep <= known, sorted(c.stored - keep - known)  # nothing forgotten


@pytest.mark.parametrize("cache", [False, True])
def test_the_memory_of_handed_out_checkpoints_stays_bounded_and_hands_each_out_once(
        monkeypatch: pytest.MonkeyPatch, cache: bool) -> None:
    """The operator remembers which checkpoints it handed to Jobs for deletion (the daemon's
    `collected`) only while a rebuild could list them again: at most a few windows' worth, however long
    the training runs (before, one entry per collected checkpoint: 150 here, 1M at 1,000 members x
    1,000 segments). Forgetting the rest hands none out twice (no Job fails here, nothing restarts; with
    `cache` False every pass rebuilds its engine from the statuses, as after a restart, but keeps the
    set) and leaves none in storage: at the end it holds what the docs promise plus what the engine
    still lists."""
    from collections import Counter

    import pbt_operator.kube.reconcile as R

    monkeypatch.setattr(R, "HISTORY_WINDOW", 2)  # the engine's window: 4 (the significance test's)
    population = 3
    c = StoredCluster(training_obj(population=population, budget={"segments": 60}, parallelism=2), cache=cache)
    rng = random.Random(3)
    sizes: list[int] = []
    for _ in range(5000):
        p = c.reconcile()
        sizes.append(len(c.collected))
        if p.done:
            break
        running = c.running()
        if running and not p.create_members:
            c.finish(rng.choice(running))
    assert c.training["status"]["phase"] == "Succeeded" and p.engine is not None
    window = p.engine.window or 0
    handouts = Counter(r for j in c.jobs.values() for r in c.gc_of(j))
    assert sum(handouts.values()) >= 100, "little was collected: the test would prove little"
    twice = sorted(r for r, n in handouts.items() if n > 1)
    assert not twice, twice
    assert max(sizes) <= 2 * population * window, max(sizes)
    assert not leftover_unknown(c)
    assert c.stored - promised(c, window) == set(p.engine.garbage()) - set(handouts)  # the rest was deleted


class WithdrawingCluster(StoredCluster):
    """A StoredCluster whose deletes happen (a stopped Job is gone, having saved nothing)."""

    def apply(self, p: Any, limit: int | None = None) -> None:
        super().apply(p, limit)
        if limit is None:
            for jname, _uid in p.delete_jobs:
                self.jobs.pop(jname, None)


def leftover_unknown(c: StoredCluster) -> set[tuple[int, int]]:
    """What storage holds beyond the promise that the operator, as it stands (its handed-out set and
    engine kept), will never offer for deletion again."""
    p = c.reconcile()
    assert p.engine is not None
    keep = promised(c, p.engine.window or 0)
    assert keep <= c.stored, sorted(keep - c.stored)
    return c.stored - keep - set(p.engine.garbage(exclude=c.collected))


@pytest.mark.parametrize("cache", [False, True])
def test_a_failed_attempt_gives_its_delete_list_back(monkeypatch: pytest.MonkeyPatch, cache: bool) -> None:
    """A failed attempt's worker may never have saved, so never deleted its contract's gc list: those
    checkpoints must be offered again (to the next starting Job, or, at the end, still be known), not
    count as deleted. Before give_back, the failed Jobs' lists stayed in storage, unknown."""
    import pbt_operator.kube.reconcile as R

    monkeypatch.setattr(R, "HISTORY_WINDOW", 2)
    c = StoredCluster(training_obj(population=3, budget={"segments": 12}, parallelism=2), cache=cache)
    rng = random.Random(4)
    failed_with_gc = 0
    for _ in range(5000):
        p = c.reconcile()
        if p.done:
            break
        running = c.running()
        if running and not p.create_members:
            job = rng.choice(running)
            fail = bool(c.gc_of(job)) and job["metadata"]["name"].endswith("-a0") and rng.random() < 0.5
            failed_with_gc += fail
            c.finish(job, fail=fail)
    assert c.training["status"]["phase"] == "Succeeded" and failed_with_gc >= 3
    assert not leftover_unknown(c)


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("restart", [False, True])
def test_a_segment_whose_deletes_failed_gives_its_delete_list_back(monkeypatch: pytest.MonkeyPatch, cache: bool,
                                                                   restart: bool) -> None:
    """A segment that saved but whose worker could not delete its gc list (an S3 error, a denied delete:
    the result's gcFailed) gives the list back: a Warning Event names the member and the count, the
    next Job that starts is handed the checkpoints again (also after a restart in between), and at the
    end storage holds exactly the promised checkpoints plus those status.leftoverCheckpoints counts.
    Before, they counted as deleted and stayed in storage for good, unknown."""
    import pbt_operator.kube.reconcile as R
    from pbt_operator.kube.builders import member_name

    monkeypatch.setattr(R, "HISTORY_WINDOW", 2)
    c = StoredCluster(training_obj(population=3, budget={"segments": 12}, parallelism=2), cache=cache)
    rng = random.Random(5)
    failed = offered_again = 0
    for _ in range(5000):
        p = c.reconcile()
        if p.done:
            break
        running = c.running()
        if not running or p.create_members:
            continue
        job = rng.choice(running)
        gc = c.gc_of(job)
        if not gc or rng.random() < 0.5:
            c.finish(job)
            continue
        failed += 1
        c.finish(job, gc_fails=True)
        if restart:
            c.collected, c.cache = set(), None
        p = c.reconcile()
        member = int(job["metadata"]["labels"]["pbt.dev/member"])
        ev = [e for e in p.events if e.reason == C.EV_CHECKPOINT_DELETE_FAILED] or [C.EV_CHECKPOINT_DELETE_FAILED]
        assert len(ev) == 1 and ev[0].type == "Warning" and ev[0].target == member_name("toy", member), ev
        assert f"could not delete {len(gc)} of the {counted(len(gc), 'old checkpoint')} it" in ev[0].message
        assert not [e for e in p.events if e.reason == C.EV_SEGMENT_FAILED]  # the segment itself succeeded
        offered = {r for j in p.create_jobs for r in c.gc_of(j)}
        assert all(r in offered or r not in c.collected for r in gc), (gc, sorted(offered))
        offered_again += set(gc) <= offered
    assert c.training["status"]["phase"] == "Succeeded" and failed >= 3 and offered_again >= 1
    assert not leftover_unknown(c)
    p = c.reconcile()
    assert p.engine is not None
    left = c.stored - promised(c, p.engine.window or 0)
    assert c.training["status"].get("leftoverCheckpoints", {}).get("count", 0) == len(left)


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("restart", [False, True])
def test_jobs_withdrawn_before_training_give_their_delete_lists_back(
        monkeypatch: pytest.MonkeyPatch, cache: bool, restart: bool) -> None:
    """A Job deleted before its trainer ran (suspend; the same path serves scale-down and the end of
    the training) deleted nothing: its gc list is offered to the next Job that starts, also after a
    restart in between (those outside the windows through status.uncollected)."""
    import pbt_operator.kube.reconcile as R

    monkeypatch.setattr(R, "HISTORY_WINDOW", 2)
    c = WithdrawingCluster(training_obj(population=3, budget={"segments": 12}, parallelism=2), cache=cache)
    rng = random.Random(2)
    withdrawn: list[tuple[int, int]] = []
    for _ in range(2000):
        p = c.reconcile()
        with_gc = [j for j in p.create_jobs if c.gc_of(j)]
        if with_gc and any(m >= 0 and s < 10 for m, s in c.gc_of(with_gc[0])) and len(withdrawn) < 1 \
                and sum(1 for _ in c.ckpt) > 12:
            withdrawn = c.gc_of(with_gc[0])
            c.training["spec"]["suspend"] = True
            c.training["metadata"]["generation"] += 1
            p = c.reconcile()
            assert with_gc[0]["metadata"]["name"] in {n for n, _ in p.delete_jobs}
            if restart:
                c.collected, c.cache = set(), None
            c.training["spec"]["suspend"] = False
            c.training["metadata"]["generation"] += 1
            p = c.reconcile()
            offered = [r for j in p.create_jobs for r in c.gc_of(j)]
            assert set(withdrawn) <= set(offered), sorted(set(withdrawn) - set(offered))
            break
        running = c.running()
        if running and not p.create_members:
            c.finish(rng.choice(running))
    assert withdrawn
    assert any(s < (max(ss for mm, ss in c.ckpt if mm == m) - 2) for m, s in withdrawn)  # some outside a window


def test_a_refused_job_gives_its_delete_list_back() -> None:
    """A Job the API server refused never runs: what the plan handed it is not counted as handed out."""
    from pbt_operator.kube.reconcile import collected_after

    c = StoredCluster(training_obj(population=3, budget={"segments": 6}, parallelism=1))
    rng = random.Random(0)
    for _ in range(500):
        p = c.reconcile()
        with_gc = [j for j in p.create_jobs if c.gc_of(j)]
        if with_gc:
            name = with_gc[0]["metadata"]["name"]
            refs = set(c.gc_of(with_gc[0]))
            assert refs <= p.collected
            assert not refs & collected_after(p, [name])
            assert collected_after(p, []) == p.collected
            return
        running = c.running()
        if running and not p.create_members:
            c.finish(rng.choice(running))
    raise AssertionError("no Job got a delete list")


def test_checkpoint_ref_reads_back_only_this_trainings_uris() -> None:
    from pbt_operator.checkpoints import checkpoint_ref, checkpoint_uri

    uri = checkpoint_uri("s3://b/runs", "toy", (3, 41))
    assert checkpoint_ref("s3://b/runs", "toy", uri) == (3, 41)
    assert checkpoint_ref("s3://b/other", "toy", uri) is None  # another root (a spec edit): never mistaken
    assert checkpoint_ref("s3://b/runs", "toy2", uri) is None
    assert checkpoint_ref("s3://b/runs", "toy", "s3://b/runs/toy/records/") is None


@pytest.mark.parametrize("cache", [False, True])
def test_a_finished_training_lists_the_checkpoints_no_segment_deleted(monkeypatch: pytest.MonkeyPatch,
                                                                       cache: bool) -> None:
    """Deletes ride on starting segments, so what the last results make collectable stays in storage:
    the status of the training that ended says exactly how many and which (at most 20 URIs), one
    Normal Event says so, and a later pass (e.g. after a restart, which no longer knows what was
    deleted) keeps the list as written."""
    import pbt_operator.kube.reconcile as R

    monkeypatch.setattr(R, "HISTORY_WINDOW", 2)
    monkeypatch.setattr(R, "LEFTOVERS_LISTED", 3)
    c = StoredCluster(training_obj(population=3, budget={"segments": 12}, parallelism=2), cache=cache)
    drive(c, random.Random(6), max_passes=5000)
    st = c.training["status"]
    assert st["phase"] == "Succeeded"
    p = c.reconcile()
    assert p.engine is not None
    left = c.stored - promised(c, p.engine.window or 0)
    assert left, "the scenario leaves nothing: it tests nothing"
    lc = st["leftoverCheckpoints"]
    assert lc["count"] == len(left) and lc["prefix"] == "s3://bucket/runs/toy/"
    listed = {(int(mm.group(1)), int(mm.group(2))) for u in lc["uris"] if (mm := CKPT.search(u))}
    assert len(lc["uris"]) == min(3, len(left)) and listed <= left
    ev = [e for e in c.events if e.reason == C.EV_CHECKPOINTS_LEFT]
    assert len(ev) == 1 and ev[0].type == "Normal" and f"{len(left)} checkpoints" in ev[0].message
    c.collected, c.cache = set(), None  # a restart: what the status says stays
    c.reconcile()
    assert c.training["status"]["leftoverCheckpoints"] == lc
    assert len([e for e in c.events if e.reason == C.EV_CHECKPOINTS_LEFT]) == 1
