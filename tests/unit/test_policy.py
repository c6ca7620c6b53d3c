"""The driver policy (core/policy.py) both drivers share: rebuild from a journal, admission,
garbage batching, and telling a retry from a new decision."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from pbt_operator.core.engine import Engine
from pbt_operator.core.policy import Decision, admit, garbage_batch, pick_next, rebuild
from pbt_operator.core.types import Finish, Record, SegmentResult, Suggestion

SPACE = {"x": {"type": "float", "min": 0.0, "max": 1.0}, "y": {"type": "float", "min": 0.0, "max": 1.0}}


def spec_for(make_spec: Any, **kw: Any) -> Any:
    return make_spec({"hyperparameters": SPACE, "population": 4, "budget": {"segments": 4},
                      "exploit": {"fraction": 0.5}, **kw})


def dicts(sugs: list[Suggestion]) -> list[str]:
    return [json.dumps(s.to_dict(), sort_keys=True) for s in sugs]


def ok(s: Suggestion, score: float) -> SegmentResult:
    return SegmentResult(s.member, s.segment, score, s.steps_start + s.steps_budget)


def test_a_fresh_journal_starts_every_member(make_spec: Any) -> None:
    spec = spec_for(make_spec)
    r = rebuild(spec, [], {})
    assert [s.member for s in r.started] == [0, 1, 2, 3] and not r.decisions
    assert dicts(r.started) == dicts(Engine(spec).start())  # the same initial samples as a fresh engine


def test_only_members_without_decision_or_record_are_started(make_spec: Any) -> None:
    """A member deleted by hand, or a crash between creating members: it starts from scratch, the
    others keep their decisions."""
    spec = spec_for(make_spec)
    first = Engine(spec).start()
    r = rebuild(spec, [], {s.member: s for s in first if s.member != 2})
    assert [s.member for s in r.started] == [2]
    assert dicts(r.started) == dicts([first[2]])
    assert dicts(r.engine.start()) == dicts(first)


def test_owed_decisions_are_made_again_in_journal_order(make_spec: Any) -> None:
    """Two results persisted, both decisions lost (one batch, one crash). Member 1's result reaches
    the target: the uninterrupted engine decided member 0 first, then stopped. Telling both again in
    order does the same; absorbing both first and deciding afterwards would decide nothing."""
    spec = spec_for(make_spec, budget={"segments": 4, "targetScore": 10.0})
    straight = Engine(spec)
    first = {s.member: s for s in straight.start()}
    d0 = straight.tell(ok(first[0], 1.0))
    rec0 = straight.last
    assert straight.tell(ok(first[1], 11.0)) == []
    rec1 = straight.last
    assert rec0 is not None and rec1 is not None and len(d0) == 1 and straight.finish is not None
    r = rebuild(spec, [rec0, rec1], first)
    assert dicts([d.suggestion for d in r.decisions]) == dicts(d0)
    assert r.decisions[0].cause == first[0] and not r.decisions[0].retry
    assert r.engine.finish == straight.finish and r.engine.finish.reason == "TargetReached"
    assert dicts(sorted(r.engine.pending.values(), key=lambda s: s.member)) == \
        dicts(sorted(straight.pending.values(), key=lambda s: s.member))


def test_a_persisted_decision_is_not_made_again(make_spec: Any) -> None:
    spec = spec_for(make_spec)
    eng = Engine(spec)
    first = {s.member: s for s in eng.start()}
    (nxt,) = eng.tell(ok(first[0], 1.0))
    assert eng.last is not None
    r = rebuild(spec, [eng.last], {**first, 0: nxt})
    assert not r.decisions and not r.started
    assert r.engine.pending[0] == nxt


def test_an_owed_retry_is_a_retry(make_spec: Any) -> None:
    spec = spec_for(make_spec, failurePolicy={"maxRetries": 2})
    eng = Engine(spec)
    first = {s.member: s for s in eng.start()}
    (retry,) = eng.tell(SegmentResult(3, 0, None, 0, error="boom"))
    failed = eng.last
    assert failed is not None and failed.status == "failed"
    r = rebuild(spec, [Record.from_dict(failed.to_dict())], first)  # the retry was never persisted
    (d,) = r.decisions
    assert d.suggestion == retry and d.suggestion.attempt == 1 and d.retry


def test_admit_least_progressed_first_up_to_parallelism(make_spec: Any) -> None:
    spec = spec_for(make_spec)
    eng = Engine(spec)
    waiting = [Suggestion(m, k, {"x": 0.5, "y": 0.5}, None, steps, 1, "start")
               for m, k, steps in [(0, 2, 20), (1, 1, 10), (2, 1, 10), (3, 0, 0)]]
    start, rest = admit(eng, waiting, running=1, parallelism=3)
    assert [s.member for s in start] == [3, 1] and [s.member for s in rest] == [2, 0]
    assert admit(eng, waiting, running=3, parallelism=3) == ([], sorted(waiting, key=lambda s: s.steps_start))
    assert admit(eng, waiting, running=5, parallelism=3)[0] == []  # parallelism lowered below running
    assert pick_next(waiting).member == 3


def test_nothing_starts_once_the_training_finished(make_spec: Any) -> None:
    spec = spec_for(make_spec, budget={"segments": 4, "targetScore": 1.0})
    eng = Engine(spec)
    first = eng.start()
    eng.tell(ok(first[0], 2.0))
    assert eng.finish is not None
    assert admit(eng, first[1:], running=0, parallelism=4) == ([], [])
    assert not eng.pending and eng.done
    assert eng.outcome == eng.finish


def test_garbage_is_handed_out_once_in_bounded_batches(make_spec: Any) -> None:
    spec = spec_for(make_spec, population=4, budget={"segments": 8})
    eng = Engine(spec)
    pending = {s.member: s for s in eng.start()}
    for step in range(40):  # member m always scores m: members 0 and 1 keep copying 2 and 3
        m = step % 4
        sug = pending.pop(m, None)
        if sug is None:
            continue
        for s in eng.tell(ok(sug, float(m) + sug.segment)):
            pending[s.member] = s
    everything = eng.garbage()
    assert len(everything) >= 3, "nothing collectable: the test would prove nothing"
    handed: set[tuple[int, int]] = set()
    first = garbage_batch(eng, handed, limit=2)
    assert first == everything[:2] and handed == set(first)
    second = garbage_batch(eng, handed, limit=2)
    assert second and not set(second) & set(first)
    rest = garbage_batch(eng, handed, limit=None)
    assert set(first) | set(second) | set(rest) == set(everything)
    assert garbage_batch(eng, handed) == []


def test_decision_retry_only_for_the_same_segment_again() -> None:
    cause = Suggestion(1, 3, {"x": 0.5}, (0, 2), 30, 10, "exploit", 0.7, 0, "r")
    assert Decision(dataclasses.replace(cause, attempt=1), cause).retry
    assert not Decision(dataclasses.replace(cause, segment=4, attempt=0), cause).retry
    assert not Decision(dataclasses.replace(cause, kind="replace", attempt=1), cause).retry


def test_typed_outcomes(make_spec: Any) -> None:
    spec = spec_for(make_spec, population=2, budget={"segments": 1},
                    failurePolicy={"maxRetries": 0, "onExhausted": "fail"})
    eng = Engine(spec)
    a, b = eng.start()
    assert eng.outcome is None
    eng.tell(SegmentResult(a.member, 0, None, 0, error="boom"))
    assert eng.failure is not None and eng.failure.reason == "SegmentFailed" and "boom" in eng.failure.message
    assert eng.failed == str(eng.failure) == f"SegmentFailed: {eng.failure.message}"
    eng.tell(ok(b, 1.0))
    assert eng.outcome == eng.failure
    done = Engine(spec_for(make_spec, population=2, budget={"segments": 1}))
    for s in done.start():
        done.tell(ok(s, 1.0))
    assert done.outcome == Finish("BudgetExhausted", "every member trained 1 segment") and done.finished is None


def test_an_exploit_carries_its_two_reasons(make_spec: Any) -> None:
    spec = spec_for(make_spec, population=2, exploit={"strategy": "truncation", "fraction": 0.5})
    eng = Engine(spec)
    a, b = eng.start()
    eng.tell(ok(a, 5.0))
    (s,) = eng.tell(ok(b, 1.0))
    assert s.kind == "exploit" and s.donor == 0
    assert s.exploit_reason.startswith("truncation") and s.explore_reason == "perturb"
    assert s.reason == f"{s.exploit_reason}; explore: {s.explore_reason}"
    back = Suggestion.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back == s and back.exploit_reason == ""  # persisted: the joined reason only
