"""Invalid PopulationTraining manifests, generated (hypothesis, derandomized) as mutations of a valid one:
wrong types, unknown fields, bad enums, reversed bounds, population < 2, bad fractions, out-of-range
numbers, missing required fields.

Here every mutation the spec model rejects goes through one reconcile pass (`plan`): it must end the
training as Failed with an InvalidSpec condition naming the broken field, create nothing, and never
raise. tests/e2e/test_faults.py sends the same kind of manifests to a real API server (the schema
refuses many of them first) and a running operator.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pbt_operator.kube.reconcile import plan
from pbt_operator.spec import SpecError, parse_spec

VALID_SPEC: dict[str, Any] = {
    "population": 2, "parallelism": 2, "mode": "asynchronous", "seed": 7,
    "objective": {"metric": "score", "direction": "max"},
    "segment": {"steps": 10, "timeoutSeconds": 120}, "budget": {"segments": 2},
    "hyperparameters": {"h0": {"type": "float", "min": 0.0, "max": 1.0, "initial": {"min": 0.0, "max": 0.3}},
                        "h1": {"type": "float", "min": 0.0, "max": 1.0, "initial": {"min": 0.0, "max": 0.3}}},
    "exploit": {"strategy": "truncation", "fraction": 0.25},
    "explore": {"strategy": "perturb"},
    "storage": {"uri": "file:///tmp/ckpt"},
    "failurePolicy": {"maxRetries": 1, "onExhausted": "replace"},
    "template": {"spec": {"containers": [{"name": "train", "image": "x", "command": ["python", "w.py"]}]}},
}

LEAVES = {  # path -> kind of its valid value
    "population": "int", "parallelism": "int", "seed": "int", "mode": "enum",
    "objective.metric": "str", "objective.direction": "enum", "segment.steps": "int",
    "segment.timeoutSeconds": "int", "budget.segments": "int", "exploit.strategy": "enum",
    "exploit.fraction": "float", "explore.strategy": "enum", "hyperparameters.h0.type": "enum",
    "hyperparameters.h0.min": "float", "hyperparameters.h0.max": "float", "storage.uri": "str",
    "failurePolicy.maxRetries": "int", "failurePolicy.onExhausted": "enum",
    "hyperparameters.h1.initial.min": "float",
}
ENUMS = ["mode", "exploit.strategy", "explore.strategy", "objective.direction", "hyperparameters.h0.type",
         "failurePolicy.onExhausted"]
MAPPINGS = ["", "segment", "budget", "exploit", "explore", "hyperparameters.h0", "storage", "failurePolicy",
            "objective", "hyperparameters.h1.initial"]


def mutations() -> st.SearchStrategy[tuple[str, str, Any]]:
    """(operation, dotted path under spec, value)."""
    junk = st.one_of(st.text(max_size=8), st.lists(st.integers(), max_size=2), st.booleans(),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.none())
    wrong_type = {
        "int": st.one_of(junk, st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f))),
        "float": st.one_of(st.text(min_size=1, max_size=8), st.lists(st.floats(), max_size=2), st.booleans()),
        "enum": st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=2), st.booleans()),
        "str": st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=2), st.booleans()),
    }
    return st.one_of(
        st.sampled_from(sorted(LEAVES)).flatmap(lambda p: st.tuples(st.just("set"), st.just(p), wrong_type[LEAVES[p]])),
        st.tuples(st.just("set"), st.sampled_from(ENUMS), st.text(min_size=1, max_size=12)),
        st.tuples(st.just("add"), st.sampled_from(MAPPINGS),
                  st.tuples(st.text("abcdefghijklmnopqrstuvwxyzXYZ", min_size=1, max_size=10), junk)),
        st.tuples(st.just("set"), st.just("population"), st.integers(-5, 1)),
        st.tuples(st.just("set"), st.sampled_from(["parallelism", "segment.steps", "budget.segments",
                                                    "segment.timeoutSeconds"]), st.integers(-1000, 0)),
        st.tuples(st.just("set"), st.just("seed"), st.integers(-10**6, -1)),
        st.tuples(st.just("set"), st.just("exploit.fraction"),
                  st.one_of(st.floats(0.5, 1e6, exclude_min=True), st.floats(-1e6, 0.0))),
        st.tuples(st.just("bounds"), st.sampled_from(["hyperparameters.h0", "hyperparameters.h1.initial"]),
                  st.floats(0.0, 10.0)),
        st.tuples(st.just("del"), st.sampled_from(["population", "hyperparameters", "template", "storage.uri",
                                                   "hyperparameters.h0.type", "budget"]), st.none()),
    )


def mutate(spec: dict[str, Any], mut: tuple[str, str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The mutated copy and the path of the field it broke (None: not a usable mutation)."""
    op, path, value = mut
    spec = copy.deepcopy(spec)
    parts = [p for p in path.split(".") if p]
    parent = spec
    for p in parts if op in ("add", "bounds") else parts[:-1]:
        parent = parent[p]
    if op == "set":
        parent[parts[-1]] = value
    elif op == "del":
        del parent[parts[-1]]
    elif op == "add":
        key, v = value
        if key in parent:
            return None
        parent[key] = v
        path = ".".join([*parts, key])
    elif op == "bounds":
        parent["min"], parent["max"] = value + 0.5, value
    try:
        json.dumps(spec, allow_nan=False)
    except ValueError:
        return None
    return f"spec.{path}".rstrip("."), spec


def invalid(spec: dict[str, Any]) -> bool:
    """True when the spec model rejects it; any other exception is a bug (propagates)."""
    try:
        parse_spec(spec, name="x", namespace="x")
    except SpecError:
        return True
    return False


def names_field(message: str, path: str) -> bool:
    parts = path.split(".")
    return any(".".join(parts[:k]) in message for k in range(2, len(parts) + 1))


def generate(base: dict[str, Any], n: int, max_examples: int = 1200) -> list[tuple[str, dict[str, Any]]]:
    """n distinct invalid mutations of `base` (deterministic)."""
    out: dict[str, tuple[str, dict[str, Any]]] = {}

    @settings(derandomize=True, max_examples=max_examples, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(mutations())
    def collect(mut: tuple[str, str, Any]) -> None:
        got = mutate(base, mut)
        if got is not None and invalid(got[1]):
            out.setdefault(json.dumps(got[1], sort_keys=True), got)

    collect()
    found = list(out.values())
    assert len(found) >= n, len(found)
    return found[:n]


@settings(derandomize=True, max_examples=400, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutations())
def test_invalid_manifest_fails_with_a_condition_naming_the_field(mut: tuple[str, str, Any]) -> None:
    got = mutate(VALID_SPEC, mut)
    if got is None or not invalid(got[1]):
        return
    path, spec = got
    training = {"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining",
                "metadata": {"name": "bad", "namespace": "ns", "uid": "u", "generation": 1}, "spec": spec}
    p = plan(training, [], [], [], "2026-01-01T00:00:00Z")
    assert not p.done and not p.create_members and not p.create_jobs  # not done: it waits for an edit
    assert p.status["phase"] == "Failed"
    cond = next(c for c in p.status["conditions"] if c["type"] == "Failed")
    assert cond["status"] == "True" and cond["reason"] == "InvalidSpec"
    assert names_field(cond["message"], path), (path, cond["message"])
    assert [e.reason for e in p.events] == ["InvalidSpec"]


def test_generator_finds_enough_distinct_invalid_manifests() -> None:
    found = generate(VALID_SPEC, 200)
    kinds = {path.split(".")[1] for path, _ in found}
    assert {"population", "exploit", "hyperparameters", "mode"} <= kinds, kinds
