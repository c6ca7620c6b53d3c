"""The autoscaling test cluster: a private control plane with Karpenter (KWOK provider) and Kueue
(hack/addons.sh), and a node agent that adopts the Nodes Karpenter creates (hack/nodeagent.py
--adopt-selector), so that the real Karpenter decides when GPU nodes come and go and the workers really
run on them. Used by tests/e2e/test_autoscaling.py and benchmarks/autoscale.py."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterlib import REPO, Cluster, NodeAgent, parse_env_file, run_testcluster

ADDONS = REPO / "hack" / "addons.sh"
EXAMPLES = REPO / "examples" / "autoscaling"
KWOK_NODE_SELECTOR = "kwok.x-k8s.io/node=fake"  # the label Karpenter's KWOK provider puts on its Nodes
POOL_LABEL = "karpenter.sh/nodepool"


def build_addons(*names: str) -> subprocess.CompletedProcess:
    """Build (once per machine, cached by version) the add-ons; slow the first time."""
    return subprocess.run(["bash", str(ADDONS), "build", *names], text=True, check=False)


class AutoscaleCluster:
    """A private control plane with the add-ons, plus a node agent adopting Karpenter's nodes."""

    def __init__(self, workdir: Path, addons: str = "karpenter,kueue", ready_delay: float = 3.0,
                 owner_pid: int | None = None):
        self.dir = str(workdir / "cluster")
        env = {"PBT_ADDONS": addons, "PBT_CLUSTER_OWNER_PID": str(owner_pid or os.getpid())}
        up = run_testcluster("up", self.dir, check=False, env=env, timeout=900)
        if up.returncode != 0:
            raise RuntimeError(f"hack/testcluster.sh up with {addons} failed:\n{up.stderr[-4000:]}")
        self.cluster = Cluster(self.dir, parse_env_file(run_testcluster("env", self.dir).stdout))
        try:
            self.agent = NodeAgent(self.cluster, workdir / "nodeagent", nodes=0, gpus=0, prefix="static",
                                   extra_args=("--adopt-selector", KWOK_NODE_SELECTOR,
                                               "--adopt-ready-delay", str(ready_delay)))
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        agent = getattr(self, "agent", None)
        if agent is not None:
            agent.stop()
        run_testcluster("down", self.dir, check=False, timeout=120)

    def pool_nodes(self, pool: str | None = None) -> list[dict[str, Any]]:
        sel = f"{POOL_LABEL}={pool}" if pool else POOL_LABEL
        return self.cluster.kubectl_json("get", "nodes", "-l", sel)["items"]


def node_gpus(node: Any) -> int:
    """nvidia.com/gpu capacity of a Node (dict from kubectl or a kubernetes client object)."""
    cap = node["status"]["capacity"] if isinstance(node, dict) else (node.status.capacity or {})
    return int(cap.get("nvidia.com/gpu", 0) or 0)


@dataclass
class Sample:
    t: float  # seconds since the sampler started
    nodes: dict[str, int]  # Karpenter node -> GPUs, Ready ones only
    booting: int  # Karpenter nodes that exist but are not Ready yet
    running: dict[str, str]  # pod -> node, for pods whose trainer container runs
    pending: int  # pods not yet running (unscheduled, waiting for a node, starting)
    disrupted: list[str] = field(default_factory=list)  # pods with a DisruptionTarget condition
    billed: dict[str, int] = field(default_factory=dict)  # every Karpenter node that exists -> GPUs (booting,
    # ready or draining: what a cloud bills from launch to termination)


class Sampler(threading.Thread):
    """Polls the cluster a few times a second: Karpenter's nodes and one namespace's segment pods.
    The tests and the benchmark derive peaks, node-seconds and overlaps from the samples."""

    def __init__(self, cluster: Cluster, namespace: str, selector: str = "pbt.dev/training", interval: float = 0.5):
        super().__init__(daemon=True)
        from kubernetes import client

        self.core = client.CoreV1Api(cluster.api_client())
        self.ns = namespace
        self.selector = selector
        self.interval = interval
        self.samples: list[Sample] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()
        self.ever_disrupted: set[str] = set()
        self.ever_on: dict[str, str] = {}  # pod -> the node it ran on

    def sample(self) -> Sample:
        nodes: dict[str, int] = {}
        billed: dict[str, int] = {}
        booting = 0
        for n in self.core.list_node(label_selector=POOL_LABEL).items:
            billed[n.metadata.name] = node_gpus(n)
            ready = any(c.type == "Ready" and c.status == "True" for c in (n.status.conditions or []))
            if ready and not n.metadata.deletion_timestamp:
                nodes[n.metadata.name] = node_gpus(n)
            elif not ready:
                booting += 1
        running: dict[str, str] = {}
        pending = 0
        disrupted = []
        for p in self.core.list_namespaced_pod(self.ns, label_selector=self.selector).items:
            name = p.metadata.name
            if any(c.type == "DisruptionTarget" and c.status == "True" for c in (p.status.conditions or [])):
                disrupted.append(name)
            phase = p.status.phase
            statuses = p.status.container_statuses or []
            if phase == "Running" and any(s.state and s.state.running for s in statuses):
                running[name] = p.spec.node_name
            elif phase == "Pending":
                pending += 1
        return Sample(time.monotonic() - self.t0, nodes, booting, running, pending, disrupted, billed)

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                s = self.sample()
                self.samples.append(s)
                self.ever_disrupted.update(s.disrupted)
                self.ever_on.update(s.running)
            except Exception:  # a transient API error: the next sample will do
                pass
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        """Stop sampling and take one last sample now: the loop's last one may predate what the test has
        just waited for (e.g. the pool's last node going away)."""
        self.stop_event.set()
        self.join(10)
        try:
            self.samples.append(self.sample())
        except Exception:  # a transient API error: the loop's last sample stands
            pass

    # -- summaries ---------------------------------------------------------------------------
    def peak_running(self) -> int:
        return max((len(s.running) for s in self.samples), default=0)

    def peak_nodes(self) -> int:
        return max((len(s.nodes) for s in self.samples), default=0)

    def gpu_node_seconds(self, billed: bool = True) -> float:
        """GPUs of Karpenter's nodes integrated over time: from launch to termination (billed=True, what
        a cloud charges) or only while Ready."""
        total = 0.0
        for a, b in zip(self.samples, self.samples[1:], strict=False):
            total += sum((a.billed if billed else a.nodes).values()) * (b.t - a.t)
        return total

    def busy_gpu_seconds(self) -> float:
        """Segment pods running (1 GPU each) integrated over time, as sampled."""
        total = 0.0
        for a, b in zip(self.samples, self.samples[1:], strict=False):
            total += len(a.running) * (b.t - a.t)
        return total
