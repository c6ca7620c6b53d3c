"""The Helm chart on the real control plane: its rendered objects pass server-side validation, and an
installed chart runs a training with nothing but the RBAC it grants.

There is no container runtime here, so the chart is installed with `replicaCount=0` (a supported value:
"installed, not running"; the node agent would otherwise start the pod's command as a process), and the
test starts the operator itself from the *installed* Deployment: its command, args and env, with a
kubeconfig holding a token of the chart's ServiceAccount (`kubectl create token`). The PopulationTraining
is applied by a namespaced user (a ServiceAccount with a Role that only allows PopulationTrainings in its
namespace), through impersonation. The replicas > 1 test needs replicaCount 2, so there the pods are
kept Pending instead (a nodeSelector no node matches) and two operator processes are started.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from clusterlib import Cluster, NodeAgent
from test_operator import OperatorProcess, check_finished, training, wait_phase

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pbt-operator"
RELEASE = "pbt"
FULLNAME = "pbt-pbt-operator"  # the chart's fullname for release "pbt": SA, (Cluster)Role, Deployment

# kopf's peering CRDs (kopf never installs them): the chart's peering objects need them (replicaCount > 1).
KOPF_PEERING_CRDS = [
    {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
     "metadata": {"name": f"{plural}.kopf.dev"},
     "spec": {"group": "kopf.dev", "scope": scope,
              "names": {"kind": kind, "plural": plural, "singular": plural[:-1]},
              "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                  "type": "object", "properties": {"status": {"type": "object",
                                                              "x-kubernetes-preserve-unknown-fields": True}}}}}]}}
    for kind, plural, scope in (("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
                                ("KopfPeering", "kopfpeerings", "Namespaced"))
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_namespace(cluster: Cluster, prefix: str) -> str:
    name = f"{prefix}-{os.urandom(3).hex()}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "pbt.dev/e2e=true")
    return name


def sa_user(ns: str, name: str) -> str:
    return f"system:serviceaccount:{ns}:{name}"


def ca_file(cluster: Cluster) -> str:
    cfg = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    return str(cfg["clusters"][0]["cluster"]["certificate-authority"])


def sa_kubeconfig(cluster: Cluster, ns: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as ServiceAccount ns/sa with a fresh token (TokenRequest)."""
    token = cluster.kubectl("create", "token", sa, "-n", ns, "--duration=1h").stdout.strip()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": cluster.server, "certificate-authority": ca_file(cluster)}}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": sa, "namespace": ns}}],
        "current-context": "c",
    }))
    path.chmod(0o600)
    return path


class ChartOperator(OperatorProcess):
    """`pbt operator` started from the installed Deployment's container: command, args, env."""

    def __init__(self, cluster: Cluster, log_path: Path, deployment: dict[str, Any], kubeconfig: Path,
                 pod_name: str = "pbt-operator-e2e", own_ports: bool = False):
        super().__init__(cluster, log_path)
        c = deployment["spec"]["template"]["spec"]["containers"][0]
        self.argv = [*c["command"], *c.get("args", [])]
        self.ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if own_ports:  # a second replica on this host: pods would each have their own network namespace
            self.ports = {name: free_port() for name in self.ports}
            self.argv = [f"--health-port={self.ports['health']}" if a.startswith("--health-port=") else a
                         for a in self.argv]
        self.env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "KUBECONFIG": str(kubeconfig)}  # no admin credentials: only the ServiceAccount's token
        for e in c.get("env", []):
            if "value" in e:
                self.env[e["name"]] = e["value"]
            elif (e.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") == "metadata.name":
                self.env[e["name"]] = pod_name
        self.env["HOME"] = str(log_path.parent)  # the pod's HOME is its /tmp emptyDir
        if own_ports and "metrics" in self.ports:
            self.env["PBT_METRICS_PORT"] = str(self.ports["metrics"])

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def get(self, port_name: str, path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[port_name]}{path}", timeout=5) as r:
            return r.status, r.read().decode()


def installed_deployment(cluster: Cluster, ns: str, release: str) -> dict[str, Any]:
    manifest = cluster.helm("get", "manifest", release, "-n", ns).stdout
    docs = [d for d in yaml.safe_load_all(manifest) if d]
    return next(d for d in docs if d["kind"] == "Deployment")


def make_tenant(cluster: Cluster, prefix: str) -> tuple[str, str]:
    """A namespace with a user (ServiceAccount `alice`) allowed to manage PopulationTrainings there, only."""
    ns = make_namespace(cluster, prefix)
    cluster.kubectl("create", "serviceaccount", "alice", "-n", ns)
    cluster.apply([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "pbt-user"},
         "rules": [{"apiGroups": ["pbt.dev"], "resources": ["populationtrainings"],
                    "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
                   {"apiGroups": ["pbt.dev"], "resources": ["populationmembers"], "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "pbt-user"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pbt-user"},
         "subjects": [{"kind": "ServiceAccount", "name": "alice", "namespace": ns}]},
    ], ns)
    return ns, sa_user(ns, "alice")


def apply_as(cluster: Cluster, user: str, ns: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", ns, f"--as={user}", "-f", "-", input=json.dumps(obj))


def can_i(cluster: Cluster, user: str, *args: str) -> bool:
    p = cluster.kubectl("auth", "can-i", *args, f"--as={user}", check=False)
    assert p.stdout.strip() in ("yes", "no"), p.stdout + p.stderr
    return p.stdout.strip() == "yes"


def rbac_list(cluster: Cluster, user: str, ns: str) -> set[str]:
    out = cluster.kubectl("auth", "can-i", "--list", "-n", ns, f"--as={user}").stdout
    return {re.sub(r"\s+", " ", line.strip()) for line in out.splitlines()[1:] if line.strip()}


def install(cluster: Cluster, ns: str, *sets: str, **json_values: Any) -> subprocess.CompletedProcess[str]:
    args = ["install", RELEASE, str(CHART), "-n", ns, "--set", "replicaCount=0", "--set", "logFormat=plain",
            "--set", f"healthPort={free_port()}", "--set", f"metrics.port={free_port()}"]
    for s in sets:
        args += ["--set", s]
    for k, v in json_values.items():
        args += ["--set-json", f"{k}={json.dumps(v)}"]
    return cluster.helm(*args)


@pytest.fixture(scope="module")
def peering_crds(cluster: Cluster) -> None:
    cluster.apply(KOPF_PEERING_CRDS)
    for crd in KOPF_PEERING_CRDS:
        cluster.wait_established(crd["metadata"]["name"])


@pytest.fixture
def tenant(cluster: Cluster) -> Iterator[Any]:
    """make_tenant, with the namespaces (and their trainings) deleted afterwards, so that no operator
    started by a later test module picks those trainings up."""
    made: list[str] = []

    def make(prefix: str) -> tuple[str, str]:
        ns, user = make_tenant(cluster, prefix)
        made.append(ns)
        return ns, user

    yield make
    for ns in made:
        # the test's operator is gone: drop kopf's finalizers so nothing waits for the next operator
        for name in cluster.kubectl("get", "pbt", "-n", ns, "-o", "name", check=False).stdout.split():
            cluster.kubectl("patch", name, "-n", ns, "--type=merge", "-p", '{"metadata":{"finalizers":null}}',
                            check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture
def op_namespace(cluster: Cluster) -> Iterator[str]:
    ns = make_namespace(cluster, "pbt-system")
    yield ns
    cluster.helm("uninstall", RELEASE, "-n", ns, check=False)
    cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def rbac_denials(log: str) -> list[str]:
    """Forbidden answers that mean missing permissions. A create refused because an earlier test's
    namespace is still terminating is also a 403 (reason NamespaceTerminating) but says nothing
    about RBAC: a cluster-wide operator may still see that namespace's training for a moment."""
    lines = log.splitlines()
    out = []
    for i, line in enumerate(lines):
        if "Forbidden" in line:
            window = " ".join(lines[i:i + 4])  # "Reason: Forbidden", headers, then the body
            if "being terminated" not in window and "NamespaceTerminating" not in window:
                out.append(line)
    return out


@pytest.mark.parametrize("sets", [
    {},
    {"watchNamespaces": "NS"},
    {"replicaCount": 3},
    {"replicaCount": 2, "watchNamespaces": "NS"},
    {"metrics": {"enabled": False}, "rbac": {"create": True}, "logFormat": "plain"},
], ids=["cluster-wide", "namespaced", "replicas-3", "replicas-2-namespaced", "metrics-off"])
def test_rendered_chart_passes_server_side_dry_run(cluster: Cluster, namespace: str, peering_crds: None,
                                                   sets: dict[str, Any]) -> None:
    values = {k: ([namespace] if v == "NS" else v) for k, v in sets.items()}
    args = ["template", f"dry-{os.urandom(2).hex()}", str(CHART), "-n", namespace, "--include-crds",
            "--kube-version", cluster.version.lstrip("v") or "1.36.5"]
    for k, v in values.items():
        args += ["--set-json", f"{k}={json.dumps(v)}"]
    rendered = cluster.helm(*args).stdout
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(rendered) if d)
    assert "Deployment" in kinds and kinds.count("CustomResourceDefinition") == 2, kinds
    p = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=rendered)
    assert p.stdout.count("(server dry run)") == len(kinds), p.stdout


def test_installed_chart_runs_a_training_as_its_service_account(
        cluster: Cluster, node_agent: NodeAgent, op_namespace: str, tenant: Any, tmp_path: Path) -> None:
    notes = install(cluster, op_namespace).stdout
    assert "examples/digits/populationtraining-k8s.yaml" in notes and "kubectl apply" in notes, notes
    for plural in ("populationtrainings", "populationmembers"):
        cluster.wait_established(f"{plural}.pbt.dev")
    dep = installed_deployment(cluster, op_namespace, RELEASE)
    assert dep["spec"]["replicas"] == 0
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    assert sa == FULLNAME
    operator_user = sa_user(op_namespace, sa)

    # -- least privilege, as the API server sees it --------------------------------------------------
    ns, alice = tenant("team")
    for where in (("-n", ns), ("-n", op_namespace), ("--all-namespaces",)):
        assert not can_i(cluster, operator_user, "get", "secrets", *where)
        assert not can_i(cluster, operator_user, "list", "secrets", *where)
    assert can_i(cluster, operator_user, "delete", "jobs.batch", "-n", ns)  # to stop its own segment Jobs...
    # ...and only those: the chart's admission policy refuses the operator a Job that is not a segment's
    plain = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "not-ours"},
             "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never",
                                                             "containers": [{"name": "c", "image": "x"}]}}}}
    # The API server loads a new ValidatingAdmissionPolicy and its binding asynchronously (its policy
    # source resyncs and type-checks them), so right after `helm install` a request can precede the
    # enforcement: retry on a fresh Job for a while; what must hold is that it is enforced, within seconds.
    deadline = time.monotonic() + 30
    while True:
        cluster.apply(plain, ns)
        refused = cluster.kubectl("delete", "job", "not-ours", "-n", ns, "--wait=false", f"--as={operator_user}",
                                  check=False)
        if refused.returncode != 0 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert refused.returncode != 0 and "only its own segment Jobs" in refused.stderr, refused.stderr
    cluster.kubectl("delete", "job", "not-ours", "-n", ns)  # an admin is not affected
    # pods: create is granted for one server-side dry run per new training (quota, LimitRange, Pod Security
    # and webhooks judge pods); creating Jobs already lets the operator run pods, but it cannot touch others'
    assert can_i(cluster, operator_user, "create", "pods", "-n", ns)
    assert not can_i(cluster, operator_user, "delete", "pods", "-n", ns)
    assert not can_i(cluster, operator_user, "create", "pods", "--subresource=exec", "-n", ns)
    assert can_i(cluster, operator_user, "create", "jobs.batch", "-n", ns)
    assert can_i(cluster, operator_user, "patch", "populationtrainings.pbt.dev", "--subresource=status", "-n", ns)
    assert not can_i(cluster, operator_user, "update", "populationtrainings.pbt.dev", "-n", ns)
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", op_namespace)
    baseline = rbac_list(cluster, sa_user(op_namespace, "nobody"), ns)  # what every authenticated user has
    granted = rbac_list(cluster, operator_user, ns) - baseline
    assert granted, "the operator's ServiceAccount got no permissions"
    assert not any("*" in line for line in granted), granted
    assert not any(line.startswith("secrets") for line in granted), granted
    names = {line.split()[0] for line in granted}
    assert {"populationtrainings.pbt.dev", "populationmembers.pbt.dev", "jobs.batch", "pods", "events"} <= names, names

    # -- users: namespace view/edit get trainings through the chart's aggregated ClusterRoles ------------
    for who, role in (("viewer", "view"), ("editor", "edit")):
        cluster.kubectl("create", "serviceaccount", who, "-n", ns)
        cluster.kubectl("create", "rolebinding", who, f"--clusterrole={role}", f"--serviceaccount={ns}:{who}",
                        "-n", ns)
    viewer, editor = sa_user(ns, "viewer"), sa_user(ns, "editor")
    cluster.wait_for(lambda: can_i(cluster, viewer, "list", "populationtrainings.pbt.dev", "-n", ns)
                     and can_i(cluster, editor, "create", "populationtrainings.pbt.dev", "-n", ns), 60,
                     desc="aggregated roles")
    assert can_i(cluster, viewer, "list", "populationmembers.pbt.dev", "-n", ns)
    assert not can_i(cluster, viewer, "create", "populationtrainings.pbt.dev", "-n", ns)
    assert can_i(cluster, editor, "patch", "populationtrainings.pbt.dev", "--subresource=scale", "-n", ns)
    assert not can_i(cluster, editor, "create", "populationmembers.pbt.dev", "-n", ns)  # the operator's

    # -- the operator process, as the chart's ServiceAccount ---------------------------------------
    op = ChartOperator(cluster, tmp_path / "operator.log", dep, sa_kubeconfig(cluster, op_namespace, sa,
                                                                              tmp_path / "operator.kubeconfig"))
    op.start()
    try:
        status, _ = cluster.wait_for(lambda: op.get("health", "/healthz"), 60, desc="operator /healthz")
        assert status == 200
        apply_as(cluster, alice, ns, training("quad", tmp_path / "ckpt", population=2, parallelism=2, segments=2))
        obj = wait_phase(cluster, ns, "quad", op, timeout=180)
        assert obj["status"]["segmentsDone"] == 4 and obj["status"]["best"]["score"] is not None
        members = cluster.kubectl_json("get", "pbtm", "-n", ns, f"--as={alice}")["items"]
        assert len(members) == 2
        _, text = op.get("metrics", "/metrics")
        lab = f'namespace="{ns}",training="quad"'
        assert f"pbt_segments_finished_total{{{lab}}} 4.0" in text, text[-3000:]
        assert f"pbt_segments_started_total{{{lab}}} 4.0" in text
        assert f"pbt_segment_duration_seconds_count{{{lab}}} 4.0" in text
        assert f"pbt_best_score{{{lab}}}" in text
        assert re.search(r"^pbt_reconcile_plan_seconds_count [1-9]", text, re.M)
    finally:
        op.stop()
    log = op.log_path.read_text(errors="replace")
    assert not rbac_denials(log) and "Not enough permissions" not in log, op.tail(80)
    assert "CRDs are this version's" in log, op.tail(80)  # the chart's CRDs, read with the chart's RBAC


def test_namespaced_install_watches_only_its_namespaces(
        cluster: Cluster, node_agent: NodeAgent, op_namespace: str, tenant: Any, tmp_path: Path) -> None:
    ns, alice = tenant("watched")
    other, bob = tenant("unwatched")
    install(cluster, op_namespace, f"watchNamespaces={{{ns}}}")
    dep = installed_deployment(cluster, op_namespace, RELEASE)
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    operator_user = sa_user(op_namespace, sa)
    assert can_i(cluster, operator_user, "create", "jobs.batch", "-n", ns)
    assert not can_i(cluster, operator_user, "create", "jobs.batch", "-n", other)
    assert not can_i(cluster, operator_user, "list", "populationtrainings.pbt.dev", "--all-namespaces")
    assert not can_i(cluster, operator_user, "list", "customresourcedefinitions.apiextensions.k8s.io")
    # only get, of the chart's own two CRDs: the start-up check that they are this version's
    for crd in ("populationtrainings.pbt.dev", "populationmembers.pbt.dev"):
        assert can_i(cluster, operator_user, "get", f"customresourcedefinitions.apiextensions.k8s.io/{crd}")
    assert not can_i(cluster, operator_user, "get", "customresourcedefinitions.apiextensions.k8s.io/other.example.com")
    assert not can_i(cluster, operator_user, "get", "secrets", "-n", ns)
    cluster.kubectl("create", "serviceaccount", "nobody", "-n", op_namespace)
    granted = rbac_list(cluster, operator_user, ns) - rbac_list(cluster, sa_user(op_namespace, "nobody"), ns)
    assert granted and not any("*" in line for line in granted), granted

    op = ChartOperator(cluster, tmp_path / "operator.log", dep, sa_kubeconfig(cluster, op_namespace, sa,
                                                                              tmp_path / "operator.kubeconfig"))
    op.start()
    try:
        cluster.wait_for(lambda: op.get("health", "/healthz"), 60, desc="operator /healthz")
        apply_as(cluster, bob, other, training("ignored", tmp_path / "ckpt-b", population=2, segments=1))
        apply_as(cluster, alice, ns, training("quad", tmp_path / "ckpt", population=2, parallelism=2, segments=2))
        wait_phase(cluster, ns, "quad", op, timeout=180)
        ignored = cluster.get("pbt", "ignored", other)
        assert ignored is not None and not ignored.get("status"), ignored  # not watched: untouched
        assert not cluster.kubectl_json("get", "jobs", "-n", other)["items"]
    finally:
        op.stop()
    # kopf does not try the cluster-scoped namespaces list and CRD watch in namespaced mode (its scanning is
    # off, kube/handlers.py configure): nothing is denied, no startup delay
    log = op.log_path.read_text(errors="replace")
    assert not rbac_denials(log) and "Not enough permissions" not in log, op.tail(80)
    assert "CRDs are this version's" in log, op.tail(80)  # the chart's CRDs, read with the chart's RBAC


def test_two_replicas_with_peering_one_works_the_other_takes_over(
        cluster: Cluster, node_agent: NodeAgent, op_namespace: str, tenant: Any, peering_crds: None,
        tmp_path: Path) -> None:
    """replicaCount 2: `--peering` and a ClusterKopfPeering from the chart. Each process draws its own
    priority, so exactly one works; stopping it mid-training hands the training to the other."""
    # Pending pods (no node matches) instead of replicaCount 0: peering needs replicaCount > 1.
    install(cluster, op_namespace, "replicaCount=2", nodeSelector={"pbt.dev/e2e-no-such-node": "true"})
    dep = installed_deployment(cluster, op_namespace, RELEASE)
    assert f"--peering={FULLNAME}" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert cluster.get("clusterkopfpeering", FULLNAME) is not None
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    kubeconfig = sa_kubeconfig(cluster, op_namespace, sa, tmp_path / "operator.kubeconfig")
    ops = {name: ChartOperator(cluster, tmp_path / f"{name}.log", dep, kubeconfig, pod_name=name, own_ports=True)
           for name in ("replica-a", "replica-b")}
    ns, alice = tenant("ha")
    try:
        for op in ops.values():
            op.start()

        def peers() -> dict[str, Any] | None:
            st = (cluster.get("clusterkopfpeering", FULLNAME) or {}).get("status") or {}
            return st if set(ops) <= set(st) else None

        st = cluster.wait_for(peers, 90, desc="both replicas in the peering")
        prios = {name: st[name]["priority"] for name in ops}
        assert len(set(prios.values())) == 2, prios  # equal priorities would pause both
        active = max(prios, key=lambda n: prios[n])
        standby = next(n for n in ops if n != active)
        apply_as(cluster, alice, ns, training("ha", tmp_path / "ckpt", population=2, parallelism=2, segments=5,
                                              env={"PBT_TEST_SLEEP": "3"}))

        def status() -> dict[str, Any]:
            return (cluster.get("pbt", "ha", ns) or {}).get("status") or {}

        cluster.wait_for(lambda: status().get("segmentsDone", 0) >= 2, 120, desc="the active replica's segments")
        ops[active].stop()  # SIGTERM: kopf leaves the peering and the standby resumes at once
        assert status().get("phase") == "Running", status()
        obj = wait_phase(cluster, ns, "ha", ops[standby], timeout=180)
        _, text = ops[standby].get("metrics", "/metrics")
        started = re.search(rf'^pbt_segments_started_total{{namespace="{ns}",training="ha"}} (\S+)$', text, re.M)
        assert started and float(started.group(1)) >= 1, "the standby created no segment Jobs"
    finally:
        for op in ops.values():
            op.stop()
    check_finished(cluster, ns, "ha", obj, 2, 5)  # every segment exactly once across the handover
    for op in ops.values():
        log = op.log_path.read_text(errors="replace")
        assert not rbac_denials(log) and "Pausing all operators" not in log, op.tail(60)
