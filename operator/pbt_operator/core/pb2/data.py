"""PB2's inputs: the records the engine hands over, and their encoding into arrays for the GP.

One row per finished segment. The GP's inputs are (time, score before the segment, hyperparameters)
and its target is the improvement rate, exactly as on the "PBT + BO" slides: the score before the
segment is an input because improvement depends strongly on how good the model already is.

Cost is bounded here, before anything is encoded: the scalars of every row are read once (cheap),
then a time window and a subsample of at most `max_rows` rows are chosen, and only those rows'
hyperparameter dicts are touched. A decision therefore costs about the same at 10 000 rows as at 500.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..space import Param, Space, Value
from ..types import Pb2Settings

# Share of the `max_rows` budget given to the most recent rows; the rest is a uniform random sample
# of older rows, so that regions of the space visited long ago are not forgotten entirely (the time
# kernel decides how much they still count).
RECENT_FRACTION = 0.75
# Pending points beyond this many are ignored (the newest by time are kept): each one is one more
# row in the GP, and a population is rarely larger.
MAX_PENDING = 64
# Rates further than this many robust standard deviations (MADs) from the median are clipped.
WINSOR_K = 3.0


@dataclass(frozen=True)
class Pb2Row:
    """One finished segment.

    `t` is the step count at the start of the segment, `c` the score before it (for an exploited
    member: the donor's score; already "higher is better"), `rate` = (c(t) - c(t-1)) / dt.
    """

    t: float
    c: float
    hyperparameters: Mapping[str, Value]
    rate: float


@dataclass(frozen=True)
class Pb2Pending:
    """A segment that is running, or decided but not finished: its outcome is unknown."""

    t: float
    c: float
    hyperparameters: Mapping[str, Value]


@dataclass(frozen=True)
class Pb2Choice:
    """PB2's answer. `hyperparameters` is None when PB2 declines; the engine then perturbs."""

    hyperparameters: dict[str, Value] | None
    reason: str


class Pb2Fallback(Exception):
    """Raised inside the package when PB2 must decline; `suggest` turns it into a Pb2Choice(None)."""


@dataclass(frozen=True)
class Encoded:
    """GP inputs for a set of points.

    tau: (n,) time normalised to [0, 1] over the data window.
    x:   (n, 1 + p) continuous inputs: column 0 is the normalised score c, then the p numeric
         hyperparameters in the unit space of `Param.to_unit` (log-scaled ones in log space).
    h:   (n, q) integer index of each categorical hyperparameter's choice.
    """

    tau: np.ndarray
    x: np.ndarray
    h: np.ndarray

    def __len__(self) -> int:
        return int(self.tau.shape[0])

    def take(self, idx: np.ndarray) -> Encoded:
        return Encoded(self.tau[idx], self.x[idx], self.h[idx])

    @staticmethod
    def concat(a: Encoded, b: Encoded) -> Encoded:
        return Encoded(
            np.concatenate([a.tau, b.tau]), np.vstack([a.x, b.x]), np.vstack([a.h, b.h])
        )


@dataclass(frozen=True)
class Affine:
    """x -> (x - lo) / span, with span 1 when the data has no spread (everything maps to 0)."""

    lo: float
    span: float

    @staticmethod
    def fit(values: np.ndarray) -> Affine:
        lo = float(np.min(values))
        span = float(np.max(values)) - lo
        return Affine(lo, span if span > 0.0 and math.isfinite(span) else 1.0)

    def __call__(self, v: np.ndarray | float) -> np.ndarray:
        return (np.asarray(v, dtype=float) - self.lo) / self.span


@dataclass(frozen=True)
class Prepared:
    """Everything the GP and the acquisition need, already normalised."""

    rows: Encoded
    y: np.ndarray  # standardised rates
    y_mean: float
    y_std: float
    pending: Encoded
    query_tau: float
    query_c: float
    n_total: int  # rows handed in
    n_valid: int  # rows with finite scalars, inside the window
    dropped_nonfinite: int
    dropped_invalid: int
    ignored_pending: int
    notes: list[str] = field(default_factory=list)


def _as_float(v: object) -> float:
    if isinstance(v, bool):
        raise TypeError("bool is not a number")
    return float(v)  # type: ignore[arg-type]


def _scalar_columns(rows: Sequence[Pb2Row]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t, c, rate, ok) for every row; ok is False where a scalar is missing, not a number or not
    finite. One vectorised pass (a per-row pass only if some row holds a non-number); no
    hyperparameter dict is touched."""
    n = len(rows)
    try:
        arr = np.array([(row.t, row.c, row.rate) for row in rows], dtype=float).reshape(n, 3)
    except (TypeError, ValueError, AttributeError):
        arr = np.empty((n, 3))
        for i, row in enumerate(rows):
            try:
                arr[i] = (_as_float(row.t), _as_float(row.c), _as_float(row.rate))
            except (TypeError, ValueError, AttributeError):
                arr[i] = math.nan
    t, c, r = arr[:, 0].copy(), arr[:, 1].copy(), arr[:, 2].copy()
    with np.errstate(invalid="ignore"):
        ok = np.all(np.isfinite(arr), axis=1)
    return t, c, r, ok


def select_rows(t: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    """Indices (into `t`) of at most `max_rows` rows, in increasing time order.

    Keeps the most recent `RECENT_FRACTION * max_rows` rows (by t, ties by position: later rows are
    newer) and fills the remaining budget with a uniform random sample of the older ones, drawn from
    `rng` so that the choice is reproducible.
    """
    n = t.shape[0]
    budget = max(1, int(max_rows))
    order = np.argsort(t, kind="stable")
    if n <= budget:
        return order
    n_recent = max(1, int(round(RECENT_FRACTION * budget)))
    recent = order[n - n_recent :]
    older = order[: n - n_recent]
    n_old = min(budget - n_recent, older.shape[0])
    if n_old > 0:
        picked = np.sort(rng.choice(older.shape[0], size=n_old, replace=False))
        keep = np.concatenate([older[picked], recent])
    else:
        keep = recent
    return keep


def unit_columns(space: Space, hps: Sequence[Mapping[str, Value]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, h, status) for hyperparameter dicts: status 0 ok, 1 non-finite numeric, 2 invalid.

    Column by column with numpy (the per-value `Param.to_unit` calls cost more than the GP at
    a few hundred rows); a column that does not convert cleanly is redone row by row, so one bad
    row only costs itself.
    """
    numeric = space.numeric
    cats = space.categorical
    n = len(hps)
    u = np.zeros((n, len(numeric)))
    h = np.zeros((n, len(cats)), dtype=np.int64)
    status = np.zeros(n, dtype=np.int64)
    for j, p in enumerate(numeric):
        try:
            col = np.array([hp[p.name] for hp in hps], dtype=float).reshape(n)
        except (KeyError, TypeError, ValueError, AttributeError):
            col = np.empty(n)
            for i, hp in enumerate(hps):
                try:
                    col[i] = _as_float(hp[p.name])
                except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
                    col[i] = 0.0
                    status[i] = 2
        with np.errstate(all="ignore"):
            u[:, j] = _to_unit(p, col)
    for j, p in enumerate(cats):
        index = {v: i for i, v in reversed(list(enumerate(p.choices)))}
        for i, hp in enumerate(hps):
            try:
                h[i, j] = index[hp[p.name]]
            except (KeyError, TypeError, AttributeError):
                status[i] = 2
    with np.errstate(invalid="ignore"):
        bad = ~np.all(np.isfinite(u), axis=1)
    status[(status == 0) & bad] = 1
    u[bad] = 0.0
    # Values outside the bounds (a stale config from an older spec) are clamped, not rejected.
    np.clip(u, 0.0, 1.0, out=u)
    return u, h, status


def _to_unit(p: Param, v: np.ndarray) -> np.ndarray:
    """Vectorised `Param.to_unit` (same formula; non-positive values of a log param become NaN)."""
    lo, hi = float(p.low), float(p.high)
    if hi == lo:
        return np.where(np.isfinite(v), 0.5, np.nan)
    if p.log:
        with np.errstate(divide="ignore", invalid="ignore"):
            return (np.log(np.where(v > 0, v, np.nan)) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return (v - lo) / (hi - lo)


def prepare(
    space: Space,
    rows: Sequence[Pb2Row],
    pending: Sequence[Pb2Pending],
    t: float,
    c: float,
    settings: Pb2Settings,
    rng: np.random.Generator,
) -> Prepared:
    """Clean, window, subsample, encode and normalise. Raises Pb2Fallback when too little is left.

    Rows with a non-finite t, c or rate are dropped and counted; the hyperparameter dicts are
    validated only for the rows the subsample keeps (that is what bounds the cost), so a row with a
    NaN hyperparameter is counted only when it was drawn. t and c are scaled to [0, 1] over the
    kept rows, the pending points and the donor together; rates are winsorised (`robust_rates`)
    and standardised.
    """
    try:
        qt, qc = _as_float(t), _as_float(c)
    except (TypeError, ValueError) as e:
        raise Pb2Fallback(f"donor time/score is not a number ({e})") from e
    if not (math.isfinite(qt) and math.isfinite(qc)):
        raise Pb2Fallback(f"donor time/score not finite (t={qt}, c={qc})")

    tt, cc, rr, ok = _scalar_columns(rows)
    dropped_nonfinite = int(np.count_nonzero(~ok))
    idx = np.flatnonzero(ok)
    notes: list[str] = []
    if settings.window is not None and idx.size:
        newest = float(np.max(tt[idx]))
        inside = tt[idx] >= newest - float(settings.window)
        if not np.all(inside):
            notes.append(f"window dropped {int(np.count_nonzero(~inside))}")
        idx = idx[inside]
    n_valid = int(idx.size)
    min_rows = min_rows_for(settings, space)
    if n_valid < min_rows:
        raise Pb2Fallback(_too_few(n_valid, min_rows, dropped_nonfinite, 0))

    keep = idx[select_rows(tt[idx], settings.max_rows, rng)]
    u, h, status = unit_columns(space, [rows[int(i)].hyperparameters for i in keep])
    dropped_nonfinite += int(np.count_nonzero(status == 1))
    dropped_invalid = int(np.count_nonzero(status == 2))
    good = status == 0
    keep, u, h = keep[good], u[good], h[good]
    if keep.size < min_rows:
        raise Pb2Fallback(_too_few(int(keep.size), min_rows, dropped_nonfinite, dropped_invalid))

    # Pending points: keep the newest MAX_PENDING; those whose config cannot be encoded are ignored.
    pend = list(pending)
    ignored = 0
    if len(pend) > MAX_PENDING:
        ignored += len(pend) - MAX_PENDING
        pend = sorted(pend, key=lambda p: _safe_t(p, qt))[-MAX_PENDING:]
    pu, ph, pstatus = unit_columns(space, [p.hyperparameters for p in pend])
    pgood = pstatus == 0
    ignored += int(np.count_nonzero(~pgood))
    pt = np.array([_safe_t(p, qt) for p in pend], dtype=float)[pgood]
    pc = np.array([_safe_c(p, qc) for p in pend], dtype=float)[pgood]
    pu, ph = pu[pgood], ph[pgood]

    t_rows, c_rows, r_rows = tt[keep], cc[keep], rr[keep]
    tnorm = Affine.fit(np.concatenate([t_rows, pt, [qt]]))
    cnorm = Affine.fit(np.concatenate([c_rows, pc, [qc]]))
    robust = robust_rates(r_rows)
    y_mean = float(np.mean(robust))
    y_std = float(np.std(robust))
    if not (y_std > 0.0 and math.isfinite(y_std)):
        y_std = 1.0
    y = (robust - y_mean) / y_std

    enc_rows = Encoded(tnorm(t_rows), np.column_stack([cnorm(c_rows), u]), h)
    enc_pend = Encoded(tnorm(pt), np.column_stack([cnorm(pc), pu]), ph)
    return Prepared(
        rows=enc_rows,
        y=y,
        y_mean=y_mean,
        y_std=y_std,
        pending=enc_pend,
        query_tau=float(tnorm(qt)),
        query_c=float(cnorm(qc)),
        n_total=len(rows),
        n_valid=n_valid,
        dropped_nonfinite=dropped_nonfinite,
        dropped_invalid=dropped_invalid,
        ignored_pending=ignored,
        notes=notes,
    )


def robust_rates(r: np.ndarray) -> np.ndarray:
    """Improvement rates with outliers tamed, before standardising.

    One diverged segment (a rate of -1 among rates of +-0.01) would otherwise own the standard
    deviation: every other row would sit within a few hundredths of a unit of the others, the GP
    would explain their differences as noise, and UCB would choose almost at random. Rates are
    therefore winsorised at median +- WINSOR_K MADs (scaled to a normal's standard deviation).
    When more than half the rates are equal (a plateau: MAD 0) they are replaced by their ranks
    (ties share one), which keeps the order and nothing else.
    """
    r = np.asarray(r, dtype=float)
    if r.size == 0:
        return r
    med = float(np.median(r))
    mad = 1.4826 * float(np.median(np.abs(r - med)))
    if mad > 0.0 and math.isfinite(mad):
        return np.clip(r, med - WINSOR_K * mad, med + WINSOR_K * mad)
    _, inverse = np.unique(r, return_inverse=True)
    return inverse.astype(float)


def _safe_t(p: Pb2Pending, default: float) -> float:
    try:
        v = _as_float(p.t)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def _safe_c(p: Pb2Pending, default: float) -> float:
    try:
        v = _as_float(p.c)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


AUTO_MIN_ROWS_CAP = 32
# The rule below was measured at 4 members and 20 segments, where its 8 rows for `cat-flip` are a tenth
# of the 80 rows the run produces. A run that produces fewer waits for a larger share of its budget:
# a member's first segment gives no row, and at 4 members and 5 segments, 8 rows meant PBT's
# perturbation for 39-65% of PB2's explore steps. So the rows asked for are at most a tenth of
# population x segments, and at least 2 (benchmarks/README.md, "minRows that follows the run's rows").
AUTO_MIN_ROWS_SHARE = 0.1


def auto_min_rows(space: Space, population: int | None = None, segments: int | None = None) -> int:
    """The default `minRows`: two rows per numeric hyperparameter and per categorical choice, at
    least 4 (the old fixed default, unchanged for up to two numeric hyperparameters without
    categoricals) and at most 32 (a quarter of `maxRows`: beyond that PB2 would rarely engage).

    Why: the usual initial design of Bayesian optimisation grows with the dimension, and a GP with
    fewer rows than it has length scales explains every difference as noise. Categoricals weigh
    more: the overlap kernel knows nothing of a choice no row has tried, so with a handful of rows
    UCB's uncertainty sends PB2 to untried choices at arbitrary numbers; PBT's perturbation walks the
    choices meanwhile. Measured (benchmarks/README.md, "Fourth round"): on `cat-flip` (one number,
    three optimizers: 8 rows) median final / limit 0.667 -> 0.697 at population 4 and 0.790 -> 0.817
    at 8 over 60 seeds; every benchmark problem without categoricals keeps 4 and decides exactly as
    before."""
    need = min(AUTO_MIN_ROWS_CAP, max(4, 2 * (len(space.numeric) + sum(len(p.choices) for p in space.categorical))))
    if population is not None and segments is not None:
        need = min(need, max(2, math.floor(AUTO_MIN_ROWS_SHARE * population * segments + 0.5)))
    return need


def min_rows_for(settings: Pb2Settings, space: Space) -> int:
    """The rows PB2 needs before it engages: `minRows` as written, else `auto_min_rows(space)`."""
    return max(1, int(settings.min_rows)) if settings.min_rows is not None else auto_min_rows(space)


def _too_few(have: int, need: int, nonfinite: int, invalid: int) -> str:
    extra = []
    if nonfinite:
        extra.append(f"dropped {nonfinite} non-finite")
    if invalid:
        extra.append(f"dropped {invalid} invalid")
    tail = f"; {', '.join(extra)}" if extra else ""
    return f"only {have} rows (need {need}){tail}"


def decode(space: Space, u: np.ndarray, h: np.ndarray) -> dict[str, Value]:
    """Unit-space point + categorical indices -> a config inside the space (ints are ints)."""
    cats = {p.name: p.choices[int(h[j])] for j, p in enumerate(space.categorical)}
    out = space.from_unit([float(v) for v in u], cats)
    return {p.name: _native(p, out[p.name]) for p in space.params}


def _native(p: Param, v: Value) -> Value:
    """Plain Python types: ints as int, floats as float (never numpy scalars)."""
    if p.kind == "int":
        return int(v)
    if p.kind == "float":
        return float(v)
    return v
