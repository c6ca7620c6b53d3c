"""Smoke test of benchmarks/api_quality.py: search_quality's problems through `pbt_operator.run` (tiny)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def aq():
    """benchmarks/api_quality.py under a private name (benchmarks/ is not a package), unloaded after."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("api_quality_under_test", ROOT / "benchmarks" / "api_quality.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)
        sys.path.remove(str(ROOT / "benchmarks"))


def _quick(aq):
    return replace(aq.PROBLEMS["lr-schedule"], segments=2)


@pytest.mark.parametrize("mode", ["asynchronous", "synchronous"])
def test_a_run_through_the_local_runner_gives_a_finite_fraction(aq, tmp_path, mode):
    quick = _quick(aq)
    r = aq.run_api(quick, "pb2-liar-pessimistic", 2, 0, tmp_path, mode=mode, ms_per_step=0.5)
    assert r.segments == 2 * 2
    frac = r.final / quick.limit(2, 0)
    assert math.isfinite(frac) and 0.0 < frac < 1.5
    # the simulator's run of the same spec measures the same thing
    s = aq.run_sim(quick, "pb2-liar-pessimistic", 2, 0, mode)
    assert s.segments == r.segments and math.isfinite(s.final)


def test_a_segment_that_does_not_restore_its_checkpoint_fails_the_benchmark(aq, tmp_path, monkeypatch):
    from pbt_worker.segment import Segment

    monkeypatch.setattr(Segment, "restore", lambda self, **kw: None)  # every segment starts from scratch
    with pytest.raises(RuntimeError, match="not restored"):
        aq.run_api(_quick(aq), "pbt", 2, 0, tmp_path, ms_per_step=0.5)


def test_the_json_is_what_paired_py_reads(aq, tmp_path, monkeypatch):
    monkeypatch.setitem(aq.PROBLEMS, "lr-schedule", _quick(aq))
    monkeypatch.setattr(aq.sq, "LIMIT_CACHE", tmp_path / "limits.json")  # not the shared cache: a tiny problem
    out = tmp_path / "api.json"
    assert aq.main(["--seeds", "1", "--pops", "2", "--problems", "lr-schedule", "--ms-per-step", "0.5",
                    "--quiet", "--out", str(out)]) == 0
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import paired
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    runs = paired.load(out, "pb2-liar-pessimistic")
    assert list(runs) == [("lr-schedule", 2, 0)] and math.isfinite(runs[("lr-schedule", 2, 0)][0])
    assert len(json.loads(out.read_text())["rows"]) == 2
