"""Fixtures for the e2e tests against a real control plane (see docs/testcluster.md).

- ``cluster`` (session): etcd + kube-apiserver + kube-controller-manager + kube-scheduler started with
  ``hack/testcluster.sh up`` in a private directory and stopped at the end. ``cluster.kubectl(*args)`` and
  ``cluster.helm(*args)`` return CompletedProcess; ``cluster.kubeconfig`` is the admin kubeconfig.
- ``namespace`` (function): a fresh namespace (with its default service account), deleted afterwards.
- ``node_agent`` (session): hack/nodeagent.py serving ``PBT_E2E_NODES`` (2) nodes with ``PBT_E2E_GPUS`` (4)
  ``nvidia.com/gpu`` each; methods add_node / remove_node / lose_node / evict_pod / processes.
- ``node_agent_factory`` (session): start more agents, e.g. ``node_agent_factory(nodes=1, gpus=8)``.

Environment:
- ``PBT_E2E=0`` skips every test that uses these fixtures.
- ``PBT_CLUSTER_DIR=<dir>`` reuses (or starts and leaves running) the cluster in that directory instead of a
  private one, e.g. after ``hack/testcluster.sh up``: fast edit-test loops.
The binaries are built on first use if they are not cached yet (slow: see docs/testcluster.md).
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest
from clusterlib import Cluster, NodeAgent, parse_env_file, run_testcluster


def _e2e_disabled() -> bool:
    return os.environ.get("PBT_E2E", "").strip().lower() in ("0", "false", "no", "off")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if _e2e_disabled():
        pytest.skip("e2e tests disabled (PBT_E2E=0)")
    # builds on first use (tens of minutes), a no-op once cached
    build = run_testcluster("build", check=False)
    if build.returncode != 0:
        pytest.fail("hack/testcluster.sh build failed: the e2e tests need the control plane binaries "
                    "(Go >= 1.26 and the Go module proxy; set PBT_E2E=0 to skip these tests)", pytrace=False)
    shared = os.environ.get("PBT_CLUSTER_DIR")
    cluster_dir = shared or str(tmp_path_factory.mktemp("testcluster"))
    env = {} if shared else {"PBT_CLUSTER_OWNER_PID": str(os.getpid())}
    up = run_testcluster("up", cluster_dir, check=False, env=env, timeout=600)
    if up.returncode != 0:
        pytest.fail(f"hack/testcluster.sh up failed:\n{up.stderr[-4000:]}", pytrace=False)
    c = Cluster(cluster_dir, parse_env_file(run_testcluster("env", cluster_dir).stdout))
    try:
        yield c
    finally:
        if not shared:
            run_testcluster("down", cluster_dir, check=False, timeout=120)


def _ns_name(node: pytest.Item) -> str:
    base = re.sub(r"[^a-z0-9-]+", "-", node.name.lower()).strip("-")[:40].strip("-")
    return f"{base or 'e2e'}-{uuid.uuid4().hex[:5]}"


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = _ns_name(request.node)
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "pbt.dev/e2e=true")
    cluster.wait_for(lambda: cluster.get("serviceaccount", "default", name), 60, desc=f"default SA in {name}")
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="session")
def node_agent_factory(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    agents: list[NodeAgent] = []

    def start(nodes: int = 1, gpus: int = 4, prefix: str | None = None, **kw) -> NodeAgent:
        agent = NodeAgent(cluster, tmp_path_factory.mktemp("nodeagent"), nodes=nodes, gpus=gpus, prefix=prefix, **kw)
        agents.append(agent)
        return agent

    yield start
    for a in agents:
        a.stop()


@pytest.fixture(scope="session")
def node_agent(node_agent_factory) -> NodeAgent:
    return node_agent_factory(nodes=int(os.environ.get("PBT_E2E_NODES", "2")),
                              gpus=int(os.environ.get("PBT_E2E_GPUS", "4")), prefix="gpu-node")
