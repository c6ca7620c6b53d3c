"""Warnings that a persistent problem repeats, held back to one per training per interval.

A checkpoint store whose key may write but not delete fails the deletes of every segment, and each
would post its own `CheckpointDeleteFailed` Warning: hundreds of Events that say the same thing and
push the useful ones out of `kubectl describe`. The first one is posted; the next ones within the
interval are only counted (the Prometheus counter still sees each), and the first one after it says
how many were held back. The state lives in the training's daemon, so an operator restart costs at
most one extra Event."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..core.display import shorten
from . import conditions as C
from .reconcile import EventSpec


@dataclass(frozen=True)
class HoldBack:
    """How a repeated reason is held back: the interval, and the metric that still counts every one
    (named in the first Event after the interval, so a reader knows where the held-back ones went)."""

    every: float  # seconds between two Events of this reason for one training
    counter: str


HELD_BACK: dict[str, HoldBack] = {
    C.EV_CHECKPOINT_DELETE_FAILED: HoldBack(600.0, "pbt_checkpoint_delete_failed_total"),
    C.EV_WRITE_REFUSED: HoldBack(600.0, "pbt_reconcile_errors_total"),
}


@dataclass
class EventThrottle:
    last: dict[str, float] = field(default_factory=dict)  # reason -> when its last Event was posted
    held: dict[str, int] = field(default_factory=dict)  # reason -> Events held back since then

    def admit(self, events: list[EventSpec], now: float) -> tuple[list[EventSpec], list[EventSpec]]:
        """(to post, held back); `now` is a monotonic clock in seconds."""
        post: list[EventSpec] = []
        held: list[EventSpec] = []
        for ev in events:
            rule = HELD_BACK.get(ev.reason)
            if rule is None:
                post.append(ev)
                continue
            last = self.last.get(ev.reason)
            if last is not None and now - last < rule.every:
                self.held[ev.reason] = self.held.get(ev.reason, 0) + 1
                held.append(ev)
                continue
            n = self.held.pop(ev.reason, 0)
            if n and last is not None:
                ev = dataclasses.replace(ev, message=(
                    f"{shorten(ev.message, 850)} ({n} more {ev.reason} in the {(now - last) / 60:.0f} min before this "
                    f"were not posted as Events; {rule.counter} counts them all)"))
            self.last[ev.reason] = now
            post.append(ev)
        return post, held
