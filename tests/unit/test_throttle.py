"""Repeated CheckpointDeleteFailed Warnings: one per training per interval, the next says how many waited."""

from __future__ import annotations

from pbt_operator.kube import conditions as C
from pbt_operator.kube.reconcile import EventSpec
from pbt_operator.kube.throttle import HELD_BACK, EventThrottle


def delete_failed(member: str, segment: int) -> EventSpec:
    return EventSpec(member, "Warning", C.EV_CHECKPOINT_DELETE_FAILED,
                     f"segment {segment} could not delete 2 of the 2 old checkpoints it was handed")


def test_a_persistent_delete_failure_posts_one_warning_per_interval() -> None:
    every = HELD_BACK[C.EV_CHECKPOINT_DELETE_FAILED]
    t = EventThrottle()
    other = EventSpec("m-0", "Normal", "Exploited", "copied m-1")
    post, held = t.admit([delete_failed("m-0", 3), other, delete_failed("m-1", 3)], now=100.0)
    assert post == [delete_failed("m-0", 3), other] and held == [delete_failed("m-1", 3)]
    # within the interval: only counted; other reasons are never held
    post, held = t.admit([delete_failed("m-0", 4), other], now=100.0 + every - 1)
    assert post == [other] and len(held) == 1
    # after it: posted, saying how many were held back since the last one
    post, held = t.admit([delete_failed("m-1", 5)], now=100.0 + every)
    assert held == [] and len(post) == 1
    assert post[0].target == "m-1" and post[0].message.startswith("segment 5 could not delete")
    assert "2 more CheckpointDeleteFailed" in post[0].message and "10 min" in post[0].message
    # and the count starts again
    post, _ = t.admit([delete_failed("m-0", 9)], now=100.0 + 2 * every)
    assert "more" not in post[0].message


def test_a_long_message_keeps_the_count() -> None:
    t = EventThrottle()
    long = EventSpec("m-0", "Warning", C.EV_CHECKPOINT_DELETE_FAILED, "x" * 1000)
    t.admit([long, long], now=0.0)
    post, _ = t.admit([long], now=HELD_BACK[C.EV_CHECKPOINT_DELETE_FAILED])
    assert len(post[0].message) <= 1000 and "1 more CheckpointDeleteFailed" in post[0].message
