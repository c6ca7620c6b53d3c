"""Repeated CheckpointDeleteFailed Warnings: one per training per interval, the next says how many waited."""

from __future__ import annotations

from pbt_operator.kube import conditions as C
from pbt_operator.kube.reconcile import EventSpec
from pbt_operator.kube.throttle import HELD_BACK, EventThrottle


def delete_failed(member: str, segment: int) -> EventSpec:
    return EventSpec(member, "Warning", C.EV_CHECKPOINT_DELETE_FAILED,
                     f"segment {segment} could not delete 2 of the 2 old checkpoints it was handed")


def test_a_persistent_delete_failure_posts_one_warning_per_interval() -> None:
    every = HELD_BACK[C.EV_CHECKPOINT_DELETE_FAILED].every
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
    post, _ = t.admit([long], now=HELD_BACK[C.EV_CHECKPOINT_DELETE_FAILED].every)
    assert len(post[0].message) <= 1000 and "1 more CheckpointDeleteFailed" in post[0].message


def test_every_held_back_reason_names_a_counter_the_operator_exports() -> None:
    """The first Event after an interval tells the reader which metric counted the held-back ones; a
    reason added to HELD_BACK with a wrong or stale name would send them to a metric that is not there."""
    from pbt_operator.kube import metrics  # noqa: F401  (registers the operator's metrics)
    from prometheus_client import REGISTRY

    exported = {m.name for m in REGISTRY.collect()}
    for reason, rule in HELD_BACK.items():
        assert rule.counter.removesuffix("_total") in exported, (reason, rule.counter)
        assert rule.every > 0
