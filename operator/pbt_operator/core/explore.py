"""Explore: new hyperparameters for a member that just copied a donor's weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .choices import EXPLORE_STRATEGIES, check_table
from .display import describe_change  # re-exported: its old home
from .space import Space, Value
from .types import Pb2Settings

Pb2Fn = Callable[[], "tuple[dict[str, Value] | None, str]"]


def explore(
    space: Space,
    strategy: str,
    donor: Mapping[str, Value],
    second: Mapping[str, Value] | None,
    rng: np.random.Generator,
    *,
    factors: tuple[float, ...] = (0.8, 1.2),
    resample_probability: float = 0.25,
    crossover: bool = False,
    pb2: Pb2Fn | None = None,
) -> tuple[dict[str, Value], str]:
    """Return (hyperparameters, reason).

    With `crossover`, perturb/resample start from a uniform crossover of the two parents; for pb2 the
    crossover mixes PB2's proposal with the second parent, so the bandit's choice still dominates
    half the coordinates on average while good values of another top member can spread.
    """
    fn = _STRATEGIES.get(strategy)
    if fn is None:  # the spec refuses it at parse time: reaching here is a bug, not a reason to perturb
        raise ValueError(f"unknown explore strategy {strategy!r} (one of: {', '.join(EXPLORE_STRATEGIES)})")
    base = dict(donor)
    notes: list[str] = []
    if crossover and second is not None and strategy != "pb2":
        base = space.crossover(donor, second, rng)
        notes.append("crossover")
    out = fn(_Step(space, base, second, rng, factors, resample_probability, crossover, pb2, notes))
    return space.clip(out), "; ".join(notes)


@dataclass
class _Step:
    """One explore step's inputs, and the notes that become the decision's explore reason."""

    space: Space
    base: dict[str, Value]
    second: Mapping[str, Value] | None
    rng: np.random.Generator
    factors: tuple[float, ...]
    resample_probability: float
    crossover: bool
    pb2: Pb2Fn | None
    notes: list[str]


def _perturb(x: _Step) -> dict[str, Value]:
    x.notes.append("perturb")
    return x.space.perturb(x.base, x.rng, x.factors, x.resample_probability)


def _resample(x: _Step) -> dict[str, Value]:
    x.notes.append("resample")
    return x.space.sample(x.rng)


def _pb2(x: _Step) -> dict[str, Value]:
    choice, why = x.pb2() if x.pb2 is not None else (None, "pb2 not available here")
    if choice is None:
        x.notes.append(f"{why}; perturb")
        return x.space.perturb(x.base, x.rng, x.factors, x.resample_probability)
    x.notes.append(why)
    if x.crossover and x.second is not None:
        x.notes.append("crossover with second parent")
        return x.space.crossover(choice, x.second, x.rng)
    return choice


_STRATEGIES: dict[str, Callable[[_Step], dict[str, Value]]] = {
    "perturb": _perturb, "resample": _resample, "pb2": _pb2,
}
check_table("explore strategies", _STRATEGIES, EXPLORE_STRATEGIES)


__all__ = ["Pb2Settings", "describe_change", "explore"]
