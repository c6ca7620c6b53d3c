"""Every enumerated value a PopulationTraining may hold, written once.

Each set of allowed values is a `Literal` type (what the dataclasses in `spec.py` and `core/` are
annotated with) and a tuple derived from it (what code iterates). Everything else derives from these:
`spec.parse_spec` refuses any other value with the field's name, `kube/crds.py` builds the schema's
`enum`s (and the storage URI pattern) from them, the engine's dispatch tables are checked against them
when their module is imported (`check_table`), and a unit test checks that docs/manifest.md lists
exactly these values. Adding a value (a PB2 parallel mode, say) is one edit here plus its
implementation; forgetting the implementation fails at import, never by silently running another one.

The module lives in `core/` because the engine dispatches on these values and the core imports
nothing outside itself except the worker's list of storage schemes: the worker implements storage, so
what it accepts is the truth (`pbt_worker` is standard library only, like this module).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, get_args

from pbt_worker.contract import URI_SCHEMES

Mode = Literal["asynchronous", "synchronous"]
Direction = Literal["max", "min"]
ExploitStrategy = Literal["truncation", "tournament", "none"]
ExploreStrategy = Literal["perturb", "resample", "pb2"]
Pb2Parallel = Literal["bucb", "liar-optimistic", "liar-pessimistic", "liar-mean", "thompson", "randomized"]
OnExhausted = Literal["replace", "fail"]
OnSuspend = Literal["finish", "stop"]
Executor = Literal["process", "inline"]
InlinePool = Literal["threads", "processes"]
ParamKind = Literal["float", "int", "categorical"]

MODES: tuple[str, ...] = get_args(Mode)
DIRECTIONS: tuple[str, ...] = get_args(Direction)
EXPLOIT_STRATEGIES: tuple[str, ...] = get_args(ExploitStrategy)
EXPLORE_STRATEGIES: tuple[str, ...] = get_args(ExploreStrategy)
PB2_PARALLEL: tuple[str, ...] = get_args(Pb2Parallel)
ON_EXHAUSTED: tuple[str, ...] = get_args(OnExhausted)
ON_SUSPEND: tuple[str, ...] = get_args(OnSuspend)
EXECUTORS: tuple[str, ...] = get_args(Executor)
INLINE_POOLS: tuple[str, ...] = get_args(InlinePool)
PARAM_KINDS: tuple[str, ...] = get_args(ParamKind)
STORAGE_SCHEMES: tuple[str, ...] = tuple(URI_SCHEMES)

# Manifest field -> its allowed values: what the schema, the docs table and their tests walk.
FIELDS: dict[str, tuple[str, ...]] = {
    "spec.mode": MODES,
    "spec.objective.direction": DIRECTIONS,
    "spec.hyperparameters.NAME.type": PARAM_KINDS,
    "spec.exploit.strategy": EXPLOIT_STRATEGIES,
    "spec.explore.strategy": EXPLORE_STRATEGIES,
    "spec.explore.pb2.parallel": PB2_PARALLEL,
    "spec.storage.uri": STORAGE_SCHEMES,
    "spec.worker.executor": EXECUTORS,
    "spec.worker.pool": INLINE_POOLS,
    "spec.failurePolicy.onExhausted": ON_EXHAUSTED,
    "spec.segment.onSuspend": ON_SUSPEND,
}


def scheme_pattern() -> str:
    """The regular expression a storage URI must match at its start, e.g. ``^(file|s3|mem)://``."""
    return f"^({'|'.join(STORAGE_SCHEMES)})://"


def check_table(what: str, table: Iterable[Any], allowed: tuple[str, ...]) -> None:
    """Raise at import when a dispatch table does not cover exactly the allowed values: an engine that
    knows a value the spec refuses, or (worse) a spec that allows one the engine cannot run."""
    keys = set(table)
    if keys != set(allowed):
        raise RuntimeError(f"{what}: dispatch covers {sorted(keys)}, the spec allows {sorted(allowed)}")


__all__ = [
    "DIRECTIONS",
    "EXECUTORS",
    "EXPLOIT_STRATEGIES",
    "EXPLORE_STRATEGIES",
    "FIELDS",
    "INLINE_POOLS",
    "MODES",
    "ON_EXHAUSTED",
    "ON_SUSPEND",
    "PARAM_KINDS",
    "PB2_PARALLEL",
    "STORAGE_SCHEMES",
    "Direction",
    "Executor",
    "ExploitStrategy",
    "ExploreStrategy",
    "InlinePool",
    "Mode",
    "OnExhausted",
    "OnSuspend",
    "ParamKind",
    "Pb2Parallel",
    "check_table",
    "scheme_pattern",
]
