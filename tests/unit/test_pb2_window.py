"""PB2's data window chosen by marginal likelihood (pbt_operator.core.pb2.window)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from pbt_operator.core.pb2 import Pb2Row, suggest
from pbt_operator.core.pb2.data import prepare
from pbt_operator.core.pb2.kernel import Layout
from pbt_operator.core.pb2.window import choose
from pbt_operator.core.space import Param, Space
from pbt_operator.core.types import Pb2Settings

SPACE = Space((Param("x", "float", 0.0, 1.0),))


def changed_history(n: int = 120, seed: int = 0) -> list[Pb2Row]:
    """The best x is 0.15 for the first 3/4 of the time, then 0.85: one kernel for the whole
    history must blur the two phases, a window over the recent phase need not."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t = float(10 * (i // 4))
        x = float(rng.uniform())
        best = 0.15 if i < 3 * n // 4 else 0.85
        rows.append(Pb2Row(t=t, c=0.0, hyperparameters={"x": x}, rate=-((x - best) ** 2) + 0.005 * rng.standard_normal()))
    return rows


def test_search_prefers_the_recent_phase_after_a_change() -> None:
    rows = changed_history()
    settings = replace(Pb2Settings(), window_search=True, max_rows=128)
    prep = prepare(SPACE, rows, [], rows[-1].t + 10.0, 0.0, settings, np.random.default_rng(0))
    win = choose(prep, Layout(dx=2, q=0), settings, np.random.default_rng(1))
    assert win.note.startswith("window "), win.note
    assert len(win.rows) < len(prep.rows)
    # the window holds only recent rows, re-standardised
    assert float(np.min(win.rows.tau)) > float(np.min(prep.rows.tau))
    assert abs(float(np.mean(win.y))) < 1e-9 and abs(float(np.std(win.y)) - 1.0) < 1e-9


def test_search_is_off_by_default_and_short_histories_skip_it() -> None:
    rows = changed_history()
    prep = prepare(SPACE, rows, [], rows[-1].t + 10.0, 0.0, Pb2Settings(), np.random.default_rng(0))
    assert choose(prep, Layout(dx=2, q=0), Pb2Settings(), np.random.default_rng(1)).note == ""
    short = changed_history(n=60)
    on = replace(Pb2Settings(), window_search=True)
    prep = prepare(SPACE, short, [], short[-1].t + 10.0, 0.0, on, np.random.default_rng(0))
    assert choose(prep, Layout(dx=2, q=0), on, np.random.default_rng(1)).note == ""  # < 2 x fit_rows rows


def test_suggestion_follows_the_recent_phase_and_says_so() -> None:
    rows = changed_history()
    settings = replace(Pb2Settings(), window_search=True, trust_region=1.0)
    ch = suggest(SPACE, rows, [], rows[-1].t + 10.0, 0.0, settings, np.random.default_rng(3), remaining=1)
    assert ch.hyperparameters is not None, ch.reason
    assert "by likelihood" in ch.reason
    assert abs(float(ch.hyperparameters["x"]) - 0.85) < 0.2, ch.reason
