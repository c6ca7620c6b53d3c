"""Smoke test of benchmarks/search_quality.py: the quadratic problem, 2 seeds, a tiny budget."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sq():
    path = ROOT / "benchmarks" / "search_quality.py"
    spec = importlib.util.spec_from_file_location("search_quality_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_quadratic_table_has_a_row_per_method(sq, tmp_path):
    segments, population = 3, 4
    rows, runs = sq.benchmark(["quadratic"], [population], range(2), segments=segments, workdir=tmp_path)

    assert [(r.problem, r.population, r.method) for r in rows] == [
        ("quadratic", population, m) for m in ("pb2", "pbt", "random", "random-full")
    ]
    assert all(r.seeds == 2 for r in rows)
    # equal budget: every run finished exactly population x segments segments
    assert len(runs) == 8 and {r.segments for r in runs} == {population * segments}
    for r in runs:
        assert len(r.curve) == population * segments
        assert all(b >= a for a, b in zip(r.curve, r.curve[1:], strict=False)), "best-so-far must not decrease"
        assert r.final_best == r.curve[-1] and r.auc <= r.final_best
        assert r.auc == pytest.approx(sum(r.curve) / len(r.curve))
    for row in rows:
        assert row.final_q25 <= row.final_median <= row.final_q75
        assert row.auc_q25 <= row.auc_median <= row.auc_q75
    by = {r.method: r for r in rows}
    assert by["pbt"].vs_pbt == "-" and by["random"].vs_pbt.count("/") == 2
    # random starts from the initial ranges like PBT (same seeds, same first segments); random-full does not
    rand = {(r.method, r.seed): r.curve for r in runs}
    assert rand[("random", 0)][:population] == rand[("pbt", 0)][:population]
    assert rand[("random-full", 0)][:population] != rand[("random", 0)][:population]
    # Members start with h in [0, 0.2]: copying the best theta must beat training alone (deterministic runs).
    assert by["pbt"].final_median > by["random"].final_median

    table = sq.format_table(rows)
    for method in ("pb2", "pbt", "random", "random-full"):
        assert sum(1 for line in table.splitlines() if line.split()[2:3] == [method]) == 1
    assert [text.split(":")[0] for text, _ in sq.verdicts(rows)] == ["quadratic pop 4"] * 2


def test_runs_are_reproducible(sq, tmp_path):
    problem = sq.PROBLEMS["quadratic"]
    a = sq.run_one(problem, "pb2", 4, 3, tmp_path / "a", segments=4)
    b = sq.run_one(problem, "pb2", 4, 3, tmp_path / "b", segments=4)
    assert a.curve == b.curve
