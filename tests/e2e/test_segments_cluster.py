"""Segments on a real control plane and the node agent (issue 16, the operator's half): a segment that
cannot be scheduled says why and its pending timeout fails it clearly; the timeout counts from the
trainer's start, not from the Job's creation; a training that reaches its target stops its running
segments; suspend and scale-to-zero pause without losing anything; disruptions are capped.
tests/e2e/test_autoscaling.py runs the same behaviours against the real Karpenter and Kueue."""

from __future__ import annotations

import datetime
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterlib import Cluster, NodeAgent
from test_operator import OperatorProcess, check_finished, jobs_of, training, wait_phase

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
FAIL_FAST = {"maxRetries": 0, "onExhausted": "fail"}


@pytest.fixture(scope="module")
def op(cluster: Cluster, node_agent: NodeAgent, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    for plural in ("populationtrainings", "populationmembers"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{plural}.pbt.dev", "--timeout=60s")
    o = OperatorProcess(cluster, tmp_path_factory.mktemp("operator") / "operator.log")
    o.start()
    yield o
    o.stop()


def pods_of(c: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    return c.kubectl_json("get", "pods", "-n", ns, "-l", f"pbt.dev/training={name}")["items"]


def active(c: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    return [p for p in pods_of(c, ns, name) if p["status"].get("phase") in ("Running", "Pending")
            and not p["metadata"].get("deletionTimestamp")]


def cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def ts(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc).timestamp()


def events(c: Cluster, ns: str) -> list[dict[str, Any]]:
    return c.kubectl_json("get", "events", "-n", ns)["items"]


def test_unschedulable_segment_says_why_and_its_pending_timeout_fails_it(
        cluster: Cluster, namespace: str, op: OperatorProcess, tmp_path: Path) -> None:
    """64 GPUs per pod on nodes of 4: the scheduler's message reaches the member, an Event and the
    training (not Ready, WAITING 2), and pendingTimeoutSeconds fails it naming why, instead of a
    "timed out" after retries that never started."""
    c = cluster
    c.apply(training("nogpu", tmp_path / "ckpt", population=2, parallelism=2, segments=1, gpus=64,
                     segment={"steps": 10, "timeoutSeconds": 20, "pendingTimeoutSeconds": 25},
                     failurePolicy=FAIL_FAST), namespace)

    def both_unschedulable() -> list[dict[str, Any]] | None:
        ms = c.kubectl_json("get", "pbtm", "-n", namespace, "-l", "pbt.dev/training=nogpu")["items"]
        waits = [(m.get("status") or {}).get("waiting") or {} for m in ms]
        return ms if len(ms) == 2 and all(w.get("reason") == "Unschedulable" for w in waits) else None

    members = c.wait_for(both_unschedulable, 60, interval=0.5, desc="members waiting, Unschedulable")
    for m in members:
        assert "Insufficient nvidia.com/gpu" in m["status"]["waiting"]["message"], m["status"]
        assert m["status"]["phase"] == "Pending"
    obj = c.wait_for(lambda: (o := c.get("pbt", "nogpu", namespace)) and (o.get("status") or {}).get("waiting") == 2
                     and o, 30, interval=0.5, desc="status.waiting 2")
    ready = cond(obj, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Unschedulable", ready
    assert "Insufficient nvidia.com/gpu" in ready["message"]
    started = cond(obj, "SegmentsStarted")
    assert started["status"] == "False" and started["reason"] == "Unschedulable", started
    head, row = c.kubectl("get", "pbt", "nogpu", "-n", namespace).stdout.splitlines()
    at = head.index(" WAITING ") + 1  # a column of `kubectl get pbt` (empty cells make split() useless)
    assert row[at:at + len("WAITING")].split() == ["2"], (head, row)
    # (Events are posted after the pass's status writes, so the Event may lag what was read above)
    warn = c.wait_for(lambda: [e for e in events(c, namespace) if e["reason"] == "Unschedulable"
                               and e["involvedObject"]["kind"] == "PopulationMember"], 30, interval=0.5,
                      desc="an Unschedulable Event on a member")
    assert warn[0]["type"] == "Warning" and "Insufficient nvidia.com/gpu" in warn[0]["message"]
    # the pending timeout fails it, saying what it waited for
    obj = wait_phase(c, namespace, "nogpu", op, timeout=120, phase="Failed")
    failed = cond(obj, "Failed")["message"]
    assert "PendingTimeout" in failed and "pendingTimeoutSeconds (25 s)" in failed, failed
    assert "Insufficient nvidia.com/gpu" in failed, failed
    # the Job controller stopped it at its pending deadline (FailureTarget first, Failed once its pod is gone)
    c.wait_for(lambda: any(cond(j, "Failed").get("reason") == "DeadlineExceeded" for j in jobs_of(c, namespace, "nogpu")),
               30, interval=0.5, desc="a Job Failed with DeadlineExceeded")


def test_timeout_counts_from_the_trainer_start(cluster: Cluster, namespace: str, op: OperatorProcess,
                                               node_agent: NodeAgent, tmp_path: Path) -> None:
    """timeoutSeconds 10: segments that wait about 20 s for their node and then train 2 s succeed (the
    Job's activeDeadlineSeconds used to count that wait); one that trains 30 s fails with
    DeadlineExceeded, from the Job controller."""
    c = cluster
    pool = f"late-{uuid.uuid4().hex[:5]}"
    seg = {"steps": 10, "timeoutSeconds": 10}

    def on_pool(t: dict[str, Any]) -> dict[str, Any]:
        t["spec"]["template"]["spec"]["nodeSelector"] = {"pbt.dev/e2e-pool": pool}
        return t

    c.apply([on_pool(training("late", tmp_path / "a", population=2, parallelism=2, segments=1,
                              env={"PBT_TEST_SLEEP": "2"}, segment=seg, failurePolicy=FAIL_FAST)),
             on_pool(training("overrun", tmp_path / "b", population=2, parallelism=2, segments=1,
                              env={"PBT_TEST_SLEEP": "30"}, segment=seg, failurePolicy=FAIL_FAST))], namespace)
    c.wait_for(lambda: len(pods_of(c, namespace, "late")) == 2 and len(pods_of(c, namespace, "overrun")) == 2,
               60, interval=0.5, desc="four pending pods")
    time.sleep(20)  # longer than the timeout, waiting for a node
    node = node_agent.add_node(gpus=4, labels={"pbt.dev/e2e-pool": pool})
    try:
        obj = wait_phase(c, namespace, "late", op, timeout=120)
        check_finished(c, namespace, "late", obj, 2, 1)
        for p in pods_of(c, namespace, "late"):
            trainer = p["status"]["containerStatuses"][0]["state"]["terminated"]
            assert ts(trainer["startedAt"]) - ts(p["metadata"]["creationTimestamp"]) > 10, p["status"]
        jobs = jobs_of(c, namespace, "late")
        assert all(j["metadata"]["annotations"]["pbt.dev/deadline"].startswith("running ") for j in jobs)
        bad = wait_phase(c, namespace, "overrun", op, timeout=120, phase="Failed")
        msg = cond(bad, "Failed")["message"]
        assert "DeadlineExceeded: timed out: the trainer ran longer than spec.segment.timeoutSeconds (10 s" in msg, msg
        c.wait_for(lambda: any(cond(j, "Failed").get("reason") == "DeadlineExceeded"
                               for j in jobs_of(c, namespace, "overrun")), 30, interval=0.5,
                   desc="a Job Failed with DeadlineExceeded")
    finally:
        node_agent.remove_node(node)


def test_reaching_the_target_stops_running_segments(cluster: Cluster, namespace: str, op: OperatorProcess,
                                                    node_agent: NodeAgent, tmp_path: Path) -> None:
    """Member 0 reaches the target while members 1-3 train (they would for an hour): the training
    succeeds and no segment pod or process is left holding a GPU. Segment pods ask node autoscalers
    not to disrupt them."""
    c = cluster
    log = tmp_path / "runs.log"
    c.apply(training("target", tmp_path / "ckpt", population=4, parallelism=4, segments=3,
                     env={"PBT_TEST_HANG": "1:0:1,2:0:1,3:0:1", "PBT_TEST_SLEEP": "3", "PBT_TEST_LOG": str(log)},
                     budget={"segments": 3, "targetScore": -5.0}), namespace)
    c.wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 4, 90, interval=0.5,
               desc="four segments started")
    obj = wait_phase(c, namespace, "target", op, timeout=90)
    assert cond(obj, "Succeeded")["reason"] == "TargetReached", obj["status"]
    c.wait_for(lambda: not active(c, namespace, "target"), 30, interval=0.5, desc="no segment pod left")
    c.wait_for(lambda: not [p for p in node_agent.processes() if p["pod"].startswith(f"{namespace}/")], 30,
               interval=0.5, desc="no segment process left")
    stopped = c.wait_for(lambda: (s := [e for e in events(c, namespace) if e["reason"] == "SegmentStopped"])
                         and len(s) == 3 and s, 30, interval=0.5, desc="three SegmentStopped events")
    assert all("the training has finished" in e["message"] for e in stopped), stopped
    for j in jobs_of(c, namespace, "target"):  # the one that finished stays, for its logs and result
        ann = j["spec"]["template"]["metadata"]["annotations"]
        assert ann["karpenter.sh/do-not-disrupt"] == "true"
        assert ann["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false"


def test_suspend_and_scale_to_zero_pause_without_losing_anything(cluster: Cluster, namespace: str,
                                                                 op: OperatorProcess, tmp_path: Path) -> None:
    """spec.suspend with onSuspend: stop stops the running segments (no pod left), resume reruns them
    from their checkpoints; /scale to 0 pauses too; the training then completes every segment."""
    c = cluster
    c.apply(training("pause", tmp_path / "ckpt", population=2, parallelism=2, segments=3,
                     env={"PBT_TEST_SLEEP": "4"}, segment={"steps": 10, "timeoutSeconds": 120, "onSuspend": "stop"}),
            namespace)
    c.wait_for(lambda: any(p["status"].get("phase") == "Running" for p in pods_of(c, namespace, "pause")), 60,
               interval=0.5, desc="a segment running")
    c.kubectl("patch", "pbt", "pause", "-n", namespace, "--type", "merge", "-p", '{"spec":{"suspend":true}}')
    c.wait_for(lambda: (c.get("pbt", "pause", namespace)["status"] or {}).get("phase") == "Suspended", 30,
               interval=0.5, desc="phase Suspended")
    c.wait_for(lambda: not active(c, namespace, "pause"), 30, interval=0.5, desc="no segment pod while suspended")
    time.sleep(5)
    assert not active(c, namespace, "pause")
    obj = c.get("pbt", "pause", namespace)
    assert cond(obj, "Ready")["reason"] == "Suspended" and obj["status"]["phase"] == "Suspended"
    c.kubectl("patch", "pbt", "pause", "-n", namespace, "--type", "merge", "-p", '{"spec":{"suspend":false}}')
    c.wait_for(lambda: active(c, namespace, "pause"), 30, interval=0.5, desc="segments again after resume")
    # the scale subresource: replicas is parallelism, its selector finds the segment pods; 0 pauses
    scale = json.loads(c.kubectl("get", "--raw",
                                 f"/apis/pbt.dev/v1alpha1/namespaces/{namespace}/populationtrainings/pause/scale").stdout)
    assert scale["spec"]["replicas"] == 2 and scale["status"]["selector"] == "pbt.dev/training=pause", scale
    c.kubectl("scale", "pbt/pause", "-n", namespace, "--replicas=0")
    c.wait_for(lambda: (c.get("pbt", "pause", namespace)["status"] or {}).get("phase") == "Suspended", 30,
               interval=0.5, desc="phase Suspended at parallelism 0")
    c.wait_for(lambda: not active(c, namespace, "pause"), 30, interval=0.5, desc="running segments finish, none starts")
    c.kubectl("scale", "pbt/pause", "-n", namespace, "--replicas=2")
    obj = wait_phase(c, namespace, "pause", op, timeout=120)
    check_finished(c, namespace, "pause", obj, 2, 3)
    reasons = {e["reason"] for e in events(c, namespace) if e["involvedObject"]["kind"] == "PopulationTraining"}
    assert {"Suspended", "Resumed"} <= reasons, reasons
    assert any(e["reason"] == "SegmentStopped" and "suspended" in e["message"] for e in events(c, namespace))


def test_disruptions_beyond_the_cap_fail_the_segment(cluster: Cluster, namespace: str, op: OperatorProcess,
                                                     node_agent: NodeAgent, tmp_path: Path) -> None:
    """maxDisruptions 1: a first preemption reruns the segment, a second fails it (TooManyDisruptions)
    instead of rerunning it forever."""
    c = cluster
    c.apply(training("flaky", tmp_path / "ckpt", population=2, parallelism=1, segments=1,
                     env={"PBT_TEST_SLEEP": "60"},
                     failurePolicy={"maxRetries": 0, "onExhausted": "fail", "maxDisruptions": 1}), namespace)
    for i in range(2):
        pod = c.wait_for(lambda: next((p for p in pods_of(c, namespace, "flaky")
                                       if p["status"].get("phase") == "Running"
                                       and not any(x["type"] == "DisruptionTarget" for x in p["status"].get("conditions") or [])),
                                      None), 60, interval=0.5, desc=f"running pod {i}")
        node_agent.evict_pod(namespace, pod["metadata"]["name"], mode="preempt")
    obj = wait_phase(c, namespace, "flaky", op, timeout=60, phase="Failed")
    msg = cond(obj, "Failed")["message"]
    assert "TooManyDisruptions" in msg and "maxDisruptions (1)" in msg, msg
    c.wait_for(lambda: not active(c, namespace, "flaky"), 30, interval=0.5, desc="the disrupted Job stopped")
