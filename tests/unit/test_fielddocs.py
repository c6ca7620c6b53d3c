"""One source for what fields mean: every CRD property has a description (what `kubectl explain`
shows), docs/manifest.md's table is generated from the same entries, and the schema's defaults are the
spec model's (applying them changes nothing the operator parses)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pbt_operator import fielddocs
from pbt_operator.kube.crds import DEFAULTS, member_crd, training_crd
from pbt_operator.spec import parse_spec
from test_reconcile import training_obj

ROOT = Path(__file__).resolve().parents[2]


def schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def undescribed(node: dict[str, Any], path: str = "") -> list[str]:
    out = []
    for k, sub in (node.get("properties") or {}).items():
        p = f"{path}.{k}" if path else k
        if p == "metadata":  # the API server forbids anything but type there; kubectl explain knows ObjectMeta
            assert sub == {"type": "object"}, sub
            continue
        if not sub.get("description"):
            out.append(p)
        out += undescribed(sub, p)
    for key, suffix in (("additionalProperties", ".NAME"), ("items", "[]")):
        if isinstance(node.get(key), dict):
            out += undescribed(node[key], path + suffix)
    return out


def test_every_crd_field_has_a_description() -> None:
    for crd in (training_crd(), member_crd()):
        missing = undescribed(schema(crd))
        assert not missing, (f"{crd['spec']['names']['kind']}: no description for {missing}: add a Field (or a "
                             "STATUS_FIELDS/MEMBER_FIELDS entry) in operator/pbt_operator/fielddocs.py")
    spec = schema(training_crd())["properties"]["spec"]["properties"]
    assert spec["exploit"]["properties"]["fraction"]["description"].startswith("Truncation: the bottom fraction")
    assert "\\|" not in spec["mode"]["description"]  # markdown escapes stay in the markdown


def test_manifest_table_is_generated_from_the_same_fields() -> None:
    doc = (ROOT / "docs" / "manifest.md").read_text()
    assert fielddocs.render_doc(doc) == doc, \
        "docs/manifest.md is stale: .venv/bin/python -m pbt_operator.fielddocs --write docs/manifest.md"
    rows = [line for line in fielddocs.table().splitlines()[2:]]
    assert len(rows) == sum(f.row for f in fielddocs.FIELDS)
    assert any(r.startswith("| `spec.exploit.fraction` | (0, 1) and at most 1 - `donorFraction`, 0.25 (with `explore.strategy: pb2`: 0.75 below 8 members, else 0.5; with more than 20 segments at most 15 / `budget.segments`, never below 0.25) |")
               for r in rows)


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: a missing property with a default gets it, then
    the defaults inside it apply."""
    if not isinstance(value, dict):
        return value
    out = dict(value)
    for k, sub in (node.get("properties") or {}).items():
        if k not in out and "default" in sub:
            out[k] = copy.deepcopy(sub["default"])
        if k in out:
            out[k] = apply_defaults(sub, out[k])
    return out


def test_schema_defaults_are_the_spec_models() -> None:
    spec_schema = schema(training_crd())["properties"]["spec"]
    minimal = {"population": 4, "hyperparameters": {"lr": {"type": "float", "min": 0.1, "max": 1.0}},
               "storage": {"uri": "s3://bucket/p"}, "template": training_obj()["spec"]["template"]}
    defaulted = apply_defaults(spec_schema, minimal)
    assert defaulted["objective"] == {"metric": "score", "direction": "max"}  # the METRIC column shows it
    assert defaulted["explore"]["pb2"]["parallel"] == "liar-pessimistic" and "worker" not in defaulted
    assert parse_spec(defaulted, name="t") == parse_spec(minimal, name="t")
    assert {k.split(".")[1] for k in DEFAULTS} <= set(spec_schema["properties"])
