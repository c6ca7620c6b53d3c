"""Upgrading: `helm upgrade` never updates the chart's CRDs, and an API server with an older CRD schema
prunes the spec fields it does not know (kubectl's strict validation refuses them as unknown fields). On the real control plane: the operator reports CRDs
whose fingerprint (pbt.dev/schema) is not its own (an ERROR with the fix, a CRDOutdated Warning on each
training), is quiet with the current ones, and an upgrade done as docs/upgrading.md says (the new CRDs
applied server-side, then `helm upgrade`) keeps a running training going to the end.

The "old" CRDs are this version's with `explore.pb2.retune` taken out and another fingerprint, applied
over whatever is installed (server-side, forcing conflicts: the cluster is shared by the session's test
modules, which apply the current CRDs again in their own fixtures); each test leaves the current ones.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from clusterlib import Cluster, NodeAgent
from pbt_operator.kube import crdcheck
from pbt_operator.kube.crds import SCHEMA_ANNOTATION
from test_helm import CHART, RELEASE, ChartOperator, free_port, installed_deployment, sa_kubeconfig
from test_helm import op_namespace as op_namespace  # a fixture, re-exported for this module
from test_operator import OperatorProcess, check_finished, training, wait_phase

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
TRAININGS, MEMBERS = "populationtrainings.pbt.dev", "populationmembers.pbt.dev"
OLD_FINGERPRINT = "0000000000000001"
# The fix the operator logs and docs/upgrading.md gives (run here from the repository root).
FIX = ["apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds")]


def old_training_crd() -> dict[str, Any]:
    """The training CRD of an "older version": no explore.pb2.retune, another fingerprint."""
    crd = yaml.safe_load((CHART / "crds" / "populationtrainings.yaml").read_text())
    crd = copy.deepcopy(crd)
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    del spec["explore"]["properties"]["pb2"]["properties"]["retune"]
    crd["metadata"]["annotations"][SCHEMA_ANNOTATION] = OLD_FINGERPRINT
    return crd


def apply_old_crds(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds" / "populationmembers.yaml"))
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(old_training_crd()))
    cluster.wait_established(TRAININGS, MEMBERS)
    cluster.wait_for(lambda: installed_fingerprint(cluster) == OLD_FINGERPRINT, 30, desc="the old CRD")


def installed_fingerprint(cluster: Cluster, name: str = TRAININGS) -> str | None:
    crd = cluster.get("crd", name) or {}
    return ((crd.get("metadata") or {}).get("annotations") or {}).get(SCHEMA_ANNOTATION)


def apply_training(cluster: Cluster, ns: str, doc: dict[str, Any], *flags: str) -> None:
    """Applied once the API server serves the kind with the schema just installed (discovery and the
    schema used for pruning lag a moment behind Established)."""
    cluster.wait_for(lambda: cluster.kubectl("apply", *flags, "-n", ns, "-f", "-", input=json.dumps(doc),
                                             check=False).returncode == 0, 30, desc=f"pbt/{doc['metadata']['name']} applied")


def pb2_training(name: str, storage: Path, **kw: Any) -> dict[str, Any]:
    return training(name, storage, population=2, explore={"strategy": "pb2", "pb2": {"retune": 0.5, "minRows": 2}},
                    **kw)


def retune(cluster: Cluster, ns: str, name: str) -> Any:
    return ((((cluster.get("pbt", name, ns) or {}).get("spec") or {}).get("explore") or {}).get("pb2") or {}).get("retune")


def crd_outdated_events(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    return [e for e in cluster.kubectl_json("get", "events", "-n", ns)["items"] if e["reason"] == "CRDOutdated"]


def drop_finalizers(cluster: Cluster, ns: str) -> None:
    """The test's operator is gone: nothing would remove kopf's finalizer when the namespace goes."""
    for name in cluster.kubectl("get", "pbt", "-n", ns, "-o", "name", check=False).stdout.split():
        cluster.kubectl("patch", name, "-n", ns, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)


@pytest.fixture
def restore_crds(cluster: Cluster) -> Iterator[None]:
    yield
    cluster.kubectl(*FIX)
    cluster.wait_established(TRAININGS, MEMBERS)


def test_outdated_crds_are_reported_until_the_new_ones_are_applied(
        cluster: Cluster, namespace: str, restore_crds: None, tmp_path: Path) -> None:
    apply_old_crds(cluster)
    # Why this matters: kubectl's strict field validation (its default) refuses the new field with an
    # error that does not say "upgrade the CRDs"; every client that does not ask for strict validation
    # (--validate=false, client libraries, some GitOps tools) gets at most a warning, and the field is
    # pruned: the training would run with the default.
    early = pb2_training("early", tmp_path / "ckpt-early", parallelism=0)
    cluster.wait_for(lambda: 'unknown field "spec.explore.pb2.retune"' in cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(early), check=False).stderr, 30, desc="strict refusal")
    apply_training(cluster, namespace, early, "--validate=false")
    assert retune(cluster, namespace, "early") is None
    op = OperatorProcess(cluster, tmp_path / "operator.log")
    op.start()
    try:
        line = f"CRD {TRAININGS} is outdated"
        cluster.wait_for(lambda: line in op.log_path.read_text(errors="replace"), 60, desc="the ERROR line")
        log = op.log_path.read_text(errors="replace")
        err = next(x for x in log.splitlines() if line in x)
        assert "ERROR" in err and OLD_FINGERPRINT in err and crdcheck.EXPECTED[TRAININGS] in err, err
        assert "kubectl apply --server-side --force-conflicts -f charts/pbt-operator/crds/" in err, err
        assert f"CRD {MEMBERS} is outdated" not in log  # that one is current
        events = cluster.events_once(namespace, "CRDOutdated", kind="PopulationTraining", name="early", timeout=60)
        ev = next(e for e in events if e["reason"] == "CRDOutdated")
        assert ev["type"] == "Warning" and OLD_FINGERPRINT in ev["message"] and "--server-side" in ev["message"]
        # a training created later gets its own, once
        apply_training(cluster, namespace, pb2_training("later", tmp_path / "ckpt-later", parallelism=0),
                       "--validate=false")
        cluster.events_once(namespace, "CRDOutdated", kind="PopulationTraining", name="later", timeout=60)
        cluster.kubectl("scale", "pbt/early", "-n", namespace, "--replicas=0")  # an edit: a pass, no new Warning
        for name in ("early", "later"):
            got = [e for e in crd_outdated_events(cluster, namespace) if e["involvedObject"]["name"] == name]
            assert len(got) == 1 and got[0].get("count", 1) == 1, got
    finally:
        op.stop()

    # The fix it names; a restarted operator is quiet, and the manifest applied again keeps its field.
    cluster.kubectl(*FIX)
    cluster.wait_for(lambda: installed_fingerprint(cluster) == crdcheck.EXPECTED[TRAININGS], 30, desc="the new CRD")
    mark = op.log_path.stat().st_size
    op.start()
    try:
        def since_restart() -> str:
            with open(op.log_path, "rb") as f:
                f.seek(mark)
                return f.read().decode(errors="replace")

        cluster.wait_for(lambda: "CRDs are this version's" in since_restart(), 60, desc="the CRD check passing")
        apply_training(cluster, namespace, pb2_training("early", tmp_path / "ckpt-early", parallelism=0))
        cluster.wait_for(lambda: retune(cluster, namespace, "early") == 0.5, 30, desc="retune kept")
        apply_training(cluster, namespace, pb2_training("fresh", tmp_path / "ckpt-fresh", parallelism=0))
        assert retune(cluster, namespace, "fresh") == 0.5
        cluster.wait_for(lambda: (cluster.get("pbt", "fresh", namespace) or {}).get("status"), 60,
                         desc="the new operator's first pass on pbt/fresh")
        assert "is outdated" not in since_restart()
        assert not [e for e in crd_outdated_events(cluster, namespace) if e["involvedObject"]["name"] == "fresh"]
        cluster.kubectl("delete", "pbt", "--all", "-n", namespace, "--timeout=60s")
    finally:
        op.stop()
        drop_finalizers(cluster, namespace)


def test_helm_upgrade_with_the_new_crds_applied_keeps_a_training_running(
        cluster: Cluster, node_agent: NodeAgent, namespace: str, op_namespace: str,
        restore_crds: None, tmp_path: Path) -> None:
    # An "older" chart: version 0.0.9, whose crds/ hold the old training CRD. `helm install` creates CRDs
    # only where none exist, so the old ones are put in place first, as its install would have left them.
    old_chart = tmp_path / "old" / "pbt-operator"
    shutil.copytree(CHART, old_chart)
    (old_chart / "crds" / "populationtrainings.yaml").write_text(yaml.safe_dump(old_training_crd(), sort_keys=False))
    chart_yaml = yaml.safe_load((old_chart / "Chart.yaml").read_text())
    (old_chart / "Chart.yaml").write_text(yaml.safe_dump({**chart_yaml, "version": "0.0.9"}, sort_keys=False))
    apply_old_crds(cluster)
    sets = ["--set", "replicaCount=0", "--set", "logFormat=plain", "--set", f"healthPort={free_port()}",
            "--set", f"metrics.port={free_port()}"]
    notes = cluster.helm("install", RELEASE, str(old_chart), "-n", op_namespace, *sets).stdout
    assert "does not update CRDs" not in notes, notes
    dep = installed_deployment(cluster, op_namespace, RELEASE)
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    kubeconfig = sa_kubeconfig(cluster, op_namespace, sa, tmp_path / "operator.kubeconfig")
    old = ChartOperator(cluster, tmp_path / "old.log", dep, kubeconfig)
    old.start()
    try:
        # The chart's ServiceAccount may read the CRDs: this operator, newer than them, says so.
        cluster.wait_for(lambda: f"CRD {TRAININGS} is outdated" in old.log_path.read_text(errors="replace"), 60,
                         desc="the ERROR line")
        assert "--version 0.0.9" in old.log_path.read_text(errors="replace")  # the chart's version (PBT_CHART_VERSION)
        apply_training(cluster, namespace, training("quad", tmp_path / "ckpt", population=2, parallelism=2,
                                                    segments=4, env={"PBT_TEST_SLEEP": "1"}))
        cluster.wait_for(lambda: ((cluster.get("pbt", "quad", namespace) or {}).get("status") or {})
                         .get("segmentsDone", 0) >= 2, 90, desc="segments before the upgrade")
    finally:
        old.stop()  # what the Deployment's Recreate strategy does first

    # `helm upgrade` alone leaves the old CRDs (Helm never updates crds/): hence the separate apply.
    notes = cluster.helm("upgrade", RELEASE, str(CHART), "-n", op_namespace, *sets).stdout
    assert installed_fingerprint(cluster) == OLD_FINGERPRINT
    chart_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    assert "does not update CRDs" in notes and f"--version {chart_version}" in notes, notes  # NOTES.txt
    assert "kubectl apply --server-side --force-conflicts -f pbt-operator/crds/" in notes, notes
    cluster.kubectl(*FIX)
    cluster.wait_for(lambda: installed_fingerprint(cluster) == crdcheck.EXPECTED[TRAININGS], 30, desc="the new CRD")
    dep = installed_deployment(cluster, op_namespace, RELEASE)
    new = ChartOperator(cluster, tmp_path / "new.log", dep, kubeconfig)
    new.start()
    try:
        obj = wait_phase(cluster, namespace, "quad", new, timeout=180)
        check_finished(cluster, namespace, "quad", obj, 2, 4)  # every segment exactly once across the upgrade
        log = new.log_path.read_text(errors="replace")
        assert "CRDs are this version's" in log and "is outdated" not in log, new.tail(40)
        assert len(crd_outdated_events(cluster, namespace)) == 1  # the old operator's; none from the new one
        cluster.kubectl("delete", "pbt", "--all", "-n", namespace, "--timeout=60s")
    finally:
        new.stop()
        drop_finalizers(cluster, namespace)
