"""The operator on a real node: kubelet, containerd, runc, CNI and kube-proxy (hack/realnode.sh), running
the images our Dockerfiles build. The operator is installed with its Helm chart into a namespace that
enforces the `restricted` Pod Security Standard and runs as its ServiceAccount from a real pod with a
read-only root filesystem; segments run in containers of the quadratic worker image and keep their
checkpoints in a real S3-compatible server (moto) that they reach over the pod network.

What only a real node shows (the node agent of the other e2e tests plays the kubelet with host processes
and ignores images, securityContext, limits, sidecars and the device-plugin flow): see
docs/testcluster.md for which tests run where.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterlib import Cluster, parse_env_file, start_moto

pytestmark = [pytest.mark.e2e, pytest.mark.node]

ROOT = Path(__file__).resolve().parents[2]
REALNODE = ROOT / "hack" / "realnode.sh"
GPUS = 4  # fake nvidia.com/gpu devices the node's device plugin advertises
RESTRICTED = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"

# Runs before the worker in some tests: reports what the container sees, then runs the image's worker.
PROBE = r"""
import json, os, sys, time, runpy
seg = json.loads(os.environ["PBT_SEGMENT"])
info = {"uid": os.getuid(), "gid": os.getgid(), "token": os.path.exists("TOKEN"),
        "nvidia": os.environ.get("NVIDIA_VISIBLE_DEVICES"), "member": seg["member"], "segment": seg["segment"],
        "restore": seg["restore"]}
try:
    open("/probe-write", "w").close()
    info["root_writable"] = True
except OSError as e:
    info["root_writable"] = False
print("PROBE " + json.dumps(info), flush=True)
if seg["segment"] in [int(s) for s in os.environ.get("PROBE_SLEEP_SEGMENTS", "").split(",") if s]:
    print("PROBE sleeping", flush=True)
    time.sleep(float(os.environ.get("PROBE_SLEEP", "20")))
sys.path.insert(0, "/app")
sys.argv = ["/app/worker.py"]
runpy.run_path("/app/worker.py", run_name="__main__")
""".replace("TOKEN", TOKEN)


def _e2e_disabled() -> bool:
    return os.environ.get("PBT_E2E", "").strip().lower() in ("0", "false", "no", "off")


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 3600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REALNODE), *args], env=dict(os.environ, **(env or {})), text=True,
                          capture_output=True, timeout=timeout)


class Moto:
    """`python -m moto.server` on the node's bridge address: reachable from the host and from pods."""

    def __init__(self, host: str, log: Path):
        self.proc, self.port = start_moto(host, log, start_new_session=True)
        self.endpoint = f"http://{host}:{self.port}"

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="k",
                            aws_secret_access_key="s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Node:
    def __init__(self, cluster: Cluster, env: dict[str, str], s3: Moto):
        self.cluster = cluster
        self.env = env
        self.s3 = s3
        self.worker_image = env["PBT_WORKER_IMAGE"]
        self.operator_image = env["PBT_OPERATOR_IMAGE"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    if _e2e_disabled():
        pytest.skip("e2e tests disabled (PBT_E2E=0)")
    if os.geteuid() != 0:
        pytest.skip("the real node needs root (containerd, runc, network devices, cgroups)")
    pytest.importorskip("grpc", reason="grpcio (the test extra) runs the fake GPU device plugin")
    pytest.importorskip("moto.server")
    for step in ("build", "images"):
        p = _run(step, timeout=3600)
        if p.returncode != 0:
            pytest.fail(f"hack/realnode.sh {step} failed (set PBT_E2E=0 to skip the e2e tests):\n"
                        f"{p.stderr[-4000:]}", pytrace=False)
    shared = os.environ.get("PBT_NODE_CLUSTER_DIR")  # a node started by hand: reuse it, leave it running
    cluster_dir = shared or str(tmp_path_factory.mktemp("realnode"))
    env = {"PBT_CLUSTER_DIR": cluster_dir, "PBT_CLUSTER_OWNER_PID": str(os.getpid()),
           "PBT_PYTHON": sys.executable, "PBT_NODE_GPUS": str(GPUS)}
    if not shared:
        up = _run("up", env=env, timeout=900)
        if up.returncode != 0 and "a real node runs in" in up.stderr:
            pytest.skip("another test run's real node is up on this machine (one node per machine: "
                        "the bridge and cgroup root are machine-wide)")
        if up.returncode != 0:
            _run("down", env=env, timeout=300)
            pytest.fail(f"hack/realnode.sh up failed:\n{up.stderr[-6000:]}", pytrace=False)
    cenv = parse_env_file((Path(cluster_dir) / "env").read_text())
    cluster = Cluster(cluster_dir, cenv)
    s3 = Moto(cenv["PBT_NODE_BRIDGE_IP"], Path(cluster_dir) / "moto.log")
    try:
        yield Node(cluster, cenv, s3)
    finally:
        s3.stop()
        if not shared:
            down = _run("down", env=env, timeout=300)
            assert down.returncode == 0, down.stderr[-3000:]


@pytest.fixture(scope="module")
def operator(node: Node) -> dict[str, Any]:
    """The chart installed with the built image into a namespace enforcing the restricted standard."""
    c = node.cluster
    c.kubectl("create", "namespace", "pbt-system", check=False)  # (exists on a reused node)
    c.kubectl("label", "--overwrite", "namespace", "pbt-system", "pod-security.kubernetes.io/enforce=restricted")
    repo, tag = node.operator_image.rsplit(":", 1)
    c.helm("upgrade", "--install", "pbt", str(ROOT / "charts" / "pbt-operator"), "-n", "pbt-system",
           "--set", f"image.repository={repo}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
           "--set", "replicaCount=1", "--set", "logFormat=plain", "--wait", "--timeout", "240s", timeout=300)
    pods = c.kubectl_json("get", "pods", "-n", "pbt-system", "-l", "app.kubernetes.io/name=pbt-operator")["items"]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def operator_log(node: Node) -> str:
    p = node.cluster.kubectl("logs", "-n", "pbt-system", "deploy/pbt-pbt-operator", "--tail=80", check=False)
    return p.stdout + p.stderr


@pytest.fixture
def ns(node: Node, operator: dict[str, Any], request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace enforcing the restricted standard, with the S3 credentials Secret and a fresh bucket."""
    base = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    c = node.cluster
    c.kubectl("create", "namespace", name)
    c.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    c.kubectl("create", "secret", "generic", "s3", "-n", name, "--from-literal=AWS_ACCESS_KEY_ID=k",
              "--from-literal=AWS_SECRET_ACCESS_KEY=s", f"--from-literal=AWS_ENDPOINT_URL_S3={node.s3.endpoint}",
              "--from-literal=AWS_REGION=us-east-1")
    node.s3.client().create_bucket(Bucket=name)
    yield name
    c.kubectl("delete", "namespace", name, "--wait=false", check=False)


def worker(node: Node, *, name: str = "trainer", gpus: int = 1, memory: str = "256Mi", probe: bool = False,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name, "image": node.worker_image, "imagePullPolicy": "Never",
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                      "limits": {"memory": memory, "nvidia.com/gpu": gpus}},
        "securityContext": RESTRICTED,
        "env": [{"name": k, "value": v} for k, v in (env or {}).items()],
    }
    if probe:
        c["command"] = ["python", "-c", PROBE]
    return c


def training(ns: str, name: str, containers: list[dict[str, Any]], *, population: int = 4, segments: int = 3,
             init: list[dict[str, Any]] | None = None, annotations: dict[str, str] | None = None,
             **extra: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {"terminationGracePeriodSeconds": 5, "containers": containers,
                           "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}}
    if init:
        pod["initContainers"] = init
    spec: dict[str, Any] = {
        "population": population, "parallelism": population, "mode": "asynchronous", "seed": 11,
        "segment": {"steps": 10, "timeoutSeconds": 180}, "budget": {"segments": segments},
        "hyperparameters": {"h0": {"type": "float", "min": 0.0, "max": 1.0, "initial": {"min": 0.0, "max": 0.3}},
                            "h1": {"type": "float", "min": 0.0, "max": 1.0, "initial": {"min": 0.0, "max": 0.3}}},
        "exploit": {"strategy": "truncation", "fraction": 0.5},
        "explore": {"strategy": "perturb"},
        "storage": {"uri": f"s3://{ns}/runs", "credentialsSecret": "s3"},
        "template": {"metadata": {"annotations": annotations or {}}, "spec": pod},
    }
    spec.update(extra)
    return {"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining", "metadata": {"name": name},
            "spec": spec}


def wait_phase(node: Node, ns: str, name: str, phase: str = "Succeeded", timeout: float = 300) -> dict[str, Any]:
    return node.cluster.wait_phase(ns, name, phase, timeout,
                                   describe=lambda: f"--- operator\n{operator_log(node)}")


def pods_of(node: Node, ns: str, name: str) -> list[dict[str, Any]]:
    return node.cluster.kubectl_json("get", "pods", "-n", ns, "-l", f"pbt.dev/training={name}")["items"]


def logs(node: Node, ns: str, pod: str, container: str | None = None) -> str:
    args = ["logs", "-n", ns, pod] + (["-c", container] if container else [])
    return node.cluster.kubectl(*args).stdout


def events(node: Node, ns: str) -> list[dict[str, Any]]:
    return node.cluster.kubectl_json("get", "events", "-n", ns)["items"]


# ---------------------------------------------------------------------------------------------------------

def test_operator_runs_from_its_chart_as_a_restricted_pod(node: Node, operator: dict[str, Any]) -> None:
    spec = operator["spec"]
    assert spec["serviceAccountName"] == "pbt-pbt-operator"
    (ctr,) = spec["containers"]
    assert ctr["image"] == node.operator_image and ctr["imagePullPolicy"] == "Never"
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    status = operator["status"]
    assert status["phase"] == "Running" and all(cs["ready"] for cs in status["containerStatuses"])
    # what runs is the image we built, imported into containerd (no registry anywhere)
    assert status["containerStatuses"][0]["imageID"]


def test_training_succeeds_in_worker_containers_with_s3_checkpoints_and_exploits(node: Node, ns: str) -> None:
    c = node.cluster
    c.apply(training(ns, "quad", [worker(node)], population=4, segments=4), ns)
    obj = wait_phase(node, ns, "quad")
    st = obj["status"]
    pods = pods_of(node, ns, "quad")
    assert len(pods) == 16, [p["metadata"]["name"] for p in pods]
    saved: dict[str, str] = {}
    restores: list[tuple[str, str, str]] = []  # (pod, uri, theta)
    for p in pods:
        (cs,) = p["status"]["containerStatuses"]
        assert cs["name"] == "trainer" and cs["image"].endswith(node.worker_image.split("/", 1)[1])
        assert cs["state"]["terminated"]["exitCode"] == 0
        out = logs(node, ns, p["metadata"]["name"])  # the trainer is the pod's default container
        m = re.search(r"saved=(\S+) theta=(\[[^\]]*\])", out)
        assert m, out
        saved[m.group(1)] = m.group(2)
        r = re.search(r"restore=(\S+) theta=(\[[^\]]*\])", out)
        assert r, out
        restores.append((p["metadata"]["name"], r.group(1), r.group(2)))
    # every restore reads exactly the weights its source saved; some came from another member (exploits)
    exploits = 0
    for pod, uri, theta in restores:
        if uri == "scratch":
            continue
        assert saved[uri] == theta, (pod, uri, theta, saved.get(uri))
        own = re.search(r"-m(\d{3})-", pod).group(1)  # type: ignore[union-attr]
        exploits += f"/m{own}/" not in uri
    assert exploits >= 1, restores
    reasons = collections.Counter(e["reason"] for e in c.events_once(ns, "Completed", kind="PopulationTraining")
                                  if e["involvedObject"]["kind"] in ("PopulationTraining", "PopulationMember"))
    assert reasons["Exploited"] >= 1 and reasons["Completed"] == 1, reasons
    # the best checkpoint is committed in S3
    best = st["best"]["checkpoint"]
    bucket, _, prefix = best[len("s3://"):].partition("/")
    keys = [o["Key"] for o in node.s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert f"{prefix}_COMMITTED" in keys, keys


def test_segment_container_has_no_token_runs_as_the_image_user_with_its_gpus_and_a_read_only_root(
        node: Node, ns: str) -> None:
    c = node.cluster
    c.apply(training(ns, "probe", [worker(node, gpus=2, probe=True)], population=2, segments=1), ns)
    wait_phase(node, ns, "probe")
    seen: list[list[str]] = []
    for p in pods_of(node, ns, "probe"):
        out = logs(node, ns, p["metadata"]["name"])
        info = json.loads(re.search(r"^PROBE (\{.*\})$", out, re.M).group(1))  # type: ignore[union-attr]
        assert info["token"] is False, info  # automountServiceAccountToken: false
        assert (info["uid"], info["gid"]) == (65532, 65532), info  # USER 65532:65532 in the image
        assert info["root_writable"] is False, info
        ids = info["nvidia"].split(",")
        assert len(ids) == 2 and all(re.fullmatch(r"GPU-pbt-\d+", i) for i in ids), info
        seen.append(ids)
        assert "saved=" in out  # and the segment still ran: it needs no writable root filesystem
    # both pods ran at once on a 4-GPU node: each got its own devices
    assert len(seen) == 2


def test_oom_killed_segment_is_a_failure_with_the_reason(node: Node, ns: str) -> None:
    c = node.cluster
    hog = worker(node, memory="64Mi")
    hog["command"] = ["python", "-c", "import time; x = b'x' * (512 * 1024 * 1024); time.sleep(5)"]
    c.apply(training(ns, "oom", [hog], population=2, segments=1,
                     failurePolicy={"maxRetries": 0, "onExhausted": "fail"}), ns)
    obj = wait_phase(node, ns, "oom", phase="Failed", timeout=180)
    p = c.wait_for(lambda: next((p for p in pods_of(node, ns, "oom") if (p["status"].get("containerStatuses") or [{}])[0]
                                 .get("state", {}).get("terminated")), None), 60, desc="a terminated pod")
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["reason"] == "OOMKilled", term
    members = c.kubectl_json("get", "pbtm", "-n", ns)["items"]
    failed = [h for m in members for h in m["status"].get("history") or [] if h["status"] != "done"]
    assert failed and all("OOMKilled" in h["error"] for h in failed), [m["status"] for m in members]
    msgs = [e["message"] for e in c.events_once(ns, "SegmentFailed") if e["reason"] == "SegmentFailed"]
    assert any("OOMKilled" in m for m in msgs), msgs
    assert obj["status"]["phase"] == "Failed"


def test_evicted_pod_reruns_the_segment_from_the_same_checkpoint(node: Node, ns: str) -> None:
    c = node.cluster
    w = worker(node, probe=True, env={"PROBE_SLEEP_SEGMENTS": "1", "PROBE_SLEEP": "15"})
    c.apply(training(ns, "evict", [w], population=2, segments=2), ns)

    def sleeping_pod() -> str | None:
        for p in pods_of(node, ns, "evict"):
            labels = p["metadata"]["labels"]
            if labels.get("pbt.dev/segment") == "1" and labels.get("pbt.dev/member") == "0" \
                    and p["status"].get("phase") == "Running":
                name = p["metadata"]["name"]
                if "PROBE sleeping" in c.kubectl("logs", "-n", ns, name, check=False).stdout:
                    return name
        return None

    first = c.wait_for(sleeping_pod, 120, interval=0.5, desc="segment 1 running")
    probe = re.compile(r"^PROBE (\{.*\})$", re.M)
    before = json.loads(probe.search(logs(node, ns, first)).group(1))  # type: ignore[union-attr]
    body = json.dumps({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": first, "namespace": ns}})
    c.kubectl("create", "--raw", f"/api/v1/namespaces/{ns}/pods/{first}/eviction", "-f", "-", input=body)
    wait_phase(node, ns, "evict", timeout=240)
    pods = [p for p in pods_of(node, ns, "evict") if p["metadata"]["labels"].get("pbt.dev/segment") == "1"
            and p["metadata"]["labels"].get("pbt.dev/member") == "0"]
    rerun = [p for p in pods if p["metadata"]["name"] != first]
    assert len(rerun) == 1, [p["metadata"]["name"] for p in pods]
    after = json.loads(probe.search(logs(node, ns, rerun[0]["metadata"]["name"])).group(1))  # type: ignore[union-attr]
    # the rerun restored exactly the checkpoint the evicted run had started from
    assert before["restore"] and after["restore"] == before["restore"], (before, after)
    assert re.search(r"/evict/m00\d/00000/$", after["restore"]), after
    member = c.get("pbtm", "evict-m000", ns)
    assert member is not None
    hist = member["status"]["history"]
    assert [h["status"] for h in hist] == ["done", "done"], hist  # the eviction was not a failure
    assert "SegmentFailed" not in {e["reason"] for e in events(node, ns)}


def test_sidecars_do_not_hide_the_trainers_result(node: Node, ns: str) -> None:
    c = node.cluster
    # a classic sidecar listed first that leaves a result-shaped termination message, and a native sidecar
    classic = worker(node, name="a-helper", gpus=0)
    classic["command"] = ["python", "-c", "open('/dev/termination-log', 'w').write('{\"score\": -999}')"]
    del classic["resources"]["limits"]["nvidia.com/gpu"]
    native = worker(node, name="proxy", gpus=0)
    native["command"] = ["python", "-c", "import time; print('sidecar up', flush=True); time.sleep(3600)"]
    native["restartPolicy"] = "Always"
    del native["resources"]["limits"]["nvidia.com/gpu"]
    c.apply(training(ns, "side", [classic, worker(node)], init=[native], population=2, segments=2,
                     annotations={DEFAULT_CONTAINER: "trainer"}), ns)
    obj = wait_phase(node, ns, "side")
    assert -2.0 < obj["status"]["best"]["score"] <= 1.2, obj["status"]["best"]
    for m in c.kubectl_json("get", "pbtm", "-n", ns)["items"]:
        for h in m["status"]["history"]:
            assert h["status"] == "done" and h["score"] != -999, h
    p = pods_of(node, ns, "side")[0]
    assert "saved=" in logs(node, ns, p["metadata"]["name"])  # kubectl logs picks the trainer
    assert "sidecar up" in logs(node, ns, p["metadata"]["name"], "proxy")


def test_more_gpus_than_the_node_has_shows_the_schedulers_reason(node: Node, ns: str) -> None:
    c = node.cluster
    from pbt_operator.kube import conditions

    if not hasattr(conditions, "UNSCHEDULABLE"):
        pytest.skip("the operator does not surface Pending reasons yet (issue 16)")
    c.apply(training(ns, "big", [worker(node, gpus=GPUS + 1)], population=2, segments=1), ns)

    def pending_pod() -> dict[str, Any] | None:
        for p in pods_of(node, ns, "big"):
            for cond in p["status"].get("conditions") or []:
                if cond["type"] == "PodScheduled" and cond.get("reason") == "Unschedulable":
                    return p
        return None

    p = c.wait_for(pending_pod, 60, desc="an unschedulable segment pod")
    assert "Insufficient nvidia.com/gpu" in json.dumps(p["status"]["conditions"])

    def explained() -> dict[str, Any] | None:
        member = c.get("pbtm", "big-m000", ns) or {}
        text = json.dumps(member.get("status") or {})
        return member if "Insufficient nvidia.com/gpu" in text else None

    member = c.wait_for(explained, 60, desc="the member status saying why it waits")
    assert member["status"]["phase"] != "Running", member["status"]

    def explained_by_event() -> list[str] | None:  # posted after the status write, through kopf's queue
        msgs = [e["message"] for e in events(node, ns) if e["involvedObject"]["kind"] in
                ("PopulationMember", "PopulationTraining")]
        return msgs if any("Insufficient nvidia.com/gpu" in m for m in msgs) else None

    c.wait_for(explained_by_event, 30, interval=0.5, desc="an Event saying why the segment waits")


@pytest.mark.torch
def test_digits_image_trains_segments_on_the_cpu(node: Node, ns: str) -> None:
    """The digits example's image (examples/digits/Dockerfile on the torch stand-in base; PBT_E2E_TORCH=1
    builds it, several GB) runs its segments on the node: torch on the CPU, checkpoints in S3."""
    image = node.env.get("PBT_DIGITS_IMAGE")
    if not image:
        pytest.skip("the digits image is built only with PBT_E2E_TORCH=1 (torch from PyPI, several GB)")
    c = node.cluster
    trainer = {"name": "train", "image": image, "imagePullPolicy": "Never", "command": ["python", "/app/train.py"],
               "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                             "limits": {"memory": "2Gi", "nvidia.com/gpu": 1}},
               "securityContext": RESTRICTED, "env": [{"name": "PBT_CPU", "value": "1"}],
               # torch (dynamo, via the optimizer) needs a writable temp dir: with a read-only root, a volume
               "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    hps = {"lr": {"type": "float", "min": 1e-3, "max": 0.5, "log": True, "initial": {"min": 0.05, "max": 0.3}},
           "momentum": {"type": "float", "min": 0.0, "max": 0.95},
           "batch_size": {"type": "int", "min": 8, "max": 128, "log": True}}
    t = training(ns, "digits", [trainer], population=2, segments=2, hyperparameters=hps,
                 objective={"metric": "score", "direction": "max"}, segment={"steps": 40, "timeoutSeconds": 300})
    t["spec"]["template"]["spec"]["volumes"] = [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    c.apply(t, ns)
    obj = wait_phase(node, ns, "digits", timeout=600)
    pods = pods_of(node, ns, "digits")
    assert len(pods) == 4, [p["metadata"]["name"] for p in pods]
    assert all(p["status"]["containerStatuses"][0]["image"].endswith(image.split("/", 1)[1]) for p in pods)
    # a digits classifier after two short segments is far better than chance (0.1)
    assert obj["status"]["best"]["score"] > 0.3, obj["status"]["best"]
