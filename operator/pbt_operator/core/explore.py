"""Explore: new hyperparameters for a member that just copied a donor's weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

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
    base = dict(donor)
    notes: list[str] = []
    if crossover and second is not None and strategy != "pb2":
        base = space.crossover(donor, second, rng)
        notes.append("crossover")
    if strategy == "resample":
        out = space.sample(rng)
        notes.append("resample")
    elif strategy == "pb2" and pb2 is not None:
        choice, why = pb2()
        if choice is None:
            out = space.perturb(base, rng, factors, resample_probability)
            notes.append(f"{why}; perturb")
        else:
            out = choice
            notes.append(why)
            if crossover and second is not None:
                out = space.crossover(out, second, rng)
                notes.append("crossover with second parent")
    else:
        out = space.perturb(base, rng, factors, resample_probability)
        notes.append("perturb")
    return space.clip(out), "; ".join(notes)


def describe_change(old: Mapping[str, Value], new: Mapping[str, Value]) -> str:
    """'lr 0.01->0.012, opt sgd->adam' for Events and logs."""
    parts = [f"{k} {_fmt(old.get(k))}->{_fmt(v)}" for k, v in new.items() if old.get(k) != v]
    return ", ".join(parts) if parts else "unchanged"


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


__all__ = ["Pb2Settings", "describe_change", "explore"]
