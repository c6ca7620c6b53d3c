"""Every benchmark that needs no cluster and no S3 server runs end to end with the tiniest arguments.

Nothing imports the benchmark scripts, so an API rename in the packages broke them silently: a
user running a documented command was the first to see the AttributeError. Each test runs the
script as its README command does (a fresh interpreter, `python benchmarks/<name>.py ...`: its own
sys.path set-up, its own monkeypatching, none of it leaking into this process) and checks the
printed table: its header and one row per requested case, with numbers that mean a measurement
happened. The figures themselves are not asserted (tests never assert times).

Left out, because they need what a unit test does not have: operator_turnaround.py,
operator_scale.py and autoscale.py (the local test control plane), checkpoint_io.py (an S3 server).
paired.py reads search_quality.py's output, so its test runs both.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(name: str, *args: str, timeout: float = 120.0) -> str:
    """stdout of `python benchmarks/<name>.py args`; a non-zero exit fails with its stderr."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name}.py {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return proc.stdout


def tables(out: str) -> list[tuple[list[str], list[list[str]]]]:
    """The markdown tables printed, as (header cells, body rows of cells); separator lines dropped."""
    found: list[tuple[list[str], list[list[str]]]] = []
    block: list[list[str]] = []
    for line in [*out.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if block:
            assert len(block) >= 2 and set("".join(block[1])) <= set("-:"), f"not a table: {block[:2]}"
            found.append((block[0], block[2:]))
            block = []
    return found


def number(cell: str) -> float:
    value = float(cell.split()[0].removesuffix("ms"))
    assert math.isfinite(value), cell
    return value


def test_decision_latency_times_every_size_and_space() -> None:
    out = run("decision_latency", "--repeats", "1", "--sizes", "30,200", "--dims", "3,10")
    assert out.startswith("PB2 decision latency: parallel=liar-pessimistic ")
    [(head, rows)] = tables(out)
    assert head == ["rows", "dims", "wall median ms", "wall p90 ms", "cpu median ms", "cpu p90 ms", "fallbacks"]
    assert [(r[0], r[1]) for r in rows] == [("30", "3"), ("200", "3"), ("30", "10"), ("200", "10")]
    for r in rows:
        assert number(r[4]) > 0 and r[6] == "0"  # PB2 decided (a fallback would time the perturb path)


def test_decision_latency_refuses_a_field_that_is_not_an_integer_setting() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decision_latency.py"), "--set", "kappa=2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--set 'kappa=2'" in proc.stderr and "fit_rows" in proc.stderr


def test_pb2_convergence_measures_the_fit_and_the_acquisition() -> None:
    out = run("pb2_convergence", "--seeds", "1", "--dims", "3")
    assert out.startswith("defaults: fit_restarts=1 fit iterations=30 restarts=2 acquisition iterations=25")
    (fit_head, fit_rows), (acq_head, acq_rows) = tables(out)
    assert fit_head == ["fit_restarts", "iterations", "gap median", "gap p90", "fit cpu ms"]
    assert [(r[0], r[1]) for r in fit_rows] == [("1", "20"), ("1", "30"), ("2", "30"), ("4", "30"), ("1", "60")]
    assert acq_head == ["restarts", "iterations", "candidates", "gap median", "gap p10", "acq cpu ms"]
    assert [tuple(r[:3]) for r in acq_rows] == [("1", "25", "128"), ("2", "15", "128"), ("2", "25", "128"),
                                                ("4", "25", "128"), ("2", "25", "64")]
    for r in fit_rows:
        assert number(r[2]) > -0.5 and number(r[4]) > 0  # the reference fit is (nearly) the best
    for r in acq_rows:
        assert number(r[3]) < 0.5 and number(r[5]) > 0  # nor does any setting beat the reference much


def test_overhead_runs_every_executor_configuration() -> None:
    out = run("overhead", "--repeats", "1", "--population", "2", "--segments", "2", "--cold-segments", "1")
    [(head, rows)] = tables(out)
    assert head == ["configuration", "strategy", "segments", "total ms/seg", "decision", "ckpt", "rest",
                    "cpu ms/seg"]
    configs = ["inline-threads-mem", "inline-threads-file", "inline-processes-file", "process-warm-file",
               "process-cold-file"]
    assert [(r[0], r[1]) for r in rows] == [(c, s) for c in configs for s in ("pbt", "pb2")]
    for r in rows:
        assert r[2] == ("2" if r[0] == "process-cold-file" else "4")  # population x segments per member
        assert number(r[3]) > 0 and number(r[4]) > 0  # Engine.tell was timed


def test_plan_cpu_times_the_reconcile_passes() -> None:
    out = run("plan_cpu", "--population", "2", "--parallelism", "1", "--segments", "1", "--repeats", "1")
    [(head, rows)] = tables(out)
    assert head == ["metric", "value"]
    got = {r[0]: r[1] for r in rows}
    assert list(got) == ["passes per run", "CPU per pass, median", "CPU per pass, p95", "CPU for the whole run"]
    assert number(got["passes per run"]) >= 2 and number(got["CPU per pass, median"]) > 0


def test_sync_cost_times_each_durability_method(tmp_path: Path) -> None:
    # Two batches: the p90 is then the slower one (a p90 read at index int(0.9 (n-1)) was the faster)
    out = run("sync_cost", "--dir", str(tmp_path), "--batches", "2", "--threads", "2")
    [(head, rows)] = tables(out)
    assert head == ["method", "median ms", "p90 ms"]
    assert [r[0] for r in rows] == ["syncfs", "fsync-serial", "fsync-threads"]
    for r in rows:
        assert 0 < number(r[1]) <= number(r[2])


def test_search_quality_has_a_row_per_problem_and_method(tmp_path: Path) -> None:
    methods = ["pb2-liar-pessimistic", "pbt", "random-full"]  # in the order of search_quality.METHODS
    out = run("search_quality", "--seeds", "1", "--problems", "lr-schedule,cat-flip", "--pops", "4", "--jobs", "2",
              "--methods", ",".join(methods), "--quiet", "--out", str(tmp_path / "runs.json"))
    [(head, rows)] = tables(out)[:1]
    assert head[:6] == ["problem", "pop", "mode", "int", "method", "seeds"]
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        (p, "4", "async", "5", m) for p in ("lr-schedule", "cat-flip") for m in methods]
    for r in rows:
        assert 0.0 <= number(r[7]) <= 1.2  # final / limit
    assert "targets (population 4):" in out
    assert len(json.loads((tmp_path / "runs.json").read_text())["runs"]) == 2 * len(methods)


def test_paired_compares_two_settings_seed_by_seed(tmp_path: Path) -> None:
    common = ["--seeds", "2", "--problems", "lr-schedule-10d", "--pops", "4", "--jobs", "1",
              "--methods", "pb2-liar-pessimistic", "--quiet"]
    run("search_quality", *common, "--out", str(tmp_path / "a.json"))
    run("search_quality", *common, "--pb2-settings", '{"fit_restarts": 2}', "--out", str(tmp_path / "b.json"))
    [(head, rows)] = tables(run("paired", str(tmp_path / "a.json"), str(tmp_path / "b.json")))
    assert head[:3] == ["problem", "pop", "seeds"] and "B w/t/l" in head
    assert [(r[0], r[1], r[2]) for r in rows] == [("lr-schedule-10d", "4", "2")]
    wins, ties, losses = (int(x) for x in rows[0][head.index("B w/t/l")].split("/"))
    assert wins + ties + losses == 2
    # a file against itself: every seed ties
    [(head, rows)] = tables(run("paired", str(tmp_path / "a.json"), str(tmp_path / "a.json")))
    assert rows[0][head.index("B w/t/l")] == "0/2/0"


def test_fixed_configs_finds_the_best_fixed_configuration() -> None:
    out = run("fixed_configs", "--seeds", "1", "--problems", "quadratic,cat-flip", "--pops", "4", "--points", "3",
              "--jobs", "1")
    [(head, rows)] = tables(out)
    assert head[:3] == ["problem", "pop", "configs"]
    assert [(r[0], r[1], r[2]) for r in rows] == [("quadratic", "4", "9"), ("cat-flip", "4", "9")]
    assert number(rows[0][4]) == pytest.approx(1.0, abs=1e-3)  # the stationary quadratic: a grid point is optimal
    assert number(rows[1][4]) < 0.9  # cat-flip's optimum moves: no fixed configuration reaches the limit
    schedules = run("fixed_configs", "--schedules", "--problems", "rl-reach", "--seeds", "1", "--points", "2",
                    "--jobs", "1")
    assert "best fixed:" in schedules


def test_divergence_counts_failed_attempts_and_scores_at_equal_training() -> None:
    out = run("divergence", "--seeds", "2", "--decades", "1.0")
    [(head, rows)] = tables(out)
    assert head[:3] == ["method", "trainings failed", "failed attempts per run"]
    assert [r[0] for r in rows] == ["pb2-liar-pessimistic", "pbt"]
    for r in rows:
        assert r[1].endswith("of 2") and number(r[2]) > 0  # a decade too large diverges in every run here
        assert 0 < number(r[3]) < 1.5 and 0 < number(r[4]) < 1.5  # fractions of the limit: within 100, final
        assert number(r[5]) >= 100  # the longest lineage


def test_cat_flip_trace_splits_the_best_lineage_shortfall() -> None:
    out = run("cat_flip_trace", "--seeds", "1")
    [(head, rows)] = tables(out)
    assert head == ["half", "chosen by", "optimizer", "lineage segments", "points lost per seed"]
    assert {r[0] for r in rows} == {"first", "second"} and all(int(r[3]) > 0 for r in rows)
    assert sum(int(r[3]) for r in rows if r[0] == "first") >= 10  # the lineage's segments before the flip
    assert "population's first sgd within 0.5 decades of its optimum: iteration median" in out


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="examples/digits trains with torch")
def test_replay_digits_replays_the_best_schedule(tmp_path: Path) -> None:
    out = run("replay_digits", "--seeds", "0", "--population", "2", "--segments", "2", "--parallelism", "2",
              "--repeats", "1", "--out", str(tmp_path))
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["0"]]
    assert len(rows) == 1, out  # seed 0: population best, median, lineage, replays, differences
    assert 0.0 < number(rows[0][1]) <= 1.0 and "over 1 replays:" in out
    # the digits worker seeds its first weights and its batches: the replay lands on the population's best
    assert number(rows[0][4]) == number(rows[0][1]) and number(rows[0][6]) == 0.0, out


def test_pb2_trace_reports_every_numeric_hyperparameter() -> None:
    out = run("pb2_trace", "lr-schedule-3d", "--seeds", "1")
    assert out.startswith("lr-schedule-3d pop 4: 1 seeds, median final ")
    [(header, rows)] = tables(out)
    assert header[0] == "hp" and [r[0] for r in rows] == ["lr", "x1", "x2"]
    for r in rows:
        number(r[1])
