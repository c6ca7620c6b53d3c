"""Search spaces: every move (sample, perturb, resample, crossover, clip, unit mapping) stays inside the
space, for every kind of hyperparameter (float, log float, int, log int, categorical)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pbt_operator.core.explore import describe_change, explore
from pbt_operator.core.space import Param, Space

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------------
# strategies


@st.composite
def float_params(draw: st.DrawFn, name: str = "x") -> Param:
    log = draw(st.booleans())
    if log:
        low = draw(st.floats(1e-8, 1e3))
        high = low * draw(st.floats(1.001, 1e6))
    else:
        low = draw(st.floats(-1e3, 1e3))
        high = low + draw(st.floats(1e-3, 1e4))
    initial: Any = None
    ilo = ihi = None
    mode = draw(st.sampled_from(["none", "value", "range"]))
    if mode == "value":
        initial = draw(st.floats(low, high))
    elif mode == "range":
        a, b = sorted(draw(st.lists(st.floats(low, high), min_size=2, max_size=2, unique=True)))
        ilo, ihi = a, b
    return Param(name, "float", low=low, high=high, log=log, initial=initial, initial_low=ilo, initial_high=ihi)


@st.composite
def int_params(draw: st.DrawFn, name: str = "n") -> Param:
    log = draw(st.booleans())
    low = draw(st.integers(1, 100)) if log else draw(st.integers(-100, 100))
    high = low + draw(st.integers(1, 1000))
    initial: Any = None
    ilo = ihi = None
    mode = draw(st.sampled_from(["none", "value", "range"]))
    if mode == "value":
        initial = draw(st.integers(low, high))
    elif mode == "range":
        a = draw(st.integers(low, high - 1))
        ilo, ihi = float(a), float(draw(st.integers(a + 1, high)))
    return Param(name, "int", low=float(low), high=float(high), log=log, initial=initial,
                 initial_low=ilo, initial_high=ihi)


@st.composite
def cat_params(draw: st.DrawFn, name: str = "c") -> Param:
    choices = draw(st.lists(st.one_of(st.text("abcdef", min_size=1, max_size=3), st.integers(-5, 5)),
                            min_size=1, max_size=6, unique_by=lambda v: (type(v), v)))
    initial: Any = None
    ichoices: tuple[Any, ...] = ()
    mode = draw(st.sampled_from(["none", "value", "subset"]))
    if mode == "value":
        initial = draw(st.sampled_from(choices))
    elif mode == "subset":
        ichoices = tuple(draw(st.lists(st.sampled_from(choices), min_size=1, max_size=len(choices), unique=True)))
    return Param(name, "categorical", choices=tuple(choices), initial=initial, initial_choices=ichoices)


def any_param(name: str) -> st.SearchStrategy[Param]:
    return st.one_of(float_params(name), int_params(name), cat_params(name))


@st.composite
def spaces(draw: st.DrawFn) -> Space:
    n = draw(st.integers(1, 5))
    return Space(tuple(draw(any_param(f"p{i}")) for i in range(n)))


seeds = st.integers(0, 2**32 - 1)
factors_st = st.lists(st.floats(0.05, 5.0), min_size=1, max_size=4).map(tuple)


def check_value(p: Param, v: Any) -> None:
    assert p.contains(v), (p, v)
    if p.kind == "int":
        assert type(v) is int, (p, v)
    elif p.kind == "float":
        assert type(v) is float and math.isfinite(v), (p, v)
    else:
        assert v in p.choices


def check_values(space: Space, values: dict[str, Any]) -> None:
    assert space.contains(values), (space, values)
    for p in space.params:
        check_value(p, values[p.name])


# --------------------------------------------------------------------------------------------------
# properties


@SETTINGS
@given(spaces(), seeds)
def test_sample_within_space_and_initial_honoured(space: Space, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for initial in (False, True):
        values = space.sample(rng, initial=initial)
        check_values(space, values)
    init = space.sample(rng, initial=True)
    for p in space.params:
        v = init[p.name]
        if p.initial is not None:
            assert v == p.initial
        elif p.kind == "categorical" and p.initial_choices:
            assert v in p.initial_choices
        elif p.initial_low is not None and p.initial_high is not None:
            assert p.initial_low <= v <= p.initial_high or math.isclose(v, p.initial_high, rel_tol=1e-9) \
                or math.isclose(v, p.initial_low, rel_tol=1e-9)


@SETTINGS
@given(spaces(), seeds, factors_st, st.floats(0.0, 1.0))
def test_perturb_and_resample_stay_inside(space: Space, seed: int, factors: tuple[float, ...], p_resample: float) -> None:
    rng = np.random.default_rng(seed)
    values = space.sample(rng)
    for _ in range(20):  # a chain of perturbations, as along a long lineage
        values = space.perturb(values, rng, factors, p_resample)
        check_values(space, values)
    check_values(space, space.resample(rng))


@SETTINGS
@given(spaces(), seeds)
def test_crossover_takes_each_value_from_a_parent(space: Space, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = space.sample(rng), space.sample(rng)
    child = space.crossover(a, b, rng)
    check_values(space, child)
    for name in space.names:
        assert child[name] == a[name] or child[name] == b[name]


@SETTINGS
@given(spaces(), seeds, st.sampled_from(["perturb", "resample"]), st.booleans(), factors_st, st.floats(0.0, 1.0))
def test_explore_stays_inside(space: Space, seed: int, strategy: str, crossover: bool,
                              factors: tuple[float, ...], p: float) -> None:
    rng = np.random.default_rng(seed)
    donor, second = space.sample(rng), space.sample(rng)
    out, why = explore(space, strategy, donor, second, rng, factors=factors, resample_probability=p,
                       crossover=crossover)
    check_values(space, out)
    assert strategy in why
    assert ("crossover" in why) == crossover


@SETTINGS
@given(st.one_of(float_params(), int_params()), st.floats(allow_nan=False, allow_infinity=True))
def test_clip_numeric(p: Param, raw: float) -> None:
    check_value(p, p.clip(raw))


@SETTINGS
@given(cat_params(), seeds)
def test_clip_categorical(p: Param, seed: int) -> None:
    v = p.sample(np.random.default_rng(seed))
    assert p.clip(v) == v
    with pytest.raises(ValueError, match="is not one of"):
        p.clip(object())  # type: ignore[arg-type]


@SETTINGS
@given(st.one_of(float_params(), int_params()), seeds, st.floats(-1.0, 2.0))
def test_unit_mapping(p: Param, seed: int, u: float) -> None:
    check_value(p, p.from_unit(u))
    v = p.sample(np.random.default_rng(seed))
    x = p.to_unit(v)
    assert -1e-9 <= x <= 1 + 1e-9
    back = p.from_unit(x)
    if p.kind == "int":
        assert back == v
    else:
        assert math.isclose(back, v, rel_tol=1e-6, abs_tol=1e-9 * (p.high - p.low))


@SETTINGS
@given(spaces(), seeds)
def test_space_unit_roundtrip_keeps_categoricals(space: Space, seed: int) -> None:
    values = space.sample(np.random.default_rng(seed))
    u = space.to_unit(values)
    assert u.shape == (len(space.numeric),)
    cats = {p.name: values[p.name] for p in space.categorical}
    back = space.from_unit(u, cats)
    check_values(space, back)
    assert space.categorical_indices(back) == space.categorical_indices(values)


# --------------------------------------------------------------------------------------------------
# perturbation semantics


@SETTINGS
@given(float_params(), seeds, st.floats(0.1, 3.0))
def test_perturb_multiplies_log_and_positive_floats(p: Param, seed: int, f: float) -> None:
    rng = np.random.default_rng(seed)
    v = p.sample(rng)
    out = p.perturb(v, f, rng)
    if p.log or (p.low >= 0 and v != 0):
        assert out == p.clip(v * f)
    else:
        assert out == p.clip(v + (f - 1.0) * (p.high - p.low))


@SETTINGS
@given(int_params(), seeds, st.sampled_from([0.8, 1.2, 0.5, 2.0]))
def test_perturb_int_always_moves_unless_at_bound(p: Param, seed: int, f: float) -> None:
    rng = np.random.default_rng(seed)
    v = p.sample(rng)
    out = p.perturb(v, f, rng)
    check_value(p, out)
    at_bound = (f > 1 and v == int(p.high)) or (f < 1 and v == int(p.low))
    if not at_bound:
        assert out != v and (out > v) == (f > 1)


@SETTINGS
@given(cat_params(), seeds, st.sampled_from([0.8, 1.2]))
def test_perturb_categorical_moves_to_a_neighbour(p: Param, seed: int, f: float) -> None:
    rng = np.random.default_rng(seed)
    v = p.sample(rng)
    out = p.perturb(v, f, rng)
    if len(p.choices) == 1:
        assert out == v
    else:
        assert abs(p.choices.index(out) - p.choices.index(v)) == 1


def test_perturb_examples() -> None:
    rng = np.random.default_rng(0)
    lr = Param("lr", "float", low=1e-4, high=1e-1, log=True)
    assert lr.perturb(1e-2, 1.2, rng) == pytest.approx(1.2e-2)
    assert lr.perturb(1e-1, 1.2, rng) == 1e-1  # clipped at the bound
    mom = Param("m", "float", low=-1.0, high=1.0)  # zero-crossing range: shift by (f-1)*width
    assert mom.perturb(0.5, 1.2, rng) == pytest.approx(0.9)
    assert mom.perturb(-0.5, 0.8, rng) == pytest.approx(-0.9)
    n = Param("n", "int", low=1, high=100)
    assert n.perturb(3, 1.2, rng) == 4  # 3.6 rounds to 4
    assert n.perturb(2, 1.2, rng) == 3  # 2.4 would round back to 2: moved by one instead
    assert n.perturb(1, 0.8, rng) == 1  # at the lower bound
    opt = Param("opt", "categorical", choices=("sgd", "adam", "rmsprop"))
    assert opt.perturb("sgd", 0.8, rng) == "adam"  # no left neighbour: go right
    assert opt.perturb("adam", 0.8, rng) == "sgd"
    assert opt.perturb("adam", 1.2, rng) == "rmsprop"
    assert opt.perturb("rmsprop", 1.2, rng) == "adam"


def test_perturb_streams_do_not_shift_between_parameters() -> None:
    """Each parameter draws the same numbers whichever branch it takes, so one parameter's resample
    never changes another parameter's perturbation factor."""
    a = Param("a", "float", low=0.0, high=10.0)
    b = Param("b", "float", low=0.0, high=10.0)
    space = Space((a, b))
    vals = {"a": 5.0, "b": 5.0}
    out0 = space.perturb(vals, np.random.default_rng(1), (0.8, 1.2), 0.0)
    out1 = space.perturb(vals, np.random.default_rng(1), (0.8, 1.2), 1.0)  # everything resampled
    assert out0["b"] in (4.0, 6.0)
    assert out1 != out0
    # same seed, same probability: bit-identical
    assert space.perturb(vals, np.random.default_rng(1), (0.8, 1.2), 0.3) == \
        space.perturb(vals, np.random.default_rng(1), (0.8, 1.2), 0.3)


def test_contains_rejects_bad_values() -> None:
    n = Param("n", "int", low=0, high=5)
    assert n.contains(3) and not n.contains(2.5) and not n.contains(True) and not n.contains("3")
    assert not n.contains(6) and not n.contains(-1)
    space = Space((n, Param("c", "categorical", choices=("a", "b"))))
    assert space.contains({"n": 1, "c": "a"})
    assert not space.contains({"n": 1})  # missing name
    assert not space.contains({"n": 1, "c": "a", "extra": 1})  # unknown name
    assert not space.contains({"n": 1, "c": "z"})


def test_describe_change() -> None:
    assert describe_change({"lr": 0.01, "opt": "sgd"}, {"lr": 0.012, "opt": "adam"}) == "lr 0.01->0.012, opt sgd->adam"
    assert describe_change({"lr": 0.01}, {"lr": 0.01}) == "unchanged"
