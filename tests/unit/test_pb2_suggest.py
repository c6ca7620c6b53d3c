"""PB2's `suggest`: determinism, parallel modes, fallbacks, mixed spaces, and that it learns."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from pbt_operator.core.pb2 import PARALLEL_MODES, Pb2Pending, Pb2Row, suggest
from pbt_operator.core.pb2.acquisition import BETA_SCALE, beta_schedule, beta_theory
from pbt_operator.core.pb2.data import auto_min_rows
from pbt_operator.core.space import Param, Space
from pbt_operator.core.types import Pb2Settings

SETTINGS = Pb2Settings()


def mixed_space() -> Space:
    return Space((
        Param("lr", "float", 1e-4, 1e-1, log=True),
        Param("layers", "int", 1, 8),
        Param("drop", "float", 0.0, 0.5),
        Param("opt", "categorical", choices=("sgd", "adam", "rmsprop")),
    ))


def history(space: Space, n: int, seed: int = 0, optimum: float = 0.7) -> list[Pb2Row]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        hp = space.sample(rng)
        u = space.to_unit(hp)
        rate = -float(np.sum((u - optimum) ** 2)) + 0.01 * rng.standard_normal()
        rows.append(Pb2Row(t=float(100 * (i // 4)), c=0.01 * i, hyperparameters=hp, rate=rate))
    return rows


def t_c(rows: list[Pb2Row]) -> tuple[float, float]:
    return rows[-1].t + 100.0, rows[-1].c


def test_deterministic_under_seed() -> None:
    space = mixed_space()
    rows = history(space, 40)
    pend = [Pb2Pending(t=1000.0, c=0.3, hyperparameters=space.sample(np.random.default_rng(9)))]
    for mode in PARALLEL_MODES:
        s = replace(SETTINGS, parallel=mode)
        a = suggest(space, rows, pend, *t_c(rows), s, np.random.default_rng(42))
        b = suggest(space, rows, pend, *t_c(rows), s, np.random.default_rng(42))
        assert a.hyperparameters is not None, a.reason
        assert a == b


def test_choice_is_inside_space_with_native_types() -> None:
    space = mixed_space()
    rows = history(space, 30)
    ch = suggest(space, rows, [], *t_c(rows), SETTINGS, np.random.default_rng(0))
    hp = ch.hyperparameters
    assert hp is not None, ch.reason
    assert space.contains(hp)
    assert type(hp["layers"]) is int
    assert type(hp["lr"]) is float and type(hp["drop"]) is float
    assert hp["opt"] in ("sgd", "adam", "rmsprop")
    assert ch.reason.startswith("pb2 liar-pessimistic: ucb=")
    assert "rows=30/30" in ch.reason


@pytest.mark.parametrize("mode", ["bucb", "liar-mean", "liar-pessimistic"])
def test_consecutive_choices_differ_when_the_first_is_pending(mode: str) -> None:
    """The same data and the same rng seed: only the pending point differs between the calls."""
    space = Space((Param("x", "float", 0.0, 1.0), Param("y", "float", 0.0, 1.0)))
    rows = history(space, 30, seed=1)
    s = replace(SETTINGS, parallel=mode)
    t, c = t_c(rows)
    first = suggest(space, rows, [], t, c, s, np.random.default_rng(5))
    assert first.hyperparameters is not None, first.reason
    pend = [Pb2Pending(t=t, c=c, hyperparameters=first.hyperparameters)]
    second = suggest(space, rows, pend, t, c, s, np.random.default_rng(5))
    assert second.hyperparameters is not None, second.reason
    assert second.hyperparameters != first.hyperparameters
    assert "pending=1" in second.reason


def test_thompson_consecutive_choices_differ() -> None:
    space = Space((Param("x", "float", 0.0, 1.0), Param("y", "float", 0.0, 1.0)))
    rows = history(space, 30, seed=2)
    s = replace(SETTINGS, parallel="thompson")
    rng = np.random.default_rng(6)
    t, c = t_c(rows)
    a = suggest(space, rows, [], t, c, s, rng)
    assert a.hyperparameters is not None, a.reason
    b = suggest(space, rows, [Pb2Pending(t, c, a.hyperparameters)], t, c, s, rng)
    assert b.hyperparameters is not None and b.hyperparameters != a.hyperparameters
    assert a.reason.startswith("pb2 thompson: sample=")


def test_too_few_rows_falls_back() -> None:
    space = mixed_space()
    rows = history(space, 3)
    ch = suggest(space, rows, [], *t_c(rows), replace(SETTINGS, min_rows=4), np.random.default_rng(0))
    assert ch.hyperparameters is None
    assert ch.reason == "pb2 fallback: only 3 rows (need 4)"


def test_min_rows_by_default_grows_with_the_numbers_and_the_categorical_choices() -> None:
    """Two rows per numeric hyperparameter and per categorical choice, within [4, 32]: the mixed space
    (3 numbers, 3 optimizers) waits for 12 rows; an explicit minRows still wins."""
    space = mixed_space()
    assert auto_min_rows(space) == 12
    assert auto_min_rows(Space((Param("lr", "float", 1e-4, 1e-1, log=True),))) == 4
    assert auto_min_rows(Space((Param("a", "float", 0, 1), Param("b", "float", 0, 1)))) == 4
    assert auto_min_rows(Space((Param("a", "float", 0, 1),
                                Param("o", "categorical", choices=("sgd", "adam", "rmsprop"))))) == 8
    many = Space(tuple(Param(f"x{i}", "float", 0, 1) for i in range(40)))
    assert auto_min_rows(many) == 32
    rows = history(space, 11)
    ch = suggest(space, rows, [], *t_c(rows), SETTINGS, np.random.default_rng(0))
    assert ch.reason == "pb2 fallback: only 11 rows (need 12)"
    ch = suggest(space, rows, [], *t_c(rows), replace(SETTINGS, min_rows=4), np.random.default_rng(0))
    assert ch.hyperparameters is not None, ch.reason
    ch = suggest(space, history(space, 12), [], *t_c(history(space, 12)), SETTINGS, np.random.default_rng(0))
    assert ch.hyperparameters is not None, ch.reason


def test_min_rows_by_default_is_at_most_a_tenth_of_the_rows_the_run_produces() -> None:
    """A short run cannot wait for the space's rows: at 4 members and 5 segments (20 rows, the first
    round giving none) 8 rows were PBT's perturbation for most of its explore steps. At most a tenth of
    population x segments, at least 2; the measured setting (4 members, 20 segments: 80 rows) keeps 8."""
    cat = Space((Param("a", "float", 0, 1), Param("o", "categorical", choices=("sgd", "adam", "rmsprop"))))
    assert auto_min_rows(cat, 4, 20) == 8 and auto_min_rows(cat, 16, 5) == 8
    assert auto_min_rows(cat, 4, 10) == 4 and auto_min_rows(cat, 8, 5) == 4
    assert auto_min_rows(cat, 4, 5) == 2 and auto_min_rows(cat, 2, 5) == 2  # never below 2
    assert auto_min_rows(cat, 3, 20) == 6  # 6 of 60 rows
    many = Space(tuple(Param(f"x{i}", "float", 0, 1) for i in range(40)))
    assert auto_min_rows(many, 16, 20) == 32 and auto_min_rows(many, 4, 20) == 8


def test_nonfinite_rows_are_dropped_and_counted() -> None:
    space = mixed_space()
    rows = history(space, 20)
    bad_hp = dict(rows[0].hyperparameters, lr=math.nan)
    rows += [
        Pb2Row(t=5.0, c=math.nan, hyperparameters=rows[0].hyperparameters, rate=0.1),
        Pb2Row(t=5.0, c=0.1, hyperparameters=rows[0].hyperparameters, rate=math.inf),
        Pb2Row(t=math.inf, c=0.1, hyperparameters=rows[0].hyperparameters, rate=0.1),
        Pb2Row(t=5.0, c=0.1, hyperparameters=bad_hp, rate=0.1),
    ]
    ch = suggest(space, rows, [], 3000.0, 0.3, SETTINGS, np.random.default_rng(0))
    assert ch.hyperparameters is not None, ch.reason
    assert "dropped 4 non-finite" in ch.reason
    assert "rows=20/24" in ch.reason


def test_only_nonfinite_rows_falls_back_with_count() -> None:
    space = mixed_space()
    rows = [replace(r, rate=math.nan) for r in history(space, 10)]
    ch = suggest(space, rows, [], 100.0, 0.0, SETTINGS, np.random.default_rng(0))
    assert ch.hyperparameters is None
    assert ch.reason == "pb2 fallback: only 0 rows (need 12); dropped 10 non-finite"


def test_invalid_rows_and_pending_are_skipped() -> None:
    space = mixed_space()
    rows = history(space, 12)
    rows.append(Pb2Row(t=1.0, c=0.0, hyperparameters={"lr": 0.01}, rate=0.0))  # missing keys
    rows.append(Pb2Row(t=1.0, c=0.0, hyperparameters=dict(rows[0].hyperparameters, opt="lion"), rate=0.0))
    pend = [Pb2Pending(t=1.0, c=0.0, hyperparameters={"nope": 1}),
            Pb2Pending(t=math.nan, c=math.nan, hyperparameters=rows[0].hyperparameters)]
    ch = suggest(space, rows, pend, 400.0, 0.1, SETTINGS, np.random.default_rng(0))
    assert ch.hyperparameters is not None, ch.reason
    assert "dropped 2 invalid" in ch.reason
    assert "ignored 1 pending" in ch.reason and "pending=1" in ch.reason


def test_nonfinite_donor_falls_back() -> None:
    space = mixed_space()
    rows = history(space, 12)
    ch = suggest(space, rows, [], math.nan, 0.1, SETTINGS, np.random.default_rng(0))
    assert ch.hyperparameters is None and ch.reason.startswith("pb2 fallback: donor time/score not finite")


def test_forced_cholesky_failure_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    import scipy.linalg.lapack

    def broken(a: np.ndarray, lower: int = 0, clean: int = 1) -> tuple[np.ndarray, int]:
        return np.array(a), 1  # LAPACK's "leading minor 1 is not positive definite"

    monkeypatch.setattr(scipy.linalg.lapack, "dpotrf", broken)
    space = mixed_space()
    rows = history(space, 20)
    for mode in PARALLEL_MODES:
        ch = suggest(space, rows, [], *t_c(rows), replace(SETTINGS, parallel=mode), np.random.default_rng(0))
        assert ch.hyperparameters is None
        assert ch.reason.startswith("pb2 fallback: cholesky failed (matrix not PD)"), ch.reason


def test_unexpected_exception_never_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    from pbt_operator.core.pb2 import window

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("kaboom")

    monkeypatch.setattr(window, "fit", boom)
    space = mixed_space()
    rows = history(space, 20)
    ch = suggest(space, rows, [], *t_c(rows), SETTINGS, np.random.default_rng(0))
    assert ch == type(ch)(None, "pb2 fallback: RuntimeError: kaboom")


def test_unknown_mode_and_empty_space() -> None:
    rows = history(mixed_space(), 10)
    bad = suggest(mixed_space(), rows, [], 1.0, 0.0, replace(SETTINGS, parallel="nope"),  # type: ignore[arg-type]
                  np.random.default_rng(0))
    assert bad.hyperparameters is None and "unknown parallel mode" in bad.reason
    empty = suggest(Space(()), rows, [], 1.0, 0.0, SETTINGS, np.random.default_rng(0))
    assert empty.hyperparameters == {}


def test_identical_rows_do_not_break_the_gp() -> None:
    space = Space((Param("x", "float", 0.0, 1.0),))
    rows = [Pb2Row(t=0.0, c=0.0, hyperparameters={"x": 0.5}, rate=1.0) for _ in range(30)]
    ch = suggest(space, rows, [], 0.0, 0.0, SETTINGS, np.random.default_rng(0))
    assert ch.hyperparameters is not None, ch.reason
    assert 0.0 <= ch.hyperparameters["x"] <= 1.0


def test_categorical_only_and_large_categorical_spaces() -> None:
    small = Space((Param("opt", "categorical", choices=("a", "b", "c")),))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        hp = small.sample(rng)
        rows.append(Pb2Row(t=float(i), c=0.0, hyperparameters=hp, rate=1.0 if hp["opt"] == "b" else 0.0))
    picks = [suggest(small, rows, [], 30.0, 0.0, SETTINGS, np.random.default_rng(s)).hyperparameters
             for s in range(5)]
    assert all(p == {"opt": "b"} for p in picks)

    # 5^4 = 625 combinations: above the enumeration limit, sampled + hill climbing
    cats = [Param(f"c{j}", "categorical", choices=tuple("vwxyz")) for j in range(4)]
    big = Space((*cats, Param("x", "float", 0.0, 1.0)))
    rows = []
    for i in range(40):
        hp = big.sample(rng)
        good = sum(hp[f"c{j}"] == "x" for j in range(4))
        rows.append(Pb2Row(t=float(i), c=0.0, hyperparameters=hp, rate=float(good)))
    ch = suggest(big, rows, [], 40.0, 0.0, SETTINGS, np.random.default_rng(1))
    assert ch.hyperparameters is not None and big.contains(ch.hyperparameters), ch.reason


def test_window_and_subsampling_bound_the_gp() -> None:
    space = Space((Param("x", "float", 0.0, 1.0),))
    rows = history(space, 600)
    s = replace(SETTINGS, max_rows=50, window=10_000)
    ch = suggest(space, rows, [], *t_c(rows), s, np.random.default_rng(0))
    assert ch.hyperparameters is not None, ch.reason
    assert "rows=50/600" in ch.reason
    assert "window dropped" in ch.reason


def test_beta_schedule_grows_with_time_and_dimension() -> None:
    assert beta_theory(100, 3) > beta_theory(10, 3) > 0
    assert beta_theory(100, 10) > beta_theory(100, 3)
    assert beta_schedule(100, 3, kappa=2.0) == pytest.approx(2 * BETA_SCALE * beta_theory(100, 3))
    assert beta_schedule(100, 3, kappa=0.0) == 0.0


def test_pb2_learns_a_clear_optimum() -> None:
    """rate = -(x - 0.7)^2 in unit space: after 40 rows PB2 lands near 0.7 far more often than
    chance (a +-0.1 window holds 20% of uniform draws)."""
    space = Space((Param("x", "float", 0.0, 1.0),))
    hits = 0
    trials = 20
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        rows = []
        for i in range(40):
            x = float(rng.uniform())
            rows.append(Pb2Row(t=float(10 * (i // 8)), c=0.01 * i, hyperparameters={"x": x},
                               rate=-((x - 0.7) ** 2) + 0.01 * rng.standard_normal()))
        ch = suggest(space, rows, [], 50.0, 0.4, SETTINGS, np.random.default_rng(100 + seed))
        assert ch.hyperparameters is not None, ch.reason
        hits += abs(float(ch.hyperparameters["x"]) - 0.7) < 0.1
    assert hits >= 0.7 * trials, hits


def test_one_diverged_segment_does_not_blind_the_gp() -> None:
    """Rates of +-0.01 around a clear optimum, plus one segment that diverged (rate -1) far away:
    with mean/std scaling that one row owns the standard deviation and PB2 chooses almost at random
    (issue 14); winsorised rates keep it pointing at the optimum."""
    space = Space((Param("x", "float", 0.0, 1.0),))
    misses = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        rows = []
        for i in range(40):
            x = float(rng.uniform(0.0, 1.0))
            rate = 0.01 * (1.0 - 8.0 * (x - 0.7) ** 2) + 0.0005 * rng.standard_normal()
            rows.append(Pb2Row(t=float(10 * (i // 4)), c=0.0, hyperparameters={"x": x}, rate=rate))
        rows.append(Pb2Row(t=90.0, c=0.0, hyperparameters={"x": 0.02}, rate=-1.0))
        ch = suggest(space, rows, [], 100.0, 0.0, replace(SETTINGS, kappa=0.1), np.random.default_rng(seed))
        assert ch.hyperparameters is not None, ch.reason
        misses.append(abs(float(ch.hyperparameters["x"]) - 0.7))
    assert max(misses) < 0.12, misses


def test_a_plateau_of_equal_rates_keeps_their_order() -> None:
    from pbt_operator.core.pb2.data import robust_rates

    r = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.3, -5.0])
    out = robust_rates(r)
    assert np.all(np.isfinite(out)) and len(set(out[:5])) == 1
    assert out[6] < out[0] < out[5]
    wide = robust_rates(np.array([0.01, -0.01, 0.02, 0.0, -1.0]))
    assert wide.min() > -0.1  # the diverged rate is clipped to a few MADs below the median


def test_last_segment_is_greedy_and_earlier_ones_explore() -> None:
    """Budget-aware exploration: on a member's last segment beta is 0 (the posterior mean's argmax,
    whatever kappa says); with segments left the exploration weight is the schedule's."""
    from pbt_operator.core.pb2.decide import budget_factor

    assert budget_factor(1) == 0.0 and budget_factor(2) < budget_factor(3) < budget_factor(4) == 1.0
    assert budget_factor(None) == 1.0 and budget_factor(50) == 1.0
    space = mixed_space()
    rows = history(space, 30)
    greedy = suggest(space, rows, [], *t_c(rows), replace(SETTINGS, kappa=0.0), np.random.default_rng(3))
    last = suggest(space, rows, [], *t_c(rows), replace(SETTINGS, kappa=25.0), np.random.default_rng(3), remaining=1)
    early = suggest(space, rows, [], *t_c(rows), replace(SETTINGS, kappa=25.0), np.random.default_rng(3), remaining=10)
    assert last.hyperparameters == greedy.hyperparameters and "beta=0 " in last.reason
    assert early.hyperparameters != greedy.hyperparameters
    ts = suggest(space, rows, [], *t_c(rows), replace(SETTINGS, parallel="thompson"), np.random.default_rng(3),
                 remaining=1)
    assert ts.reason.startswith("pb2 thompson: ucb=") and "beta=0 " in ts.reason


def test_randomized_draws_its_own_exploration_weight() -> None:
    space = mixed_space()
    rows = history(space, 30)
    pend = [Pb2Pending(t=1000.0, c=0.3, hyperparameters=space.sample(np.random.default_rng(9)))]
    s = replace(SETTINGS, parallel="randomized")
    betas = set()
    for seed in range(6):
        ch = suggest(space, rows, pend, *t_c(rows), s, np.random.default_rng(seed))
        assert ch.hyperparameters is not None and space.contains(ch.hyperparameters), ch.reason
        betas.add(ch.reason.split("beta=")[1].split()[0])
    assert len(betas) == 6


def test_trust_region_keeps_numeric_choices_near_the_donor() -> None:
    """The acquisition searches +- trust_region (unit space) around the donor's configuration; with 1
    it searches everywhere and finds the far optimum."""
    space = Space((Param("x", "float", 0.0, 1.0), Param("y", "float", 0.0, 1.0)))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        x, y = float(rng.uniform()), float(rng.uniform())
        rows.append(Pb2Row(t=float(10 * (i // 4)), c=0.0, hyperparameters={"x": x, "y": y},
                           rate=-((x - 0.9) ** 2 + (y - 0.9) ** 2) + 0.001 * rng.standard_normal()))
    center = {"x": 0.2, "y": 0.3}
    near = suggest(space, rows, [], 100.0, 0.0, replace(SETTINGS, trust_region=0.25), np.random.default_rng(1),
                   center=center)
    assert near.hyperparameters is not None, near.reason
    assert abs(near.hyperparameters["x"] - 0.2) <= 0.25 + 1e-9 and abs(near.hyperparameters["y"] - 0.3) <= 0.25 + 1e-9
    assert near.hyperparameters["x"] > 0.3  # it still moves towards the optimum, to the region's edge
    far = suggest(space, rows, [], 100.0, 0.0, replace(SETTINGS, trust_region=1.0), np.random.default_rng(1),
                  center=center)
    assert far.hyperparameters is not None and far.hyperparameters["x"] > 0.6


def test_trust_region_holds_when_the_category_changes() -> None:
    """A switch of category keeps the numeric box: freed, the acquisition went to the corners of the
    range, where a category it knows little about has the largest uncertainty."""
    from pbt_operator.core.pb2.acquisition import Region

    region = Region.around(np.array([0.2, 0.5]), 0.25)
    lo, hi = region.bounds(np.array([[1], [0], [2]]))
    np.testing.assert_allclose(lo, [[0.0, 0.25]] * 3)
    np.testing.assert_allclose(hi, [[0.45, 0.75]] * 3)


def test_a_category_switch_stays_near_the_donors_numbers() -> None:
    """History only in category a, which has stopped paying; b is unknown. PB2 switches to b, at a
    learning rate within the trust region of the donor's, not at a corner of the range."""
    space = Space((Param("lr", "float", 1e-5, 1.0, log=True), Param("opt", "categorical", choices=("a", "b"))))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        lr = float(10 ** rng.uniform(-3.5, -2.5))
        rows.append(Pb2Row(t=float(10 * (i // 4)), c=0.0, hyperparameters={"lr": lr, "opt": "a"},
                           rate=-1.0 + 0.01 * rng.standard_normal()))
    center = {"lr": 1e-3, "opt": "a"}
    for seed in range(4):
        ch = suggest(space, rows, [], 100.0, 0.0, SETTINGS, np.random.default_rng(seed), center=center)
        assert ch.hyperparameters is not None, ch.reason
        if ch.hyperparameters["opt"] == "b":
            u = space["lr"].to_unit(ch.hyperparameters["lr"])
            assert abs(u - space["lr"].to_unit(1e-3)) <= 0.25 + 1e-9, ch.hyperparameters
