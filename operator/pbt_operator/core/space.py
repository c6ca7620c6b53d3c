"""Search spaces: the only place that knows how a hyperparameter moves.

Every operator of the algorithm (sampling, perturbation, resampling, PB2's normalisation) goes through
`Space`, so bounds, integer rounding, log scales and categorical neighbourhoods are enforced in one
module and can be property-tested once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from .choices import ParamKind

Value = Union[float, int, str]  # noqa: UP007 (a runtime alias; py3.10 needs Union here)
Kind = ParamKind  # spec.hyperparameters.NAME.type (core/choices.py)


@dataclass(frozen=True)
class Param:
    """One hyperparameter: its kind, bounds (or choices) and how its first value is drawn."""

    name: str
    kind: Kind
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    choices: tuple[Value, ...] = ()
    initial: Value | None = None
    # Optional narrower initial distribution: a sub-range (numeric) or a subset of choices.
    initial_low: float | None = None
    initial_high: float | None = None
    initial_choices: tuple[Value, ...] = ()

    @property
    def numeric(self) -> bool:
        return self.kind != "categorical"

    # -- unit-interval mapping (numeric params only) -------------------------------------------
    def to_unit(self, value: float) -> float:
        lo, hi = self.low, self.high
        if hi == lo:
            return 0.5
        if self.log:
            return (math.log(float(value)) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return (float(value) - lo) / (hi - lo)

    def from_unit(self, u: float) -> float | int:
        u = min(1.0, max(0.0, float(u)))
        lo, hi = self.low, self.high
        if self.log:
            v = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        else:
            v = lo + u * (hi - lo)
        out = self.clip(v)
        assert not isinstance(out, str)  # numeric params only
        return out

    def clip(self, value: Value) -> Value:
        """Clamp into bounds; ints are rounded, categoricals must already be a choice."""
        if self.kind == "categorical":
            if value not in self.choices:
                raise ValueError(f"{self.name}: {value!r} is not one of {list(self.choices)}")
            return value
        v = min(self.high, max(self.low, float(value)))
        if self.kind == "int":
            r = int(round(v))
            return min(int(self.high), max(int(math.ceil(self.low)), r))
        return v

    def contains(self, value: object) -> bool:
        if self.kind == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int" and int(value) != value:
            return False
        return self.low <= float(value) <= self.high

    # -- random moves -------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator, *, initial: bool = False) -> Value:
        """Draw from the prior; with `initial`, honour the user's initial value or distribution."""
        if initial and self.initial is not None:
            return self.initial
        if self.kind == "categorical":
            pool = self.initial_choices if (initial and self.initial_choices) else self.choices
            return pool[int(rng.integers(len(pool)))]
        lo, hi = self.low, self.high
        if initial and self.initial_low is not None and self.initial_high is not None:
            lo, hi = self.initial_low, self.initial_high
        if self.log:
            v = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        elif self.kind == "int":
            v = float(rng.integers(int(math.ceil(lo)), int(math.floor(hi)) + 1))
        else:
            v = rng.uniform(lo, hi)
        return self.clip(v)

    def perturb(self, value: Value, factor: float, rng: np.random.Generator) -> Value:
        """Move one step: multiply (or shift, for zero-crossing linear ranges); categoricals go to a
        neighbouring choice. An int that would round back onto itself is moved by one unit so that a
        perturbation always explores."""
        if self.kind == "categorical":
            i = self.choices.index(value)
            n = len(self.choices)
            if n == 1:
                return value
            step = -1 if factor < 1.0 else 1
            j = i + step
            if j < 0 or j >= n:
                j = i - step
            return self.choices[j]
        v = float(value)
        if self.log or (self.low >= 0 and v != 0.0):
            new = v * factor
        else:
            new = v + (factor - 1.0) * (self.high - self.low)
        out = self.clip(new)
        if self.kind == "int" and out == int(v) and factor != 1.0:
            out = self.clip(int(v) + (1 if factor > 1.0 else -1))
        return out


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]
    _index: dict[str, Param] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {p.name: p for p in self.params})

    def __getitem__(self, name: str) -> Param:
        return self._index[name]

    def __len__(self) -> int:
        return len(self.params)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def numeric(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.numeric)

    @property
    def categorical(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.numeric)

    def sample(self, rng: np.random.Generator, *, initial: bool = False) -> dict[str, Value]:
        return {p.name: p.sample(rng, initial=initial) for p in self.params}

    def clip(self, values: Mapping[str, Value]) -> dict[str, Value]:
        return {p.name: p.clip(values[p.name]) for p in self.params}

    def contains(self, values: Mapping[str, object]) -> bool:
        return set(values) == set(self._index) and all(p.contains(values[p.name]) for p in self.params)

    def perturb(
        self,
        values: Mapping[str, Value],
        rng: np.random.Generator,
        factors: Sequence[float] = (0.8, 1.2),
        resample_probability: float = 0.0,
    ) -> dict[str, Value]:
        """PBT's explore step: each hyperparameter is resampled from its prior with the given
        probability, otherwise perturbed by a factor drawn from `factors`."""
        out: dict[str, Value] = {}
        for p in self.params:
            # Draw both numbers always so that one parameter's branch never shifts another's stream.
            r = rng.random()
            f = float(factors[int(rng.integers(len(factors)))])
            out[p.name] = p.sample(rng) if r < resample_probability else p.perturb(values[p.name], f, rng)
        return out

    def resample(self, rng: np.random.Generator) -> dict[str, Value]:
        return self.sample(rng)

    def crossover(
        self, a: Mapping[str, Value], b: Mapping[str, Value], rng: np.random.Generator
    ) -> dict[str, Value]:
        """Uniform crossover: the child takes each hyperparameter from one of its two parents."""
        return {p.name: (a[p.name] if rng.random() < 0.5 else b[p.name]) for p in self.params}

    # -- normalisation used by PB2 ------------------------------------------------------------
    def to_unit(self, values: Mapping[str, Value]) -> np.ndarray:
        """Numeric hyperparameters as a vector in [0, 1]^d (log-scaled ones in log space)."""
        return np.array([p.to_unit(values[p.name]) for p in self.numeric], dtype=float)  # type: ignore[arg-type]

    def from_unit(self, u: Sequence[float], categorical: Mapping[str, Value] | None = None) -> dict[str, Value]:
        out: dict[str, Value] = {}
        cats = dict(categorical or {})
        it = iter(u)
        for p in self.params:
            out[p.name] = p.from_unit(next(it)) if p.numeric else cats[p.name]
        return out

    def categorical_indices(self, values: Mapping[str, Value]) -> tuple[int, ...]:
        return tuple(p.choices.index(values[p.name]) for p in self.categorical)
