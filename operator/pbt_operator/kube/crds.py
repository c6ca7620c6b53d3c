"""The CustomResourceDefinitions, built in Python and written to crds/ by `pbt crds`.

Both kinds share the category `pbt-all` (`kubectl get pbt-all`), not `pbt`: kubectl expands a category
before a short name, so `kubectl get pbt NAME` would then ask for two kinds at once and fail.

The schema repeats what `spec.parse_spec` checks wherever OpenAPI and CEL can say it, and its enums
come from core/choices.py as the spec's do, so most bad manifests are refused by `kubectl apply`
itself; the operator still parses every object with the spec model and marks anything the schema let
through as Failed with the field named. A test applies a corpus of manifests to a real API server and
checks that the two agree.

Each generated CRD carries a fingerprint of its whole spec (schema, names, printer columns,
subresources) in the annotation `pbt.dev/schema`. `helm upgrade` never updates a chart's CRDs, and an API
server pruning spec fields that an old schema does not know says nothing, so the operator compares the
installed CRDs' annotation with `expected_fingerprints()` at start-up (kube/crdcheck.py). Both sides come
from this generator: nothing is stored that could go stale.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from typing import Any

from .. import spec as S
from ..core.choices import (
    DIRECTIONS,
    EXECUTORS,
    EXPLOIT_STRATEGIES,
    EXPLORE_STRATEGIES,
    INLINE_POOLS,
    MODES,
    ON_EXHAUSTED,
    ON_SUSPEND,
    PARAM_KINDS,
    PB2_PARALLEL,
    scheme_pattern,
)
from ..core.types import Pb2Settings
from ..fielddocs import CONDITION_FIELDS, MEMBER_FIELDS, crd_description

GROUP = "pbt.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
SCHEMA_ANNOTATION = f"{GROUP}/schema"  # metadata.annotations key of the generated CRDs' fingerprint

_str: dict[str, Any] = {"type": "string", "minLength": 1}
_int: dict[str, Any] = {"type": "integer"}
_num: dict[str, Any] = {"type": "number"}
_any: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def _enum(*values: str) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


def _min(n: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": n}


HYPERPARAMETER = _obj(
    {
        "type": _enum(*PARAM_KINDS),
        "min": _num,
        "max": _num,
        "log": {"type": "boolean"},
        # Choices may mix strings and numbers (e.g. dropout [0.1, 0.2] or optimizer [sgd, adam]).
        "choices": {"type": "array", "minItems": 1, "items": _any},
        "initial": _any,
    },
    required=["type"],
    **{
        "x-kubernetes-validations": [
            # (choices holds untyped items, which CEL cannot see: the spec model checks categoricals)
            {"rule": "self.type == 'categorical' || (has(self.min) && has(self.max))",
             "message": "float and int need min and max"},
            {"rule": "self.type != 'categorical' || (!has(self.min) && !has(self.max) && !has(self.log))",
             "message": "min, max and log are not allowed for type: categorical (use choices)"},
            {"rule": "!has(self.min) || !has(self.max) || self.min < self.max", "message": "max must be > min"},
            # sampling draws from max - min: it must not overflow to infinity
            {"rule": "!has(self.min) || !has(self.max) || self.max - self.min <= 1.7976931348623157e308",
             "message": "max - min must be a finite number"},
            {"rule": "!has(self.log) || !self.log || !has(self.min) || self.min > 0",
             "message": "min must be > 0 when log: true"},
        ]
    },
)

TRAINING_SPEC = _obj(
    {
        "population": {"type": "integer", "minimum": 2, "maximum": 1000},
        "parallelism": _min(0),
        "suspend": {"type": "boolean"},
        "queueName": {"type": "string", "maxLength": 63, "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "jobMetadata": _obj({"labels": {"type": "object", "additionalProperties": {"type": "string"}},
                             "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}),
        "mode": _enum(*MODES),
        "seed": _min(0),
        "objective": _obj({"metric": _str, "direction": _enum(*DIRECTIONS)}),
        "segment": _obj({"steps": _min(1), "timeoutSeconds": _min(1), "pendingTimeoutSeconds": _min(1),
                         "onSuspend": _enum(*ON_SUSPEND), "protectFromDisruption": {"type": "boolean"}}),
        "budget": _obj({"segments": _min(1), "targetScore": _num, "patience": _min(1)}),
        "hyperparameters": {"type": "object", "minProperties": 1, "additionalProperties": HYPERPARAMETER,
                            # on create only (the space is immutable): an object created before this rule
                            # must stay writable, or its status writes and finalizer removal are refused
                            "x-kubernetes-validations": [{"rule": "oldSelf.hasValue() || "
                                                                  "(!('true' in self) && !('false' in self))",
                                                          "optionalOldSelf": True,
                                                          "message": S.YAML_BOOL_NAME_HINT}]},
        "exploit": _obj({
            "strategy": _enum(*EXPLOIT_STRATEGIES),
            "fraction": {"type": "number", "exclusiveMinimum": True, "minimum": 0,
                         "exclusiveMaximum": True, "maximum": 1},
            "donorFraction": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 0.5},
            "size": _min(2),
            "significance": _obj({
                "enabled": {"type": "boolean"},
                "alpha": {"type": "number", "exclusiveMinimum": True, "minimum": 0,
                          "exclusiveMaximum": True, "maximum": 1},
                "window": _min(2),
            }),
        }),
        "explore": _obj({
            "strategy": _enum(*EXPLORE_STRATEGIES),
            "factors": {"type": "array", "minItems": 1,
                        "items": {"type": "number", "exclusiveMinimum": True, "minimum": 0}},
            "resampleProbability": {"type": "number", "minimum": 0, "maximum": 1},
            "crossover": {"type": "boolean"},
            "pb2": _obj({
                "parallel": _enum(*PB2_PARALLEL),
                "window": _min(1), "maxRows": _min(8), "minRows": _min(2), "candidates": _min(1),
                "restarts": _min(0), "kappa": {"type": "number", "minimum": 0},
                "trustRegion": {"type": "number", "exclusiveMinimum": True, "minimum": 0, "maximum": 1},
                "retune": {"type": "number", "minimum": 0, "maximum": 1},
            }, None, **{"x-kubernetes-validations": [
                # (a default minRows above maxRows depends on the hyperparameters: the spec model checks that)
                {"rule": "!has(self.minRows) || !has(self.maxRows) || self.minRows <= self.maxRows",
                 "message": "minRows must be <= maxRows (PB2 would never engage)"},
            ]}),
        }),
        "storage": _obj({
            "uri": {"type": "string", "pattern": scheme_pattern()},
            "credentialsSecret": _str,
        }, None, **{"x-kubernetes-validations": [
            {"rule": "!has(self.uri) || !self.uri.startsWith('mem://')",
             "message": "mem:// keeps checkpoints in the memory of `pbt run` and means nothing on a cluster: use "
                        "s3://BUCKET/PREFIX (or file:// on a volume mounted in spec.template)"},
        ]}),
        "worker": _obj({
            "executor": _enum(*EXECUTORS),
            "command": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "function": _str,
            "env": {"type": "object", "additionalProperties": {"type": "string"}},
            "workingDir": _str,
            "pool": _enum(*INLINE_POOLS),
            "warm": {"type": "boolean"},
        }),
        # A PodTemplateSpec, kept as the user wrote it (GPU requests, tolerations, node selectors).
        "template": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "failurePolicy": _obj({"maxRetries": _min(0), "onExhausted": _enum(*ON_EXHAUSTED),
                               "maxDisruptions": _min(0)}),
    },
    required=["population", "hyperparameters"],
    **{
        "x-kubernetes-validations": [
            {"rule": "self.population == oldSelf.population", "message": "population is immutable (delete the training and create it again to change it)"},
            {"rule": "self.hyperparameters == oldSelf.hyperparameters",
             "message": "hyperparameters (the search space) are immutable (delete the training and create it again "
                        "to change them)"},
            # Every member's history and every restore names checkpoints under the storage root: a new
            # uri mid-run made each next segment restore from where nothing was ever saved, and the whole
            # training failed a few segments later with "no committed checkpoint".
            {"rule": "(has(self.storage) && has(self.storage.uri) ? self.storage.uri : '') == "
                     "(has(oldSelf.storage) && has(oldSelf.storage.uri) ? oldSelf.storage.uri : '')",
             "message": "storage.uri is immutable: the members' checkpoints are under the old one (delete the "
                        "training and create it again to use another)"},
            # Without a pod template the operator has nothing to run (spec.worker, which `pbt run` uses
            # instead, is refused below). Checked on create, and on updates of an object that had one: the
            # API server validates every write against the whole schema, so an object created before this
            # rule would otherwise refuse the operator's status writes and the finalizer's removal (a
            # training that could not even be deleted).
            {"rule": "has(self.template) || (oldSelf.hasValue() && !has(oldSelf.value().template))",
             "optionalOldSelf": True,
             "message": "spec.template is required on a cluster: the pod template whose container runs one "
                        "segment (see docs/manifest.md)"},
            # (population < 2 is refused by its own minimum: without the guard, population: 1 also got
            # "exploit.size must be <= population" for the default size 2 the user never wrote)
            {"rule": "!has(self.exploit) || !has(self.exploit.size) || self.population < 2 || "
                     "self.exploit.size <= self.population",
             "message": "exploit.size must be <= population"},
            # spec.parse_spec's rule, donors filled in as it does: donorFraction, else the top `fraction`
            # (PBT's rule), with pb2 at most the top quarter (PB2_DONORS).
            {"rule": "!has(self.exploit) || !has(self.exploit.fraction) || self.exploit.fraction + "
                     "(has(self.exploit.donorFraction) ? self.exploit.donorFraction : "
                     "((has(self.explore) && has(self.explore.strategy) && self.explore.strategy == 'pb2' && "
                     f"self.exploit.fraction > {S.PB2_DONORS}) ? {S.PB2_DONORS} : self.exploit.fraction)) "
                     "<= 1.000000001",
             "message": "exploit.fraction must be at most 1 - exploit.donorFraction: the bottom fraction that copies "
                        "and the top fraction that donates may not overlap (without donorFraction the donors are "
                        f"the top `fraction`, with explore.strategy pb2 at most the top {S.PB2_DONORS})"},
            # spec.worker configures `pbt run`; on a cluster the segment is spec.template, so a worker
            # section there would be silently ignored: refused instead, saying so.
            {"rule": "!has(self.worker) || (oldSelf.hasValue() && has(oldSelf.value().worker))",
             "optionalOldSelf": True,  # as for spec.template above: objects from before the rule stay writable
             "message": "spec.worker configures `pbt run` only and means nothing on a cluster, where each segment "
                        "runs spec.template: remove it (the process executor of `pbt run` defaults to the "
                        "template container's command)"},
        ]
    },
)

CONDITIONS = {
    "type": "array",
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
    "items": _obj(
        {
            "type": _str, "status": _enum("True", "False", "Unknown"), "reason": {"type": "string"},
            "message": {"type": "string"}, "lastTransitionTime": {"type": "string", "format": "date-time"},
            "observedGeneration": _int,
        },
        required=["type", "status"],
    ),
}

TRAINING_STATUS = _obj(
    {"conditions": CONDITIONS, "observedGeneration": _int, "running": _int, "queued": _int, "waiting": _int,
     "selector": {"type": "string"}},
    None, **{"x-kubernetes-preserve-unknown-fields": True},
)


# Schema defaults: the spec model's own defaults (its dataclasses), so `kubectl get -o yaml` and the
# printer columns (METRIC, MODE) show what the operator will use. An object default ({}) on a section
# lets the defaults inside it apply when the section is left out. Nothing in spec.worker (refused on a
# cluster) or where a default depends on other fields (parallelism = population; exploit.fraction = 0.5 with
# explore pb2, else 0.25; exploit.donorFraction = fraction, at most 0.25 with pb2; explore.pb2.minRows grows
# with the hyperparameter space; explore.pb2.retune shrinks with budget.segments).
DEFAULTS: dict[str, Any] = {
    "spec.mode": "asynchronous", "spec.seed": 0,
    "spec.objective": {}, "spec.objective.metric": S.Objective().metric, "spec.objective.direction": S.Objective().direction,
    "spec.segment": {}, "spec.segment.steps": S.SegmentSpec().steps,
    "spec.budget": {}, "spec.budget.segments": S.Budget().segments,
    "spec.exploit": {}, "spec.exploit.strategy": S.Exploit().strategy,
    "spec.exploit.size": S.Exploit().size, "spec.exploit.significance": {},
    "spec.exploit.significance.enabled": S.Significance().enabled,
    "spec.exploit.significance.alpha": S.Significance().alpha,
    "spec.exploit.significance.window": S.Significance().window,
    "spec.explore": {}, "spec.explore.strategy": S.Explore().strategy,
    "spec.explore.factors": list(S.Explore().factors),
    "spec.explore.resampleProbability": S.Explore().resample_probability,
    "spec.explore.crossover": S.Explore().crossover, "spec.explore.pb2": {},
    "spec.explore.pb2.parallel": Pb2Settings.parallel, "spec.explore.pb2.maxRows": Pb2Settings.max_rows,
    "spec.explore.pb2.candidates": Pb2Settings.candidates,
    "spec.explore.pb2.restarts": Pb2Settings.restarts, "spec.explore.pb2.kappa": Pb2Settings.kappa,
    "spec.explore.pb2.trustRegion": Pb2Settings.trust_region,
    "spec.failurePolicy": {}, "spec.failurePolicy.maxRetries": S.FailurePolicy().max_retries,
    "spec.failurePolicy.onExhausted": S.FailurePolicy().on_exhausted,
}


def annotate(schema: dict[str, Any], path: str, describe: Callable[[str], str | None],
             defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of `schema` with a description on every property (`describe(path)`, paths like
    spec.exploit.fraction; map values as NAME, condition items from CONDITION_FIELDS) and the defaults."""
    out = dict(schema)

    # Schema fragments are shared between properties (_str, _any...): copy each node before writing to it.
    def walk(node: dict[str, Any], p: str) -> None:
        if p:
            text = describe(p)
            if text:
                node["description"] = text
            if defaults and p in defaults:
                node["default"] = copy.deepcopy(defaults[p])
                if "enum" in node:  # the docs table lists an enum's values only: say the default here
                    node["description"] = f"{node.get('description', '')} Default: {defaults[p]}.".strip()
        if p.endswith("conditions") and "items" in node:
            node["items"] = items = dict(node["items"])
            items["properties"] = {k: {**sub, "description": CONDITION_FIELDS[k]}
                                   for k, sub in items.get("properties", {}).items()}
            return
        if node.get("properties"):
            node["properties"] = props = {k: dict(sub) for k, sub in node["properties"].items()}
            for k, sub in props.items():
                walk(sub, f"{p}.{k}" if p else k)
        if isinstance(node.get("additionalProperties"), dict):
            node["additionalProperties"] = dict(node["additionalProperties"])
            walk(node["additionalProperties"], f"{p}.NAME")

    walk(out, path)
    return out


def _crd(kind: str, plural: str, short: str, schema: dict[str, Any], columns: list[dict[str, Any]],
         scale: bool) -> dict[str, Any]:
    subresources: dict[str, Any] = {"status": {}}
    if scale:
        # status.selector selects the training's segment pods, so an HPA or KEDA can read their metrics.
        subresources["scale"] = {"specReplicasPath": ".spec.parallelism", "statusReplicasPath": ".status.running",
                                 "labelSelectorPath": ".status.selector"}
    spec = {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                  "shortNames": [short], "categories": ["pbt-all"]},
        "versions": [{
            "name": VERSION, "served": True, "storage": True,
            "schema": {"openAPIV3Schema": schema},
            "subresources": subresources,
            "additionalPrinterColumns": columns,
        }],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}", "annotations": {SCHEMA_ANNOTATION: schema_fingerprint(spec)}},
        "spec": spec,
    }


def schema_fingerprint(crd_spec: dict[str, Any]) -> str:
    """A short sha256 of a CRD's spec as canonical JSON (sorted keys, no spaces): any change to the schema,
    names, printer columns or subresources changes it. 16 hex digits: 64 bits, to tell versions apart."""
    canonical = json.dumps(crd_spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _cond(type_: str, field: str = "status") -> str:
    return f'.status.conditions[?(@.type=="{type_}")].{field}'


# Member and Job names are derived from the training's (NAME-m000-s00000-a0, a label value on its pods:
# at most 63 bytes): longer names would be accepted and then never run.
NAME_RULE = {"rule": "self.metadata.name.size() <= 40",
             "message": "metadata.name must be at most 40 characters: segment Job names (NAME-m000-s00000-a0) "
                        "must fit in 63"}


_META = {
    "apiVersion": {"type": "string", "description": "The versioned schema of this object: pbt.dev/v1alpha1."},
    "kind": {"type": "string", "description": "The kind of this object."},
    "metadata": {"type": "object"},  # the API server allows nothing else here (kubectl explain describes it)
}


def training_crd() -> dict[str, Any]:
    schema = _obj({**_META, "spec": annotate(TRAINING_SPEC, "spec", crd_description, DEFAULTS),
                   "status": annotate(TRAINING_STATUS, "status", crd_description)}, required=["spec"],
                  **{"x-kubernetes-validations": [NAME_RULE]})
    schema["description"] = ("PopulationTraining: Population Based Training (PBT) or PB2 of a population of models, "
                             "each segment a Job from spec.template. Creating one runs that pod template in its "
                             "namespace.")
    cols: list[dict[str, Any]] = [
        {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
        {"name": "Gen", "type": "integer", "jsonPath": ".status.generation"},
        {"name": "Best", "type": "number", "jsonPath": ".status.best.score"},
        {"name": "Metric", "type": "string", "jsonPath": ".spec.objective.metric"},
        {"name": "Running", "type": "integer", "jsonPath": ".status.running"},
        # Jobs created but not training yet: waiting for admission (Kueue), a node, the scheduler, an image.
        {"name": "Waiting", "type": "integer", "jsonPath": ".status.waiting"},
        {"name": "Queued", "type": "integer", "jsonPath": ".status.queued"},
        {"name": "Ready", "type": "string", "jsonPath": _cond("Ready")},
        {"name": "Succeeded", "type": "string", "jsonPath": _cond("Succeeded")},
        # In the default view: Ready and Succeeded alone read False/False both for a training that is
        # starting and for one that failed (InvalidSpec, a segment out of retries).
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        # `kubectl get pbt -o wide`: why it is (not) Ready, e.g. Unschedulable when no segment trains
        # because none can be scheduled, WaitingForAdmission, InvalidSpec, SegmentsRunning.
        {"name": "Reason", "type": "string", "priority": 1, "jsonPath": _cond("Ready", "reason")},
    ]
    return _crd("PopulationTraining", "populationtrainings", "pbt", schema, cols, scale=True)


def member_crd() -> dict[str, Any]:
    spec = _obj(
        {"training": _str, "index": _min(0), "segment": _any},
        required=["training", "index"],
    )
    status = _obj({"conditions": CONDITIONS}, None, **{"x-kubernetes-preserve-unknown-fields": True})
    schema = _obj({**_META, "spec": annotate(spec, "spec", MEMBER_FIELDS.get),
                   "status": annotate(status, "status", MEMBER_FIELDS.get)}, required=["spec"])
    schema["description"] = "PopulationMember: one model of a PopulationTraining's population (operator-managed)."
    cols = [
        {"name": "Training", "type": "string", "jsonPath": ".spec.training"},
        {"name": "Segment", "type": "integer", "jsonPath": ".status.segment"},
        {"name": "Score", "type": "number", "jsonPath": ".status.score"},
        {"name": "Hyperparameters", "type": "string", "jsonPath": ".status.summary"},
        {"name": "Parent", "type": "string", "jsonPath": ".status.parent"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Waiting", "type": "string", "jsonPath": ".status.waiting.reason"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return _crd("PopulationMember", "populationmembers", "pbtm", schema, cols, scale=False)


def all_crds() -> list[dict[str, Any]]:
    return [training_crd(), member_crd()]


def expected_fingerprints() -> dict[str, str]:
    """CRD name -> the fingerprint this version of the operator generates (and expects installed)."""
    return {c["metadata"]["name"]: c["metadata"]["annotations"][SCHEMA_ANNOTATION] for c in all_crds()}


def render() -> dict[str, str]:
    """File name -> YAML text, as kept in crds/ and charts/pbt-operator/crds/."""
    import yaml

    header = "# Generated by `pbt crds --write crds/` from pbt_operator/kube/crds.py: do not edit by hand.\n"
    return {
        f"{c['spec']['names']['plural']}.yaml": header + yaml.safe_dump(c, sort_keys=False, width=120)
        for c in all_crds()
    }
