"""Contract parsing: every malformed PBT_SEGMENT fails with a message naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pbt_worker import ContractError, Segment
from pbt_worker.contract import contract_from_env, parse_contract


def contract(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "version": 1,
        "training": "digits",
        "member": 3,
        "segment": 5,
        "hyperparameters": {"lr": 0.01, "batch": 32, "opt": "adam"},
        "steps": {"start": 500, "budget": 100},
        "restore": "file:///ck/digits/m003/00004/",
        "checkpoint": "file:///ck/digits/m003/00005/",
        "result": "/tmp/result.json",
        "gc": ["file:///ck/digits/m001/00002/"],
    }
    base.update(over)
    return base


def test_fields_are_exposed() -> None:
    seg = Segment(contract())
    assert (seg.training, seg.member, seg.index) == ("digits", 3, 5)
    assert seg.hyperparameters == {"lr": 0.01, "batch": 32, "opt": "adam"}
    assert (seg.steps_start, seg.steps_budget, seg.steps_end, seg.steps) == (500, 100, 600, 100)
    assert seg.restore_uri == "file:///ck/digits/m003/00004/"
    assert seg.checkpoint_uri == "file:///ck/digits/m003/00005/"
    assert seg.result == "/tmp/result.json"
    assert seg.gc == ("file:///ck/digits/m001/00002/",)
    assert not seg.is_first


def test_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBT_SEGMENT", json.dumps(contract(restore=None)))
    seg = Segment.from_env()
    assert seg.is_first and seg.restore() is None


def test_missing_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PBT_SEGMENT", raising=False)
    with pytest.raises(ContractError, match="PBT_SEGMENT is not set"):
        Segment.from_env()


def test_not_json() -> None:
    with pytest.raises(ContractError, match="not valid JSON"):
        contract_from_env({"PBT_SEGMENT": "{nope"})


@pytest.mark.parametrize("field", ["version", "training", "member", "segment", "hyperparameters", "steps",
                                   "restore", "checkpoint", "result", "gc"])
def test_missing_field_is_named(field: str) -> None:
    data = contract()
    del data[field]
    with pytest.raises(ContractError, match=f"'{field}'"):
        parse_contract(data)


@pytest.mark.parametrize(
    ("over", "named"),
    [
        ({"version": 2}, "'version'"),
        ({"member": -1}, "'member'"),
        ({"member": "3"}, "'member'"),
        ({"segment": True}, "'segment'"),
        ({"training": ""}, "'training'"),
        ({"steps": {"start": 0}}, "'steps.budget'"),
        ({"steps": {"start": 1.5, "budget": 3}}, "'steps.start'"),
        ({"hyperparameters": {"lr": [1]}}, "'hyperparameters.lr'"),
        ({"hyperparameters": {"flag": None}}, "'hyperparameters.flag'"),
        ({"checkpoint": "file:///no/trailing/slash"}, "'checkpoint'"),
        ({"checkpoint": "gs://bucket/x/"}, "'checkpoint'"),
        ({"restore": 7}, "'restore'"),
        ({"gc": "file:///a/"}, "'gc'"),
        ({"gc": ["file:///a"]}, "'gc\\[0\\]'"),
        ({"gc": ["file:///ck/digits/m003/00005/"]}, "'gc'"),
        ({"result": None}, "'result'"),
    ],
)
def test_bad_field_is_named(over: dict[str, Any], named: str) -> None:
    with pytest.raises(ContractError, match=named):
        parse_contract(contract(**over))


def test_a_boolean_choice_reaches_the_worker_as_a_boolean() -> None:
    """A categorical's [true, false] must arrive as True/False: the string 'false' would be truthy."""
    seg = Segment(contract(hyperparameters={"nesterov": False, "bn": True, "lr": 0.1}))
    assert seg.hyperparameters["nesterov"] is False and seg.hyperparameters["bn"] is True


def test_inline_driver_may_omit_result() -> None:
    data = contract()
    del data["result"]
    assert Segment(data).result is None
