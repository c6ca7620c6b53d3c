"""The drivers' end of the segment contract: what a worker is handed, and how what it writes back is read.
Worker output is untrusted: anything malformed fails only that segment, with a reason, and never raises."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from pbt_operator.checkpoints import checkpoint_uri, storage_root
from pbt_operator.contract import MAX_RESULT_BYTES, build_contract, parse_result
from pbt_operator.core.types import Suggestion

SUG = Suggestion(2, 5, {"lr": 0.01, "layers": 3, "opt": "adam"}, (1, 4), 50, 10, "exploit", 0.5, 1, "why")


def test_build_contract_fields() -> None:
    c = build_contract("train", SUG, "file:///ck", "/tmp/r.json", ["file:///ck/train/m000/00001/"])
    assert c == {
        "version": 1, "training": "train", "member": 2, "segment": 5,
        "hyperparameters": {"lr": 0.01, "layers": 3, "opt": "adam"},
        "steps": {"start": 50, "budget": 10},
        "restore": "file:///ck/train/m001/00004/",
        "checkpoint": "file:///ck/train/m002/00005/",
        "result": "/tmp/r.json",
        "gc": ["file:///ck/train/m000/00001/"],
    }
    first = Suggestion(0, 0, {"lr": 0.1}, None, 0, 10, "start")
    assert build_contract("t", first, "s3://b/p/", "/r")["restore"] is None
    json.dumps(c)  # it travels as JSON in PBT_SEGMENT


def test_contract_matches_the_worker_sdk() -> None:
    """What the driver builds, the worker SDK accepts (the two ends share one definition)."""
    from pbt_worker import parse_contract

    c = build_contract("train", SUG, "file:///ck", "/tmp/r.json")
    parsed = parse_contract(c)
    assert parsed.member == 2 and parsed.segment == 5 and parsed.restore == c["restore"]
    assert parsed.steps_start == 50 and parsed.steps_budget == 10


def test_checkpoint_uris(tmp_path: Path) -> None:
    assert checkpoint_uri("s3://bucket/prefix", "t", (3, 12)) == "s3://bucket/prefix/t/m003/00012/"
    assert checkpoint_uri("s3://bucket/prefix/", "t", (3, 12)) == "s3://bucket/prefix/t/m003/00012/"
    root = storage_root(None, "t", tmp_path / "run")
    assert root == (tmp_path / "run" / "checkpoints").resolve().as_uri()
    assert storage_root(f"file://{tmp_path}/ck/", "t", tmp_path) == (tmp_path / "ck").as_uri()
    assert storage_root("s3://b/p/", "t", tmp_path) == "s3://b/p"


def test_parse_result_ok() -> None:
    r = parse_result('{"score": 0.93, "metrics": {"loss": 0.21}, "steps": 60}', SUG, duration=1.5)
    assert r.ok and r.score == 0.93 and r.steps == 60 and r.metrics == {"loss": 0.21} and r.duration == 1.5
    r = parse_result(b'{"score": 1}', SUG)
    assert r.ok and r.steps == 60  # steps default to start + budget
    r = parse_result('{"score": 0.5, "metrics": {"val_acc": 0.8}}', SUG, metric="val_acc")
    assert r.ok and r.score == 0.8
    assert r.gc_failed == 0
    r = parse_result('{"score": 0.5, "steps": 60, "gcFailed": 3}', SUG)  # 3 of the gc deletes failed
    assert r.ok and r.gc_failed == 3


def test_an_objective_metric_reported_as_null_is_a_divergence_not_a_missing_metric() -> None:
    """The worker SDK reports a NaN metric as null: under `objective.metric: val_loss` a loss that went
    NaN must not read as a result without the metric (that fails the whole training at once)."""
    from pbt_operator.core.types import diverged, permanent_failure

    r = parse_result('{"score": 0.1, "metrics": {"val_loss": null}}', SUG, "val_loss")
    assert r.error is not None and diverged(r.error) and not permanent_failure(r.error), r.error
    assert "metric 'val_loss' is null" in r.error
    r = parse_result('{"metrics": {"acc": 0.5}}', SUG, "val_loss")  # absent, and no score: still missing
    assert r.error is not None and permanent_failure(r.error) and not diverged(r.error)


def test_parse_result_failures_name_the_problem() -> None:
    cases = [
        (None, "wrote no result"),
        ("", "wrote no result"),
        ("  \n", "wrote no result"),
        ("not json", "not JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"error": "CUDA out of memory"}', "worker reported an error: CUDA out of memory"),
        ('{"score": 1, "extra": 2}', "unexpected keys ['extra']"),
        ('{"score": "high"}', "no numeric score"),
        ('{"score": true}', "no numeric score"),
        ('{"score": NaN}', "diverged: score is nan (not finite)"),
        ('{"score": Infinity}', "diverged: score is inf (not finite)"),
        ('{"error": "score is nan: the segment diverged", "diverged": true}', "diverged: score is nan: the segment"),
        ('{"error": "no", "diverged": 1}', "worker reported an error: no"),  # only true is the flag
        ('{"error": "no", "permanent": true, "diverged": true}', "worker reported a permanent error: no"),
        ('{"metrics": {"loss": 1}}', "no numeric score for metric 'score' (got None); the worker reported loss: "
                                     "report 'score' (seg.report(score=...)) or set spec.objective.metric"),
        ('{"metrics": {"note": "x"}}', "the worker reported no number"),
        ('{"score": 1, "metrics": [1]}', "metrics must be an object"),
        ('{"score": 1, "steps": 10}', "steps must be an integer >= 50"),
        ('{"score": 1, "steps": 60.5}', "steps must be an integer"),
        ('{"score": 1, "steps": true}', "steps must be an integer"),
        ('{"score": 1, "metrics": {"x": "' + "a" * MAX_RESULT_BYTES + '"}}', "at most 4096"),
        (b"\xff\xfe", "not JSON"),
        ('{"score": 1' + "0" * 400 + "}", "score is out of range"),  # float() would raise OverflowError
        ('{"score": 1, "gcFailed": -1}', "result.gcFailed must be a non-negative integer"),
        ('{"score": 1, "gcFailed": true}', "result.gcFailed must be a non-negative integer"),
        ('{"score": 1, "gcFailed": 1.5}', "result.gcFailed must be a non-negative integer"),
        ('{"score": 1, "gcFailed": "2"}', "result.gcFailed must be a non-negative integer"),
        ('{"score": 1, "gcFailed": [1]}', "result.gcFailed must be a non-negative integer"),
    ]
    for text, why in cases:
        r = parse_result(text, SUG)
        assert not r.ok and r.error is not None and why in r.error, (text, r.error)
        assert (r.member, r.segment, r.score) == (2, 5, None)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
                              lambda ch: st.lists(ch, max_size=4) | st.dictionaries(
                                  st.sampled_from(["score", "metrics", "steps", "error", "gcFailed", "x"]), ch, max_size=4),
                              max_leaves=12).map(lambda d: json.dumps(d, allow_nan=True))))
def test_parse_result_never_raises(text: str | bytes) -> None:
    r = parse_result(text, SUG, metric="score")
    if r.ok:
        assert isinstance(r.score, float) and r.steps >= SUG.steps_start
        assert type(r.gc_failed) is int and r.gc_failed >= 0
    else:
        assert r.error


def test_a_long_worker_error_is_cut_with_a_visible_mark() -> None:
    """It was sliced at 500 characters: the cut message stopped mid-word and read as complete."""
    r = parse_result(json.dumps({"error": "RuntimeError: " + "x" * 2000}), SUG)
    assert r.error is not None and r.error.endswith("...") and len(r.error) == len("worker reported an error: ") + 500
