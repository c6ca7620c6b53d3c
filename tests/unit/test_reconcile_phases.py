"""Each phase of a reconcile pass (kube/reconcile.py) on its own, on states built by driving the
in-memory stand-in for the API server of test_reconcile.py."""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Any

import pytest
from pbt_operator.core.policy import Decision
from pbt_operator.core.types import Suggestion
from pbt_operator.kube import conditions as C
from pbt_operator.kube.builders import member_name
from pbt_operator.kube.reconcile import (
    EventSpec,
    Pass,
    Plan,
    admit_segments,
    decision_events,
    finish_pass,
    invalid_spec,
    no_failure_message,
    not_finished_message,
    parse_training,
    rebuild_pass,
    tell_finished_jobs,
    write_member_statuses,
    write_members,
)
from pbt_operator.spec import SpecError, parse_spec
from test_reconcile import FakeCluster, drive, training_obj


def pass_of(c: FakeCluster) -> Pass:
    """A pass over the cluster's current state, rebuilt but with no other phase run yet."""
    spec, root = parse_training(c.training)
    return rebuild_pass(c.training, spec, root, list(c.members.values()), list(c.jobs.values()), c.pods, c.now(),
                        Plan(collected=set(c.collected), spec=spec))


def running_cluster(**spec: Any) -> FakeCluster:
    c = FakeCluster(training_obj(**spec))
    c.reconcile()  # creates the members
    c.reconcile()  # creates the first Jobs
    return c


def test_parse_training_needs_storage_and_a_template() -> None:
    spec, root = parse_training(training_obj())
    assert spec.population == 6 and root == "s3://bucket/runs"
    with pytest.raises(SpecError, match=r"spec\.template: is required in Kubernetes"):
        parse_training(training_obj(template=None, worker={"command": ["python", "w.py"]}))
    t = training_obj()
    del t["spec"]["storage"]
    with pytest.raises(SpecError, match=r"spec\.storage\.uri: is required in Kubernetes"):
        parse_training(t)


def test_invalid_spec_fails_the_training_and_says_so_once() -> None:
    t = training_obj()
    out = invalid_spec(t, SpecError(["spec.x: bad", "spec.y: worse"]), "2026-01-01T00:00:00Z", Plan())
    # not done: the daemon stays to read the next edit of the spec
    assert not out.done and out.status["phase"] == "Failed" and not out.create_members and not out.create_jobs
    conds = {c["type"]: c for c in out.status["conditions"]}
    assert {c["reason"] for c in conds.values()} == {C.INVALID_SPEC}
    assert conds[C.FAILED]["status"] == "True" and conds[C.FAILED]["message"] == "spec.x: bad; spec.y: worse"
    assert [e.reason for e in out.events] == [C.EV_INVALID]
    t["status"] = out.status  # already failed for this reason: no second Event
    assert invalid_spec(t, SpecError(["spec.x: bad"]), "2026-01-01T00:00:01Z", Plan()).events == []


def test_rebuild_pass_creates_missing_members_only() -> None:
    c = FakeCluster(training_obj())
    p = pass_of(c)
    assert [s.member for s in p.new_members] == list(range(6)) and not p.decided
    c.reconcile()
    assert pass_of(c).new_members == []
    del c.members[member_name("toy", 4)]
    p = pass_of(c)
    assert [(s.member, s.segment, s.kind) for s in p.new_members] == [(4, 0, "start")]


def test_rebuild_pass_makes_an_owed_decision_again() -> None:
    """Crash after the member status (the result) was written but before the member spec (the
    decision): the next pass decides the same thing again."""
    c = running_cluster()
    job = c.running()[0]
    m = int(job["metadata"]["labels"]["pbt.dev/member"])
    c.finish(job)
    full = pass_of(c)
    tell_finished_jobs(full)
    (want,) = full.decided.values()
    crashed = c.reconcile(limit=1)  # writes the first member status only: the finished member's
    assert next(iter(crashed.member_statuses)) == member_name("toy", m) and member_name("toy", m) in crashed.member_specs
    mobj = c.members[member_name("toy", m)]
    assert mobj["status"]["history"] and mobj["spec"]["segment"]["segment"] == 0  # result kept, decision lost
    p = pass_of(c)
    (d,) = p.decided.values()
    assert d.suggestion.to_dict() == want.suggestion.to_dict() and d.cause == want.cause


def test_tell_finished_jobs_records_results_and_decides() -> None:
    c = running_cluster(failurePolicy={"maxRetries": 1})
    ok_job, bad_job = c.running()[:2]
    c.finish(ok_job)
    c.finish(bad_job, fail=True)
    p = pass_of(c)
    tell_finished_jobs(p)
    names = {ok_job["metadata"]["name"], bad_job["metadata"]["name"]}
    assert p.told == names and p.out.finished == 1
    entries = [h for hs in p.new_history.values() for h in hs]
    assert sorted(h["status"] for h in entries) == ["done", "failed"]
    bad_member = int(bad_job["metadata"]["labels"]["pbt.dev/member"])
    assert p.decided[bad_member].retry and p.decided[bad_member].suggestion.attempt == 1
    ok_member = int(ok_job["metadata"]["labels"]["pbt.dev/member"])
    assert p.decided[ok_member].suggestion.segment == 1 and not p.decided[ok_member].retry
    assert [e.reason for e in p.out.events] == [C.EV_SEGMENT_FAILED]
    assert "attempt 0 failed: exit code 1" in p.out.events[0].message


def test_decision_events() -> None:
    c = running_cluster()
    p = pass_of(c)
    base = Suggestion(1, 2, {"h0": 0.6, "h1": 0.5}, (0, 1), 10, 5, "exploit", 0.3, 0,
                      "why; explore: how", exploit_reason="why", explore_reason="how")
    retry_of = Suggestion(2, 1, {"h0": 0.1, "h1": 0.1}, (2, 0), 5, 5, "continue", 0.1, None, "continue")
    replaced = Suggestion(3, 1, {"h0": 0.1, "h1": 0.1}, (0, 0), 5, 5, "replace", 0.4, 0, "replaced: boom")
    cont = Suggestion(4, 1, {"h0": 0.2, "h1": 0.1}, (4, 0), 5, 5, "continue", 0.2, None, "continue")
    before = Suggestion(1, 1, {"h0": 0.1, "h1": 0.1}, (1, 0), 5, 5, "continue", 0.1, None, "continue")
    failing = Suggestion(3, 1, {"h0": 0.3, "h1": 0.3}, (3, 0), 5, 5, "continue", 0.1, None, "continue", attempt=1)
    retuned = Suggestion(5, 1, {"h0": 0.25, "h1": 0.1}, (5, 0), 5, 5, "continue", 0.2, None, "continue; retune: pb2")
    p.decide([Decision(base, before), Decision(dataclasses.replace(retry_of, attempt=1), retry_of),
              Decision(replaced, failing), Decision(cont, dataclasses.replace(cont, segment=0)),
              Decision(retuned, dataclasses.replace(retuned, segment=0, hyperparameters={"h0": 0.2, "h1": 0.1}))])
    events = decision_events(p)
    by = [(e.target, e.reason) for e in events]
    assert by == [("toy-m001", C.EV_EXPLOITED), ("toy-m001", C.EV_EXPLORED), ("toy-m002", C.EV_SEGMENT_RETRIED),
                  ("toy-m003", C.EV_MEMBER_REPLACED), ("toy-m005", C.EV_EXPLORED)]
    assert "h0" in events[4].message and events[4].message.endswith("(continue; retune: pb2)")
    assert events[0].message == "member 1 copies member 0 checkpoint s1 (score 0.3): why"
    assert events[1].message.endswith(" (how)") and "->" in events[1].message
    # which attempt runs and under what policy, not "segment 1 retried" under the reason SegmentRetried
    assert events[2].message == ("segment 1 runs again as attempt 1, from the same checkpoint with the same "
                                 "hyperparameters (spec.failurePolicy.maxRetries: 2)")


def test_write_members_creates_and_patches_only_what_changed() -> None:
    c = FakeCluster(training_obj())
    p = pass_of(c)
    write_members(p)
    assert len(p.out.create_members) == 6 and not p.out.member_specs
    assert [e.reason for e in p.out.events] == [C.EV_MEMBER_CREATED] * 6
    c.reconcile()
    p = pass_of(c)
    write_members(p)
    assert not p.out.create_members and not p.out.member_specs  # nothing decided: nothing written
    c.reconcile()
    job = c.running()[0]
    c.finish(job)
    p = pass_of(c)
    tell_finished_jobs(p)
    write_members(p)
    m = int(job["metadata"]["labels"]["pbt.dev/member"])
    assert list(p.out.member_specs) == [member_name("toy", m)]
    assert p.out.member_specs[member_name("toy", m)]["segment"] == 1


def test_admit_segments_up_to_parallelism_with_garbage_on_the_first_job() -> None:
    c = FakeCluster(training_obj())
    c.reconcile()
    p = pass_of(c)
    admit_segments(p)
    assert [j["metadata"]["name"] for j in p.out.create_jobs] == [f"toy-m00{m}-s00000-a0" for m in range(3)]
    assert p.running == 3 and [s.member for s in p.waiting] == [3, 4, 5]
    # later: checkpoints nothing needs any more ride along with the first Job of a pass, once each
    c = FakeCluster(training_obj(exploit={"fraction": 0.5}))
    rng = random.Random(0)
    for _ in range(400):
        if c.reconcile().create_jobs and c.collected:
            break
        running = c.running()
        if running:
            c.finish(rng.choice(running))
    assert c.collected, "nothing was ever collected: the test would prove nothing"
    gcs = [json.loads(next(e["value"] for e in j["spec"]["template"]["spec"]["containers"][0]["env"]
                           if e["name"] == "PBT_SEGMENT"))["gc"] for j in c.jobs.values()]
    listed = [u for gc in gcs for u in gc]
    assert len(listed) == len(set(listed)) == len(c.collected)
    assert all(len(gc) <= 64 for gc in gcs)


def test_admit_segments_starts_nothing_after_the_target_and_stops_what_runs() -> None:
    c = running_cluster(budget={"segments": 4, "targetScore": 0.0001})
    c.finish(c.running()[0])
    still = sorted(j["metadata"]["name"] for j in c.running())
    p = pass_of(c)
    tell_finished_jobs(p)
    assert p.engine.finish is not None
    admit_segments(p)
    assert not p.out.create_jobs and p.waiting == [] and p.running == 0
    assert sorted(n for n, _ in p.out.delete_jobs) == still and len(still) == 2
    assert not p.engine.pending  # cancelled: the training is done


def test_write_member_statuses_phases_and_no_needless_writes() -> None:
    c = FakeCluster(training_obj())
    c.reconcile()
    p = pass_of(c)
    admit_segments(p)
    write_member_statuses(p)
    phases = {n: st["phase"] for n, st in p.out.member_statuses.items()}
    assert phases == {**{member_name("toy", m): "Running" for m in range(3)},
                      **{member_name("toy", m): "Queued" for m in range(3, 6)}}
    c.reconcile()
    p = pass_of(c)
    admit_segments(p)
    write_member_statuses(p)
    assert p.out.member_statuses == {}  # nothing changed since the last pass wrote them


def test_finish_pass_announces_the_end_once() -> None:
    c = FakeCluster(training_obj(population=2, parallelism=2, budget={"segments": 1}))
    drive(c, random.Random(0))
    assert c.training["status"]["phase"] == "Succeeded"
    done = [e for e in c.events if e.reason == C.EV_COMPLETED]
    # how the budget ended it (the finish's own message), not "budget exhausted"
    assert len(done) == 1 and done[0].message.startswith("BudgetExhausted: every member trained 1 segment; best member")
    conds = {x["type"]: x for x in c.training["status"]["conditions"]}
    assert conds[C.SUCCEEDED]["reason"] == "BudgetExhausted"
    assert conds[C.SUCCEEDED]["message"] == "every member trained 1 segment"
    p = pass_of(c)
    finish_pass(p)
    assert p.out.done and p.out.events == [] and not p.out.status_changed


def _words(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalpha())


def test_condition_messages_say_more_than_their_reason() -> None:
    """Succeeded=False read "NotFinished: training in progress" and Failed=False "NoFailure: no
    failure" on every running training; the Resumed Event said "training resumed"."""
    c = running_cluster()
    conds = {x["type"]: x for x in c.training["status"]["conditions"]}
    assert conds[C.SUCCEEDED]["reason"] == C.NOT_FINISHED
    assert conds[C.SUCCEEDED]["message"] == ("0/24 segments done; it ends when every member has trained 4 segments "
                                             "(spec.budget.segments)")
    assert conds[C.FAILED]["reason"] == C.NO_FAILURE
    assert conds[C.FAILED]["message"] == ("no segment attempt failed; a failed segment is retried 2 times "
                                          "(spec.failurePolicy.maxRetries), then its member is replaced, "
                                          "and the training fails if the replacement fails as often "
                                          "(onExhausted: replace)")
    for x in conds.values():
        assert _words(x["message"]) not in (_words(x["reason"]), ""), x
    # paused and resumed: the Resumed Event says what starts now
    c.training["spec"]["suspend"] = True
    c.reconcile()
    c.training["spec"]["suspend"] = False
    c.reconcile()
    resumed = [e for e in c.events if e.reason == C.EV_RESUMED]
    assert [e.message for e in resumed] == ["training resumed: up to 3 segments run at once again (spec.parallelism); "
                                            "0/24 segments done"]
    # finished: how many attempts failed (the policy no longer matters)
    c = FakeCluster(training_obj(population=2, parallelism=2, budget={"segments": 1}))
    drive(c, random.Random(0))
    failed = next(x for x in c.training["status"]["conditions"] if x["type"] == C.FAILED)
    assert failed["reason"] == C.NO_FAILURE and failed["message"] == "no segment attempt failed"


def test_not_finished_and_no_failure_messages_name_what_ends_it_and_what_failed() -> None:
    spec = parse_spec({**training_obj(budget={"segments": 1, "targetScore": 0.95, "patience": 3},
                                      failurePolicy={"maxRetries": 1, "onExhausted": "fail"})["spec"]}, name="toy")
    assert not_finished_message(spec, 5, 6) == (
        "5/6 segments done; it ends when every member has trained 1 segment (spec.budget.segments), or a member "
        "reaches 0.95 (spec.budget.targetScore), or the best score has not improved for 3 generations "
        "(spec.budget.patience)")
    assert no_failure_message(spec, 1) == ("1 segment attempt failed, none fatal; a failed segment is retried 1 time "
                                           "(spec.failurePolicy.maxRetries), then the training fails (onExhausted: fail)")
    assert no_failure_message(spec, 3, finished=True) == "3 segment attempts failed, none fatal"
    # "retried 0 times", and a replacement that fails too fails the training (it said only "replaced")
    spec = parse_spec({**training_obj(failurePolicy={"maxRetries": 0, "onExhausted": "replace"})["spec"]}, name="toy")
    assert no_failure_message(spec, 0) == (
        "no segment attempt failed; a failed segment is not retried (spec.failurePolicy.maxRetries: 0), then its "
        "member is replaced, and the training fails if the replacement fails as often (onExhausted: replace)")


def test_counts_agree_with_their_nouns_and_say_the_total() -> None:
    """'1 segments running' (Ready, Progressing), SegmentsStarted without how many may run, and the
    Completed Event's raw score float (0.30000000000000004) instead of the status columns' format."""
    c = running_cluster(parallelism=1)
    conds = {x["type"]: x for x in c.training["status"]["conditions"]}
    assert conds[C.READY]["message"].startswith("1 segment running, 0 waiting to start"), conds[C.READY]
    assert conds[C.SEGMENTS_STARTED]["message"] == "1 of 1 segment running (spec.parallelism), none waiting to start"
    c = running_cluster()
    conds = {x["type"]: x for x in c.training["status"]["conditions"]}
    assert conds[C.SEGMENTS_STARTED]["message"] == "3 of 3 segments running (spec.parallelism), none waiting to start"
    c.training["spec"]["parallelism"] = 1
    c.training["spec"]["suspend"] = True
    c.reconcile()
    c.training["spec"]["suspend"] = False
    c.reconcile()
    resumed = [e for e in c.events if e.reason == C.EV_RESUMED]
    assert resumed[-1].message.startswith("training resumed: up to 1 segment runs at once again (spec.parallelism)")
    c = FakeCluster(training_obj(population=2, parallelism=2, budget={"segments": 1}))
    drive(c, random.Random(0))
    done = next(e for e in c.events if e.reason == C.EV_COMPLETED)
    score = done.message.rsplit(" score ", 1)[1]
    best = c.training["status"]["best"]["score"]
    assert score == f"{best:.4g}", (done.message, best)


def test_cut_messages_end_with_a_visible_mark() -> None:
    """Condition messages (1024) and Event messages (1000) were cut by slicing: a cut one just stopped
    mid-word, and read as complete."""
    long = "x" * 3000
    conds = C.set_condition(None, C.READY, False, "Because", long, "now")
    assert len(conds[0]["message"]) == 1024 and conds[0]["message"].endswith("...")
    assert C.set_condition(None, C.READY, False, "Because", "short", "now")[0]["message"] == "short"
    ev = EventSpec("training", "Warning", C.EV_INVALID, long)
    assert len(ev.message) == 1000 and ev.message.endswith("...")
    from pbt_operator.kube import lifecycle

    status, events = lifecycle.invalid_spec(training_obj(), long, "2026-01-01T00:00:00Z")
    assert events[0].message.endswith("...") and len(events[0].message) == 1000
    assert all(x["message"].endswith("...") for x in status["conditions"])
    assert lifecycle.jobs_accepted({"status": {}}, {"conditions": status["conditions"]}, False, "Refused", long,
                                   "now") is not None
    again = {"conditions": C.set_condition(status["conditions"], C.JOBS_ACCEPTED, False, "Refused", long, "now")}
    assert lifecycle.jobs_accepted({"status": {}}, again, False, "Refused", long, "now") is None  # same cut text
