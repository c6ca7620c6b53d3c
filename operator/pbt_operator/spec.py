"""The PopulationTraining spec: parsed and validated once, shared by `pbt run` and the operator.

Validation collects every problem rather than stopping at the first, and each message names the field
path, what is wrong and the value it got, e.g. ``spec.hyperparameters.lr.min: must be > 0 when log: true
(got -1)``. Unknown fields are errors: a typo such as ``popluation`` must never silently fall back to a
default and waste a GPU-day.
"""

from __future__ import annotations

import builtins
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .core.choices import (
    DIRECTIONS,
    EXECUTORS,
    EXPLOIT_STRATEGIES,
    EXPLORE_STRATEGIES,
    INLINE_POOLS,
    MODES,
    ON_EXHAUSTED,
    ON_SUSPEND,
    PARAM_KINDS,
    PB2_PARALLEL,
    STORAGE_SCHEMES,
    Direction,
    Executor,
    ExploitStrategy,
    ExploreStrategy,
    InlinePool,
    Mode,
    OnExhausted,
    OnSuspend,
    scheme_pattern,
)
from .core.display import shorten
from .core.space import Param, Space, Value
from .core.types import Pb2Settings

API_VERSION = "pbt.dev/v1alpha1"
OBJECT_META = ("name", "namespace", "labels", "annotations", "generateName", "uid", "resourceVersion", "generation",
               "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "ownerReferences",
               "finalizers", "managedFields", "selfLink")
KIND = "PopulationTraining"
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
# YAML 1.1 reads an unquoted key n, no, off (kubectl: also N, y, Y) as false and yes, on, y as true, so a
# hyperparameter written `n: {type: int, ...}` reached the worker as "false" and every segment failed
# with KeyError 'n'. No one names a hyperparameter true or false on purpose.
YAML_BOOL_NAMES = frozenset({"true", "false", "True", "False"})
YAML_BOOL_NAME_HINT = ("a hyperparameter named true or false is what YAML makes of an unquoted key such as n, no, off "
                       "(false) or y, yes, on (true): quote the name in the manifest (\"n\": {...})")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


class SpecError(ValueError):
    """A manifest that must not run. `problems` holds one line per field."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid PopulationTraining:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True)
class Objective:
    metric: str = "score"
    direction: Direction = "max"

    def internal(self, score: float) -> float:
        """Scores as the engine sees them: higher is always better."""
        return score if self.direction == "max" else -score


@dataclass(frozen=True)
class SegmentSpec:
    steps: int = 1
    # Trainer time: counted from the trainer container's start, never from the Job's creation, so
    # waiting for a node, an image or a queue does not eat it.
    timeout_seconds: int | None = None
    # How long an admitted segment may wait for its trainer to start (node, scheduling, image pull).
    pending_timeout_seconds: int | None = None
    # spec.suspend: segments already training finish, or are stopped and rerun later from their checkpoint.
    on_suspend: OnSuspend = "finish"
    # karpenter.sh/do-not-disrupt and cluster-autoscaler safe-to-evict=false on segment pods.
    protect_from_disruption: bool = True


@dataclass(frozen=True)
class Budget:
    segments: int = 10
    target_score: float | None = None
    patience: int | None = None


@dataclass(frozen=True)
class Significance:
    enabled: bool = False
    alpha: float = 0.05
    window: int = 4


@dataclass(frozen=True)
class Exploit:
    strategy: ExploitStrategy = "truncation"
    fraction: float = 0.25
    size: int = 2
    significance: Significance = field(default_factory=Significance)
    # The top fraction that donates (truncation); parse_spec fills it in: `fraction`, or PB2_DONORS with PB2.
    donors: float = 0.25


# Truncation's default fraction depends on the explore strategy: PB2 chooses hyperparameters only for the
# members that copy, so it needs more of them (at 0.5 its paired median gained on every non-stationary
# benchmark and on the quadratic, while PBT's perturbation lost on lr-schedule: benchmarks/README.md).
PB2_FRACTION = 0.5
# Below PB2_SMALL members, three quarters: every member but the best quarter re-decides. Paired over the
# benchmarks' seeds (benchmarks/README.md, "Ninth round"), that gained at 3, 4 and 6 members on every
# non-stationary problem and on the quadratic (0.02-0.16 of the limit, ties on the RL tasks), and lost
# the RL trap task at 8 and 16 (-0.11, -0.06), where the members left alone keep the diversity of weights
# that escapes the trap: a small population has too few members for that reserve to pay.
PB2_FRACTION_SMALL = 0.75
PB2_SMALL = 8
# Both were measured at 20 decisions per member. The fraction applies per decision, so a member's expected
# restarts over its budget grow with budget.segments: exploiting every iteration (100 segments), 0.75 made
# three of four members restart on one iteration's noisy score after almost every iteration, no
# configuration ran long enough to be judged, and PB2 fell behind PBT on every moving optimum; at PBT's 0.25
# it led again (benchmarks/README.md, "Outside the benchmark's setting"). So the default keeps a member's
# expected restarts near what was measured to pay (0.75 x 20 = 15), never below PBT's fraction: the same
# fraction up to 20 segments (30 from 8 members), then 15 / segments, 0.25 from 60 segments on.
PB2_RESTARTS = 15.0


# `retune` was measured at 20 segments (0.05 won over 0.025; benchmarks/README.md, "Retuning members that
# keep their weights"). It is a half-width per decision, so what a kept member's numbers can drift over
# its budget grows with budget.segments: exploiting every iteration (100 segments), 0.05 let a member that
# kept winning walk five times the range on one iteration's noisy rates, into a wall of the space on the RL
# reaching task (PB2 0.05 of the limit against PBT's 1.00 at 3 members), and cost the moving optima 0.03-0.09
# of the limit at 3, 4 and 8 members (benchmarks/README.md, "A retune that follows the number of
# segments"). So the default keeps the drift over the whole budget at what was measured (0.05 x 20 = 1, the
# whole unit range): 0.05 up to 20 segments, then 1 / segments. Never more: larger radii at 5 and 10
# segments measured within noise.
PB2_RETUNE_DRIFT = 1.0


def pb2_retune(segments: int) -> float:
    """`explore.pb2.retune`'s default for budget.segments (PB2_RETUNE_DRIFT says why)."""
    return min(Pb2Settings.retune, PB2_RETUNE_DRIFT / max(1, segments))


def pb2_fraction(population: int, segments: int) -> float:
    """`exploit.fraction`'s default with `explore: pb2` for this population and budget.segments
    (PB2_FRACTION_SMALL and PB2_RESTARTS say why)."""
    base = PB2_FRACTION_SMALL if population < PB2_SMALL else PB2_FRACTION
    return max(Exploit.fraction, min(base, PB2_RESTARTS / max(1, segments)))
# ... but the members that copy take the top quarter's checkpoints, not the top half's: the second-best
# of four is often far behind the best. Paired over the benchmarks' seeds (benchmarks/README.md, "Who
# donates"), donors from the top quarter gained 0.01-0.04 of the limit at populations 8 and 16 on every
# non-stationary problem and on the quadratic, and held at 4.
PB2_DONORS = 0.25


@dataclass(frozen=True)
class Explore:
    strategy: ExploreStrategy = "perturb"
    factors: tuple[float, ...] = (0.8, 1.2)
    resample_probability: float = 0.25
    crossover: bool = False
    pb2: Pb2Settings = field(default_factory=Pb2Settings)


@dataclass(frozen=True)
class FailurePolicy:
    max_retries: int = 2
    on_exhausted: OnExhausted = "replace"
    # Reruns after a disruption (preemption, eviction, node loss) per segment attempt; one more fails it.
    max_disruptions: int = 5


@dataclass(frozen=True)
class Storage:
    uri: str | None = None
    credentials_secret: str | None = None


@dataclass(frozen=True)
class Worker:
    executor: Executor = "process"
    command: tuple[str, ...] = ()
    function: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    inline_pool: InlinePool = "threads"
    warm: bool = True  # process executor: long-lived interpreters run segment after segment (local/warm.py)


@dataclass(frozen=True)
class TrainingSpec:
    name: str
    namespace: str | None
    population: int
    parallelism: int
    mode: Mode
    seed: int
    objective: Objective
    segment: SegmentSpec
    budget: Budget
    space: Space
    exploit: Exploit
    explore: Explore
    storage: Storage
    worker: Worker
    failure_policy: FailurePolicy
    template: Mapping[str, Any] | None = None
    base_dir: Path | None = None  # folder of the manifest; relative paths resolve against it
    suspend: bool = False  # Kubernetes: no new segments (spec.segment.onSuspend says what happens to running ones)
    queue_name: str | None = None  # Kubernetes: a Kueue LocalQueue for every segment Job
    job_labels: Mapping[str, str] = field(default_factory=dict)  # Kubernetes: extra labels on segment Jobs
    job_annotations: Mapping[str, str] = field(default_factory=dict)


# Names that other tuners (Ray Tune, Katib, Optuna, W&B sweeps) use for fields we spell differently: a
# user porting a search space meets these first, and a typo-distance match would not find them.
_PEER_NAMES = {
    "values": "choices", "options": "choices", "list": "choices", "categories": "choices",
    "low": "min", "lower": "min", "minimum": "min", "high": "max", "upper": "max", "maximum": "max",
    "scale": "log", "log_scale": "log", "logScale": "log", "distribution": "log",
    "steps": "segments", "iterations": "segments", "num_samples": "population", "size": "population",
    "quantile_fraction": "fraction", "perturbation_interval": "steps", "metric_name": "metric",
    "mode": "direction", "goal": "direction",
}
# How to write a field whose peers take a different value (`scale: log` is our `log: true`).
_PEER_HINTS = {"log": "`log: true` (a log scale)"}


def _is_choice(value: object, choices: Sequence[object]) -> bool:
    """`value in choices`, but a boolean is never the number 1 or 0 (True == 1 in Python)."""
    return any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices)


def _did_you_mean(key: str, allowed: Sequence[str]) -> str:
    """`; did you mean `x`?` for an unknown field, when a peer's name or a near spelling says which."""
    peer = _PEER_NAMES.get(key)
    if peer is not None and peer in allowed:
        return f"; did you mean {_PEER_HINTS.get(peer, f'`{peer}`')}?"
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.75)
    return f"; did you mean `{close[0]}`?" if close else ""


# --------------------------------------------------------------------------------------------------
class _Fields:
    """Reads one mapping, recording every problem with its full path."""

    def __init__(self, errors: list[str], path: str, data: object, allowed: Sequence[str]):
        self.errors = errors
        self.path = path
        self.ok = isinstance(data, Mapping)
        self.data: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
        if not self.ok:
            errors.append(f"{path}: must be a mapping (got {_show(data)})")
            return
        for key in self.data:
            if key not in allowed:
                errors.append(f"{path}.{key}: unknown field{_did_you_mean(str(key), allowed)}; allowed: {', '.join(allowed)}")

    def err(self, key: str, message: str) -> None:
        self.errors.append(f"{self.path}.{key}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str) -> Any:
        return self.data.get(key)

    def int(self, key: str, default: int | None, *, minimum: int | None = None, required: bool = False) -> Any:
        if not self.has(key):
            if required:
                self.err(key, "is required (an integer)")
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(key, f"must be an integer (got {_show(v)})")
            return default
        if minimum is not None and v < minimum:
            self.err(key, f"must be >= {minimum} (got {v})")
            return default
        return v

    def float(self, key: str, default: float | None, *, required: bool = False) -> Any:
        if not self.has(key):
            if required:
                self.err(key, "is required (a number)")
            return default
        v = self.data[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            self.err(key, f"must be a finite number (got {_show(v)})")
            return default
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        if not self.has(key):
            return default
        v = self.data[key]
        if not isinstance(v, bool):
            self.err(key, f"must be true or false (got {_show(v)})")
            return default
        return v

    def str(self, key: builtins.str, default: builtins.str | None, *, choices: Sequence[builtins.str] | None = None,
            required: builtins.bool = False) -> Any:
        if not self.has(key):
            if required:
                self.err(key, "is required" + (f" (one of: {', '.join(choices)})" if choices else ""))
            return default
        v = self.data[key]
        if not isinstance(v, str) or not v:
            self.err(key, f"must be a non-empty string (got {_show(v)})")
            return default
        if choices is not None and v not in choices:
            self.err(key, f"must be one of: {', '.join(choices)} (got {_show(v)})")
            return default
        return v

    def sub(self, key: builtins.str, allowed: Sequence[builtins.str]) -> _Fields:
        v = self.data.get(key)
        return _Fields(self.errors, f"{self.path}.{key}", {} if v is None else v, allowed)


def _show(v: object) -> str:
    s = repr(v) if isinstance(v, str) else str(v).replace("True", "true").replace("False", "false")
    return shorten(s, 60)


# --------------------------------------------------------------------------------------------------
def parse_manifest(doc: object, *, base_dir: Path | None = None, name: str | None = None,
                   name_field: str = "metadata.name") -> TrainingSpec:
    """Parse a whole PopulationTraining document (apiVersion/kind/metadata/spec). `name` replaces
    metadata.name; `name_field` is what a bad one is called in the message (`--name` for `pbt run`'s
    flag, which `pbt_operator.run` words as its `name` argument)."""
    errors: list[str] = []
    top = _Fields(errors, "manifest", doc, ("apiVersion", "kind", "metadata", "spec", "status"))
    if not top.ok:
        raise SpecError(errors)
    if top.raw("apiVersion") != API_VERSION:
        errors.append(f"apiVersion: must be {API_VERSION} (got {_show(top.raw('apiVersion'))})")
    if top.raw("kind") != KIND:
        errors.append(f"kind: must be {KIND} (got {_show(top.raw('kind'))})")
    meta = top.data.get("metadata")
    meta = {} if meta is None else meta
    if not isinstance(meta, Mapping):
        errors.append(f"metadata: must be a mapping (got {_show(meta)})")
        meta = {}
    # Kubernetes' ObjectMeta, all of it (a file saved with `kubectl get -o yaml` runs as it is): a typo such
    # as `lables` is refused, as kubectl's strict field validation does.
    _Fields(errors, "metadata", meta, OBJECT_META)
    override = name is not None  # an empty override is refused, not quietly replaced by metadata.name
    nm = name if override else meta.get("name")
    if not isinstance(nm, str) or not NAME_RE.match(nm) or len(nm) > 40:
        errors.append(
            f"{name_field if override else 'metadata.name'}: must be a DNS label of at most 40 characters (lower-case letters, digits, '-'), "
            f"got {_show(nm)}"
        )
        nm = "invalid"
    ns = meta.get("namespace")
    try:
        spec = parse_spec(top.data.get("spec"), name=nm, namespace=ns, base_dir=base_dir, errors=errors)
    except SpecError as e:
        raise SpecError(errors if errors else e.problems) from None
    if errors:
        raise SpecError(errors)
    return spec


def parse_spec(
    raw: object,
    *,
    name: str,
    namespace: str | None = None,
    base_dir: Path | None = None,
    errors: list[str] | None = None,
) -> TrainingSpec:
    errs: list[str] = [] if errors is None else errors
    start = len(errs)
    s = _Fields(
        errs, "spec", raw if raw is not None else None,
        ("population", "parallelism", "mode", "seed", "objective", "segment", "budget", "hyperparameters",
         "exploit", "explore", "storage", "worker", "template", "failurePolicy", "suspend", "queueName",
         "jobMetadata"),
    )
    if not s.ok:
        raise SpecError(errs)
    population = s.int("population", 4, required=True)
    if isinstance(population, int) and population < 2:
        s.err("population", f"must be >= 2: PBT needs members to exploit (got {population})")
    if isinstance(population, int) and population > 1000:
        s.err("population", f"must be <= 1000 (got {population})")
    # 0 pauses a training on a cluster (kubectl scale, an HPA or KEDA scaling to zero); `pbt run` refuses it.
    parallelism = s.int("parallelism", population, minimum=0)
    mode = s.str("mode", "asynchronous", choices=MODES)
    seed = s.int("seed", 0, minimum=0)

    o = s.sub("objective", ("metric", "direction"))
    objective = Objective(o.str("metric", "score"), o.str("direction", "max", choices=DIRECTIONS))

    g = s.sub("segment", ("steps", "timeoutSeconds", "pendingTimeoutSeconds", "onSuspend", "protectFromDisruption"))
    segment = SegmentSpec(g.int("steps", 1, minimum=1), g.int("timeoutSeconds", None, minimum=1),
                          g.int("pendingTimeoutSeconds", None, minimum=1),
                          g.str("onSuspend", "finish", choices=ON_SUSPEND), g.bool("protectFromDisruption", True))
    suspend = s.bool("suspend", False)
    queue_name = s.str("queueName", None)
    if queue_name is not None and not (NAME_RE.match(queue_name) and len(queue_name) <= 63):
        s.err("queueName", f"must be a Kueue LocalQueue name (a DNS label: lower-case letters, digits, '-') "
                           f"(got {_show(queue_name)})")
        queue_name = None
    jm = s.sub("jobMetadata", ("labels", "annotations"))
    job_labels = _string_map(jm, "labels", label_values=True)
    job_annotations = _string_map(jm, "annotations", label_values=False)
    named = job_labels.get(KUEUE_QUEUE_LABEL)
    if named is not None and queue_name is not None and named != queue_name:
        jm.err(f"labels.{KUEUE_QUEUE_LABEL}", f"names queue {_show(named)} but spec.queueName is "
                                              f"{_show(queue_name)}: give one of them")

    b = s.sub("budget", ("segments", "targetScore", "patience"))
    budget = Budget(b.int("segments", 10, minimum=1), b.float("targetScore", None), b.int("patience", None, minimum=1))

    space = _parse_space(errs, s.raw("hyperparameters"))

    e = s.sub("exploit", ("strategy", "fraction", "donorFraction", "size", "significance"))
    fraction = e.float("fraction", None)
    if fraction is not None and not (0.0 < fraction < 1.0):
        e.err("fraction", f"must be in (0, 1), and at most 1 - donorFraction (got {fraction})")
        fraction = None
    donors = e.float("donorFraction", None)
    if donors is not None and not (0.0 < donors <= 0.5):
        e.err("donorFraction", f"must be in (0, 0.5]: the top fraction that donates may not overlap the bottom "
                               f"fraction that copies (got {donors})")
        donors = None
    size = e.int("size", 2, minimum=2)
    # a population below 2 is refused above: a default size of 2 would only repeat that
    if isinstance(population, int) and population >= 2 and isinstance(size, int) and size > population:
        e.err("size", f"must be <= spec.population ({population}) (got {size})")
    sig = e.sub("significance", ("enabled", "alpha", "window"))
    alpha = sig.float("alpha", 0.05)
    if alpha is not None and not (0.0 < alpha < 1.0):
        sig.err("alpha", f"must be in (0, 1) (got {alpha})")
        alpha = 0.05
    exploit_strategy = e.str("strategy", "truncation", choices=EXPLOIT_STRATEGIES)
    exploit_significance = Significance(sig.bool("enabled", False), alpha, sig.int("window", 4, minimum=2))

    x = s.sub("explore", ("strategy", "factors", "resampleProbability", "crossover", "pb2"))
    factors = x.raw("factors")
    if factors is None:
        factors_t: tuple[float, ...] = (0.8, 1.2)
    elif (not isinstance(factors, list) or not factors
          or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors)):
        x.err("factors", f"must be a non-empty list of positive numbers, e.g. [0.8, 1.2] (got {_show(factors)})")
        factors_t = (0.8, 1.2)
    else:
        factors_t = tuple(float(f) for f in factors)
    rp = x.float("resampleProbability", 0.25)
    if rp is not None and not (0.0 <= rp <= 1.0):
        x.err("resampleProbability", f"must be in [0, 1] (got {rp})")
        rp = 0.25
    p = x.sub("pb2", ("parallel", "window", "maxRows", "minRows", "candidates", "restarts", "kappa", "trustRegion",
                               "retune"))
    kappa = p.float("kappa", 1.0)
    if kappa is not None and kappa < 0:
        p.err("kappa", f"must be >= 0 (got {kappa})")
        kappa = 1.0
    trust = p.float("trustRegion", Pb2Settings.trust_region)
    if trust is None or not (0.0 < trust <= 1.0):
        if trust is not None:
            p.err("trustRegion", f"must be in (0, 1]: a half-width in unit space, 1 for the whole space (got {trust})")
        trust = Pb2Settings.trust_region
    retune = p.float("retune", None)
    if retune is None or not (0.0 <= retune <= 1.0):
        if retune is not None:
            p.err("retune", f"must be in [0, 1]: a half-width in unit space, 0 to keep a winning member's "
                            f"configuration (got {retune})")
        retune = pb2_retune(budget.segments)
    pb2 = Pb2Settings(
        parallel=p.str("parallel", Pb2Settings.parallel, choices=PB2_PARALLEL),
        window=p.int("window", None, minimum=1),
        max_rows=p.int("maxRows", Pb2Settings.max_rows, minimum=8),
        min_rows=p.int("minRows", None, minimum=2),
        candidates=p.int("candidates", Pb2Settings.candidates, minimum=1),
        restarts=p.int("restarts", Pb2Settings.restarts, minimum=0),
        kappa=kappa,
        trust_region=trust,
        retune=retune,
    )
    explore = Explore(
        x.str("strategy", "perturb", choices=EXPLORE_STRATEGIES),
        factors_t, rp, x.bool("crossover", False), pb2,
    )
    # PB2 fits at most maxRows rows and engages only from minRows on: minRows > maxRows would quietly make
    # every PB2 decision PBT's perturbation.
    if isinstance(pb2.max_rows, int) and isinstance(pb2.min_rows, int) and pb2.min_rows > pb2.max_rows:
        p.err("minRows", f"must be <= maxRows ({pb2.max_rows}): PB2 fits at most maxRows rows, so with more "
                         f"required it would never engage and always perturb (got {pb2.min_rows})")
    elif explore.strategy == "pb2" and pb2.min_rows is None and isinstance(pb2.max_rows, int) and space.params:
        from .core.pb2.data import auto_min_rows

        need = auto_min_rows(space, population, budget.segments)
        if need > pb2.max_rows:
            p.err("maxRows", f"must be >= minRows, whose default for these hyperparameters is {need} (2 x (numeric "
                             f"hyperparameters + categorical choices), at most a tenth of population x "
                             f"budget.segments): PB2 would never engage and always "
                             f"perturb; raise maxRows or set minRows (got {pb2.max_rows})")
        else:
            pb2 = replace(pb2, min_rows=need)
            explore = replace(explore, pb2=pb2)
    if fraction is None:
        fraction = pb2_fraction(population, budget.segments) if explore.strategy == "pb2" else Exploit.fraction
        if explore.strategy == "pb2" and donors is not None:  # a default never collides with what was written
            fraction = min(fraction, 1.0 - donors)
    donors_given = donors is not None
    if donors is None:
        donors = min(fraction, PB2_DONORS) if explore.strategy == "pb2" else fraction
    if fraction + donors > 1.0 + 1e-9:
        # The bottom fraction that copies and the top fraction that donates may not overlap. Without
        # donorFraction the donors are the top `fraction` (PBT's rule), so `fraction` stays <= 0.5; with
        # PB2's top-quarter donors up to 0.75 of the population may copy (benchmarks/README.md, "Eighth round").
        unset = "" if donors_given else (
            ", its default here: the top `fraction` donates; set donorFraction (at most 0.5) to copy from a "
            "smaller top, or keep fraction <= 0.5")
        e.err("fraction", f"must be at most 1 - donorFraction: the bottom fraction that copies and the top "
                          f"fraction that donates may not overlap (got fraction {fraction}, donorFraction "
                          f"{donors}{unset})")
    exploit = Exploit(exploit_strategy, fraction, size, exploit_significance, donors)
    if explore.crossover and explore.strategy == "resample":
        # resample draws every value afresh from the prior: the crossed values would be thrown away
        # while the decision's reason still claimed a crossover.
        x.err("crossover", "has no effect with strategy: resample (every value is drawn afresh from the prior); "
                           "use strategy: perturb or pb2 with crossover, or crossover: false")

    st = s.sub("storage", ("uri", "credentialsSecret"))
    uri = st.str("uri", None)
    if uri is not None and not re.match(scheme_pattern(), uri):
        *head, last = [f"{x}://" for x in STORAGE_SCHEMES]
        st.err("uri", f"must start with {', '.join(head)} or {last} (got {_show(uri)})")
    if uri is not None and uri.startswith("s3://") and not re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/|$)", uri):
        st.err("uri", f"must be s3://BUCKET[/PREFIX] with a valid bucket name (got {_show(uri)})")
    storage = Storage(uri, st.str("credentialsSecret", None))

    w = s.sub("worker", ("executor", "command", "function", "env", "workingDir", "pool", "warm"))
    executor = w.str("executor", "process", choices=EXECUTORS)
    command = w.raw("command")
    command_t: tuple[str, ...] = ()
    if command is not None:
        if isinstance(command, str) and command.strip():
            example = "[" + ", ".join(command.split()) + "]"
            w.err("command", f"must be a list of strings, one per argument, e.g. {example} (got {_show(command)})")
        elif not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            w.err("command", f"must be a non-empty list of strings, e.g. [python, train.py] (got {_show(command)})")
        else:
            command_t = tuple(command)
    function = w.str("function", None)
    if function is not None and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", function):
        w.err("function", f"must look like module:function (got {_show(function)})")
    env = w.raw("env")
    env = {} if env is None else env
    if (isinstance(env, list) and env and all(isinstance(e, Mapping) and set(e) == {"name", "value"} for e in env)
            and len({e["name"] for e in env}) == len(env)):
        env = {e["name"]: e["value"] for e in env}  # a container's form ([{name, value}]), as in spec.template
    if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, (str, int, float)) and
                                                not isinstance(v, bool) for k, v in env.items()):
        w.err("env", f"must map names to strings, or list them as a container does ([{{name: A, value: '1'}}]; "
                     f"no valueFrom: pbt run reads no Secrets) (got {_show(env)})")
        env = {}
    template = s.raw("template")
    if template is not None and not isinstance(template, Mapping):
        s.err("template", f"must be a pod template mapping (got {_show(template)})")
        template = None
    if template is not None:
        _check_template(errs, template)
    if executor == "inline" and function is None:
        w.err("function", "is required when executor is inline (module:function)")
    if executor == "process" and command is None and template is None:  # (a bad command: said above)
        w.err("command", "is required when executor is process (or give spec.template with a container command)")
    pool = w.str("pool", "threads", choices=INLINE_POOLS)
    if uri is not None and uri.startswith("mem://") and (executor != "inline" or pool != "threads"):
        st.err("uri", f"mem:// keeps checkpoints in the runner's memory: it needs spec.worker.executor: inline "
                      f"with pool: threads (got executor: {executor}, pool: {pool}); use file:// or s3://")
    worker = Worker(
        executor, command_t, function, {str(k): str(v) for k, v in env.items()},
        w.str("workingDir", None), pool, w.bool("warm", True),
    )

    f = s.sub("failurePolicy", ("maxRetries", "onExhausted", "maxDisruptions"))
    failure = FailurePolicy(f.int("maxRetries", 2, minimum=0), f.str("onExhausted", "replace", choices=ON_EXHAUSTED),
                            f.int("maxDisruptions", 5, minimum=0))

    if len(errs) > start:
        raise SpecError(errs)
    return TrainingSpec(
        name=name, namespace=namespace, population=population, parallelism=parallelism, mode=mode, seed=seed,
        objective=objective, segment=segment, budget=budget, space=space, exploit=exploit, explore=explore,
        storage=storage, worker=worker, failure_policy=failure, template=template, base_dir=base_dir,
        suspend=suspend, queue_name=queue_name, job_labels=job_labels, job_annotations=job_annotations,
    )


DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"


def trainer_index(template: Mapping[str, Any]) -> int:
    """Index of the trainer in the template's containers (the default-container annotation, else 0):
    the container that gets the segment contract on a cluster, and whose command and GPU request
    `pbt run` reads."""
    containers = (template.get("spec") or {}).get("containers") or []
    want = ((template.get("metadata") or {}).get("annotations") or {}).get(DEFAULT_CONTAINER)
    for i, c in enumerate(containers):
        if want is not None and c.get("name") == want:
            return i
    return 0


LABEL_KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                          r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
OWN_PREFIX = "pbt.dev/"


def _string_map(f: _Fields, key: str, *, label_values: bool) -> dict[str, str]:
    """spec.jobMetadata.labels / annotations: Kubernetes keys (and label values), none of ours (pbt.dev/)."""
    raw = f.raw(key)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        f.err(key, f"must map names to strings (got {_show(raw)})")
        return {}
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not LABEL_KEY_RE.match(k) or len(k) > 316:
            f.err(f"{key}.{k}", "is not a valid Kubernetes key (optional DNS prefix/, then a name of at most 63 "
                                "characters: letters, digits, '-', '_', '.')")
        elif k.startswith(OWN_PREFIX):
            f.err(f"{key}.{k}", f"keys under {OWN_PREFIX} belong to the operator")
        elif label_values and (len(v) > 63 or not LABEL_VALUE_RE.match(v)):
            f.err(f"{key}.{k}", f"is not a valid label value (at most 63 letters, digits, '-', '_', '.'; got {_show(v)})")
        else:
            out[k] = v
    return out


def _check_template(errs: list[str], template: Mapping[str, Any]) -> None:
    spec = template.get("spec")
    containers = spec.get("containers") if isinstance(spec, Mapping) else None
    if not isinstance(containers, list) or not containers or not all(isinstance(c, Mapping) for c in containers):
        errs.append("spec.template.spec.containers: must be a non-empty list of containers")
        return
    # With sidecars, the trainer is named by the annotation kubectl also uses to pick a pod's main container.
    meta = template.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, Mapping) else None
    want = annotations.get(DEFAULT_CONTAINER) if isinstance(annotations, Mapping) else None
    names = [c.get("name") for c in containers]
    if want is not None and want not in names:
        errs.append(f"spec.template.metadata.annotations[{DEFAULT_CONTAINER}]: names the trainer container, but "
                    f"spec.template.spec.containers has no container {_show(want)} (have: {', '.join(map(str, names))})")


def _parse_space(errs: list[str], raw: object) -> Space:
    path = "spec.hyperparameters"
    if raw is None:
        errs.append(f"{path}: is required (a mapping of name -> {{type, min, max}} or {{type: categorical, choices}})")
        return Space(())
    if not isinstance(raw, Mapping):
        errs.append(f"{path}: must be a mapping of name -> definition (got {_show(raw)})")
        return Space(())
    if not raw:
        errs.append(f"{path}: must define at least one hyperparameter (got an empty mapping)")
        return Space(())
    params: list[Param] = []
    for pname, pdef in raw.items():
        if isinstance(pname, bool) or str(pname) in YAML_BOOL_NAMES:
            errs.append(f"{path}.{pname}: {YAML_BOOL_NAME_HINT}")
            continue
        p = _parse_param(errs, f"{path}.{pname}", str(pname), pdef)
        if p is not None:
            params.append(p)
    return Space(tuple(params))


def _parse_param(errs: list[str], path: str, name: str, raw: object) -> Param | None:
    if not PARAM_NAME_RE.match(name):
        errs.append(f"{path}: invalid hyperparameter name (letters, digits, '_', '-', '.'; got {_show(name)})")
    h = _Fields(errs, path, raw, ("type", "min", "max", "log", "choices", "initial"))
    if not h.ok:
        return None
    before = len(errs)
    kind = h.str("type", None, choices=PARAM_KINDS, required=True)
    if kind is None:
        return None
    initial = h.raw("initial")
    if kind == "categorical":
        for k in ("min", "max", "log"):
            if h.has(k):
                h.err(k, "is not allowed for type: categorical (use choices)")
        choices = h.raw("choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, (str, int, float)) for c in choices):
            h.err("choices", f"must be a non-empty list of strings, numbers or booleans (got {_show(choices)})")
            return None
        n_bool = sum(isinstance(c, bool) for c in choices)
        if 0 < n_bool < len(choices):
            # YAML reads yes/no/on/off/y/n as booleans too: `choices: [yes, no, maybe]` is two booleans and
            # a string; and True == 1, so a mix could not tell the two apart
            h.err("choices", f"must not mix booleans with other values (got {_show(choices)}); YAML reads "
                             f"true/false, yes/no, on/off, y/n as booleans: quote them to mean strings")
            return None
        if len(set(choices)) != len(choices):
            h.err("choices", f"must not repeat a value (got {_show(choices)})")
        init_v: Value | None = None
        init_choices: tuple[Value, ...] = ()
        if isinstance(initial, Mapping):
            ic = _Fields(errs, f"{path}.initial", initial, ("choices",))
            sub = ic.raw("choices")
            if not isinstance(sub, list) or not sub or not all(_is_choice(c, choices) for c in sub):
                ic.err("choices", f"must be a non-empty subset of {path}.choices (got {_show(sub)})")
            else:
                init_choices = tuple(sub)
        elif initial is not None:
            if not _is_choice(initial, choices):
                h.err("initial", f"must be one of {_show(choices)} (got {_show(initial)})")
            else:
                init_v = initial
        if len(errs) > before:
            return None
        return Param(name, "categorical", choices=tuple(choices), initial=init_v, initial_choices=init_choices)

    if h.has("choices"):
        h.err("choices", f"is only allowed for type: categorical (this is type: {kind})")
    lo = h.float("min", None, required=True)
    hi = h.float("max", None, required=True)
    log = h.bool("log", False)
    if lo is not None and hi is not None and lo >= hi:
        h.err("max", f"must be > min ({_num(lo)}) (got {_num(hi)})")
    elif lo is not None and hi is not None and not math.isfinite(hi - lo):
        # sampling and perturbing work on max - min: it must be a finite number too
        h.err("max", f"max - min must be a finite number (got [{_num(lo)}, {_num(hi)}]); narrow the range "
                     f"or use log: true with min > 0")
    if log and lo is not None and lo <= 0:
        h.err("min", f"must be > 0 when log: true (got {_num(lo)})")
    if kind == "int":
        for k, v in (("min", lo), ("max", hi)):
            if v is not None and v != int(v):
                h.err(k, f"must be an integer for type: int (got {_num(v)})")
    ilo = ihi = None
    ival: Value | None = None
    if isinstance(initial, Mapping):
        ir = _Fields(errs, f"{path}.initial", initial, ("min", "max"))
        ilo = ir.float("min", None, required=True)
        ihi = ir.float("max", None, required=True)
        if None not in (ilo, ihi, lo, hi) and not (lo <= ilo < ihi <= hi):
            ir.err("max", f"initial range must satisfy min <= initial.min < initial.max <= max "
                          f"(got [{_num(ilo)}, {_num(ihi)}] within [{_num(lo)}, {_num(hi)}])")
        if log and ilo is not None and ilo <= 0:
            ir.err("min", f"must be > 0 when log: true (got {_num(ilo)})")
        if kind == "int":
            for k, v in (("min", ilo), ("max", ihi)):
                if v is not None and v != int(v):
                    ir.err(k, f"must be an integer for type: int (got {_num(v)})")
    elif initial is not None:
        if isinstance(initial, bool) or not isinstance(initial, (int, float)):
            h.err("initial", f"must be a number or {{min, max}} (got {_show(initial)})")
        elif lo is not None and hi is not None and not (lo <= initial <= hi):
            h.err("initial", f"must be within [min, max] = [{_num(lo)}, {_num(hi)}] (got {_num(initial)})")
        elif kind == "int" and initial != int(initial):
            h.err("initial", f"must be an integer for type: int (got {_num(initial)})")
        else:
            ival = int(initial) if kind == "int" else float(initial)
    if len(errs) > before:
        return None
    assert lo is not None and hi is not None
    return Param(name, kind, low=lo, high=hi, log=log, initial=ival, initial_low=ilo, initial_high=ihi)


def _num(v: float | int | None) -> str:
    if v is None:
        return "null"
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _manifest_loader() -> type:
    """PyYAML's SafeLoader, read the way `kubectl apply` reads the same file (YAML 1.2 numbers, no
    repeated keys). PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string: `lr: {min: 1e-5}` would
    be refused as "must be a finite number" here while kubectl takes it as a number. And a key written
    twice would silently keep the last value (`population: 4` ... `population: 8`), where kubectl refuses
    the file."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: later keys override it
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:  # an unhashable key: the base class refuses it
                        continue
                    if first is not None:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key!r} appears twice in one mapping (first on line {first}); "
                                        "keep one", key_node.start_mark)
                    seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    # YAML 1.2's float forms that YAML 1.1 reads as strings: an exponent without a dot or without a sign.
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    return Loader


def read_manifest(path: str | Path) -> Mapping[str, Any]:
    """The PopulationTraining document of a YAML file. A file may hold other documents too (a Secret,
    as for `kubectl apply`), but only one PopulationTraining: `pbt run` runs one training."""
    import yaml

    p = Path(path)
    try:
        docs = [d for d in yaml.load_all(p.read_text(), Loader=_manifest_loader()) if d is not None]
    except FileNotFoundError:
        raise SpecError([f"{p}: no such file"]) from None
    except IsADirectoryError:
        raise SpecError([f"{p}: is a folder; give the manifest file in it"]) from None
    except OSError as e:
        raise SpecError([f"{p}: cannot read it ({e.strerror or e})"]) from None
    except UnicodeDecodeError as e:
        raise SpecError([f"{p}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    except yaml.YAMLError as e:
        raise SpecError([f"{p}: not valid YAML: {e}"]) from None
    trainings = [d for d in docs if isinstance(d, Mapping) and d.get("kind") == KIND]
    if len(trainings) > 1:
        names = ", ".join(str((d.get("metadata") or {}).get("name") if isinstance(d.get("metadata"), Mapping)
                              else None) for d in trainings)
        raise SpecError([f"{p}: holds {len(trainings)} PopulationTraining documents ({names}); `pbt run` "
                         "runs one training: put each in its own file"])
    docs = trainings or docs[:1]
    if not docs:
        raise SpecError([f"{p}: contains no PopulationTraining document"])
    return docs[0]


def load_manifest(path: str | Path, *, name: str | None = None) -> TrainingSpec:
    """Read a YAML manifest file (its PopulationTraining document, `read_manifest`); `name` overrides
    metadata.name."""
    p = Path(path)
    return parse_manifest(read_manifest(p), base_dir=p.resolve().parent, name=name)


def describe_search(spec: TrainingSpec) -> str:
    """The search a manifest asks for, with the defaults filled in, on one line for `pbt validate`.

    Why: several defaults depend on other fields (exploit.fraction and donorFraction, explore.pb2.retune
    and minRows on the population, budget.segments and the space), so neither the manifest nor
    `kubectl get -o yaml` shows what a training will use; this line does."""
    from .core.pb2.data import min_rows_for

    ex, xp = spec.exploit, spec.explore
    if ex.strategy == "truncation":
        exploit = f"truncation: the bottom {ex.fraction:g} copies the top {ex.donors:g}"
    elif ex.strategy == "tournament":
        exploit = f"tournament of {ex.size}"
    else:
        exploit = "none (members train alone)"
    if ex.significance.enabled:
        exploit += f", if Welch's test over {ex.significance.window} scores says so (alpha {ex.significance.alpha:g})"
    if xp.strategy == "pb2":
        p = xp.pb2
        explore = (f"pb2 ({p.parallel}, kappa {p.kappa:g}, trustRegion {p.trust_region:g}, retune {p.retune:g}, "
                   f"minRows {min_rows_for(p, spec.space)}{f', window {p.window}' if p.window is not None else ''})")
    elif xp.strategy == "perturb":
        explore = (f"perturb (factors {', '.join(f'{f:g}' for f in xp.factors)}, resampleProbability "
                   f"{xp.resample_probability:g})")
    else:
        explore = xp.strategy
    if xp.crossover:
        explore += " with crossover"
    return (f"{spec.population} members, {spec.parallelism} at a time, {spec.mode}; {spec.budget.segments} segments "
            f"of {spec.segment.steps} steps; exploit {exploit}; explore {explore}")
