"""The CRD schema and the spec model must not drift: on a corpus of valid and invalid manifests, the API
server (server-side dry run through the real kubectl) never accepts what the spec model refuses for a
reason the schema can express, and never refuses what the spec model accepts, except for what only
means something to `pbt run` (CLUSTER_ONLY: spec.worker, mem:// storage, names too long for Job names),
which the schema refuses with a message saying so."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from clusterlib import Cluster
from pbt_operator.spec import SpecError, parse_manifest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def base() -> dict[str, Any]:
    return {
        "apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining", "metadata": {"name": "corpus"},
        "spec": {
            "population": 4, "parallelism": 2, "mode": "asynchronous", "seed": 1,
            "objective": {"metric": "score", "direction": "max"},
            "segment": {"steps": 5, "timeoutSeconds": 60}, "budget": {"segments": 3, "targetScore": 0.9},
            "hyperparameters": {"lr": {"type": "float", "min": 1e-4, "max": 1.0, "log": True},
                                "n": {"type": "int", "min": 1, "max": 8},
                                "opt": {"type": "categorical", "choices": ["sgd", "adam"]}},
            "exploit": {"strategy": "truncation", "fraction": 0.25},
            "explore": {"strategy": "pb2", "pb2": {"parallel": "bucb"}},
            "storage": {"uri": "s3://bucket/prefix", "credentialsSecret": "s3"},
            "template": {"spec": {"containers": [{"name": "t", "image": "x"}]}},
            "failurePolicy": {"maxRetries": 1, "onExhausted": "replace"},
        },
    }


def mutate(path: str, value: Any, delete: bool = False) -> dict[str, Any]:
    doc = base()
    keys = path.split(".")
    node = doc
    for k in keys[:-1]:
        node = node[k]
    if delete:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return doc


VALID = [
    base(),
    mutate("spec.mode", "synchronous"),
    mutate("spec.exploit", {"strategy": "truncation", "fraction": 0.75}),  # with pb2 the top quarter donates
    mutate("spec.exploit", {"strategy": "truncation", "fraction": 0.6, "donorFraction": 0.4}),
    mutate("spec.exploit", {"strategy": "tournament", "size": 3}),
    mutate("spec.explore", {"strategy": "perturb", "factors": [0.5, 2.0], "resampleProbability": 0.0}),
    mutate("spec.objective", {"metric": "loss", "direction": "min"}),
    mutate("spec.hyperparameters.lr.initial", 0.01),
    mutate("spec.hyperparameters.n.initial", {"min": 2, "max": 4}),
    mutate("spec.budget", {"segments": 1}),
    mutate("spec.parallelism", 0),  # a paused training
    mutate("spec.suspend", True),
    mutate("spec.queueName", "gpu-queue"),
    mutate("spec.jobMetadata", {"labels": {"kueue.x-k8s.io/priority-class": "research"},
                                "annotations": {"example.com/team": "a b c"}}),
    mutate("spec.segment", {"steps": 5, "timeoutSeconds": 60, "pendingTimeoutSeconds": 600, "onSuspend": "stop",
                            "protectFromDisruption": False}),
    mutate("spec.failurePolicy", {"maxRetries": 1, "onExhausted": "fail", "maxDisruptions": 0}),
    yaml.safe_load((ROOT / "examples" / "digits" / "populationtraining-k8s.yaml").read_text()),
]
# Valid for `pbt run`, refused on a cluster where they mean nothing: (manifest, what the error says).
CLUSTER_ONLY = [
    (mutate("spec.worker", {"executor": "process", "command": ["python", "train.py"]}), "spec.worker configures"),
    (mutate("spec.storage.uri", "mem://x/"), "mem:// keeps checkpoints"),
    (mutate("metadata.name", "n" * 55), "at most 40 characters"),
    (mutate("spec.template", None, delete=True), "spec.template is required on a cluster"),
]
INVALID = [
    mutate("spec.population", 1),
    mutate("spec.explore.pb2", {"minRows": 64, "maxRows": 32}),  # PB2 could never engage
    mutate("spec.hyperparameters.n", {"type": "float", "min": -1e308, "max": 1e308}),  # max - min overflows
    mutate("spec.population", "four"),
    mutate("spec.parallelism", -1),
    mutate("spec.mode", "sometimes"),
    mutate("spec.suspend", "yes"),
    mutate("spec.queueName", "Not_A_Name"),
    mutate("spec.segment.pendingTimeoutSeconds", 0),
    mutate("spec.segment.onSuspend", "pause"),
    mutate("spec.failurePolicy.maxDisruptions", -1),
    mutate("spec.jobMetadata", {"labels": {"team": 3}}),
    mutate("spec.seed", -1),
    mutate("spec.objective.direction", "up"),
    mutate("spec.segment.steps", 0),
    mutate("spec.budget.segments", 0),
    mutate("spec.hyperparameters", {}),
    mutate("spec.hyperparameters.lr.min", 2.0),
    mutate("spec.hyperparameters.lr.min", -1.0),
    mutate("spec.hyperparameters.lr.type", "double"),
    mutate("spec.hyperparameters.lr.max", None, delete=True),
    mutate("spec.hyperparameters.opt.min", 0),
    mutate("spec.exploit", {"strategy": "truncation", "fraction": 0.75, "donorFraction": 0.5}),  # they overlap
    mutate("spec.exploit.fraction", 1.0),
    {**base(), "spec": {**base()["spec"], "explore": {"strategy": "perturb"},  # PBT: the donors are the top 0.6
                        "exploit": {"strategy": "truncation", "fraction": 0.6}}},
    mutate("spec.exploit.fraction", 0),
    mutate("spec.exploit.strategy", "roulette"),
    mutate("spec.exploit", {"strategy": "tournament", "size": 9}),
    mutate("spec.explore.strategy", "bayes"),
    mutate("spec.explore.resampleProbability", 1.5),
    mutate("spec.explore.factors", []),
    mutate("spec.explore.pb2.parallel", "async"),
    mutate("spec.storage.uri", "ftp://x"),
    mutate("spec.failurePolicy.onExhausted", "panic"),
    mutate("spec.failurePolicy.maxRetries", -1),
    mutate("spec.hyperparameters.false", {"type": "int", "min": 1, "max": 8}),  # kubectl's YAML for an unquoted `n:`
    mutate("spec.popluation", 4),  # a typo: an unknown field
    mutate("spec.population", None, delete=True),
]


def server_accepts(cluster: Cluster, ns: str, doc: dict[str, Any]) -> tuple[bool, str]:
    p = cluster.kubectl("apply", "--dry-run=server", "-n", ns, "-f", "-", input=json.dumps(doc), check=False)
    return p.returncode == 0, p.stderr


def model_accepts(doc: dict[str, Any]) -> tuple[bool, str]:
    try:
        parse_manifest(copy.deepcopy(doc))
        return True, ""
    except SpecError as e:
        return False, str(e)


def test_schema_and_model_agree(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    cluster.wait_established("populationtrainings.pbt.dev")
    # discovery lags a moment behind Established: until it serves the kind, every dry run is refused
    cluster.wait_for(lambda: server_accepts(cluster, namespace, VALID[0])[0], 30, desc="the kind served")
    for doc in VALID:
        ok_model, why_model = model_accepts(doc)
        ok_server, why_server = server_accepts(cluster, namespace, doc)
        assert ok_model, why_model
        assert ok_server, why_server
    refused_by_server = 0
    for doc in INVALID:
        ok_model, _ = model_accepts(doc)
        ok_server, why = server_accepts(cluster, namespace, doc)
        assert not ok_model, json.dumps(doc["spec"])[:300]  # the model refuses every invalid manifest
        refused_by_server += not ok_server
        if not ok_server:
            assert "spec" in why or "unknown field" in why, why
    # The schema expresses all of these but the cross-field immutability rules (tested elsewhere).
    assert refused_by_server == len(INVALID), refused_by_server
    for doc, says in CLUSTER_ONLY:
        ok_server, why = server_accepts(cluster, namespace, doc)
        assert not ok_server and says in why, why
        if doc["metadata"]["name"] == "corpus":
            ok_model, why_model = model_accepts(doc if "worker" in doc["spec"] else {
                **doc, "spec": {**doc["spec"], "worker": {"executor": "inline", "function": "m:f"}}})
            assert ok_model, why_model  # fine for `pbt run`


def test_population_and_space_are_immutable(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    # Run on its own (-k, a rerun on a fresh cluster), the CRD was created just now: the first apply
    # can come before the API server serves the kind (discovery lags a moment behind Established).
    cluster.wait_established("populationtrainings.pbt.dev")
    doc = base()
    doc["spec"]["storage"]["uri"] = "s3://bucket/immutable"
    cluster.wait_for(lambda: cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc),
                                             check=False).returncode == 0, 30, desc="the first training applied")
    doc["spec"]["population"] = 6
    p = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert p.returncode != 0 and "population is immutable" in p.stderr, p.stderr
    doc["spec"]["population"] = 4
    doc["spec"]["hyperparameters"]["lr"]["max"] = 0.5
    p = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert p.returncode != 0 and "immutable" in p.stderr, p.stderr
    doc["spec"]["hyperparameters"]["lr"]["max"] = 1.0
    doc["spec"]["storage"]["uri"] = "s3://bucket/elsewhere"  # the checkpoints are under the old one
    p = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc), check=False)
    assert p.returncode != 0 and "storage.uri is immutable" in p.stderr, p.stderr
    doc["spec"]["storage"]["uri"] = "s3://bucket/immutable"
    doc["spec"]["parallelism"] = 3  # allowed to change
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
