"""core.display: how text users read is written and cut."""

from __future__ import annotations

import json

from pbt_operator.core.display import counted, fmt_hp, shorten


def test_shorten_leaves_text_that_fits() -> None:
    assert shorten("abc", 3) == "abc"
    assert shorten("", 0) == ""
    assert shorten("abc", 10, keep_end=True) == "abc"


def test_shorten_keeps_the_start_and_marks_the_cut_within_the_limit() -> None:
    text = "ValueError: " + "x" * 100
    out = shorten(text, 20)
    assert out == "ValueError: xxxxx..." and len(out) == 20
    assert shorten("abcd", 3) == "abc"  # no room for a mark: a plain cut, never longer than the limit
    assert shorten("abcd", 0) == ""


def test_shorten_keep_end_keeps_a_tail_as_it_is() -> None:
    log = "Traceback\n" + "  frame\n" * 50 + "RuntimeError: CUDA out of memory"
    out = shorten(log, 40, keep_end=True)
    assert out.endswith("RuntimeError: CUDA out of memory") and len(out) == 40
    assert shorten("abcdef", 0, keep_end=True) == ""


def test_every_shortened_place_follows_the_one_rule() -> None:
    from pbt_operator.kube.reconcile import failure_text

    hp = {f"p{i}": 0.123456 for i in range(20)}
    assert fmt_hp(hp) == shorten(" ".join(f"{k}=0.1235" for k in hp), 48)
    assert len(fmt_hp(hp, 80)) == 80 and fmt_hp(hp, 80).endswith("...")
    err = "PermanentStorageError: " + "why " * 100
    assert failure_text(json.dumps({"error": err})) == shorten(err.strip(), 300)
    assert failure_text("x" * 400 + "END") == ("x" * 400 + "END")[-300:]


def test_counted_is_singular_only_for_one() -> None:
    assert counted(1, "segment") == "1 segment"
    assert counted(0, "segment") == "0 segments" and counted(3, "old checkpoint") == "3 old checkpoints"
    assert counted(2, "child", "children") == "2 children"
