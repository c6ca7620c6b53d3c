"""The Helm chart (charts/pbt-operator): CRDs identical to crds/, `helm lint`, and the objects
`helm template` renders for the value combinations that change them (cluster-wide vs namespaced,
replicas > 1 with peering, metrics on/off, ServiceMonitor). Server-side validation of the same output
and an install that really runs a training are in tests/e2e/test_helm.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pbt_operator.kube.crds import expected_fingerprints

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pbt-operator"
CACHE = Path(os.environ.get("PBT_CACHE_DIR", Path.home() / ".cache" / "pbt-operator"))
HELM = Path(os.environ.get("PBT_HELM", CACHE / "v1.36.5" / "bin" / "helm"))
KUBE_VERSION = "1.36.5"  # helm built from source reports v1.20 for template/lint without a cluster


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    """helm from the test cluster's build. `make test` builds it in the background (hack/prebuild.sh) while
    the other unit tests run (tests/conftest.py orders these tests after them); the build command waits for
    that build, or builds helm itself. Only with the builds switched off (PBT_E2E=0) is a missing helm a skip."""
    if not HELM.exists():
        if os.environ.get("PBT_E2E", "").strip().lower() in ("0", "false", "no", "off"):
            pytest.skip(f"no helm binary at {HELM} and PBT_E2E=0 (hack/testcluster.sh build)")
        build = subprocess.run(["bash", str(ROOT / "hack" / "testcluster.sh"), "build"], check=False)
        if build.returncode != 0 or not HELM.exists():
            pytest.fail(f"hack/testcluster.sh build did not produce {HELM} (PBT_E2E=0 skips these tests)",
                        pytrace=False)
    return HELM


needs_helm = pytest.mark.usefixtures("helm_binary")

# (apiGroup, resource, verb) the operator uses in each namespace it watches: kube/api.py (get trainings,
# get/list/watch/create/patch members, get/list/create jobs, list pods, create one dry-run Job and pod per new
# training, patch statuses), kube/handlers.py through kopf (list/watch/patch trainings, watch jobs and
# pods, create events); kube/segments.py (patch jobs' deadlines, delete stopped segment Jobs, list events
# that explain a waiting segment).
NEEDED = {
    ("pbt.dev", "populationtrainings", v) for v in ("get", "list", "watch", "patch")
} | {
    ("pbt.dev", "populationtrainings/status", "patch"),
    ("pbt.dev", "populationmembers", "get"),
    ("pbt.dev", "populationmembers", "list"), ("pbt.dev", "populationmembers", "watch"),
    ("pbt.dev", "populationmembers", "create"),
    ("pbt.dev", "populationmembers", "patch"), ("pbt.dev", "populationmembers/status", "patch"),
    ("batch", "jobs", "get"), ("batch", "jobs", "list"), ("batch", "jobs", "watch"), ("batch", "jobs", "create"),
    ("batch", "jobs", "patch"), ("batch", "jobs", "delete"),
    ("", "pods", "list"), ("", "pods", "watch"), ("", "pods", "create"),
    ("", "events", "create"), ("", "events", "list"),
}
# The one delete the operator may do: stopping its own segment Jobs (finished, suspended or scaled-down
# trainings). Nothing else may be deleted.
DELETABLE = {("batch", "jobs", "delete")}
# Also granted, on purpose: update on the owners' finalizers (ownerReferences with blockOwnerDeletion
# under OwnerReferencesPermissionEnforcement), kopf's CRD watch (cluster-wide), kopf peerings (replicas > 1),
# and get of our own two CRDs (CRD_READ: the start-up check that they are this version's, kube/crdcheck.py).
ALLOWED_EXTRA = {
    ("pbt.dev", "populationtrainings/finalizers", "update"), ("pbt.dev", "populationmembers/finalizers", "update"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"),
} | {("kopf.dev", r, v) for r in ("clusterkopfpeerings", "kopfpeerings") for v in ("list", "watch", "patch")}


# The only rule with resourceNames: get of exactly the CRDs the operator generates.
CRD_READ = {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
            "resourceNames": sorted(expected_fingerprints()), "verbs": ["get"]}


def is_crd_read(rule: dict[str, Any]) -> bool:
    return {**rule, "resourceNames": sorted(rule.get("resourceNames") or [])} == CRD_READ


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HELM_CACHE_HOME="/tmp/pbt-helm-unit/cache", HELM_CONFIG_HOME="/tmp/pbt-helm-unit/config",
               HELM_DATA_HOME="/tmp/pbt-helm-unit/data")
    p = subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{p.stdout}\n{p.stderr}")
    return p


def render(*sets: str, values: dict[str, Any] | None = None, check: bool = True,
           namespace: str = "pbt-system") -> list[dict[str, Any]] | subprocess.CompletedProcess[str]:
    args = ["template", "pbt", str(CHART), "--namespace", namespace, "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    if values is not None:
        args += ["--set-json", ",".join(f"{k}={json.dumps(v)}" for k, v in values.items())]
    p = helm(*args, check=check)
    if not check:
        return p
    return [d for d in yaml.safe_load_all(p.stdout) if d]


AGGREGATE = "rbac.authorization.k8s.io/aggregate-to-"


def aggregated(o: dict[str, Any]) -> bool:
    """One of the ClusterRoles for users (aggregated into view/edit/admin), not the operator's."""
    return any(k.startswith(AGGREGATE) for k in (o["metadata"].get("labels") or {}))


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """Objects of that kind; ClusterRoles: the operator's only (see aggregated)."""
    return [o for o in objs if o["kind"] == kind and not (kind == "ClusterRole" and aggregated(o))]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(objs)["env"]}


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def check_least_privilege(role: dict[str, Any]) -> None:
    for rule in role["rules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key] and all("*" not in x for x in rule[key]), rule
        assert not rule.get("nonResourceURLs") and (not rule.get("resourceNames") or is_crd_read(rule)), rule
    g = grants(role)
    assert not any(r in ("secrets", "configmaps", "serviceaccounts/token") for _, r, _ in g), g
    assert not any(v in ("delete", "deletecollection", "escalate", "bind", "impersonate")
                   for grant in g - DELETABLE for v in grant[2:]), g
    assert g >= NEEDED, NEEDED - g
    assert g <= NEEDED | ALLOWED_EXTRA, g - NEEDED - ALLOWED_EXTRA


# -- no helm needed ---------------------------------------------------------------------------------

def test_chart_crds_identical_to_top_level_crds() -> None:
    top = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").iterdir())
    assert top and chart == top, f"charts/pbt-operator/crds {chart} != crds {top}: cp crds/*.yaml charts/pbt-operator/crds/"
    for name in top:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), \
            f"charts/pbt-operator/crds/{name} differs from crds/{name}: cp crds/*.yaml charts/pbt-operator/crds/"


def test_chart_crds_are_what_the_code_generates() -> None:
    from pbt_operator.kube.crds import render as render_crds

    for fname, text in render_crds().items():
        assert (CHART / "crds" / fname).read_text() == text, \
            f"{fname} is stale: .venv/bin/pbt crds --write crds && cp crds/*.yaml charts/pbt-operator/crds/"


def test_values_match_their_schema() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"]), set(values) - set(schema["properties"])
    assert values["watchNamespaces"] == [] and values["replicaCount"] == 1 and values["rbac"]["create"] is True


# -- helm lint / template ---------------------------------------------------------------------------

@needs_helm
@pytest.mark.parametrize("sets", [(), ("watchNamespaces={team-a,team-b}", "replicaCount=3"),
                                  ("metrics.enabled=false",), ("metrics.serviceMonitor.enabled=true",)])
def test_helm_lint(sets: tuple[str, ...]) -> None:
    args = ["lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION]
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    assert "0 chart(s) failed" in out, out


@needs_helm
def test_default_render_cluster_wide() -> None:
    objs = render()
    assert isinstance(objs, list)
    assert sorted(o["kind"] for o in objs if not aggregated(o)) == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment",
         "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"])
    assert all(o["metadata"].get("namespace") in (None, "pbt-system") for o in objs)
    dep = one(objs, "Deployment")
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    pod = dep["spec"]["template"]["spec"]
    sa = one(objs, "ServiceAccount")["metadata"]["name"]
    assert pod["serviceAccountName"] == sa
    c = container(objs)
    assert c["command"] == ["pbt", "operator"]
    assert c["args"] == ["--log-format=json", "--health-port=8080"]  # no --namespace: cluster-wide
    env = env_of(objs)
    assert env["OPENBLAS_NUM_THREADS"] == "1" and env["PBT_METRICS_PORT"] == "8000"
    assert env["PBT_JOB_TTL_SECONDS"] == "900"  # finished segment Jobs are cleaned up
    chart_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    assert env["PBT_CHART_VERSION"] == chart_version  # named in the fix logged for outdated CRDs
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8080, "metrics": 8000}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    # restricted pod security standard
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])  # writable scratch with a read-only root
    # RBAC
    role = one(objs, "ClusterRole")
    check_least_privilege(role)
    assert ("kopf.dev", "clusterkopfpeerings", "patch") not in grants(role)  # no peering with one replica
    assert sum(map(is_crd_read, role["rules"])) == 1, role["rules"]  # the CRD version check at start-up
    binding = one(objs, "ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "pbt-system"}]
    # metrics Service selects the operator pod and targets the metrics port
    svc = one(objs, "Service")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8000, "targetPort": "metrics", "protocol": "TCP"}]


@needs_helm
def test_job_writes_are_narrowed_to_the_operators_own_jobs() -> None:
    """RBAC cannot narrow patch/delete on Jobs by label; the chart's admission policy does, for the
    operator's ServiceAccount only (the Job controller and users are not matched)."""
    objs = render()
    assert isinstance(objs, list)
    policy = one(objs, "ValidatingAdmissionPolicy")
    sa = one(objs, "ServiceAccount")["metadata"]["name"]
    rule = policy["spec"]["matchConstraints"]["resourceRules"][0]
    assert rule["resources"] == ["jobs"] and sorted(rule["operations"]) == ["DELETE", "UPDATE"]
    assert f'"system:serviceaccount:pbt-system:{sa}"' in policy["spec"]["matchConditions"][0]["expression"]
    assert "pbt.dev/training" in policy["spec"]["validations"][0]["expression"]
    assert policy["spec"]["failurePolicy"] == "Fail"
    binding = one(objs, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    off = render("rbac.restrictJobWrites=false")
    assert isinstance(off, list) and not by_kind(off, "ValidatingAdmissionPolicy")


@needs_helm
def test_namespaced_render_has_no_cluster_scope_but_reading_its_crds() -> None:
    objs = render(values={"watchNamespaces": ["team-a", "team-b"]})
    assert isinstance(objs, list)
    # cluster-wide, only get of the chart's two CRDs (the start-up check that they are this version's)
    crd_role = one(objs, "ClusterRole")
    assert len(crd_role["rules"]) == 1 and is_crd_read(crd_role["rules"][0]), crd_role["rules"]
    crd_binding = one(objs, "ClusterRoleBinding")
    assert crd_binding["roleRef"]["name"] == crd_role["metadata"]["name"]
    assert crd_binding["subjects"][0]["namespace"] == "pbt-system"
    roles = by_kind(objs, "Role")
    bindings = by_kind(objs, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for r in roles:
        check_least_privilege(r)
        assert not any(res == "customresourcedefinitions" for _, res, _ in grants(r))
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"][0]["namespace"] == "pbt-system"  # the operator's SA lives in the release namespace
    assert container(objs)["args"] == ["--log-format=json", "--health-port=8080", "--namespace=team-a",
                                       "--namespace=team-b"]


@needs_helm
@pytest.mark.parametrize("namespaced", [False, True])
def test_replicas_above_one_use_kopf_peering(namespaced: bool) -> None:
    values: dict[str, Any] = {"replicaCount": 3}
    if namespaced:
        values["watchNamespaces"] = ["team-a"]
    objs = render(values=values)
    assert isinstance(objs, list)
    dep = one(objs, "Deployment")
    assert dep["spec"]["replicas"] == 3 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    assert "--peering=pbt-pbt-operator" in container(objs)["args"]
    assert env_of(objs)["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}  # kopf's peer identity
    if namespaced:
        peering = one(objs, "KopfPeering")
        assert peering["metadata"]["namespace"] == "team-a"
        role = one(objs, "Role")
        assert {("kopf.dev", "kopfpeerings", v) for v in ("list", "watch", "patch")} <= grants(role)
    else:
        peering = one(objs, "ClusterKopfPeering")
        role = one(objs, "ClusterRole")
        assert {("kopf.dev", "clusterkopfpeerings", v) for v in ("list", "watch", "patch")} <= grants(role)
    check_least_privilege(role)
    assert peering["apiVersion"] == "kopf.dev/v1" and peering["metadata"]["name"] == "pbt-pbt-operator"
    named = render(values={"replicaCount": 2, "peering": {"name": "blue"}})
    assert isinstance(named, list)
    assert "--peering=blue" in container(named)["args"] and one(named, "ClusterKopfPeering")["metadata"]["name"] == "blue"


@needs_helm
def test_replicas_zero_renders_an_idle_deployment_without_peering() -> None:
    objs = render("replicaCount=0")
    assert isinstance(objs, list)
    assert one(objs, "Deployment")["spec"]["replicas"] == 0
    assert not any("--peering" in a for a in container(objs)["args"])
    assert not by_kind(objs, "ClusterKopfPeering")


@needs_helm
def test_metrics_off_and_service_monitor() -> None:
    off = render("metrics.enabled=false")
    assert isinstance(off, list)
    assert not by_kind(off, "Service") and not by_kind(off, "ServiceMonitor")
    assert env_of(off)["PBT_METRICS_PORT"] == "0"
    assert [p["name"] for p in container(off)["ports"]] == ["health"]
    on = render("metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom")
    assert isinstance(on, list)
    sm = one(on, "ServiceMonitor")
    svc = one(on, "Service")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["pbt-system"]}
    bad = render("metrics.enabled=false", "metrics.serviceMonitor.enabled=true", check=False)
    assert isinstance(bad, subprocess.CompletedProcess)
    assert bad.returncode != 0 and "serviceMonitor.enabled needs metrics.enabled" in bad.stderr


@needs_helm
def test_custom_ports_image_and_no_rbac() -> None:
    objs = render("healthPort=9090", "metrics.port=9100", "image.tag=dev", "logFormat=plain", "verbose=true",
                  "rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=existing")
    assert isinstance(objs, list)
    c = container(objs)
    assert c["image"] == "ghcr.io/pbt-operator/pbt-operator:dev"
    assert c["args"] == ["--log-format=plain", "--health-port=9090", "--verbose"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"health": 9090, "metrics": 9100}
    assert env_of(objs)["PBT_METRICS_PORT"] == "9100"
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ServiceAccount")
    assert one(objs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"


@needs_helm
@pytest.mark.parametrize("sets", [("replicaCount=-1",), ("logFormat=xml",), ("noSuchValue=1",),
                                  ("healthPort=0",), ("watchNamespaces={Bad_NS}",)])
def test_schema_rejects_bad_values(sets: tuple[str, ...]) -> None:
    p = render(*sets, check=False)
    assert isinstance(p, subprocess.CompletedProcess)
    assert p.returncode != 0 and "values don't meet the specifications of the schema" in p.stderr, p.stderr


@needs_helm
@pytest.mark.parametrize("namespaced", [False, True])
def test_namespace_users_get_trainings_through_aggregated_roles(namespaced: bool) -> None:
    objs = render(values={"watchNamespaces": ["team-a"]} if namespaced else None)
    assert isinstance(objs, list)
    user_roles = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ClusterRole" and aggregated(o)}
    view, edit = user_roles["pbt-pbt-operator-view"], user_roles["pbt-pbt-operator-edit"]
    for role, into in ((view, {"view", "edit", "admin"}), (edit, {"edit", "admin"})):
        assert {k[len(AGGREGATE):] for k, v in role["metadata"]["labels"].items()
                if k.startswith(AGGREGATE) and v == "true"} == into
        for rule in role["rules"]:
            assert rule["apiGroups"] == ["pbt.dev"] and "*" not in rule["verbs"], rule
    assert {("pbt.dev", r, "list") for r in ("populationtrainings", "populationmembers")} <= grants(view)
    assert not any(v not in ("get", "list", "watch") for _, _, v in grants(view))
    assert ("pbt.dev", "populationtrainings", "create") in grants(edit)
    assert ("pbt.dev", "populationtrainings/scale", "update") in grants(edit)
    assert not any(r.startswith("populationmembers") for _, r, _ in grants(edit))  # the operator's bookkeeping
    assert not any(o["kind"] in ("ClusterRoleBinding", "RoleBinding") and o["roleRef"]["name"] in user_roles
                   for o in objs)  # binds no one: the default roles' bindings do
    off = render("rbac.aggregateToDefaultRoles=false")
    assert isinstance(off, list) and not any(o["kind"] == "ClusterRole" and aggregated(o) for o in off)


@needs_helm
def test_optional_network_policy_for_the_metrics_port() -> None:
    objs = render()
    assert isinstance(objs, list) and not by_kind(objs, "NetworkPolicy")
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    objs = render(values={"networkPolicy": {"enabled": True, "metricsFrom": [peer]}})
    assert isinstance(objs, list)
    pol = one(objs, "NetworkPolicy")
    labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    rules = {r["ports"][0]["port"]: r for r in pol["spec"]["ingress"]}
    assert set(rules) == {"health", "metrics"}
    assert "from" not in rules["health"] and rules["metrics"]["from"] == [peer]
    closed = render(values={"networkPolicy": {"enabled": True}})
    assert isinstance(closed, list)
    assert [r["ports"][0]["port"] for r in one(closed, "NetworkPolicy")["spec"]["ingress"]] == ["health"]


def test_notes_list_the_columns_kubectl_get_pbt_prints() -> None:
    """NOTES.txt's `kubectl get pbt` comment is what a user sees after install: it left out PHASE and
    never said that -o wide adds REASON."""
    from pbt_operator.kube.crds import all_crds

    crd = next(c for c in all_crds() if c["spec"]["names"]["plural"] == "populationtrainings")
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    plain = " ".join(["NAME"] + [c["name"].upper() for c in columns if not c.get("priority")])
    wide = ", ".join(c["name"].upper() for c in columns if c.get("priority"))
    notes = (ROOT / "charts" / "pbt-operator" / "templates" / "NOTES.txt").read_text()
    line = next(x for x in notes.splitlines() if "kubectl get pbt -n" in x)
    assert line.split("# ", 1)[1] == f"{plain} (-o wide: {wide})"
