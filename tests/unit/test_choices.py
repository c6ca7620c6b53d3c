"""Each enumeration lives once (core/choices.py): the spec, the CRD schema, the docs table and the
engine's dispatch all agree with it, and an unknown value is refused at parse time, never mapped."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pbt_operator.core import choices, exploit
from pbt_operator.core.engine import Engine
from pbt_operator.core.explore import explore
from pbt_operator.core.types import SegmentResult
from pbt_operator.kube.crds import training_crd
from pbt_operator.spec import SpecError

ROOT = Path(__file__).resolve().parents[2]
FIELDS = sorted(choices.FIELDS.items())


def _set(doc: dict[str, Any], field: str, value: Any) -> None:
    """Put `value` at a manifest field path such as spec.explore.pb2.parallel (NAME: the first
    hyperparameter)."""
    parts = field.split(".")
    node = doc
    for p in parts[:-1]:
        if p == "NAME":
            p = next(iter(node))
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _schema_at(field: str) -> dict[str, Any]:
    node = training_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for p in field.split("."):
        node = node["additionalProperties"] if p == "NAME" else node["properties"][p]
    return node


@pytest.mark.parametrize(("field", "allowed"), FIELDS)
def test_the_crd_schema_allows_exactly_these(field: str, allowed: tuple[str, ...]) -> None:
    node = _schema_at(field)
    if field == "spec.storage.uri":
        assert node["pattern"] == "^(" + "|".join(allowed) + ")://"
    else:
        assert node["enum"] == list(allowed)


@pytest.mark.parametrize(("field", "allowed"), FIELDS)
def test_the_docs_table_lists_exactly_these(field: str, allowed: tuple[str, ...]) -> None:
    text = (ROOT / "docs" / "manifest.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith(f"| `{field}` |")]
    assert len(rows) == 1, f"docs/manifest.md has no single row for {field}"
    listed = rows[0].split(" | ")[1]
    if field == "spec.storage.uri":
        values = re.findall(r"`([a-z0-9]+)://", listed)
    else:
        values = re.findall(r"`([^`]+)`", listed)
    assert tuple(values) == allowed, f"docs/manifest.md lists {values} for {field}; core/choices.py says {allowed}"


@pytest.mark.parametrize(("field", "allowed"), FIELDS)
def test_an_unknown_value_is_refused_with_the_field_named(make_doc: Any, field: str,
                                                          allowed: tuple[str, ...]) -> None:
    from pbt_operator.spec import parse_manifest

    doc = make_doc()
    _set(doc, field, "bogus://x" if field == "spec.storage.uri" else "bogus")
    with pytest.raises(SpecError) as e:
        parse_manifest(doc)
    path = field.replace("NAME", next(iter(doc["spec"]["hyperparameters"])))
    assert any(p.startswith(f"{path}: must ") and allowed[0] in p for p in e.value.problems), e.value.problems


@pytest.mark.parametrize("field", ["spec.mode", "spec.objective.direction", "spec.exploit.strategy",
                                   "spec.explore.strategy", "spec.explore.pb2.parallel",
                                   "spec.failurePolicy.onExhausted"])
def test_every_listed_value_is_accepted(make_doc: Any, field: str) -> None:
    from pbt_operator.spec import parse_manifest

    for value in choices.FIELDS[field]:
        doc = make_doc()
        _set(doc, field, value)
        parse_manifest(doc)


def test_storage_schemes_are_the_workers() -> None:
    from pbt_worker.contract import URI_SCHEMES

    assert tuple(URI_SCHEMES) == choices.STORAGE_SCHEMES


def test_a_dispatch_table_that_misses_a_value_fails_loudly() -> None:
    with pytest.raises(RuntimeError, match="dispatch covers"):
        choices.check_table("x", {"a": 1}, ("a", "b"))
    choices.check_table("x", {"a": 1, "b": 2}, ("a", "b"))


def test_the_engine_never_runs_another_strategy_for_an_unknown_one(make_spec: Any) -> None:
    """The spec refuses unknown strategies; a spec built around the parser must make the engine fail,
    not silently run tournament (or perturb) instead."""
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown exploit strategy 'bogus'"):
        exploit.choose("bogus", 0, {0: 1.0, 1: 2.0}, rng, fraction=0.5, size=2)
    spec = make_spec({"population": 2})
    with pytest.raises(ValueError, match="unknown explore strategy 'bogus'"):
        explore(spec.space, "bogus", {"lr": 0.01}, None, rng)
    bad = dataclasses.replace(spec, exploit=dataclasses.replace(spec.exploit, strategy="bogus"))
    eng = Engine(bad)
    eng.start()
    with pytest.raises(ValueError, match="unknown exploit strategy"):
        eng.tell(SegmentResult(0, 0, 1.0, 10))  # asynchronous: decides member 0's next segment at once


@pytest.mark.parametrize(("attr", "sub"), [("mode", None), ("on_exhausted", "failure_policy")])
def test_the_engine_refuses_a_mode_or_policy_it_does_not_know(make_spec: Any, attr: str, sub: str | None) -> None:
    spec = make_spec({"population": 2})
    bad = (dataclasses.replace(spec, mode="bogus") if sub is None else
           dataclasses.replace(spec, failure_policy=dataclasses.replace(spec.failure_policy, on_exhausted="bogus")))
    with pytest.raises(ValueError, match="unknown value 'bogus'"):
        Engine(bad)
