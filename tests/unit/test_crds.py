"""The generated CRDs: checked-in files match the generator, and the shape kubectl users rely on."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml
from pbt_operator.core.types import Suggestion
from pbt_operator.kube.builders import build_member, member_status
from pbt_operator.kube.crds import (
    SCHEMA_ANNOTATION,
    all_crds,
    expected_fingerprints,
    render,
    schema_fingerprint,
    training_crd,
)

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_crds_match_the_generator() -> None:
    for fname, text in render().items():
        assert (ROOT / "crds" / fname).read_text() == text, f"crds/{fname} is stale: run `pbt crds --write crds`"


def test_training_crd_shape() -> None:
    crd = training_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["pbt"] and "pbt" not in names["categories"]
    v = crd["spec"]["versions"][0]
    assert v["subresources"]["scale"]["specReplicasPath"] == ".spec.parallelism"
    assert "status" in v["subresources"]
    cols = {c["name"]: c["jsonPath"] for c in v["additionalPrinterColumns"]}
    assert cols["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert cols["Succeeded"] == '.status.conditions[?(@.type=="Succeeded")].status'
    # Failed is told from starting in plain `kubectl get pbt` (both read Ready False, Succeeded False)
    phase = next(c for c in v["additionalPrinterColumns"] if c["name"] == "Phase")
    assert phase["jsonPath"] == ".status.phase" and phase.get("priority", 0) == 0
    # `kubectl get pbt -o wide` says why a training is not Ready (Unschedulable, WaitingForAdmission...)
    reason = next(c for c in v["additionalPrinterColumns"] if c["name"] == "Reason")
    assert reason["jsonPath"] == '.status.conditions[?(@.type=="Ready")].reason' and reason["priority"] == 1
    spec = v["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [r["rule"] for r in spec["x-kubernetes-validations"]]
    assert "self.population == oldSelf.population" in rules
    size = next(r for r in spec["x-kubernetes-validations"] if r["message"] == "exploit.size must be <= population")
    assert "self.population < 2 ||" in size["rule"]  # population: 1 gets one message, about population
    assert "self.hyperparameters == oldSelf.hyperparameters" in rules
    messages = [r["message"] for r in spec["x-kubernetes-validations"]]
    # a new storage.uri mid-run failed every member's next restore; a missing template was accepted
    assert any(m.startswith("storage.uri is immutable") for m in messages)
    # an InvalidSpec training whose fix is in an immutable field can only be re-created: say so
    immutable = [m for m in messages if "immutable" in m]
    assert len(immutable) == 3 and all("create it again" in m for m in immutable), immutable
    assert any(m.startswith("spec.template is required on a cluster") for m in messages)
    # Rules that an object created before them may break are checked on create (and on updates of an
    # object that kept them) only: otherwise every status write and the finalizer's removal of such an
    # object was refused with 422, and it could not be deleted.
    for says in ("spec.template is required", "spec.worker configures"):
        rule = next(r for r in spec["x-kubernetes-validations"] if r["message"].startswith(says))
        assert rule["optionalOldSelf"] is True and "oldSelf.hasValue() &&" in rule["rule"], rule
    names = spec["properties"]["hyperparameters"]["x-kubernetes-validations"][0]
    assert names["optionalOldSelf"] is True and names["rule"].startswith("oldSelf.hasValue() ||"), names
    fraction = spec["properties"]["exploit"]["properties"]["fraction"]
    assert fraction["maximum"] == 1 and fraction["exclusiveMaximum"] is True  # and <= 1 - donorFraction: spec.py
    yaml.safe_load(render()["populationtrainings.yaml"])  # valid YAML


def test_build_member_and_status() -> None:
    training = {"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining",
                "metadata": {"name": "t", "namespace": "ns", "uid": "u1"}}
    sug = Suggestion(2, 0, {"lr": 0.1, "opt": "adam"}, None, 0, 10, "start")
    m = build_member(training, sug)
    assert m["metadata"]["name"] == "t-m002"
    assert m["metadata"]["labels"] == {"pbt.dev/training": "t", "pbt.dev/member": "2"}
    owner = m["metadata"]["ownerReferences"][0]
    assert owner["uid"] == "u1" and owner["controller"] is True
    assert Suggestion.from_dict(m["spec"]["segment"]) == sug
    st = member_status(sug, [], "Queued")
    assert st["summary"] == "lr=0.1 opt=adam" and st["parent"] == "-" and st["phase"] == "Queued"
    assert "score" not in st


def test_each_crd_carries_the_fingerprint_of_its_spec() -> None:
    """`helm upgrade` never updates CRDs: the operator tells an outdated one by this annotation."""
    fps = expected_fingerprints()
    assert sorted(fps) == ["populationmembers.pbt.dev", "populationtrainings.pbt.dev"]
    for crd in all_crds():
        fp = crd["metadata"]["annotations"][SCHEMA_ANNOTATION]
        assert SCHEMA_ANNOTATION == "pbt.dev/schema" and len(fp) == 16 and int(fp, 16) >= 0
        assert fp == schema_fingerprint(crd["spec"]) == fps[crd["metadata"]["name"]]
    for fname, text in render().items():  # and the files kubectl and helm install carry it
        crd = yaml.safe_load(text)
        assert crd["metadata"]["annotations"][SCHEMA_ANNOTATION] == fps[crd["metadata"]["name"]], fname
    assert len(set(fps.values())) == 2


def test_fingerprint_changes_with_any_schema_change_and_not_with_key_order() -> None:
    spec = training_crd()["spec"]
    fp = schema_fingerprint(spec)
    assert schema_fingerprint(json.loads(json.dumps(spec, sort_keys=True))) == fp  # canonical: key order ignored
    assert schema_fingerprint(dict(reversed(list(spec.items())))) == fp
    pb2 = copy.deepcopy(spec)
    props = pb2["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    del props["explore"]["properties"]["pb2"]["properties"]["retune"]  # a field an older version lacked
    assert schema_fingerprint(pb2) != fp
    cols = copy.deepcopy(spec)
    cols["versions"][0]["additionalPrinterColumns"].pop()  # not only the schema: printer columns too
    assert schema_fingerprint(cols) != fp
    desc = copy.deepcopy(spec)
    desc["versions"][0]["schema"]["openAPIV3Schema"]["description"] += "."
    assert schema_fingerprint(desc) != fp
