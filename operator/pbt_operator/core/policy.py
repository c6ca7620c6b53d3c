"""The driver policy: what both drivers do around the engine, written once.

`pbt run` (local/runner.py) and the operator (kube/reconcile.py) differ in where they keep their
journal (two JSONL files; member specs and statuses in the API server) and in how segments run (an
executor; Jobs). Everything else about driving the engine is here, pure, and the same for both:

- `rebuild`: an engine from the journal: the finished segments in completion order and each member's
  latest persisted decision. A result whose decision was never persisted (a crash in between) is told
  again, in its place in the order, so the owed decision is exactly the one an uninterrupted run
  made; a member with no decision and no record gets its initial segment.
- `admit`: which waiting segments start now: least-progressed member first, up to parallelism, and
  nothing new once the training finished or failed.
- `garbage_batch`: checkpoints to hand to a starting segment for deletion, a bounded batch at a time,
  each one once; `still_listable`: the part of that memory that can still matter, so that it stays
  bounded however long a training runs.
- `Decision`: a decision with the segment that caused it, so a driver can tell a retry (same segment,
  next attempt) from a new decision when it reports them.

The drivers never write the engine's fields; they call `tell`, `cancel` and these functions.
docs/architecture.md describes the journal each driver keeps and why this order is crash-safe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .engine import Base, Counters, Engine
from .types import Record, Ref, SegmentResult, Suggestion

if TYPE_CHECKING:
    from ..spec import TrainingSpec

GC_BATCH = 64
"""At most this many checkpoints ride along with one segment for deletion: the list travels in the
segment's contract (an environment variable in Kubernetes), so it must stay small; the rest come up
again in the next batch."""


@dataclass(frozen=True)
class Decision:
    """A suggestion the engine made, and the segment whose result (or failure) caused it."""

    suggestion: Suggestion
    cause: Suggestion

    @property
    def retry(self) -> bool:
        """The same segment again, at the next attempt: not a new decision (exploit, replace...)."""
        s, c = self.suggestion, self.cause
        return s.member == c.member and dataclasses.replace(s, attempt=c.attempt) == c


@dataclass
class Rebuilt:
    """An engine rebuilt from a journal, and what the rebuild decided that the journal lacks."""

    engine: Engine
    started: list[Suggestion] = field(default_factory=list)  # initial segments of members that had none
    decisions: list[Decision] = field(default_factory=list)  # owed decisions, in the order they were made
    # The records absorbed anew (kept ones after the base, then the owed ones told again), with the
    # totals after each: a bounded journal rewrites their entries, so that its order and totals are
    # those of the engine that now runs.
    retold: list[tuple[Record, Counters]] = field(default_factory=list)


@dataclass(frozen=True)
class Journaled:
    """A journal entry of a bounded journal: the record, and the engine's totals right after it was
    absorbed (None for entries written before totals were kept, or never absorbed: a refused Job)."""

    record: Record
    counters: Counters | None = None


def result_of(rec: Record) -> SegmentResult:
    """The result that, told to the engine, produces `rec` again."""
    return SegmentResult(rec.member, rec.segment, rec.score, rec.steps_end, rec.metrics,
                         error=rec.error if rec.status != "done" else None, duration=rec.duration)


def rebuild(spec: TrainingSpec, records: Iterable[Record | Journaled], decided: Mapping[int, Suggestion],
            window: int | None = None, evicted_best: Mapping[int, Record] | None = None,
            evicted_live: Sequence[Ref] = (), uncollected: Sequence[Ref] = ()) -> Rebuilt:
    """The engine an uninterrupted driver would have now.

    `records`: every finished attempt (done or failed), in the order the driver told them; `decided`:
    each member's latest persisted decision. Both drivers persist a result before the decision it
    causes, so a record whose segment and attempt are still its member's latest decision is a
    result whose decision was lost: it is told again (after the rest are absorbed, in journal
    order), and the engine makes that decision again, identically.

    A bounded journal (`window`: the operator keeps each member's newest finished segments only)
    gives `Journaled` entries in absorption order and each member's best record that left its window.
    The totals a window cannot recount come from the entry absorbed last before the first owed one;
    the window up to it is placed as it is, later kept entries are absorbed one by one, then the owed
    ones are told again. The engine is then the one an uninterrupted operator with the same window
    has: tests/unit/test_bounded_history.py checks it decision by decision. `evicted_live`: the
    checkpoints that had left their windows while still live (Engine.evicted_live, as the driver last
    persisted it), so that the rebuilt engine collects them once they are not. `uncollected`: every
    checkpoint that left its window and was not yet handed out for deletion, live or not, as the driver
    persisted it with the history that dropped it (the operator: each member's status.uncollected), so
    that no restart forgets one (Engine.outside).
    """
    owed: list[Journaled] = []
    kept: list[Journaled] = []
    for item in records:
        j = item if isinstance(item, Journaled) else Journaled(item)
        cur = decided.get(j.record.member)
        if cur is not None and cur.ref == j.record.ref and cur.attempt == j.record.suggestion.attempt:
            owed.append(j)
        else:
            kept.append(j)
    done = {j.record.ref for j in kept if j.record.status == "done"}
    pending = [s for s in decided.values() if s.ref not in done]
    first_owed = min((j.counters.seq for j in owed if j.counters is not None), default=None)
    bases = [j for j in kept if j.counters is not None and (first_owed is None or j.counters.seq < first_owed)]
    if window is None or not bases:
        engine = Engine(spec, [j.record for j in kept], pending, window)
        engine.evicted_live += [r for r in evicted_live if r not in engine.evicted_live and r not in engine.records]
    else:
        last = max(bases, key=lambda j: j.counters.seq if j.counters is not None else -1)
        assert last.counters is not None
        upto = last.counters.seq
        placed = [j.record for j in kept if j.counters is None or j.counters.seq <= upto]
        later = [j.record for j in kept if j.counters is not None and j.counters.seq > upto]
        engine = Engine(spec, [], pending, window, Base(last.counters, placed, dict(evicted_best or {}),
                                                        list(evicted_live)))
    engine.outside(uncollected)
    had = {s.member for s in pending}
    out = Rebuilt(engine)
    if window is not None and bases:
        for rec in later:  # absorbed again after owed ones they once followed: their totals change
            engine.replay(rec)
            out.retold.append((rec, engine.counters()))
    out.started = [s for s in engine.start() if s.member not in had]
    for j in owed:
        out.decisions += [Decision(s, j.record.suggestion) for s in engine.tell(result_of(j.record))]
        if engine.last is not None and engine.last.ref == j.record.ref:
            out.retold.append((engine.last, engine.counters()))
    return out


def progress_key(s: Suggestion) -> tuple[int, int, int]:
    return (s.steps_start, s.segment, s.member)


def pick_next(queued: Sequence[Suggestion]) -> Suggestion:
    """Least-progressed member first: a population larger than the slots time-shares them fairly."""
    return min(queued, key=progress_key)


def admit(engine: Engine, waiting: Iterable[Suggestion], running: int,
          parallelism: int) -> tuple[list[Suggestion], list[Suggestion]]:
    """(segments to start now, segments still waiting), least-progressed first, so that at most
    `parallelism` run. Once the training finished or failed nothing new starts: the waiting segments
    are cancelled (they never ran, so nothing is lost) and neither list holds them."""
    if engine.finish or engine.failure:
        for s in waiting:
            engine.cancel(s.member)
        return [], []
    order = sorted(waiting, key=progress_key)
    slots = max(0, parallelism - running)
    return order[:slots], order[slots:]


def garbage_batch(engine: Engine, handed_out: set[Ref], limit: int | None = GC_BATCH) -> list[Ref]:
    """Checkpoints a starting segment may delete: collectable now (core/lineage.py says which), not
    handed out before, at most `limit`. Records them in `handed_out`, which the driver keeps across
    batches (and, in the operator, across passes, whose engines are rebuilt each time)."""
    refs = engine.garbage(exclude=handed_out)
    if limit is not None:
        refs = refs[:limit]
    handed_out.update(refs)
    return refs


def take_back(engine: Engine, handed_out: set[Ref], refs: Iterable[Ref]) -> None:
    """Checkpoints handed to a segment that did not delete them (it never saved, or its deletes failed:
    the result's gcFailed) go back among those to hand out: out of `handed_out`, and those outside the
    window back to the engine (Engine.outside). Deleting twice is harmless; a checkpoint counted as
    deleted that was not stays in storage for good. They were garbage when handed out and stay so (no
    lineage revives a checkpoint), and garbage_batch checks liveness again anyway."""
    refs = list(refs)
    handed_out.difference_update(refs)
    engine.outside(refs)


def still_listable(engine: Engine, handed_out: Iterable[Ref], persisted: Iterable[Ref] = ()) -> set[Ref]:
    """The refs of `handed_out` that the driver must keep remembering: those `engine` can still list as
    garbage (in its records, the window, or in evicted_live / evicted_garbage) and those in `persisted`,
    the refs outside the window that the driver's journal still holds for a rebuilt engine (the
    operator: each member's status.uncollected as the pass leaves it, kube/reconcile.forget_collected).
    The rest can be forgotten: what is left is bounded by the window (members x window, plus the
    evicted and persisted lists, which hold what is not handed out yet or was handed out since the list
    was last written), not by the training's length.

    Forgetting can never leave a checkpoint in storage for good: every reader of the set uses it only
    to leave refs out (Engine.garbage's `exclude`, lineage.collectable's `already`, the operator's
    status.uncollected and status.leftoverCheckpoints), so a smaller set lists more, never less. The
    worst a wrongly forgotten ref can cause is a second hand-out, and deleting a deleted prefix does
    nothing.

    Nor does it hand one out twice, outside a failed write or a restart. A forgotten ref is a done
    checkpoint that was garbage when handed out and stays so (no lineage revives one). The engine that
    runs lists garbage only from its records and evicted lists, and a ref gets back into those only
    through Engine.outside: take_back, for a Job that did not delete it (meant) or a rebuild's persisted
    lists. An engine rebuilt from the operator's statuses learns refs from (1) the histories: each is
    the engine's window as the pass leaves it (bounded_history keeps only what the engine's records
    hold), (2) status.retainedCheckpoints: a tail of evicted_live as the pass leaves it, (3)
    status.uncollected: `persisted`, kept here, including a member's list not rewritten since a ref in
    it was handed out, (4) evictedBest: listed only as a best that a newer one supersedes, and a best is
    live, so in the engine's lists and never handed out. The unwindowed engine of `pbt run` keeps every
    record, so there nothing is ever forgotten (nor can be: it could list any of them again).

    A pass whose writes fail: the operator keeps the previous pass's set (the daemon replaces it only
    once every write went out; kube/handlers.reconcile_once), so the next pass, which rebuilds from a
    mix of older and newer statuses, remembers everything the previous pass's statuses could list; the
    failed pass's own writes come from an engine that lists nothing that set forgot. A re-told result (a
    decision that was never persisted, core/policy.rebuild) supersedes a best again only when that best
    was superseded after the last pass whose writes all went out, so never one already forgotten. A
    failed write thus adds no second hand-out to those it caused before (what the failed pass handed to
    a Job that went out ahead of the failure); and one overlooked here would cost a second delete of a
    deleted prefix, never a leak. A restart forgets the whole set anyway (status.uncollected keeps the
    checkpoints outside the windows then)."""
    outside = set(persisted)
    outside.update(engine.evicted_live)
    outside.update(engine.evicted_garbage)
    records = engine.records
    return {r for r in handed_out if r in records or r in outside}


__all__ = ["GC_BATCH", "Decision", "Journaled", "Rebuilt", "admit", "garbage_batch", "pick_next", "progress_key", "rebuild",
           "result_of", "still_listable", "take_back"]
