"""The local control plane itself: real kube-apiserver/etcd/controller-manager/scheduler, the node agent
playing the kubelet, kubectl and helm. These tests pin down what the operator's e2e tests rely on."""

from __future__ import annotations

import json
import textwrap
import time
import uuid

import psutil
import pytest
from clusterlib import Cluster, NodeAgent

pytestmark = pytest.mark.e2e

PY = "python"  # the node agent puts the test interpreter first on PATH


def job(name: str, script: str, *, completions: int = 1, parallelism: int = 1, backoff: int = 0,
        container: dict | None = None, pod_spec: dict | None = None, metadata: dict | None = None) -> dict:
    c = {"name": "main", "image": "ignored.local/python:3", "command": [PY, "-c", script]}
    c.update(container or {})
    spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": 5, "containers": [c]}
    spec.update(pod_spec or {})
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, **(metadata or {})},
            "spec": {"completions": completions, "parallelism": parallelism, "backoffLimit": backoff,
                     "template": {"spec": spec}}}


def pod(name: str, script: str, *, gpus: int = 0, pod_spec: dict | None = None, grace: int = 5) -> dict:
    c = {"name": "main", "image": "ignored.local/python:3", "command": [PY, "-c", script]}
    if gpus:
        c["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": grace, "containers": [c]}
    spec.update(pod_spec or {})
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def job_condition(cluster: Cluster, ns: str, name: str, ctype: str) -> bool:
    j = cluster.get("job", name, ns)
    return any(c["type"] == ctype and c["status"] == "True" for c in (j or {}).get("status", {}).get("conditions", []))


def job_pods(cluster: Cluster, ns: str, name: str) -> list[dict]:
    return cluster.kubectl_json("get", "pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={name}")["items"]


def pod_phase(cluster: Cluster, ns: str, name: str) -> str | None:
    p = cluster.get("pod", name, ns)
    return p and p.get("status", {}).get("phase")


def pid_of(p: dict) -> int:
    cid = p["status"]["containerStatuses"][0]["containerID"]
    assert cid.startswith("pbt://"), cid
    return int(cid.removeprefix("pbt://"))


def process_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ------------------------------------------------------------------------------------------------


def test_kubectl_and_helm_work(cluster: Cluster, namespace: str, tmp_path) -> None:
    v = cluster.kubectl_json("version")
    assert v["serverVersion"]["gitVersion"] == cluster.version
    assert v["clientVersion"]["gitVersion"] == cluster.version
    out = cluster.helm("version").stdout
    assert "v3." in out, out
    # helm talks to the API server: install a tiny chart and see its object
    chart = tmp_path / "tiny"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: tiny\nversion: 0.1.0\n")
    (chart / "templates" / "cm.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: {{ .Release.Name }}-cm}
        data: {answer: "{{ .Values.answer }}"}
        """))
    cluster.helm("install", "tiny", str(chart), "-n", namespace, "--set", "answer=42", "--wait")
    cm = cluster.get("configmap", "tiny-cm", namespace)
    assert cm["data"]["answer"] == "42"
    assert "tiny" in cluster.helm("list", "-n", namespace, "-q").stdout.split()
    cluster.helm("uninstall", "tiny", "-n", namespace)
    assert cluster.get("configmap", "tiny-cm", namespace) is None


def test_job_completes_with_termination_message(cluster: Cluster, namespace: str, node_agent: NodeAgent) -> None:
    cluster.kubectl("create", "secret", "generic", "creds", "-n", namespace, "--from-literal=token=s3cr3t")
    cluster.kubectl("create", "configmap", "settings", "-n", namespace, "--from-literal=lr=0.01")
    script = textwrap.dedent("""\
        import json, os, sys
        out = {k: os.environ.get(k) for k in ("TOKEN", "LR", "POD", "NODE", "LABEL", "DERIVED")}
        out["cwd"] = os.getcwd()
        out["argv"] = sys.argv[1:]
        out["python"] = sys.executable
        with open(sys.argv[1], "w") as f:
            json.dump(out, f)
        print("done")
        """)
    container = {
        "args": ["/dev/termination-log"],
        "env": [
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "LR", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "lr"}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "LABEL", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}},
            {"name": "DERIVED", "value": "lr=$(LR)"},
        ],
    }
    cluster.apply(job("hello", script, container=container), namespace)
    cluster.wait_for(lambda: job_condition(cluster, namespace, "hello", "Complete"), 90, desc="job Complete")
    [p] = job_pods(cluster, namespace, "hello")
    assert p["status"]["phase"] == "Succeeded"
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 0 and term["reason"] == "Completed"
    msg = json.loads(term["message"])
    assert msg["TOKEN"] == "s3cr3t" and msg["LR"] == "0.01" and msg["DERIVED"] == "lr=0.01"
    assert msg["POD"] == p["metadata"]["name"] and msg["NODE"] == p["spec"]["nodeName"] and msg["LABEL"] == "hello"
    assert p["spec"]["nodeName"] in {n["name"] for n in node_agent.nodes}
    assert msg["argv"][0].endswith(".termination-log")  # the path was rewritten to a per-pod file
    # the same message through kubectl's jsonpath, as the operator will read it
    jp = "{.items[0].status.containerStatuses[0].state.terminated.message}"
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=hello",
                          "-o", f"jsonpath={jp}").stdout
    assert json.loads(out) == msg


def test_failed_container_reports_exit_code_and_message(cluster: Cluster, namespace: str, node_agent: NodeAgent) -> None:
    script = ("import os, sys; open(os.environ['PBT_TERMINATION_LOG'], 'w').write('diverged: loss=nan'); "
              "sys.exit(3)")
    cluster.apply(job("boom", script), namespace)
    cluster.wait_for(lambda: job_condition(cluster, namespace, "boom", "Failed"), 90, desc="job Failed")
    [p] = job_pods(cluster, namespace, "boom")
    assert p["status"]["phase"] == "Failed"
    term = p["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3 and term["reason"] == "Error"
    assert term["message"] == "diverged: loss=nan"


def test_gpu_pod_waits_for_capacity(cluster: Cluster, namespace: str, node_agent: NodeAgent) -> None:
    most = max(n["gpus"] for n in node_agent.nodes)
    want = most + 4
    cluster.apply(pod("big", "print('got the GPUs')", gpus=want), namespace)

    def unschedulable() -> bool:
        p = cluster.get("pod", "big", namespace)
        return any(c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable"
                   for c in p.get("status", {}).get("conditions", []))

    cluster.wait_for(unschedulable, 60, desc="PodScheduled=False/Unschedulable")
    assert pod_phase(cluster, namespace, "big") == "Pending"
    assert not cluster.get("pod", "big", namespace)["spec"].get("nodeName")
    node = node_agent.add_node(gpus=want)
    try:
        cluster.wait_for(lambda: pod_phase(cluster, namespace, "big") == "Succeeded", 90, desc="pod Succeeded")
        assert cluster.get("pod", "big", namespace)["spec"]["nodeName"] == node
        gpu = cluster.get("node", node)["status"]["allocatable"]["nvidia.com/gpu"]
        assert int(gpu) == want
    finally:
        cluster.kubectl("delete", "pod", "big", "-n", namespace, "--wait=false", check=False)
        node_agent.remove_node(node)


def test_deleting_owner_garbage_collects_job_and_pods(cluster: Cluster, namespace: str, node_agent: NodeAgent) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    owner = cluster.get("configmap", "owner", namespace)
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"],
           "controller": True, "blockOwnerDeletion": True}
    # ignores SIGTERM: the grace period must end with a SIGKILL
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
    cluster.apply(job("owned", script, parallelism=2, completions=2, metadata={"ownerReferences": [ref]},
                      pod_spec={"terminationGracePeriodSeconds": 2}), namespace)

    def running() -> list[dict] | None:
        ps = job_pods(cluster, namespace, "owned")
        ok = len(ps) == 2 and all(p["status"].get("phase") == "Running" for p in ps)
        return ps if ok else None

    pods = cluster.wait_for(running, 90, desc="2 running pods")
    pids = [pid_of(p) for p in pods]
    assert all(psutil.pid_exists(pid) for pid in pids)
    t0 = time.monotonic()
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace, "--cascade=foreground", "--wait=false")
    cluster.wait_for(lambda: cluster.get("job", "owned", namespace) is None, 90, desc="job garbage-collected")
    cluster.wait_for(lambda: not job_pods(cluster, namespace, "owned"), 90, desc="pods garbage-collected")
    cluster.wait_for(lambda: all(process_gone(pid) for pid in pids), 30, desc="processes killed")
    assert time.monotonic() - t0 >= 1.5  # SIGTERM was ignored: killed only after the grace period
    assert cluster.get("configmap", "owner", namespace) is None


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.e2e.pbt.dev"},
    "spec": {
        "group": "e2e.pbt.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"spec": {
                    "type": "object", "required": ["size"],
                    "properties": {
                        "size": {"type": "integer", "minimum": 1, "maximum": 64},
                        "mode": {"type": "string", "enum": ["pbt", "pb2"]},
                    },
                }},
            }},
        }],
    },
}


def test_crd_structural_schema_rejects_invalid_objects(cluster: Cluster, namespace: str) -> None:
    cluster.apply(CRD)
    try:
        cluster.wait_established("widgets.e2e.pbt.dev")

        def widget(name: str, spec: dict) -> dict:
            return {"apiVersion": "e2e.pbt.dev/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}

        # discovery may lag a moment behind Established
        cluster.wait_for(lambda: cluster.apply(widget("ok", {"size": 8, "mode": "pb2"}), namespace,
                                               check=False).returncode == 0, 30, desc="valid widget accepted")
        for bad in ({"size": 0}, {"size": "big"}, {"mode": "pbt"}, {"size": 8, "mode": "grid"}):
            p = cluster.apply(widget("bad", bad), namespace, check=False)
            assert p.returncode != 0, f"{bad} was accepted"
            assert "Invalid value" in p.stderr or "Required value" in p.stderr or "Unsupported value" in p.stderr, p.stderr
        assert cluster.get("widget", "bad", namespace) is None
        assert cluster.get("widget", "ok", namespace)["spec"]["size"] == 8
    finally:
        cluster.kubectl("delete", "crd", "widgets.e2e.pbt.dev", "--wait=false", check=False)


def test_eviction_api_terminates_the_process(cluster: Cluster, namespace: str, node_agent: NodeAgent) -> None:
    cluster.apply(pod("victim", "import time; time.sleep(3600)"), namespace)
    cluster.wait_for(lambda: pod_phase(cluster, namespace, "victim") == "Running", 60, desc="pod Running")
    pid = pid_of(cluster.get("pod", "victim", namespace))
    node_agent.evict_pod(namespace, "victim", mode="api")
    cluster.wait_for(lambda: cluster.get("pod", "victim", namespace) is None, 60, desc="evicted pod deleted")
    cluster.wait_for(lambda: process_gone(pid), 30, desc="process killed")


def test_preemption_fails_the_pod_with_disruption_target(cluster: Cluster, namespace: str,
                                                         node_agent: NodeAgent) -> None:
    cluster.apply(job("preempted", "import time; time.sleep(3600)", backoff=3,
                      pod_spec={"terminationGracePeriodSeconds": 1}), namespace)
    [first] = cluster.wait_for(lambda: [p for p in job_pods(cluster, namespace, "preempted")
                                        if p["status"].get("phase") == "Running"], 60, desc="pod Running")
    name = first["metadata"]["name"]
    pid = pid_of(first)
    node_agent.evict_pod(namespace, name, mode="preempt", message="node maintenance")
    assert process_gone(pid)
    p = cluster.wait_for(lambda: (q := cluster.get("pod", name, namespace)) and q["status"]["phase"] == "Failed" and q,
                         30, desc="pod Failed")
    dt = [c for c in p["status"]["conditions"] if c["type"] == "DisruptionTarget"]
    assert dt and dt[0]["status"] == "True" and dt[0]["message"] == "node maintenance"
    # the Job controller replaces the pod
    cluster.wait_for(lambda: any(q["metadata"]["name"] != name and q["status"].get("phase") == "Running"
                                 for q in job_pods(cluster, namespace, "preempted")), 60, desc="replacement pod")


def test_node_loss_kills_processes_and_frees_pods(cluster: Cluster, namespace: str, node_agent: NodeAgent) -> None:
    node = node_agent.add_node(gpus=1, labels={"e2e/lose": "yes"})
    try:
        spec = {"nodeSelector": {"e2e/lose": "yes"}}
        cluster.apply(job("doomed", "import time; time.sleep(3600)", backoff=3, pod_spec=spec), namespace)
        [p] = cluster.wait_for(lambda: [q for q in job_pods(cluster, namespace, "doomed")
                                        if q["status"].get("phase") == "Running"], 60, desc="pod Running")
        assert p["spec"]["nodeName"] == node
        pid = pid_of(p)
        killed = node_agent.lose_node(node)
        assert killed == [f"{namespace}/{p['metadata']['name']}"]
        assert process_gone(pid)

        def not_ready() -> bool:
            conds = cluster.get("node", node)["status"]["conditions"]
            return any(c["type"] == "Ready" and c["status"] != "True" for c in conds)

        cluster.wait_for(not_ready, 30, desc="node NotReady")
        # taint eviction + pod GC (out-of-service taint) remove the pod; the Job counts it as failed
        cluster.wait_for(lambda: cluster.get("pod", p["metadata"]["name"], namespace) is None, 120,
                         interval=1, desc="pod of the lost node deleted")
        # The Job controller counts a finished pod in three writes: its uid into
        # status.uncountedTerminatedPods, the pod's tracking finalizer removed (only now can the pod go),
        # then status.failed. So the pod can be gone a moment before `failed` says so.
        def counted() -> bool:
            j = cluster.get("job", "doomed", namespace) or {}
            return j.get("status", {}).get("failed", 0) >= 1

        cluster.wait_for(counted, 30, desc="the Job counting the lost pod as failed")
    finally:
        node_agent.remove_node(node)


def test_many_short_pods(cluster: Cluster, namespace: str, node_agent: NodeAgent) -> None:
    n = 64
    t0 = time.monotonic()
    cluster.apply(job("many", "import os; print(os.environ['HOSTNAME'])", completions=n, parallelism=32), namespace)
    cluster.wait_for(lambda: job_condition(cluster, namespace, "many", "Complete"), 300, interval=1,
                     desc=f"{n} completions")
    elapsed = time.monotonic() - t0
    j = cluster.get("job", "many", namespace)
    assert j["status"]["succeeded"] == n
    some = job_pods(cluster, namespace, "many")[0]["metadata"]["name"]
    assert node_agent.pod_log(namespace, some).strip() == some  # HOSTNAME is the pod name
    print(f"{n} pods in {elapsed:.1f}s")


def test_namespace_is_fresh(cluster: Cluster, namespace: str) -> None:
    assert cluster.kubectl_json("get", "all", "-n", namespace)["items"] == []
    name = f"x{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "configmap", name, "-n", namespace)
    assert cluster.get("configmap", name, namespace)


def test_pod_authenticates_as_its_service_account(cluster: Cluster, namespace: str, node_agent: NodeAgent) -> None:
    sa = "runner"
    cluster.kubectl("create", "serviceaccount", sa, "-n", namespace)
    cluster.kubectl("create", "role", "pod-reader", "-n", namespace, "--verb=get,list", "--resource=pods")
    cluster.kubectl("create", "rolebinding", "runner-reads", "-n", namespace, "--role=pod-reader",
                    f"--serviceaccount={namespace}:{sa}")
    script = textwrap.dedent("""\
        import json, os, subprocess, sys
        from kubernetes import client, config
        config.load_kube_config()  # KUBECONFIG: the pod's bound service-account token
        ns = open(sys.argv[1]).read()
        v1 = client.CoreV1Api()
        out = {"ns": ns, "pods": [p.metadata.name for p in v1.list_namespaced_pod(ns).items]}
        try:
            v1.list_namespace()
            out["namespaces"] = "allowed"
        except client.ApiException as e:
            out["namespaces"] = e.status
        out["whoami"] = subprocess.run(["kubectl", "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"],
                                       capture_output=True, text=True).stdout
        json.dump(out, open(os.environ["PBT_TERMINATION_LOG"], "w"))
        """)
    p = pod("whoami", script, pod_spec={"serviceAccountName": sa})
    p["spec"]["containers"][0]["args"] = ["/var/run/secrets/kubernetes.io/serviceaccount/namespace"]
    cluster.apply(p, namespace)
    cluster.wait_for(lambda: pod_phase(cluster, namespace, "whoami") in ("Succeeded", "Failed"), 60, desc="pod done")
    st = cluster.get("pod", "whoami", namespace)["status"]["containerStatuses"][0]["state"]["terminated"]
    assert st["exitCode"] == 0, node_agent.pod_log(namespace, "whoami")
    out = json.loads(st["message"])
    assert out == {"ns": namespace, "pods": ["whoami"], "namespaces": 403,
                   "whoami": f"system:serviceaccount:{namespace}:{sa}"}
