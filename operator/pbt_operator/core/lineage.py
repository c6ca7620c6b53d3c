"""Lineage: where each checkpoint's weights came from, and which checkpoints may be deleted.

A segment restores either its own member's previous checkpoint or a donor's (after an exploit), so
following `restore` links from any checkpoint walks back to a first segment. That walk is the
hyperparameter *schedule* which produced the model, and the set of checkpoints still reachable from
live ones is what garbage collection must keep.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .types import Record, Ref, Suggestion


def chain(records: Mapping[Ref, Record], ref: Ref, partial: bool = False) -> list[Record]:
    """Records from the first segment to `ref`, following restore links. Raises on a cycle or a gap,
    which would mean corrupted state rather than something to paper over; with `partial` (an engine
    that keeps a window of each member's history), a gap ends the chain: the known tail is returned."""
    out: list[Record] = []
    seen: set[Ref] = set()
    cur: Ref | None = ref
    while cur is not None:
        if cur in seen:
            raise ValueError(f"lineage cycle at member {cur[0]} segment {cur[1]}")
        seen.add(cur)
        rec = records.get(cur)
        if rec is None and partial:
            break
        if rec is None:
            raise ValueError(f"lineage gap: member {cur[0]} segment {cur[1]} has no record")
        out.append(rec)
        cur = rec.suggestion.restore
    out.reverse()
    return out


def schedule(records: Mapping[Ref, Record], ref: Ref, partial: bool = False) -> list[dict[str, Any]]:
    """The hyperparameter schedule along a lineage: one entry per segment, in training order (with
    `partial`, its newest part that `records` still hold)."""
    return [
        {
            "member": r.member,
            "segment": r.segment,
            "steps_start": r.suggestion.steps_start,
            "steps_end": r.steps_end,
            "hyperparameters": dict(r.suggestion.hyperparameters),
            "score": r.score,
            "kind": r.suggestion.kind,
        }
        for r in chain(records, ref, partial)
    ]


def keep_set(records: Mapping[Ref, Record], live: Iterable[Ref]) -> set[Ref]:
    """Every checkpoint reachable backwards from a live one."""
    keep: set[Ref] = set()
    for ref in live:
        cur: Ref | None = ref
        while cur is not None and cur not in keep:
            keep.add(cur)
            rec = records.get(cur)
            cur = rec.suggestion.restore if rec is not None else None
    return keep


def collectable(
    records: Mapping[Ref, Record],
    latest: Mapping[int, Ref],
    pending: Iterable[Suggestion],
    best: Ref | None,
    already: Iterable[Ref] = (),
) -> list[Ref]:
    """Checkpoints no member can restore again and that are on no live lineage.

    Live: each member's latest checkpoint (a future exploit may copy it), every checkpoint a pending
    segment restores from, and the best checkpoint so far. Keeping their ancestors too means the best
    model's lineage (and any future best's, which must descend from a live checkpoint) survives in
    full - the bug where exploits or exports find their checkpoint deleted cannot happen.
    """
    live: list[Ref] = list(latest.values())
    live += [s.restore for s in pending if s.restore is not None]
    if best is not None:
        live.append(best)
    keep = keep_set(records, live)
    done = set(already)
    return sorted(r for r, rec in records.items() if rec.status == "done" and r not in keep and r not in done)
