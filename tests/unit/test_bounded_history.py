"""A bounded journal (the operator's member statuses keep each member's newest segments only) makes
exactly the decisions of an engine that never restarts, and PBT makes the same decisions with a bounded
window as with an unbounded one.

The harness simulates a training: members finish in an order drawn from the seed, a score that depends
on the hyperparameters and on the checkpoint a segment restores, and now and then a failed attempt. The
journal is what the operator writes: per member the entries the engine still holds (its window, and the
failed attempts of unfinished segments), each with the engine's totals after it, plus the best record
that left each member's window.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from pbt_operator.core.engine import Engine
from pbt_operator.core.policy import Journaled, garbage_batch, rebuild, still_listable
from pbt_operator.core.types import Record, SegmentResult

SPACE = {"x": {"type": "float", "min": 0.0, "max": 1.0}, "lr": {"type": "float", "min": 1e-4, "max": 1e-1, "log": True}}


def make(make_spec: Any, explore: dict[str, Any], segments: int, **kw: Any) -> Any:
    return make_spec({"hyperparameters": SPACE, "population": 6, "budget": {"segments": segments, **kw.pop("budget", {})},
                      "exploit": {"fraction": 0.34, **kw.pop("exploit", {})}, "explore": explore,
                      "failurePolicy": {"maxRetries": 2}, "segment": {"steps": 10}, "seed": 7, **kw})


class Journal:
    """What the operator's member statuses hold for an engine."""

    def __init__(self) -> None:
        self.entries: dict[int, list[Journaled]] = {}

    def write(self, rec: Record, engine: Engine) -> None:
        mine = [j for j in self.entries.get(rec.member, []) if not _same(j.record, rec)]
        self.entries[rec.member] = [*mine, Journaled(rec, engine.counters())]
        self.trim(engine)

    def trim(self, engine: Engine) -> None:
        failed = {(f.member, f.segment, f.suggestion.attempt) for f in engine.failures}
        for m, js in self.entries.items():
            self.entries[m] = [j for j in js if (j.record.status == "done" and j.record.ref in engine.records)
                               or (j.record.status != "done" and (m, j.record.segment, j.record.suggestion.attempt)
                                   in failed)]

    def ordered(self) -> list[Journaled]:
        return sorted((j for js in self.entries.values() for j in js),
                      key=lambda j: j.counters.seq if j.counters is not None else -1)


def _same(a: Record, b: Record) -> bool:
    return a.ref == b.ref and a.suggestion.attempt == b.suggestion.attempt and a.status == b.status


def state(e: Engine) -> dict[str, Any]:
    """Everything a decision reads, as comparable data."""
    return {
        "pending": sorted(json.dumps(s.to_dict(), sort_keys=True) for s in e.pending.values()),
        "counters": e.counters().to_dict(),
        "best": e.best.ref if e.best else None,
        "records": sorted(e.records),
        "latest": {m: r.ref for m, r in e.latest.items()},
        "rows": list(e._rows),
        "failures": sorted((f.member, f.segment, f.suggestion.attempt) for f in e.failures),
        "finish": str(e.finish), "failure": str(e.failure),
    }


def simulate(spec: Any, window: int | None, restart: bool, seed: int = 1) -> list[str]:
    """Run the training to its end; with `restart`, the engine is rebuilt from the journal after every
    result, and every fifth time the result's decision is lost first (a crash between writing the
    result and the decision). Returns every decision made, in order."""
    rng = random.Random(seed)
    engine = Engine(spec, window=window)
    journal = Journal()
    scores: dict[tuple[int, int], float] = {}
    decisions: list[str] = []
    for s in engine.start():
        decisions.append(json.dumps(s.to_dict(), sort_keys=True))
    step = 0
    while engine.pending and step < 2000:
        step += 1
        member = rng.choice(sorted(engine.pending))
        sug = engine.pending[member]
        base = scores.get(sug.restore, 0.0) if sug.restore else 0.0
        x, lr = float(sug.hyperparameters["x"]), float(sug.hyperparameters["lr"])
        target = 0.2 + 0.6 * (sug.steps_start % 50) / 50  # the best x moves during training
        fail = rng.random() < 0.06
        score = base + 1.0 - (x - target) ** 2 - abs(lr - 0.01) + rng.gauss(0, 0.05)
        result = (SegmentResult(member, sug.segment, None, sug.steps_start, error="boom") if fail else
                  SegmentResult(member, sug.segment, score, sug.steps_start + sug.steps_budget))
        before = dict(engine.pending)
        new = engine.tell(result)
        assert engine.last is not None
        journal.write(engine.last, engine)
        if not fail:
            scores[sug.ref] = score
        decisions += [json.dumps(s.to_dict(), sort_keys=True) for s in new]
        if restart:
            lost = step % 5 == 0
            decided = before if lost else dict(engine.pending)
            r = rebuild(spec, journal.ordered(), decided, window, dict(engine.evicted_best))
            for rec, counters in r.retold:
                mine = [j for j in journal.entries.get(rec.member, []) if not _same(j.record, rec)]
                journal.entries[rec.member] = [*mine, Journaled(rec, counters)]
            assert state(r.engine) == state(engine), f"step {step}: rebuilt engine differs"
            if lost:
                assert sorted(json.dumps(d.suggestion.to_dict(), sort_keys=True) for d in r.decisions) == \
                    sorted(json.dumps(s.to_dict(), sort_keys=True) for s in new)
            engine = r.engine
            journal.trim(engine)
    assert not engine.pending, "the simulated training did not end"
    return decisions


PBT = {"strategy": "perturb"}
PB2 = {"strategy": "pb2", "pb2": {"maxRows": 16, "candidates": 16}}


@pytest.mark.parametrize("explore", [PBT, PB2], ids=["perturb", "pb2"])
def test_a_rebuild_from_the_bounded_journal_is_the_running_engine(make_spec: Any, explore: dict[str, Any]) -> None:
    """Window 4 over 14 segments: most records leave the window. After every result, the engine rebuilt
    from the journal equals the running one in everything decisions read, and continuing from the
    rebuilt engine (an operator restarted after every segment, some decisions lost) makes the very
    decisions of an engine that never restarted."""
    spec = make(make_spec, explore, 14, exploit={"significance": {"enabled": True, "window": 3}},
                budget={"patience": 6})
    straight = simulate(spec, 4, restart=False)
    restarted = simulate(spec, 4, restart=True)
    assert len(straight) > 6 * 5
    assert restarted == straight


def test_pbt_decides_the_same_with_a_bounded_window(make_spec: Any) -> None:
    """PBT's decisions read the members' latest scores, the best, the totals and the significance test's
    last few scores: a window of 4 over 20 segments changes none of them."""
    spec = make(make_spec, PBT, 20, exploit={"significance": {"enabled": True, "window": 3}})
    assert simulate(spec, 4, restart=False) == simulate(spec, None, restart=False)


def test_pb2_decides_the_same_until_a_row_leaves_the_window(make_spec: Any) -> None:
    """PB2 reads every row in its window: bounded and unbounded agree while no member has more finished
    segments than the window (here 8 of 8), and differ once rows leave it (what docs/operator.md says)."""
    spec8 = make(make_spec, PB2, 8)
    assert simulate(spec8, 8, restart=False) == simulate(spec8, None, restart=False)
    spec16 = make(make_spec, PB2, 16)
    bounded, unbounded = simulate(spec16, 4, restart=False), simulate(spec16, None, restart=False)
    assert bounded != unbounded


def test_the_window_is_never_below_the_significance_window(make_spec: Any) -> None:
    spec = make(make_spec, PBT, 4, exploit={"significance": {"enabled": True, "window": 6}})
    assert Engine(spec, window=2).window == 6



def _donor_left_behind(make_spec: Any, restart: bool, persist_live: bool) -> tuple[Any, bool, bool]:
    """A member decides to copy a donor's checkpoint; the donor then trains on until that checkpoint
    leaves its window (window 2) while the copy still waits in the queue (live: a pending segment
    restores it). With `restart`, the engine is rebuilt from the journal at that point (an operator
    restart), given the persisted Engine.evicted_live when `persist_live`. Then the copying segment
    runs. Returns (the donor's checkpoint, listed by garbage() while live, listed once not live)."""
    spec = make(make_spec, PBT, 12)
    engine = Engine(spec, window=2)
    journal = Journal()
    engine.start()
    rng = random.Random(3)

    def tell(member: int) -> None:
        sug = engine.pending[member]
        score = 1.0 + 0.1 * member + 0.01 * sug.segment + rng.random() * 0.01
        engine.tell(SegmentResult(member, sug.segment, score, sug.steps_start + sug.steps_budget))
        assert engine.last is not None
        journal.write(engine.last, engine)

    copier = ref = None
    for _ in range(200):  # until some member's next segment restores another member's checkpoint
        found = [(m, s.restore) for m, s in sorted(engine.pending.items()) if s.restore and s.restore[0] != m]
        if found:
            copier, ref = found[0]
            break
        tell(rng.choice(sorted(engine.pending)))
    assert copier is not None and ref is not None
    for _ in range(200):  # everyone else trains on; the copier waits
        if ref not in engine.records:
            break
        tell(rng.choice(sorted(m for m in engine.pending if m != copier)))
    assert ref not in engine.records, "the donor's checkpoint never left its window"
    early = ref in engine.garbage()
    if restart:
        engine = rebuild(spec, journal.ordered(), dict(engine.pending), 2, dict(engine.evicted_best),
                         list(engine.evicted_live) if persist_live else []).engine
    tell(copier)
    assert ref not in engine._live()
    return ref, early, ref in engine.garbage()


@pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
def test_a_checkpoint_live_when_it_left_the_window_is_collected_once_it_is_not(make_spec: Any,
                                                                               restart: bool) -> None:
    """A donor's checkpoint that left its window while a queued segment was still to restore it is
    deleted once that segment has run: by the running engine, and by one rebuilt in between (an
    operator restart) from the journal and the persisted Engine.evicted_live (the operator's
    status.retainedCheckpoints). Never while it is live."""
    ref, early, late = _donor_left_behind(make_spec, restart, persist_live=True)
    assert not early and late, ref


def test_without_the_persisted_list_a_rebuilt_engine_would_leave_it_in_storage(make_spec: Any) -> None:
    """The same restart, the list not given (as before status.retainedCheckpoints): never collected.
    (What the test above guards against.)"""
    _, early, late = _donor_left_behind(make_spec, True, persist_live=False)
    assert not early and not late


def _tell_one(engine: Engine, journal: Journal, rng: random.Random) -> None:
    """One pending member, drawn by `rng`, reports a score that rises slowly with member and segment;
    the result goes to the journal as a driver would write it."""
    m = rng.choice(sorted(engine.pending))
    sug = engine.pending[m]
    engine.tell(SegmentResult(m, sug.segment, 1.0 + 0.1 * m + 0.01 * sug.segment + rng.random() * 0.01,
                              sug.steps_start + sug.steps_budget))
    assert engine.last is not None
    journal.write(engine.last, engine)


@pytest.mark.parametrize("persist", [True, False], ids=["persisted", "forgotten"])
def test_checkpoints_that_left_their_windows_unhanded_survive_a_rebuild(make_spec: Any, persist: bool) -> None:
    """Members train until checkpoints leave their windows (window 2) with no segment started in
    between to take them for deletion: the running engine lists them as garbage. An engine rebuilt
    from the windows (an operator restart) lists them too only when given what the driver persisted
    with the histories that dropped them (`uncollected`: Engine.evicted_live and evicted_garbage, the
    operator's member status.uncollected); the live ones among them stay out of garbage either way."""
    spec = make(make_spec, PBT, 12)
    engine = Engine(spec, window=2)
    journal = Journal()
    engine.start()
    rng = random.Random(5)
    for _ in range(30):
        _tell_one(engine, journal, rng)
    left = sorted(engine.evicted_garbage)
    assert left, "nothing left a window unused: the test would prove nothing"
    running = engine.garbage()
    assert set(left) <= set(running)
    outside = [*engine.evicted_live, *engine.evicted_garbage]
    live = set(engine.evicted_live)
    rebuilt = rebuild(spec, journal.ordered(), dict(engine.pending), 2, dict(engine.evicted_best),
                      list(engine.evicted_live), outside if persist else []).engine
    after = rebuilt.garbage()
    assert not live & set(after)
    if persist:
        assert sorted(after) == sorted(running), (after, running)
    else:
        assert not set(left) & set(after)  # what a restart used to leave in storage for good


def test_forgetting_what_no_engine_lists_again_changes_no_garbage_list(make_spec: Any) -> None:
    """core/policy.still_listable: of the checkpoints handed out for deletion, a driver keeps only those
    the engine can still list (its window and evicted lists) and those its journal still holds outside
    the window (`persisted`: the operator's status.uncollected, written before some of them were handed
    out). Forgetting the rest changes nothing that the running engine, or one rebuilt from the journal,
    lists as garbage; forgetting the persisted ones too would hand those out again after a rebuild."""
    spec = make(make_spec, PBT, 40)
    engine = Engine(spec, window=2)
    journal = Journal()
    engine.start()
    rng = random.Random(5)
    handed: set[tuple[int, int]] = set()
    persisted: list[tuple[int, int]] = []
    for i in range(150):
        _tell_one(engine, journal, rng)
        if i == 120:  # the journal's list of what left the windows unhanded, as last written
            persisted = [*engine.evicted_live, *engine.evicted_garbage]
        if i % 3 == 0:
            garbage_batch(engine, handed, limit=4)
    garbage_batch(engine, handed, limit=None)
    kept = still_listable(engine, handed, persisted)
    assert len(handed) >= 100 and len(kept) <= len(engine.records) + len(persisted), (len(handed), len(kept))
    assert engine.garbage(exclude=kept) == engine.garbage(exclude=handed) == []
    outside = [*persisted, *engine.evicted_live, *engine.evicted_garbage]

    def rebuilt() -> Engine:
        return rebuild(spec, journal.ordered(), dict(engine.pending), 2, dict(engine.evicted_best),
                       list(engine.evicted_live), outside).engine

    assert rebuilt().garbage(exclude=kept) == []
    assert set(persisted) & handed - set(engine.records), "no persisted entry was handed out: proves nothing"
    assert rebuilt().garbage(exclude=still_listable(engine, handed)) != []
