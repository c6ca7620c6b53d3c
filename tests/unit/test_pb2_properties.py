"""Property test: over random spaces and histories, `suggest` never raises and stays in the space."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pbt_operator.core.pb2 import PARALLEL_MODES, Pb2Pending, Pb2Row, suggest
from pbt_operator.core.space import Param, Space
from pbt_operator.core.types import Pb2Settings


@st.composite
def params(draw: st.DrawFn, name: str) -> Param:
    kind = draw(st.sampled_from(["float", "int", "categorical"]))
    if kind == "categorical":
        n = draw(st.integers(1, 4))
        choices = draw(st.sampled_from([("a", "b", "c", "d"), (1, 2, 3, 4), (0.5, "x", 7, "y")]))[:n]
        return Param(name, "categorical", choices=choices)
    log = draw(st.booleans())
    if kind == "int":
        low = draw(st.integers(1 if log else -5, 20))
        high = low + draw(st.integers(0, 200))
        return Param(name, "int", float(low), float(high), log=log)
    low = draw(st.floats(1e-6, 10.0)) if log else draw(st.floats(-10.0, 10.0))
    high = low * draw(st.floats(1.0, 1e4)) if log else low + draw(st.floats(0.0, 100.0))
    return Param(name, "float", low, high, log=log)


@st.composite
def spaces(draw: st.DrawFn) -> Space:
    n = draw(st.integers(1, 4))
    return Space(tuple(draw(params(f"p{i}")) for i in range(n)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    space=spaces(),
    n_rows=st.integers(0, 30),
    n_pending=st.integers(0, 3),
    mode=st.sampled_from(PARALLEL_MODES),
    seed=st.integers(0, 2**31),
    nan_share=st.sampled_from([0.0, 0.0, 0.2]),
    t_step=st.sampled_from([0.0, 1.0, 1000.0]),
)
def test_suggest_respects_bounds_and_types(space: Space, n_rows: int, n_pending: int, mode: str, seed: int,
                                           nan_share: float, t_step: float) -> None:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        rate = math.nan if rng.uniform() < nan_share else float(rng.standard_normal() * 10.0 ** rng.integers(-6, 3))
        rows.append(Pb2Row(t=t_step * (i // 3), c=float(rng.standard_normal()), hyperparameters=space.sample(rng),
                           rate=rate))
    pending = [Pb2Pending(t=t_step * n_rows, c=0.0, hyperparameters=space.sample(rng)) for _ in range(n_pending)]
    s = replace(Pb2Settings(), parallel=mode, candidates=32, restarts=2)  # type: ignore[arg-type]

    choice = suggest(space, rows, pending, t_step * n_rows, 1.0, s, np.random.default_rng(seed))

    if choice.hyperparameters is None:
        assert choice.reason.startswith("pb2 fallback: ")
        return
    hp = choice.hyperparameters
    assert space.contains(hp), (hp, choice.reason)
    for p in space.params:
        v = hp[p.name]
        if p.kind == "int":
            assert type(v) is int
        elif p.kind == "float":
            assert type(v) is float and p.low <= v <= p.high
        else:
            assert v in p.choices
    assert choice.reason.startswith(f"pb2 {mode}: ")
    again = suggest(space, rows, pending, t_step * n_rows, 1.0, s, np.random.default_rng(seed))
    assert again == choice
