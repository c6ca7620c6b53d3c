"""The ask/tell engine: PBT's decisions as a pure function of the population's history.

Drivers call `start()` once, run what it suggests, and `tell()` it each result; `tell` returns the
suggestions that became runnable (none, one member's next segment in asynchronous mode, or a whole
generation at a synchronous barrier). The engine's state is just the records and the pending
suggestions, and `Engine(spec, records, pending)` rebuilds it; `core/policy.rebuild` does that from a
driver's journal, re-telling the results whose decisions were never persisted, so an operator that
crashed, or a local run resumed with `--resume`, continues with exactly the decisions an uninterrupted
run would make (docs/architecture.md, "The driver policy").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import exploit as exploit_mod
from .choices import MODES, ON_EXHAUSTED
from .explore import explore
from .lineage import collectable, schedule
from .rng import EXPLOIT, EXPLORE, INITIAL, PB2, RETUNE, rng_for
from .space import Value
from .types import (
    BUDGET_EXHAUSTED,
    DIVERGED_ERROR,
    PATIENCE_EXHAUSTED,
    SEGMENT_FAILED,
    TARGET_REACHED,
    DecisionKind,
    Finish,
    Pb2Settings,
    Record,
    Ref,
    SegmentResult,
    Suggestion,
    diverged,
    permanent_failure,
)

if TYPE_CHECKING:
    from ..spec import TrainingSpec

REPLACE_PURPOSE = 100  # + attempt: streams for replacing a member whose segment kept failing
DIVERGED_PURPOSE = 10_000  # + 100 attempt + draw: streams for exploring after a segment diverged
DIVERGED_DRAWS = 8  # explore draws that may land on a configuration that diverged there, before one is kept


@dataclass
class TrainingState:
    """A summary for progress displays and status subresources."""

    done_segments: int
    total_segments: int
    running: int
    best: Record | None
    finished: str | None
    failed: str | None


@dataclass(frozen=True)
class Counters:
    """The engine's running totals after one absorbed record (`Engine.counters`): what a bounded
    journal cannot recount once records fall out of its window. `seq` numbers absorbed records (done
    and failed) in the order the engine took them; the operator stores these with each history entry
    so that an engine rebuilt from a window (`Engine(..., base=...)`) resumes with the exact totals."""

    seq: int
    done: int
    failed: int
    since_best: int
    best: Ref | None
    finish: Finish | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"seq": self.seq, "done": self.done, "failed": self.failed, "sinceBest": self.since_best,
                             "best": list(self.best) if self.best is not None else None}
        if self.finish is not None:
            d["finish"] = [self.finish.reason, self.finish.message]
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Counters:
        best = d.get("best")
        fin = d.get("finish")
        return cls(int(d["seq"]), int(d["done"]), int(d["failed"]), int(d["sinceBest"]),
                   (int(best[0]), int(best[1])) if best is not None else None,
                   Finish(str(fin[0]), str(fin[1])) if fin else None)


@dataclass(frozen=True)
class Base:
    """Where a windowed rebuild starts: the totals after the last record absorbed before the rebuild
    (`counters`), and each member's best record among those that left its window (`evicted_best`),
    one of which may be the training's best."""

    counters: Counters
    records: list[Record] = dataclasses.field(default_factory=list)  # the window up to counters.seq, in order
    evicted_best: dict[int, Record] = dataclasses.field(default_factory=dict)
    evicted_live: list[Ref] = dataclasses.field(default_factory=list)  # Engine.evicted_live, as last persisted


class Engine:
    def __init__(self, spec: TrainingSpec, records: Iterable[Record] = (), pending: Iterable[Suggestion] = (),
                 window: int | None = None, base: Base | None = None):
        """`window`: keep only each member's newest `window` finished segments (at least the
        significance test's window) as the state decisions read (records, PB2 rows, lineage for garbage
        collection); None keeps everything (the local runner). `base`: the records given are a window
        (`base.records`, up to `base.counters.seq`) are placed as they are, with the totals taken
        from `base` (they cannot be recounted from a window); `records` are then absorbed one by one."""
        # The engine branches on these two (exploit and explore strategies raise where they dispatch):
        # a value the spec would refuse is a bug to report, never a reason to run the other branch.
        branches = (("spec.mode", spec.mode, MODES),
                    ("spec.failurePolicy.onExhausted", spec.failure_policy.on_exhausted, ON_EXHAUSTED))
        for path, value, allowed in branches:
            if value not in allowed:
                raise ValueError(f"{path}: unknown value {value!r} (one of: {', '.join(allowed)})")
        self.spec = spec
        self.records: dict[Ref, Record] = {}
        self.failures: list[Record] = []
        self.order: list[Ref] = []  # completion order, for patience and reporting
        self.latest: dict[int, Record] = {}
        self.pending: dict[int, Suggestion] = {}
        self.finish: Finish | None = None  # stopped early: target reached, patience exhausted
        self.failure: Finish | None = None  # the training failed (the first failure stays the reason)
        self.best: Record | None = None
        self._since_best = 0
        self._rows: dict[Ref, Any] = {}  # PB2 rows, built incrementally, in absorption order
        # PB2 rows of diverged attempts (t, c, hyperparameters), by (member, segment, attempt): their rate
        # is set below every finished row's when PB2 reads them (_pb2_rows), so the GP learns to avoid them.
        self._diverged: dict[tuple[int, int, int], Any] = {}
        self._sorted_rows: list[Any] | None = None  # synchronous mode: _rows by (time, member), until they change
        self.last: Record | None = None  # the record the latest tell() produced, for drivers to persist
        self.window = None if window is None else max(1, int(window), spec.exploit.significance.window)
        self.seq = 0  # records absorbed (done and failed)
        self.done_count = 0
        self.failure_count = 0
        self._member_refs: dict[int, list[Ref]] = {}  # each member's done refs in the window, oldest first
        self.evicted_best: dict[int, Record] = {}  # each member's best record that left the window
        self.evicted_garbage: list[Ref] = []  # checkpoints that left the window unused: collectable
        # Checkpoints that left the window while live (the best, restored by a pending segment):
        # collectable once they are not. A driver persists this list (the operator: the training's
        # status.retainedCheckpoints) so that a rebuilt engine still collects them.
        self.evicted_live: list[Ref] = []
        if base is not None:
            c = base.counters
            self.evicted_best = dict(base.evicted_best)
            self.evicted_live = list(base.evicted_live)
            for rec in base.records:
                self._place(rec)
            self.seq, self.done_count, self.failure_count = c.seq, c.done, c.failed
            self._since_best, self.finish = c.since_best, c.finish
            self.best = None
            if c.best is not None:
                found = self.records.get(c.best) or next(
                    (r for r in self.evicted_best.values() if r.ref == c.best), None)
                if found is None:
                    raise ValueError(f"rebuild: the best record m{c.best[0]}/s{c.best[1]} is in no window")
                self.best = found
        for rec in records:
            self._absorb(rec)
        for s in pending:
            self.pending[s.member] = s

    # -- public API -------------------------------------------------------------------------------
    @property
    def finished(self) -> str | None:
        """`finish` as one line ("TargetReached: member 3 scored ..."), or None."""
        return str(self.finish) if self.finish is not None else None

    @property
    def failed(self) -> str | None:
        """`failure` as one line ("SegmentFailed: member 0 segment 2 failed ..."), or None."""
        return str(self.failure) if self.failure is not None else None

    @property
    def outcome(self) -> Finish | None:
        """How the training ended, once it has: failed, stopped early, or every member used its
        budget; None while it runs."""
        if self.failure is not None:
            return self.failure
        if not self.done:
            return None
        return self.finish or Finish(BUDGET_EXHAUSTED, self._budget_message())

    def _budget_message(self) -> str:
        """'every member trained 20 segments'; after spec.budget.segments was lowered mid-run some members
        trained more than it says, so the message says so instead of the new budget alone."""
        n = self.spec.budget.segments
        trained = {rec.segment + 1 for rec in self.latest.values()}
        if trained == {n}:
            return f"every member trained {n} segment{'s' if n != 1 else ''}"
        lo, hi = min(trained, default=0), max(trained, default=0)
        span = f"{lo}" if lo == hi else f"{lo}-{hi}"
        return (f"every member trained {span} segment{'' if span == '1' else 's'}: spec.budget.segments ({n}) was "
                "lowered during the run")

    def start(self) -> list[Suggestion]:
        """An initial segment for each member that has neither a record nor a pending segment (every
        member, on a fresh run), then every pending segment, by member. Decisions a rebuilt engine
        still owes are not made here: `core/policy.rebuild` re-tells the results that caused them."""
        if not (self.finish or self.failure):
            tried = {r.member for r in self.failures}
            for m in range(self.spec.population):
                if m not in self.pending and m not in self.latest and m not in tried:
                    rng = rng_for(self.spec.seed, m, 0, INITIAL)
                    hp = self.spec.space.sample(rng, initial=True)
                    self.pending[m] = Suggestion(
                        member=m, segment=0, hyperparameters=hp, restore=None, steps_start=0,
                        steps_budget=self.spec.segment.steps, kind="start", reason="initial sample",
                    )
        return sorted(self.pending.values(), key=lambda s: s.member)

    def tell(self, result: SegmentResult) -> list[Suggestion]:
        sug = self.pending.get(result.member)
        if sug is None or sug.segment != result.segment:
            raise ValueError(
                f"result for member {result.member} segment {result.segment} does not match a pending segment"
            )
        if result.disrupted:
            return [sug]  # not the worker's fault: same checkpoint, same attempt
        if not result.ok:
            return self._failed(sug, result)
        rec = Record(sug, result.score, result.steps, dict(result.metrics), "done", None, result.duration)
        del self.pending[result.member]
        self._absorb(rec)
        if self.finish or self.failure:
            return []
        if self.spec.mode == "asynchronous":
            nxt = self._next(result.member)
            return [nxt] if nxt is not None else []
        if any(s.segment <= result.segment for s in self.pending.values()):
            return []  # the barrier: generation g+1 waits for all of g
        # Decided members become pending one by one, so PB2 sees the earlier choices of this batch.
        # Members already pending were decided by an earlier, interrupted pass over this same batch
        # (a driver that crashed half-way through persisting it): they keep their decision.
        batch = [self._next(m) for m in sorted(self.latest) if m not in self.pending]
        return [s for s in batch if s is not None]

    def replay(self, rec: Record) -> None:
        """Absorb a journal record after construction, exactly as the constructor absorbs `records`
        (core/policy.rebuild uses it to learn the totals after each one)."""
        self._absorb(rec)

    def cancel(self, member: int) -> None:
        """Drop a decided segment that never started (the training finished before it ran)."""
        self.pending.pop(member, None)

    @property
    def done(self) -> bool:
        if self.pending:
            return False
        if self.failure or self.finish:
            return True
        return all(self._member_done(m) for m in range(self.spec.population))

    def state(self) -> TrainingState:
        return TrainingState(
            done_segments=self.done_count,
            total_segments=self.spec.population * self.spec.budget.segments,
            running=len(self.pending),
            best=self.best,
            finished=self.finished,
            failed=self.failed,
        )

    def schedule(self, ref: Ref | None = None) -> list[dict[str, Any]]:
        """The hyperparameter schedule of `ref` (default: the best checkpoint)."""
        target = ref if ref is not None else (self.best.ref if self.best else None)
        if target is None:
            return []
        if self.window is None:
            return schedule(self.records, target)
        known = {**{r.ref: r for r in self.evicted_best.values()}, **self.records}
        return schedule(known, target, partial=True)

    def garbage(self, exclude: Iterable[Ref] = ()) -> list[Ref]:
        """Checkpoints that may be deleted now, but those in `exclude` (already handed out for
        deletion: `core/policy.garbage_batch` keeps that memory, so it survives a rebuilt engine)."""
        refs = collectable(
            self.records, {m: r.ref for m, r in self.latest.items()}, self.pending.values(),
            self.best.ref if self.best else None, exclude,
        )
        if self.evicted_live:
            live = self._live()
            freed = [r for r in self.evicted_live if r not in live]
            if freed:
                self.evicted_live = [r for r in self.evicted_live if r in live]
                self.evicted_garbage += [r for r in freed if r not in self.evicted_garbage]
        if self.evicted_garbage:
            done = set(exclude)
            self.evicted_garbage = [r for r in self.evicted_garbage if r not in done]
            live, listed = self._live(), set(refs)
            refs += [r for r in self.evicted_garbage if r not in live and r not in listed]
        return refs

    def outside(self, refs: Iterable[Ref]) -> None:
        """A rebuilt engine learns the checkpoints outside the window that its driver persisted as not
        yet handed out for deletion (core/policy.rebuild): the live ones are kept until they are not
        (evicted_live, ahead of those it knows: they left earlier), the rest are collectable now."""
        known = set(self.evicted_live) | set(self.evicted_garbage) | set(self.records)
        extra = [r for r in dict.fromkeys(refs) if r not in known]
        live = self._live()
        self.evicted_live[:0] = [r for r in extra if r in live]
        self.evicted_garbage += [r for r in extra if r not in live]

    def counters(self) -> Counters:
        """The running totals now (after the latest absorbed record)."""
        return Counters(self.seq, self.done_count, self.failure_count, self._since_best,
                        self.best.ref if self.best is not None else None, self.finish)

    def _live(self) -> set[Ref]:
        live = {r.ref for r in self.latest.values()} | {s.restore for s in self.pending.values() if s.restore}
        if self.best is not None:
            live.add(self.best.ref)
        return live

    # -- internals --------------------------------------------------------------------------------
    def _internal(self, score: float) -> float:
        return self.spec.objective.internal(score)

    def _place(self, rec: Record) -> None:
        """Put a record of a window where absorbing it put it, without touching the totals."""
        if rec.status != "done":
            self._fail(rec)
            return
        self._keep(rec)

    def _fail(self, rec: Record) -> None:
        self.failures.append(rec)
        sug = rec.suggestion
        if diverged(rec.error) and sug.score_before is not None:
            self._diverged[(sug.member, sug.segment, sug.attempt)] = (
                sug.steps_start, self._internal(sug.score_before), sug.hyperparameters)
            self._sorted_rows = None

    def _keep(self, rec: Record) -> None:
        self.records[rec.ref] = rec
        self.order.append(rec.ref)
        prev = self.latest.get(rec.member)
        if prev is None or rec.segment >= prev.segment:
            self.latest[rec.member] = rec
        before = rec.suggestion.score_before
        dt = rec.steps_end - rec.suggestion.steps_start
        if before is not None and dt > 0 and rec.score is not None:
            s = self._internal(rec.score)
            self._sorted_rows = None
            self._rows[rec.ref] = (rec.suggestion.steps_start, self._internal(before), rec.suggestion.hyperparameters,
                                   (s - self._internal(before)) / dt)
        if self.window is not None:
            refs = self._member_refs.setdefault(rec.member, [])
            refs.append(rec.ref)
            while len(refs) > self.window:
                self._evict(refs.pop(0))

    def _evict(self, ref: Ref) -> None:
        """A record leaves the window: decisions stop reading it; its checkpoint is collectable unless it
        is live (a member's latest, restored by a pending segment, the best); the best of what left is
        kept per member, since it may be (or have been) the training's best."""
        rec = self.records.pop(ref)
        self.order.remove(ref)
        # Failed attempts leave with their segment (only the current segment's attempts are counted).
        self.failures = [f for f in self.failures if f.member != ref[0] or f.segment > ref[1]]
        gone = [key for key in self._diverged if key[0] == ref[0] and key[1] <= ref[1]]
        for key in gone:
            del self._diverged[key]
        if gone:
            self._sorted_rows = None
        if self._rows.pop(ref, None) is not None:
            self._sorted_rows = None
        old = self.evicted_best.get(rec.member)
        if old is None or self._internal(rec.score) > self._internal(old.score):  # type: ignore[arg-type]
            self.evicted_best[rec.member] = rec
        if ref not in self._live():
            self.evicted_garbage.append(ref)
        elif ref not in self.evicted_live:
            self.evicted_live.append(ref)

    def _absorb(self, rec: Record) -> None:
        self.last = rec
        self.seq += 1
        if rec.status != "done":
            self.failure_count += 1
            self._fail(rec)
            return
        self.done_count += 1
        self._keep(rec)
        assert rec.score is not None
        s = self._internal(rec.score)
        if self.best is None or s > self._internal(self.best.score):  # type: ignore[arg-type]
            old = self.best
            self.best = rec
            if old is not None and old.ref not in self.records and old.ref not in self._live() \
                    and old.ref not in self.evicted_live:  # (those are freed by garbage())
                self.evicted_garbage.append(old.ref)  # a best that had left the window: no longer live
            self._since_best = 0
        else:
            self._since_best += 1
        b = self.spec.budget
        if b.target_score is not None and s >= self._internal(b.target_score) and self.finish is None:
            self.finish = Finish(TARGET_REACHED, f"member {rec.member} scored {rec.score:.6g} (target {b.target_score:g})")
        if b.patience is not None and self._since_best >= b.patience * self.spec.population and not self.finish:
            self.finish = Finish(PATIENCE_EXHAUSTED, f"best score {self.best.score:.6g} not improved in "
                                                     f"{self._since_best} segments")

    def _member_done(self, m: int) -> bool:
        rec = self.latest.get(m)
        return rec is not None and rec.segment + 1 >= self.spec.budget.segments

    def _scores(self) -> dict[int, float]:
        return {m: self._internal(r.score) for m, r in self.latest.items()}  # type: ignore[arg-type]

    def _next(self, m: int) -> Suggestion | None:
        """Continue, or exploit + explore, for member m after its latest finished segment."""
        if self._member_done(m):
            return None
        rec = self.latest[m]
        k = rec.segment + 1
        spec = self.spec
        rng = rng_for(spec.seed, m, k, EXPLOIT)
        scores = self._scores()
        choice = exploit_mod.choose(spec.exploit.strategy, m, scores, rng, fraction=spec.exploit.fraction,
                                    size=spec.exploit.size, donors=spec.exploit.donors)
        reason = choice.reason
        if choice.donor is not None and spec.exploit.significance.enabled:
            ok, why = exploit_mod.significantly_better(
                self._recent(choice.donor), self._recent(m), spec.exploit.significance.alpha
            )
            reason = f"{reason}; {why}"
            if not ok:
                return self._continue(rec, f"kept weights: {reason}")
        if choice.donor is None:
            return self._retuned(rec) or self._continue(rec, "continue")
        return self._exploit(m, k, choice.donor, choice.second, reason, kind="exploit")

    def _retuned(self, rec: Record) -> Suggestion | None:
        """With PB2, a member that keeps its weights may still move its numbers a little: to the GP's
        best posterior mean within `retune` of its own configuration (Pb2Settings.retune, which says
        why). None: keep the configuration (not PB2, retune 0, or PB2 declined)."""
        spec = self.spec
        pb2 = spec.explore.pb2
        if spec.explore.strategy != "pb2" or pb2.retune <= 0.0 or not spec.space.numeric:
            return None
        own = rec.suggestion.hyperparameters
        hp, why = self._pb2(rec.member, rec.segment + 1, rec, purpose=RETUNE,
                            settings=dataclasses.replace(pb2, trust_region=pb2.retune, kappa=0.0))
        if hp is None:
            return None
        if any(hp[p.name] != own[p.name] for p in spec.space.categorical):
            return None  # a member that keeps its weights keeps its categories
        if hp == dict(own):
            return None
        s = self._continue(rec, f"continue; retune: {why}")
        s = dataclasses.replace(s, hyperparameters=hp)
        self.pending[rec.member] = s
        return s

    def _recent(self, m: int) -> list[float]:
        w = self.spec.exploit.significance.window
        latest = self.latest[m].segment
        out = []
        for k in range(max(0, latest - w + 1), latest + 1):
            r = self.records.get((m, k))
            if r is not None and r.score is not None:
                out.append(self._internal(r.score))
        return out

    def _continue(self, rec: Record, reason: str) -> Suggestion:
        s = Suggestion(
            member=rec.member, segment=rec.segment + 1, hyperparameters=rec.suggestion.hyperparameters,
            restore=rec.ref, steps_start=rec.steps_end, steps_budget=self.spec.segment.steps,
            kind="continue", score_before=rec.score, reason=reason,
        )
        self.pending[rec.member] = s
        return s

    def _exploit(self, m: int, k: int, donor: int, second: int | None, reason: str,
                 kind: DecisionKind, purpose: int = EXPLORE) -> Suggestion:
        spec = self.spec
        drec = self.latest[donor]
        second_hp = self.latest[second].suggestion.hyperparameters if second is not None else None
        rng = rng_for(spec.seed, m, k, purpose)

        def pb2() -> tuple[dict[str, Value] | None, str]:
            return self._pb2(m, k, drec)

        hp, why = explore(
            spec.space, spec.explore.strategy, drec.suggestion.hyperparameters, second_hp, rng,
            factors=spec.explore.factors, resample_probability=spec.explore.resample_probability,
            crossover=spec.explore.crossover, pb2=pb2,
        )
        s = Suggestion(
            member=m, segment=k, hyperparameters=hp, restore=drec.ref, steps_start=drec.steps_end,
            steps_budget=spec.segment.steps, kind=kind, score_before=drec.score, donor=donor,
            reason=f"{reason}; explore: {why}", exploit_reason=reason, explore_reason=why,
        )
        self.pending[m] = s
        return s

    def _pb2(self, m: int, k: int, drec: Record, purpose: int = PB2,
             settings: Pb2Settings | None = None) -> tuple[dict[str, Value] | None, str]:
        try:
            from .pb2 import Pb2Pending, Pb2Row, suggest
        except ImportError as e:  # pragma: no cover - only while pb2 is missing
            return None, f"pb2 unavailable ({e})"
        found: Any = self._pb2_rows()
        if self.spec.mode == "synchronous":
            # A generation's results arrive in the order its members happened to finish (a thread, a pod):
            # rows in that order changed the GP in its last bits, and the run's decisions with it. By (time,
            # member) they are the same for any order, as a synchronous run's decisions must be. Sorted once
            # per generation (a generation's decisions add no rows): ~5 ms at 10 000 rows.
            if self._sorted_rows is None:
                self._sorted_rows = [row for _, row in sorted(self._pb2_rows(keyed=True),
                                                              key=lambda kv: (kv[1][0], kv[0]))]
            found = self._sorted_rows
        rows = [Pb2Row(t=float(t), c=c, hyperparameters=hp, rate=r) for t, c, hp, r in found]
        pend = [
            Pb2Pending(t=float(s.steps_start), c=self._internal(s.score_before), hyperparameters=s.hyperparameters)
            for s in self.pending.values()
            if s.score_before is not None and s.member != m
        ]
        choice = suggest(
            self.spec.space, rows, pend, float(drec.steps_end), self._internal(drec.score),  # type: ignore[arg-type]
            settings or self.spec.explore.pb2, rng_for(self.spec.seed, m, k, purpose),
            remaining=self.spec.budget.segments - k,
            center=drec.suggestion.hyperparameters,
        )
        return choice.hyperparameters, choice.reason

    def _after_divergence(self, sug: Suggestion, error: str | None, attempts: int) -> Suggestion:
        """The next attempt after `sug` diverged: what PBT does with its worst member. It copies the best
        checkpoint (its own last one when it leads) and explores from there, as an exploit does; the
        same hyperparameters from the same checkpoint would mostly diverge again. The attempt counts
        against maxRetries like a retry, so a worker that always diverges still ends in onExhausted.
        With `exploit.strategy: none` (members never copy each other) only its own checkpoint. Nothing to
        copy (a first segment diverged): a fresh sample, from scratch."""
        m, k = sug.member, sug.segment
        what = (error or "")[len(DIVERGED_ERROR):].strip()
        scores = self._scores()
        if self.spec.exploit.strategy == "none":
            scores = {mm: v for mm, v in scores.items() if mm == m}
        if not scores:
            return self._fresh(sug, DIVERGED_PURPOSE + attempts,
                               f"segment {k} diverged ({what}), with no checkpoint to copy: a fresh sample")
        donor = exploit_mod.ranked(scores)[0]
        best = self.latest[donor].score
        if donor == m:  # it leads (or may copy no one): its own last checkpoint, new hyperparameters
            reason = f"segment {k} diverged ({what}): again from its own last checkpoint (score {best:g})"
        else:
            reason = f"segment {k} diverged ({what}): copies member {donor}, the best (score {best:g})"
        # an exploit continues a member's own lineage of segments; a member with none yet is replaced
        kind: DecisionKind = "exploit" if m in self.latest else "replace"
        # Not back onto a configuration that diverged from there: a perturbation has two factors, so
        # half the explores from one donor would land on it again (PB2 sees those as its worst rows).
        bad = [f.suggestion.hyperparameters for f in self.failures
               if f.ref == sug.ref and diverged(f.error) and f.suggestion.restore == self.latest[donor].ref]
        for draw in range(DIVERGED_DRAWS):
            s = self._exploit(m, k, donor, None, reason, kind=kind, purpose=DIVERGED_PURPOSE + 100 * attempts + draw)
            if s.hyperparameters not in bad:
                break
        s = dataclasses.replace(s, attempt=sug.attempt + 1)
        if donor == m:
            s = dataclasses.replace(s, kind="continue", donor=None)
        self.pending[m] = s
        return s

    def _fresh(self, sug: Suggestion, purpose: int, reason: str) -> Suggestion:
        """The next attempt of `sug` from scratch with a fresh sample from the prior (nothing to copy)."""
        fresh = Suggestion(
            member=sug.member, segment=sug.segment,
            hyperparameters=self.spec.space.sample(rng_for(self.spec.seed, sug.member, sug.segment, purpose)),
            restore=None, steps_start=0, steps_budget=self.spec.segment.steps, kind="replace", reason=reason,
            attempt=sug.attempt + 1,
        )
        self.pending[sug.member] = fresh
        return fresh

    def _pb2_rows(self, keyed: bool = False) -> list[Any]:
        """PB2's rows: every finished segment's, then every diverged attempt's at a rate below all of
        theirs (by the spread of the rates, so the same for any units of the score; PB2 winsorises it to
        its floor). Computed from the rows as they are now, so a rebuilt engine reads the same."""
        rows: list[Any] = list(self._rows.items()) if keyed else list(self._rows.values())
        if not self._diverged or not self._rows:
            return rows
        rates = [row[3] for row in self._rows.values()]
        low, high = min(rates), max(rates)
        floor = low - (high - low) - abs(low)
        if not floor < low:  # every rate 0
            floor = low - 1.0
        for key, (t, c, hp) in self._diverged.items():
            row = (t, c, hp, floor)
            rows.append(((key[0], key[1], key[2]), row) if keyed else row)
        return rows

    def _failed(self, sug: Suggestion, result: SegmentResult) -> list[Suggestion]:
        self._absorb(Record(sug, result.score, result.steps, dict(result.metrics), "failed",
                            result.error or "no score reported", result.duration))
        return self._after_failure(sug, result.error)

    def _after_failure(self, sug: Suggestion, error: str | None) -> list[Suggestion]:
        """Retry, replace or fail after `sug` failed (its failure is already in self.failures)."""
        if self.failure or self.finish:  # nothing new starts, and the first reason stays the reason
            self.pending.pop(sug.member, None)
            return []
        attempts = sum(1 for r in self.failures if r.ref == sug.ref)
        policy = self.spec.failure_policy
        permanent = permanent_failure(error)
        if permanent:
            del self.pending[sug.member]
            why = f"member {sug.member} segment {sug.segment} failed, not retried ({permanent}): {error}"
            self.failure = Finish(SEGMENT_FAILED, why, (sug.member, sug.segment, sug.attempt))
            return []
        # Failures come in rounds of maxRetries+1 attempts: the original member's round, then (with
        # onExhausted: replace) one round for its replacement. A replacement that fails its whole
        # round too points at the worker or the data, not at hyperparameters: the training fails
        # rather than burn the GPU budget forever.
        rnd, within = divmod(attempts - 1, policy.max_retries + 1)
        if within < policy.max_retries:
            if diverged(error):
                return [self._after_divergence(sug, error, attempts)]
            retry = dataclasses.replace(sug, attempt=sug.attempt + 1)
            self.pending[sug.member] = retry
            return [retry]
        del self.pending[sug.member]
        tries = policy.max_retries + 1
        rounds = f"maxRetries {policy.max_retries}"
        if rnd >= 1:  # `maxRetries 2` next to `failed 6 times` reads as a miscount without this
            parts = [f"{tries} attempt{'s' if tries > 1 else ''}"]
            resumed = rnd  # rounds given by `pbt run --resume` of the failed training (local/runner.py)
            if policy.on_exhausted == "replace":
                was = f"a copy of member {sug.donor}" if sug.donor is not None else "a fresh sample"
                parts.append(f"then {tries} more after onExhausted: replace gave it {was}")
                resumed -= 1
            if resumed:
                parts.append(f"then {tries * resumed} more on resuming the failed training")
            rounds += ": " + ", ".join(parts)
        times = "once" if attempts == 1 else f"{attempts} times"
        why = f"member {sug.member} segment {sug.segment} failed {times} ({rounds}): {error}"
        if policy.on_exhausted == "fail" or rnd >= 1:
            self.failure = Finish(SEGMENT_FAILED, why, (sug.member, sug.segment, sug.attempt))
            return []
        scores = {mm: s for mm, s in self._scores().items() if mm != sug.member}
        if not scores:
            return [self._fresh(sug, REPLACE_PURPOSE + attempts, f"replaced with a fresh sample: {why}")]
        # An exact copy of the best member, its hyperparameters unexplored: exploring here could land
        # where the failed member was (a learning rate that diverges to NaN) and fail the training at the
        # replacement's round; a copy of a configuration that just trained fine from that checkpoint
        # failing too is what points at the worker or the data (the rule above).
        donor = exploit_mod.ranked(scores)[0]
        drec = self.latest[donor]
        reason = f"replaced by copying member {donor}: {why}"
        kept = "none (a replacement keeps the donor's hyperparameters)"
        new = Suggestion(
            member=sug.member, segment=sug.segment, hyperparameters=dict(drec.suggestion.hyperparameters),
            restore=drec.ref, steps_start=drec.steps_end, steps_budget=self.spec.segment.steps, kind="replace",
            score_before=drec.score, donor=donor, reason=f"{reason}; explore: {kept}", attempt=sug.attempt + 1,
            exploit_reason=reason, explore_reason=kept,
        )
        self.pending[sug.member] = new
        return [new]
