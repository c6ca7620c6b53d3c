"""The node agent's adopt mode (hack/nodeagent.py --adopt-selector) on the shared test cluster, without
an autoscaler: a Node that someone else creates (here the test, as Karpenter's KWOK provider would) turns
Ready only after the simulated boot time, runs its pods, keeps the capacity its creator gave it, and is let
go when its creator deletes it."""

from __future__ import annotations

import uuid

import pytest
from clusterlib import Cluster

pytestmark = pytest.mark.e2e

SELECTOR_LABEL = "pbt.dev/adopt-test"
# The simulated boot: long enough that the checks right after the Node's creation (a kubectl process and
# a call to the agent) fall inside it on a loaded machine (4 s left them 3 s at best: the agent counts
# from creationTimestamp, in whole seconds, so the node may turn Ready up to 1 s early).
BOOT_SECONDS = 12


def _ready(node: dict | None) -> bool:
    return bool(node) and any(c["type"] == "Ready" and c["status"] == "True"
                              for c in (node.get("status") or {}).get("conditions") or [])


def test_adopted_node_boots_runs_pods_and_goes(cluster: Cluster, namespace: str, node_agent_factory) -> None:
    tag = uuid.uuid4().hex[:6]
    agent = node_agent_factory(nodes=0, gpus=0, prefix=f"adopter-{tag}",
                               extra_args=("--adopt-selector", f"{SELECTOR_LABEL}={tag}",
                                           "--adopt-ready-delay", str(BOOT_SECONDS)))
    name = f"foreign-{tag}"
    cap = {"cpu": "8", "memory": "32Gi", "pods": "110", "nvidia.com/gpu": "2"}
    cluster.apply({"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": name, "labels": {SELECTOR_LABEL: tag, "kubernetes.io/hostname": name}},
                   "spec": {"providerID": f"kwok://{name}"},
                   "status": {"capacity": cap, "allocatable": cap}})
    try:
        # not Ready during the simulated boot, Ready after it
        assert not _ready(cluster.get("node", name))
        assert name not in [n["name"] for n in agent.nodes]
        cluster.wait_for(lambda: _ready(cluster.get("node", name)), 60, desc="the adopted node Ready")
        node = cluster.get("node", name)
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "2"  # the creator's capacity is kept
        assert [n for n in agent.nodes if n["name"] == name and n["adopted"] and n["gpus"] == 2]
        lease = cluster.get("lease", name, "kube-node-lease")
        assert lease["metadata"]["ownerReferences"][0]["uid"] == node["metadata"]["uid"]
        # its pods run as processes
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper"},
               "spec": {"nodeName": name, "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                        "containers": [{"name": "c", "image": "none", "command": ["python", "-c",
                                                                                  "import time; time.sleep(300)"],
                                        "resources": {"limits": {"nvidia.com/gpu": 1}}}]}}
        cluster.apply(pod, namespace)
        cluster.wait_for(lambda: (cluster.get("pod", "sleeper", namespace) or {}).get("status", {}).get("phase")
                         == "Running", 60, desc="the pod running on the adopted node")
        assert [p for p in agent.processes() if p["pod"] == f"{namespace}/sleeper" and p["node"] == name]
    finally:
        # the creator deletes the node (the instance is gone): its processes die with it
        cluster.kubectl("delete", "node", name, "--wait=false", check=False)
    cluster.wait_for(lambda: not [p for p in agent.processes() if p["pod"] == f"{namespace}/sleeper"], 30,
                     desc="the pod's process stopped with its node")
    cluster.wait_for(lambda: name not in [n["name"] for n in agent.nodes], 30, desc="the agent letting go")
