"""Plain data passed between the engine, its strategies and the drivers.

Everything here is immutable and JSON-friendly (`to_dict` / `from_dict`), because the same records are
written to `results.jsonl` by the local runner and to member status by the operator, and read back to
rebuild the engine after a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .choices import Pb2Parallel
from .space import Value

Ref = tuple[int, int]
"""(member, segment): names one checkpoint."""

DecisionKind = Literal["start", "continue", "exploit", "retry", "replace"]
Status = Literal["pending", "done", "failed"]


@dataclass(frozen=True)
class Suggestion:
    """What a member should run next: a config plus the checkpoint to start from."""

    member: int
    segment: int
    hyperparameters: Mapping[str, Value]
    restore: Ref | None
    steps_start: int
    steps_budget: int
    kind: DecisionKind
    score_before: float | None = None
    donor: int | None = None
    reason: str = ""
    attempt: int = 0
    # An exploit's reason in its two parts (`reason` joins them): why this member copies the donor,
    # and how its hyperparameters changed. Set by the engine on the decisions it makes, for the
    # drivers' Events and logs; not persisted (the joined `reason` is) and not part of equality, so a
    # decision read back from a journal equals the one the engine made.
    exploit_reason: str = field(default="", compare=False)
    explore_reason: str = field(default="", compare=False)

    @property
    def ref(self) -> Ref:
        return (self.member, self.segment)

    def to_dict(self) -> dict[str, Any]:
        # Written by hand rather than dataclasses.asdict: this runs for every segment, and asdict's
        # recursive deep copy was the local runner's largest cost after I/O.
        return {
            "member": self.member, "segment": self.segment, "hyperparameters": dict(self.hyperparameters),
            "restore": list(self.restore) if self.restore is not None else None,
            "steps_start": self.steps_start, "steps_budget": self.steps_budget, "kind": self.kind,
            "score_before": self.score_before, "donor": self.donor, "reason": self.reason, "attempt": self.attempt,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Suggestion:
        d = dict(d)
        d["restore"] = tuple(d["restore"]) if d.get("restore") is not None else None
        return cls(**d)


# How a training ends (Finish.reason): early (a target reached, patience exhausted), failed, or with
# every member's budget used. CamelCase: the operator shows them as condition reasons unchanged.
TARGET_REACHED = "TargetReached"
PATIENCE_EXHAUSTED = "PatienceExhausted"
SEGMENT_FAILED = "SegmentFailed"
BUDGET_EXHAUSTED = "BudgetExhausted"


# A result that holds no number for the objective's metric: the worker's code or the manifest's
# spec.objective.metric, never chance, so a retry or a replacement would fail the same way after
# training a whole segment again (on a cluster, GPU hours). The engine fails the training at once.
# The driver's error message starts with this text; the engine classifies by it, so that a training
# rebuilt from its records (a resume, an operator restart) decides the same.
NO_METRIC_ERROR = "result has no numeric score for metric"
# A worker's own word that a retry cannot succeed (docs/segment-contract.md, `"permanent": true`): the
# worker SDK says it for a contract it refuses and for a training function's `PermanentError`.
PERMANENT_ERROR = "worker reported a permanent error:"

# A segment whose score is not finite: its learning diverged (a learning rate too large, say). Running it
# again from the same checkpoint with the same hyperparameters mostly diverges again, so the engine
# treats it as PBT treats the worst member: it copies the best checkpoint and explores from there (see
# Engine._after_failure). Classified by this prefix like the permanent failures, for the same reason;
# the worker SDK marks it `"diverged": true` in its result (docs/segment-contract.md).
DIVERGED_ERROR = "diverged:"


def diverged(error: str | None) -> bool:
    return error is not None and error.startswith(DIVERGED_ERROR)


# Why each kind of permanent failure is not retried, for the message that fails the training.
_NOT_RETRIED = {
    NO_METRIC_ERROR: "a result without the objective's metric fails every attempt the same way",
    PERMANENT_ERROR: "the worker said that running it again cannot succeed",
}


def permanent_failure(error: str | None) -> str | None:
    """Why a segment that failed with `error` is not worth another attempt; None when it may be."""
    if error is None:
        return None
    return next((why for prefix, why in _NOT_RETRIED.items() if error.startswith(prefix)), None)


@dataclass(frozen=True)
class Finish:
    """How a training ended (or is ending): a machine-readable reason and a message for people.
    `str()` gives "Reason: message", the one-line form logs, results files and conditions show."""

    reason: str
    message: str
    # SegmentFailed: the (member, segment, attempt) whose failure failed the training, so that a driver
    # finds its log without reading the message. Not compared: the message says the same for people.
    attempt: tuple[int, int, int] | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass(frozen=True)
class SegmentResult:
    """What a driver tells the engine when a segment ends (successfully or not)."""

    member: int
    segment: int
    score: float | None
    steps: int
    metrics: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    # A disruption (preemption, eviction, node loss) is not the worker's fault: the segment simply
    # reruns from the same checkpoint and no retry is counted.
    disrupted: bool = False
    duration: float | None = None
    # How many of the contract's gc deletes failed (the result's gcFailed): the driver hands the
    # segment's gc list to a later segment again. The engine does not read it.
    gc_failed: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None and not self.disrupted and self.score is not None


@dataclass(frozen=True)
class Record:
    """One finished segment in a member's history."""

    suggestion: Suggestion
    score: float | None
    steps_end: int
    metrics: Mapping[str, Any] = field(default_factory=dict)
    status: Status = "done"
    error: str | None = None
    duration: float | None = None

    @property
    def member(self) -> int:
        return self.suggestion.member

    @property
    def segment(self) -> int:
        return self.suggestion.segment

    @property
    def ref(self) -> Ref:
        return self.suggestion.ref

    def to_dict(self) -> dict[str, Any]:
        return {
            "suggestion": self.suggestion.to_dict(),
            "score": self.score,
            "steps_end": self.steps_end,
            "metrics": dict(self.metrics),
            "status": self.status,
            "error": self.error,
            "duration": self.duration,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Record:
        return cls(
            suggestion=Suggestion.from_dict(d["suggestion"]),
            score=d.get("score"),
            steps_end=int(d["steps_end"]),
            metrics=d.get("metrics") or {},
            status=d.get("status", "done"),
            error=d.get("error"),
            duration=d.get("duration"),
        )


@dataclass(frozen=True)
class Pb2Settings:
    """Knobs of PB2's explore step (spec.explore.pb2)."""

    # How running configurations are accounted for (pbt_operator.core.pb2.decide). liar-pessimistic
    # was the best or within noise of the best mode on every problem of benchmarks/search_quality.py
    # at populations 4-16 (benchmarks/README.md); bucb, PB2's own choice, lost on the categorical one.
    parallel: Pb2Parallel = "liar-pessimistic"
    # Only rows whose time t lies within `window` steps of the newest row are used (the time kernel
    # discounts them anyway); `max_rows` bounds the GP's size by subsampling the rest (the most recent
    # 3/4, a random sample of older rows for the rest). 128 keeps one decision near 10-16 ms of CPU
    # (benchmarks/decision_latency.py).
    window: int | None = None
    max_rows: int = 128
    # Below this many rows PB2 perturbs instead. None: `auto_min_rows(space)`, which grows with what the
    # GP has to learn: a categorical's choices are unknown to its Hamming kernel until rows with them
    # exist, so a space with categoricals needs more rows than its numeric dimensions alone suggest. A
    # manifest's default also caps it by the run's rows (spec.py: `auto_min_rows(space, population,
    # segments)`).
    min_rows: int | None = None
    # Acquisition: random candidates scored, then multi-start L-BFGS-B from the best `restarts`.
    # The starts are optimised as one stacked problem, whose shared line search slows each of them:
    # on 24 synthetic 10-hyperparameter histories, against a 512-candidate, 8-start, 200-iteration
    # reference, 1, 2 and 4 starts end a median 0.017, 0.015 and 0.008 (UCB, standardised) below it
    # and 0.65, 0.57 and 0.48 below in the worst tenth (benchmarks/pb2_convergence.py, 2026-12-01;
    # before rates were winsorised, 2 starts avoided 1 start's tail: benchmarks/README.md).
    candidates: int = 128
    restarts: int = 2
    # UCB exploration: beta_t = kappa * 0.02 * (GP-UCB / PB2 theorem beta_t, growing with t and the
    # number of hyperparameters d); see pbt_operator.core.pb2.acquisition.beta_theory.
    kappa: float = 1.0
    # Kernel hyperparameters are fitted by marginal likelihood on a subsample of `fit_rows` of the
    # GP's rows (each likelihood evaluation is O(fit_rows^3) and the fit needs dozens), with
    # `fit_restarts` L-BFGS-B starts (a neutral default plus random ones). One start is the default:
    # the stacked multi-start problem converges more slowly within the iteration budget; against the
    # best likelihood of 4 starts x 300 iterations one start ends a median 1.03 nats short with 10
    # hyperparameters and none with 3, two starts 1.12 and 0.07 at 1.6 times the time. Four starts
    # end 0.20 short with 10 (0.35 with 3) at 2.2 times the time (benchmarks/pb2_convergence.py).
    # The closer likelihood buys no better decisions: on lr-schedule-10d (10 hyperparameters), 2 or
    # 4 starts move the final score by under 0.01 of the limit either way over 200 paired seeds, at
    # 1.3-1.7 times the decision CPU (benchmarks/README.md, "Many hyperparameters").
    fit_rows: int = 40
    fit_restarts: int = 1
    # Half-width, in the unit space of each numeric hyperparameter, of the trust region around the
    # donor's configuration that the acquisition searches (1: the whole space). Categorical changes
    # are free; the numeric box holds for them too (pbt_operator.core.pb2.acquisition.Region).
    trust_region: float = 0.25
    # Half-width (unit space, as `trust_region`) of the box within which a member that keeps its
    # weights has its numeric hyperparameters moved to the GP's best posterior mean at its own time
    # and score (greedy: no exploration bonus); its categories stay. 0: such a member keeps its
    # configuration, as in PBT. Why: PB2 used to choose only at exploits, and a member that keeps
    # winning keeps its configuration while the optimum moves away; on a moving learning rate those
    # kept segments trailed the optimum by 0.5-0.7 bell widths while PB2's fresh choices were
    # unbiased (benchmarks/README.md, "A family of moving optima").
    retune: float = 0.05
    # Choose the data window by marginal likelihood once the history holds at least 2 x `fit_rows`
    # rows (pbt_operator.core.pb2.window; the PB2 paper's implementation does so). Not a manifest
    # field (the CRD would need it too); off by default:
    # on benchmarks/search_quality.py it changed no median beyond noise at populations 8 and 16
    # (it never triggers at 4) and it doubles a decision's CPU time (three fits instead of one).
    window_search: bool = False
