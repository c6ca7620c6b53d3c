"""The operator end to end: real API server, Job controller, scheduler and garbage collector, the node
agent running segment pods as processes, the operator as a real `pbt operator` process, manifests
applied with the real kubectl."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from clusterlib import Cluster, NodeAgent

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "e2e" / "workers" / "quadratic_worker.py"


class OperatorProcess:
    def __init__(self, cluster: Cluster, log_path: Path):
        self.cluster = cluster
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(self.cluster.env, PBT_METRICS_PORT="0", PYTHONUNBUFFERED="1")
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen([sys.executable, "-m", "pbt_operator.cli", "operator", "--log-format", "plain",
                                      "--health-port", "0"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    for plural in ("populationtrainings", "populationmembers"):
        cluster.wait_established(f"{plural}.pbt.dev")


@pytest.fixture(scope="module")
def operator(cluster: Cluster, crds: None, node_agent: NodeAgent,
             tmp_path_factory: pytest.TempPathFactory) -> Any:
    op = OperatorProcess(cluster, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    yield op
    op.stop()


def training(name: str, storage: Path, *, population: int = 4, parallelism: int = 4, mode: str = "asynchronous",
             segments: int = 3, explore: dict | None = None, env: dict[str, str] | None = None,
             gpus: int = 1, **extra: Any) -> dict[str, Any]:
    # file:// storage on a cluster must be a volume mounted in the pod (the node agent's pods share the
    # test's filesystem, so the hostPath is what a real node would mount).
    container = {
        "name": "train", "image": "example.invalid/quadratic:1", "command": ["python", str(WORKER)],
        "volumeMounts": [{"name": "checkpoints", "mountPath": str(storage)}],
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
        "resources": {"limits": {"nvidia.com/gpu": gpus}},
    }
    spec: dict[str, Any] = {
        "population": population, "parallelism": parallelism, "mode": mode, "seed": 7,
        "segment": {"steps": 10, "timeoutSeconds": 120}, "budget": {"segments": segments},
        "hyperparameters": {"h0": {"type": "float", "min": 0.0, "max": 1.0, "initial": {"min": 0.0, "max": 0.3}},
                            "h1": {"type": "float", "min": 0.0, "max": 1.0, "initial": {"min": 0.0, "max": 0.3}}},
        "exploit": {"strategy": "truncation", "fraction": 0.25},
        "explore": explore or {"strategy": "perturb"},
        "storage": {"uri": storage.as_uri()},
        "template": {"spec": {"terminationGracePeriodSeconds": 5, "containers": [container],
                              "volumes": [{"name": "checkpoints", "hostPath": {"path": str(storage)}}]}},
    }
    spec.update(extra)
    return {"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining", "metadata": {"name": name},
            "spec": spec}


def wait_phase(cluster: Cluster, ns: str, name: str, op: OperatorProcess, timeout: float = 240,
               phase: str = "Succeeded") -> dict[str, Any]:
    return cluster.wait_phase(ns, name, phase, timeout, describe=lambda: f"--- operator log\n{op.tail()}")


def jobs_of(cluster: Cluster, ns: str, name: str) -> list[dict[str, Any]]:
    return cluster.kubectl_json("get", "jobs", "-n", ns, "-l", f"pbt.dev/training={name}")["items"]


def segment_keys(jobs: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return sorted((int(j["metadata"]["labels"]["pbt.dev/member"]), int(j["metadata"]["labels"]["pbt.dev/segment"]))
                  for j in jobs)


def check_finished(cluster: Cluster, ns: str, name: str, obj: dict[str, Any], population: int,
                   segments: int) -> None:
    st = obj["status"]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["Succeeded"]["status"] == "True" and conds["Failed"]["status"] == "False"
    assert st["best"]["checkpoint"].endswith("/") and st["best"]["score"] is not None
    assert st["schedule"] and st["schedule"][-1]["score"] == st["best"]["score"]
    jobs = jobs_of(cluster, ns, name)
    keys = segment_keys(jobs)
    assert keys == sorted({(m, k) for m in range(population) for k in range(segments)}), keys
    for j in jobs:
        c = j["spec"]["template"]["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] in (1, "1")
    members = cluster.kubectl_json("get", "pbtm", "-n", ns, "-l", f"pbt.dev/training={name}")["items"]
    assert len(members) == population
    for m in members:
        done = [h for h in m["status"]["history"] if h["status"] == "done"]
        assert [h["suggestion"]["segment"] for h in done] == list(range(segments))


@pytest.mark.parametrize("mode,explore", [
    ("asynchronous", {"strategy": "perturb"}),
    ("synchronous", {"strategy": "perturb"}),
    ("asynchronous", {"strategy": "pb2", "pb2": {"minRows": 3}}),
])
def test_population_runs_to_success(cluster: Cluster, namespace: str, operator: OperatorProcess,
                                    tmp_path: Path, mode: str, explore: dict[str, Any]) -> None:
    name = "quad"
    # Half the population in the bottom group, so that asynchronous timing cannot avoid every exploit.
    cluster.apply(training(name, tmp_path / "ckpt", mode=mode, explore=explore, segments=4,
                           exploit={"strategy": "truncation", "fraction": 0.5}), namespace)
    obj = wait_phase(cluster, namespace, name, operator)
    check_finished(cluster, namespace, name, obj, 4, 4)
    table = cluster.kubectl("get", "pbt", "-n", namespace).stdout
    header = table.splitlines()[0].split()
    assert header[:10] == ["NAME", "MODE", "GEN", "BEST", "METRIC", "RUNNING", "WAITING", "QUEUED", "READY",
                           "SUCCEEDED"], table
    assert mode in table and "True" in table
    members = cluster.kubectl("get", "pbtm", "-n", namespace).stdout
    assert "HYPERPARAMETERS" in members.splitlines()[0] and "h0=" in members
    items = cluster.events_once(namespace, "Completed", kind="PopulationTraining")
    reasons = collections.Counter(e["reason"] for e in items
                                  if e["involvedObject"]["kind"] in ("PopulationTraining", "PopulationMember"))
    assert reasons["Exploited"] >= 1 and reasons["Explored"] >= 1 and reasons["Completed"] == 1, reasons
    if explore["strategy"] == "pb2":
        msgs = [e["message"] for e in items if e["reason"] == "Explored"]
        assert any("pb2" in m for m in msgs), msgs


def test_boolean_choices_reach_the_trainers_as_booleans(cluster: Cluster, namespace: str, operator: OperatorProcess,
                                                       tmp_path: Path) -> None:
    """`choices: [true, false]` through the API server (the CRD keeps JSON booleans), the operator's PB2 and
    the segment contract: the trainer's worker SDK would refuse anything but a bool, int, float or str,
    and the member's history keeps booleans, not the strings."""
    t = training("flags", tmp_path / "ckpt", segments=3, explore={"strategy": "pb2", "pb2": {"minRows": 3}},
                 exploit={"strategy": "truncation", "fraction": 0.5})
    t["spec"]["hyperparameters"]["flag"] = {"type": "categorical", "choices": [True, False]}
    cluster.apply(t, namespace)
    obj = wait_phase(cluster, namespace, "flags", operator)
    check_finished(cluster, namespace, "flags", obj, 4, 3)
    members = cluster.kubectl_json("get", "pbtm", "-n", namespace, "-l", "pbt.dev/training=flags")["items"]
    flags = [h["suggestion"]["hyperparameters"]["flag"] for m in members for h in m["status"]["history"]]
    assert flags and all(type(f) is bool for f in flags), flags
    assert "flag=" in cluster.kubectl("get", "pbtm", "-n", namespace).stdout


def test_larger_population_time_shares_slots(cluster: Cluster, namespace: str, operator: OperatorProcess,
                                             tmp_path: Path) -> None:
    cluster.apply(training("wide", tmp_path / "ckpt", population=8, parallelism=3, segments=2,
                           env={"PBT_TEST_SLEEP": "0.5"}), namespace)
    peak = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        # segments occupying a slot: pods not yet finished (a Job whose pod succeeded frees its slot
        # at once, before the Job controller marks the Job Complete)
        pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "pbt.dev/training=wide")["items"]
        active = sum(1 for p in pods if p["status"].get("phase") in ("Pending", "Running"))
        peak = max(peak, active)
        obj = cluster.get("pbt", "wide", namespace)
        if ((obj or {}).get("status") or {}).get("phase") == "Succeeded":
            break
        time.sleep(0.3)
    obj = wait_phase(cluster, namespace, "wide", operator, timeout=10)
    check_finished(cluster, namespace, "wide", obj, 8, 2)
    assert 1 <= peak <= 3, peak


def test_scale_subresource_changes_parallelism(cluster: Cluster, namespace: str, operator: OperatorProcess,
                                               tmp_path: Path) -> None:
    cluster.apply(training("scaled", tmp_path / "ckpt", population=4, parallelism=1, segments=2,
                           env={"PBT_TEST_SLEEP": "2"}), namespace)
    cluster.kubectl("scale", "pbt/scaled", "-n", namespace, "--replicas=4")
    assert cluster.get("pbt", "scaled", namespace)["spec"]["parallelism"] == 4
    obj = wait_phase(cluster, namespace, "scaled", operator)
    check_finished(cluster, namespace, "scaled", obj, 4, 2)


def test_eviction_reruns_segment_from_same_checkpoint(cluster: Cluster, namespace: str, operator: OperatorProcess,
                                                      node_agent: NodeAgent, tmp_path: Path) -> None:
    """An evicted segment pod reruns from the same checkpoint and does not count as a failure.

    Segment 1's trainers wait at a gate until the evicted pod's process is gone, so the evicted run has
    provably started (logged its run) and cannot have finished: evicting right after the first segment-1
    log line could, under a long stall, hit a pod whose segment had already ended."""
    log = tmp_path / "runs.log"
    gate = tmp_path / "gate"
    cluster.apply(training("evict", tmp_path / "ckpt", population=2, parallelism=2, segments=3,
                           env={"PBT_TEST_SLEEP": "1", "PBT_TEST_LOG": str(log),
                                "PBT_TEST_GATE": f"0:1:{gate},1:1:{gate}"}), namespace)

    def held() -> list[dict[str, Any]] | None:
        """Both segment-1 pods Running, both trainers started (logged) and held at the gate."""
        lines = log.read_text().splitlines() if log.exists() else []
        if {r.split()[0] for r in lines if r.split()[1] == "1"} != {"0", "1"}:
            return None
        pods = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "pbt.dev/segment=1")["items"]
        return pods if len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods) else None

    try:
        pods = cluster.wait_for(held, 120, interval=0.2, desc="both segment-1 trainers started and held")
        pod = min(pods, key=lambda p: int(p["metadata"]["labels"]["pbt.dev/member"]))
        name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
        node_agent.evict_pod(namespace, name)

        def evicted_gone() -> bool:
            """The evicted pod's trainer is dead: the pod is deleted, or replaced, or terminal."""
            p = cluster.kubectl_json("get", "pods", "-n", namespace, "-l", "pbt.dev/segment=1")["items"]
            mine = next((x for x in p if x["metadata"]["uid"] == uid), None)
            return mine is None or mine["status"].get("phase") in ("Failed", "Succeeded")

        cluster.wait_for(evicted_gone, 120, interval=0.2, desc="the evicted segment-1 pod stopped")
    finally:
        gate.touch()
    obj = wait_phase(cluster, namespace, "evict", operator)
    check_finished(cluster, namespace, "evict", obj, 2, 3)
    member = int(pod["metadata"]["labels"]["pbt.dev/member"])
    runs = [line.split() for line in log.read_text().splitlines()]
    seg1 = [r for r in runs if int(r[0]) == member and r[1] == "1"]
    assert len(seg1) == 2, runs  # the evicted run and its rerun
    assert seg1[0][2] == seg1[1][2], seg1  # both restored from the same checkpoint
    mobj = cluster.get("pbtm", f"evict-m{member:03d}", namespace)
    failed = [h for h in mobj["status"]["history"] if h["status"] != "done"]
    assert not failed, failed  # a disruption is not a failure
    events = cluster.kubectl_json("get", "events", "-n", namespace)["items"]
    assert any(e["reason"] == "SegmentDisrupted" for e in events)


def test_operator_killed_mid_run_resumes_exactly_once(cluster: Cluster, namespace: str, operator: OperatorProcess,
                                                      node_agent: NodeAgent, tmp_path: Path) -> None:
    # This test's operator must be the only one: the module's (cluster-wide, like this one) would go on
    # reconciling the training through every kill, so the kills would prove nothing, and two operators
    # without peering race each other's writes. It is stopped (and waited for) first, restarted after.
    operator.stop()
    op = OperatorProcess(cluster, tmp_path / "op.log")
    op.start()
    log = tmp_path / "runs.log"
    try:
        cluster.apply(training("crash", tmp_path / "ckpt", population=4, parallelism=4, segments=4,
                               mode="synchronous", env={"PBT_TEST_LOG": str(log), "PBT_TEST_SLEEP": "0.3"}),
                      namespace)
        for kill in range(3):
            want = 2 + kill * 4
            cluster.wait_for(lambda want=want: log.exists() and len(log.read_text().splitlines()) >= want, 120,
                             desc="segments running")
            op.kill9()
            time.sleep(1.0)
            op.start()
        obj = wait_phase(cluster, namespace, "crash", op)
    finally:
        op.stop()
        operator.start()
    check_finished(cluster, namespace, "crash", obj, 4, 4)
    runs = collections.Counter(tuple(line.split()[:2]) for line in log.read_text().splitlines())
    assert all(n == 1 for n in runs.values()), runs
    assert len(runs) == 16


def test_invalid_training_rejected_or_failed(cluster: Cluster, namespace: str, operator: OperatorProcess,
                                            tmp_path: Path) -> None:
    bad = training("bad", tmp_path / "ckpt")
    bad["spec"]["hyperparameters"]["h0"]["min"] = 2.0  # min > max: the schema's CEL rule refuses it
    p = cluster.apply(bad, namespace, check=False)
    assert p.returncode != 0 and "max must be > min" in p.stderr, p.stderr
    bad2 = training("bad2", tmp_path / "ckpt")
    # passes the schema (it cannot see into choices), fails the spec model
    bad2["spec"]["hyperparameters"]["opt"] = {"type": "categorical", "choices": ["sgd", "sgd"]}
    cluster.apply(bad2, namespace)
    obj = wait_phase(cluster, namespace, "bad2", operator, phase="Failed", timeout=60)
    failed = next(c for c in obj["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.hyperparameters.opt.choices" in failed["message"]
