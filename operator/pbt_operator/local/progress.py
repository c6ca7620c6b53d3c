"""Live progress for `pbt run`: a redrawn table on a terminal, periodic lines in a log."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..core.display import fmt_hp, fmt_value
from ..core.engine import Engine
from ..core.types import Suggestion
from ..spec import TrainingSpec


def member_table(spec: TrainingSpec, engine: Engine, running: dict[int, Suggestion]) -> list[str]:
    rows = [f"{'member':>6} {'seg':>4} {'score':>10} {'state':<8} {'parent':<9} hyperparameters"]
    for m in range(spec.population):
        rec = engine.latest.get(m)
        run = running.get(m)
        state = "running" if run else ("done" if engine._member_done(m) else "queued")
        sug = run or (rec.suggestion if rec else None)
        seg = sug.segment if sug else 0
        parent = f"m{sug.restore[0]}/s{sug.restore[1]}" if sug and sug.restore else "-"
        score = fmt_value(rec.score) if rec else "-"
        hp = fmt_hp(sug.hyperparameters) if sug else ""
        rows.append(f"{m:>6} {seg:>4} {score:>10} {state:<8} {parent:<9} {hp}")
    return rows


class Progress:
    def __init__(self, spec: TrainingSpec, stream: TextIO = sys.stderr, interval: float = 0.25,
                 live: bool | None = None):
        self.spec = spec
        self.stream = stream
        self.interval = interval
        self.live = stream.isatty() if live is None else live
        self.t0 = time.monotonic()
        self.last = 0.0
        self.drawn = 0
        self.last_pct = -10

    def __call__(self, engine: Engine, running: dict[int, Suggestion], queued: list[Suggestion]) -> None:
        now = time.monotonic()
        st = engine.state()
        final = engine.done or not running
        if not final and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.t0
        total = max(1, st.total_segments)
        frac = st.done_segments / total
        # nothing done yet: no rate to tell the rest by ("ETA 0s" before the first segment read as "done")
        eta = "-" if frac == 0 else f"{elapsed / frac - elapsed:.0f}s" if frac < 1 else "0s"
        best = (f"best {fmt_value(st.best.score)} (member {st.best.member}, segment {st.best.segment})"
                if st.best else "best -")
        failed = f"  failed attempts {engine.failure_count}" if engine.failure_count else ""
        head = (f"{self.spec.name}: segments {st.done_segments}/{total} ({100 * frac:.0f}%)  {best}  "
                f"running {len(running)}  queued {len(queued)}{failed}  elapsed {elapsed:.0f}s  ETA {eta}")
        if self.live:
            lines = [head, *member_table(self.spec, engine, running)[: 1 + min(self.spec.population, 24)]]
            if self.drawn:
                self.stream.write(f"\x1b[{self.drawn}F\x1b[J")
            self.stream.write("\n".join(lines) + "\n")
            self.drawn = len(lines)
        else:
            pct = int(100 * frac)
            if pct >= self.last_pct + 10 or final:
                self.last_pct = pct
                self.stream.write(head + "\n")
        self.stream.flush()
