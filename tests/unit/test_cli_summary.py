"""The end-of-run line of `pbt run`: the rate counts only what this invocation ran."""

from pbt_operator.cli import _segments_line


def test_a_fresh_run_rates_all_its_segments() -> None:
    assert _segments_line(64, 64, 5.0) == "64 segments in 5.0s (12.8 segments/s)"


def test_a_resume_rates_only_the_segments_it_ran() -> None:
    assert _segments_line(64, 16, 2.0) == "64 segments, 16 of them in this run, in 2.0s (8.0 segments/s)"


def test_a_finished_run_resumed_gives_no_rate() -> None:
    # it said '64 segments in 0.0s (57371 segments/s)'
    assert _segments_line(64, 0, 0.001) == "64 segments; nothing was left to run"


def test_one_segment_is_singular() -> None:
    assert _segments_line(1, 1, 1.0) == "1 segment in 1.0s (1.0 segments/s)"
    assert _segments_line(1, 0, 0.0) == "1 segment; nothing was left to run"


def test_failed_attempts_are_not_counted_as_segments() -> None:
    # a run with 9 failed attempts said '32 segments, 41 of them in this run'
    assert _segments_line(32, 41, 2.0, 32, 9) == \
        "32 segments in 2.0s (16.0 segments/s); 9 attempts failed (results.jsonl has each error)"
    assert _segments_line(64, 17, 2.0, 16, 1) == \
        "64 segments, 16 of them in this run, in 2.0s (8.0 segments/s); 1 attempt failed (results.jsonl has each error)"
