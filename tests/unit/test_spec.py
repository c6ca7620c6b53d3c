"""The spec model: valid manifests parse to the right values; bad ones are rejected before anything
runs, with one message per problem that names the field path and the value it got."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pbt_operator import cli
from pbt_operator import spec as spec_mod
from pbt_operator.spec import SpecError, describe_search, load_manifest, parse_manifest

# --------------------------------------------------------------------------------------------------
# valid manifests


def test_minimal_manifest_defaults(make_spec: Any) -> None:
    spec = make_spec()
    assert spec.name == "t"
    assert spec.population == 4
    assert spec.parallelism == 4  # defaults to the population
    assert spec.mode == "asynchronous"
    assert spec.objective.metric == "score" and spec.objective.direction == "max"
    assert spec.exploit.strategy == "truncation" and spec.exploit.fraction == 0.25
    assert spec.explore.strategy == "perturb" and spec.explore.factors == (0.8, 1.2)
    assert spec.failure_policy.max_retries == 2 and spec.failure_policy.on_exhausted == "replace"
    lr = spec.space["lr"]
    assert lr.kind == "float" and lr.log and lr.low == 1e-4 and lr.high == 1e-1


def test_truncation_fraction_defaults_to_half_with_pb2_and_three_quarters_below_8(make_spec: Any) -> None:
    # PB2 decides hyperparameters only for the members that copy: its default re-decides half of them,
    # and below 8 members every member but the top quarter (benchmarks/README.md, "Ninth round")
    def fraction(population: int, exploit: dict[str, Any] | None = None, strategy: str = "pb2") -> float:
        spec = {"population": population, "explore": {"strategy": strategy}, "exploit": exploit or {}}
        return float(make_spec(spec).exploit.fraction)

    assert fraction(8) == fraction(16) == 0.5
    assert fraction(2) == fraction(4) == fraction(7) == 0.75
    assert fraction(4, strategy="resample") == fraction(16, strategy="perturb") == 0.25
    assert fraction(4, {"fraction": 0.2}) == 0.2  # given wins
    assert fraction(4, {"donorFraction": 0.5}) == 0.5  # a default never collides with a written donorFraction
    assert make_spec({"population": 4, "explore": {"strategy": "pb2"}}).exploit.donors == 0.25


def test_pb2_fraction_keeps_a_members_restarts_when_segments_are_many(make_spec: Any) -> None:
    # The fraction applies per decision: with 100 segments 0.75 restarted three of four members after every
    # noisy iteration and PB2 fell behind PBT (benchmarks/README.md, "Outside the benchmark's setting").
    def fraction(population: int, segments: int, exploit: dict[str, Any] | None = None) -> float:
        spec = {"population": population, "budget": {"segments": segments}, "explore": {"strategy": "pb2"},
                "exploit": exploit or {}}
        return float(make_spec(spec).exploit.fraction)

    assert fraction(4, 20) == 0.75 and fraction(8, 30) == 0.5  # what was measured to pay: unchanged
    assert fraction(4, 25) == 0.6 and fraction(4, 50) == fraction(8, 50) == 0.3  # 15 restarts per member
    assert fraction(4, 60) == fraction(4, 100) == fraction(16, 1000) == 0.25  # never below PBT's
    assert fraction(4, 100, {"fraction": 0.75}) == 0.75  # given wins
    spec = make_spec({"population": 4, "budget": {"segments": 100}, "explore": {"strategy": "pb2"}})
    assert spec.exploit.donors == 0.25
    assert make_spec({"population": 4, "budget": {"segments": 100}}).exploit.fraction == 0.25  # PBT's as ever


def test_pb2_retune_keeps_a_kept_members_drift_when_segments_are_many(make_spec: Any) -> None:
    # `retune` is a half-width per decision: with 100 segments 0.05 let a member that kept winning walk five
    # times the range on noisy one-iteration rates (benchmarks/README.md, "A retune that follows the number
    # of segments").
    def retune(segments: int, pb2: dict[str, Any] | None = None) -> float:
        spec = {"population": 4, "budget": {"segments": segments}, "explore": {"strategy": "pb2", "pb2": pb2 or {}}}
        return float(make_spec(spec).explore.pb2.retune)

    assert retune(5) == retune(10) == retune(20) == 0.05  # what was measured: unchanged, never larger
    assert retune(25) == 0.04 and retune(50) == 0.02 and retune(100) == 0.01  # the whole range over the budget
    assert retune(100, {"retune": 0.05}) == 0.05 and retune(100, {"retune": 0}) == 0.0  # given wins


def test_donors_are_the_top_fraction_but_only_the_top_quarter_with_pb2(make_spec: Any) -> None:
    def donors(exploit: dict[str, Any], strategy: str = "pb2") -> float:
        return float(make_spec({"explore": {"strategy": strategy}, "exploit": exploit}).exploit.donors)

    assert donors({}) == 0.25  # PB2: the bottom half copies the top quarter
    assert donors({"fraction": 0.2}) == 0.2  # never a wider top than the bottom
    assert donors({"donorFraction": 0.5}) == 0.5  # given wins: the top half, as before
    assert donors({}, "perturb") == 0.25 and donors({"fraction": 0.5}, "perturb") == 0.5  # PBT: as the paper
    assert donors({"fraction": 0.1, "donorFraction": 0.3}, "resample") == 0.3


def test_up_to_three_quarters_copy_the_top_quarter(make_spec: Any) -> None:
    # Copiers and donors may not overlap, so with PB2's top-quarter donors up to 0.75 may copy
    # (benchmarks/README.md, "Eighth round": at 0.75 PB2 gained on every benchmark problem).
    spec = make_spec({"explore": {"strategy": "pb2"}, "exploit": {"fraction": 0.75}})
    assert spec.exploit.fraction == 0.75 and spec.exploit.donors == 0.25
    spec = make_spec({"exploit": {"fraction": 0.7, "donorFraction": 0.3}})
    assert spec.exploit.fraction == 0.7 and spec.exploit.donors == 0.3


def test_full_manifest_values(make_spec: Any) -> None:
    spec = make_spec({
        "population": 8, "parallelism": 3, "mode": "synchronous", "seed": 7,
        "objective": {"metric": "loss", "direction": "min"},
        "segment": {"steps": 50, "timeoutSeconds": 30},
        "budget": {"segments": 12, "targetScore": 0.1, "patience": 3},
        "hyperparameters": {
            "lr": {"type": "float", "min": 1e-5, "max": 1.0, "log": True, "initial": {"min": 1e-4, "max": 1e-2}},
            "layers": {"type": "int", "min": 1, "max": 8, "initial": 2},
            "opt": {"type": "categorical", "choices": ["sgd", "adam", 3], "initial": {"choices": ["adam"]}},
        },
        "exploit": {"strategy": "tournament", "size": 3,
                    "significance": {"enabled": True, "alpha": 0.1, "window": 5}},
        "explore": {"strategy": "perturb", "factors": [0.5, 2], "resampleProbability": 0.5, "crossover": True},
        "storage": {"uri": "s3://my-bucket/pbt", "credentialsSecret": "s3-creds"},
        "worker": {"executor": "process", "command": ["python", "train.py"], "function": None,
                   "env": {"A": "1", "B": 2}, "workingDir": "sub"},
        "failurePolicy": {"maxRetries": 0, "onExhausted": "fail"},
    })
    assert (spec.population, spec.parallelism, spec.mode, spec.seed) == (8, 3, "synchronous", 7)
    assert spec.objective.internal(2.0) == -2.0
    assert spec.segment.steps == 50 and spec.segment.timeout_seconds == 30
    assert (spec.budget.segments, spec.budget.target_score, spec.budget.patience) == (12, 0.1, 3)
    assert spec.space.names == ["lr", "layers", "opt"]
    assert spec.space["lr"].initial_low == 1e-4 and spec.space["lr"].initial_high == 1e-2
    assert spec.space["layers"].initial == 2 and isinstance(spec.space["layers"].initial, int)
    assert spec.space["opt"].choices == ("sgd", "adam", 3) and spec.space["opt"].initial_choices == ("adam",)
    assert spec.exploit.strategy == "tournament" and spec.exploit.size == 3
    assert spec.exploit.significance.enabled and spec.exploit.significance.alpha == 0.1
    assert spec.exploit.significance.window == 5
    assert spec.explore.factors == (0.5, 2.0) and spec.explore.crossover
    assert spec.storage.uri == "s3://my-bucket/pbt"
    assert spec.worker.command == ("python", "train.py") and spec.worker.env == {"A": "1", "B": "2"}
    assert spec.failure_policy.on_exhausted == "fail"


def test_mem_storage_with_inline_threads(make_spec: Any) -> None:
    assert make_spec({"storage": {"uri": "mem://x"}}).storage.uri == "mem://x"


def test_examples_parse() -> None:
    root = Path(__file__).resolve().parents[2]
    spec = load_manifest(root / "examples" / "quadratic" / "populationtraining.yaml")
    assert spec.name == "quadratic" and spec.worker.executor == "inline"
    assert spec.base_dir == (root / "examples" / "quadratic").resolve()


# --------------------------------------------------------------------------------------------------
# bad manifests: each message names the field path

HP = "spec.hyperparameters"

BAD: list[tuple[str, dict[str, Any], list[str]]] = [
    # wrong types
    ("population-str", {"population": "4"}, ["spec.population: must be an integer (got '4')"]),
    ("population-bool", {"population": True}, ["spec.population: must be an integer (got true)"]),
    ("steps-float", {"segment": {"steps": 1.5}}, ["spec.segment.steps: must be an integer (got 1.5)"]),
    ("fraction-str", {"exploit": {"fraction": "half"}}, ["spec.exploit.fraction: must be a finite number"]),
    ("fraction-nan", {"exploit": {"fraction": float("nan")}}, ["spec.exploit.fraction: must be a finite number"]),
    ("target-str", {"budget": {"targetScore": "high"}}, ["spec.budget.targetScore: must be a finite number"]),
    ("crossover-str", {"explore": {"crossover": "yes"}}, ["spec.explore.crossover: must be true or false"]),
    ("trust-zero", {"explore": {"pb2": {"trustRegion": 0}}}, ["spec.explore.pb2.trustRegion: must be in (0, 1]"]),
    ("trust-big", {"explore": {"pb2": {"trustRegion": 1.5}}}, ["spec.explore.pb2.trustRegion: must be in (0, 1]"]),
    ("retune-negative", {"explore": {"pb2": {"retune": -0.1}}}, ["spec.explore.pb2.retune: must be in [0, 1]"]),
    ("crossover-resample", {"explore": {"strategy": "resample", "crossover": True}},
     ["spec.explore.crossover: has no effect with strategy: resample"]),
    ("mode-choice", {"mode": "sync"}, ["spec.mode: must be one of: asynchronous, synchronous (got 'sync')"]),
    ("direction-choice", {"objective": {"direction": "up"}}, ["spec.objective.direction: must be one of: max, min"]),
    ("strategy-choice", {"exploit": {"strategy": "best"}}, ["spec.exploit.strategy: must be one of"]),
    ("explore-choice", {"explore": {"strategy": "random"}}, ["spec.explore.strategy: must be one of"]),
    ("section-str", {"budget": "lots"}, ["spec.budget: must be a mapping (got 'lots')"]),
    ("section-zero", {"budget": 0}, ["spec.budget: must be a mapping (got 0)"]),
    ("section-empty-str", {"objective": ""}, ["spec.objective: must be a mapping (got '')"]),
    ("section-empty-list", {"exploit": []}, ["spec.exploit: must be a mapping (got [])"]),
    ("nested-section", {"exploit": {"significance": "yes"}}, ["spec.exploit.significance: must be a mapping"]),
    ("env-list", {"worker": {"env": ["A=1"]}}, ["spec.worker.env: must map names to strings"]),
    ("env-empty-list", {"worker": {"env": []}}, ["spec.worker.env: must map names to strings"]),
    ("env-bool", {"worker": {"env": {"A": True}}}, ["spec.worker.env: must map names to strings"]),
    ("command-str", {"worker": {"executor": "process", "command": "python train.py"}},
     ["spec.worker.command: must be a list of strings, one per argument, e.g. [python, train.py]"]),
    ("command-empty", {"worker": {"executor": "process", "command": []}},
     ["spec.worker.command: must be a non-empty list of strings"]),
    ("function-shape", {"worker": {"function": "no_colon"}}, ["spec.worker.function: must look like module:function"]),
    ("template-list", {"template": []}, ["spec.template: must be a pod template mapping"]),
    ("template-no-containers", {"worker": {"executor": "process", "function": None}, "template": {"spec": {}}},
     ["spec.template.spec.containers: must be a non-empty list"]),
    ("storage-scheme", {"storage": {"uri": "/tmp/x"}}, ["spec.storage.uri: must start with file://, s3:// or mem://"]),
    ("storage-bucket", {"storage": {"uri": "s3://Bad_Bucket/x"}}, ["spec.storage.uri: must be s3://BUCKET"]),
    ("storage-mem-process", {"storage": {"uri": "mem://x"}, "worker": {"executor": "process", "command": ["t"]}},
     ["spec.storage.uri: mem:// keeps checkpoints in the runner's memory", "got executor: process"]),
    ("storage-mem-pool", {"storage": {"uri": "mem://x"}, "worker": {"pool": "processes"}},
     ["spec.storage.uri: mem:// keeps checkpoints", "pool: processes"]),
    # unknown fields, at every level
    ("unknown-spec", {"popluation": 3}, ["spec.popluation: unknown field"]),
    ("unknown-nested", {"budget": {"segmnts": 3}}, ["spec.budget.segmnts: unknown field"]),
    ("unknown-deep", {"exploit": {"significance": {"enable": True}}}, ["spec.exploit.significance.enable: unknown field"]),
    ("unknown-param", {"hyperparameters": {"lr": {"step": 2}}}, [f"{HP}.lr.step: unknown field"]),
    ("unknown-pb2", {"explore": {"pb2": {"beta": 2}}}, ["spec.explore.pb2.beta: unknown field"]),
    # another tuner's names, and near spellings, get a suggestion
    ("peer-values", {"hyperparameters": {"o": {"type": "categorical", "values": ["a"]}}},
     [f"{HP}.o.values: unknown field; did you mean `choices`?"]),
    ("peer-scale", {"hyperparameters": {"lr": {"type": "float", "min": 1e-4, "max": 1, "scale": "log"}}},
     [f"{HP}.lr.scale: unknown field; did you mean `log: true` (a log scale)?"]),
    ("peer-mode", {"objective": {"metric": "score", "mode": "max"}}, ["spec.objective.mode: unknown field; did you mean `direction`?"]),
    ("typo-suggested", {"popluation": 3}, ["spec.popluation: unknown field; did you mean `population`?"]),
    # ranges
    ("population-1", {"population": 1}, ["spec.population: must be >= 2"]),
    ("population-0", {"population": 0}, ["spec.population: must be >= 2"]),
    ("parallelism-negative", {"parallelism": -1}, ["spec.parallelism: must be >= 0 (got -1)"]),
    ("pending-timeout-0", {"segment": {"pendingTimeoutSeconds": 0}},
     ["spec.segment.pendingTimeoutSeconds: must be >= 1 (got 0)"]),
    ("on-suspend", {"segment": {"onSuspend": "pause"}}, ["spec.segment.onSuspend: must be one of: finish, stop"]),
    ("protect-not-bool", {"segment": {"protectFromDisruption": "yes"}},
     ["spec.segment.protectFromDisruption: must be true or false"]),
    ("suspend-not-bool", {"suspend": "true"}, ["spec.suspend: must be true or false"]),
    ("queue-name", {"queueName": "Team_A"}, ["spec.queueName: must be a Kueue LocalQueue name"]),
    ("max-disruptions", {"failurePolicy": {"maxDisruptions": -1}}, ["spec.failurePolicy.maxDisruptions: must be >= 0"]),
    ("job-label-ours", {"jobMetadata": {"labels": {"pbt.dev/member": "x"}}},
     ["spec.jobMetadata.labels.pbt.dev/member: keys under pbt.dev/ belong to the operator"]),
    ("job-label-value", {"jobMetadata": {"labels": {"team": "a b"}}},
     ["spec.jobMetadata.labels.team: is not a valid label value"]),
    ("job-annotation-key", {"jobMetadata": {"annotations": {"bad key": "x"}}},
     ["spec.jobMetadata.annotations.bad key: is not a valid Kubernetes key"]),
    ("queue-twice", {"queueName": "a", "jobMetadata": {"labels": {"kueue.x-k8s.io/queue-name": "b"}}},
     ["spec.jobMetadata.labels.kueue.x-k8s.io/queue-name: names queue 'b' but spec.queueName is 'a'"]),
    ("seed-negative", {"seed": -1}, ["spec.seed: must be >= 0 (got -1)"]),
    ("segments-0", {"budget": {"segments": 0}}, ["spec.budget.segments: must be >= 1 (got 0)"]),
    ("patience-0", {"budget": {"patience": 0}}, ["spec.budget.patience: must be >= 1 (got 0)"]),
    ("timeout-0", {"segment": {"timeoutSeconds": 0}}, ["spec.segment.timeoutSeconds: must be >= 1 (got 0)"]),
    ("fraction-0", {"exploit": {"fraction": 0}}, ["spec.exploit.fraction: must be in (0, 1)", "(got 0.0)"]),
    ("fraction-1", {"exploit": {"fraction": 1.0}}, ["spec.exploit.fraction: must be in (0, 1)", "(got 1.0)"]),
    ("fraction-0.6", {"exploit": {"fraction": 0.6}},  # PBT's donors are the top `fraction`: they would overlap
     ["spec.exploit.fraction: must be at most 1 - donorFraction", "(got fraction 0.6, donorFraction 0.6, its "
      "default here", "set donorFraction"]),
    ("fraction-overlap", {"exploit": {"fraction": 0.75, "donorFraction": 0.5}, "explore": {"strategy": "pb2"}},
     ["spec.exploit.fraction: must be at most 1 - donorFraction", "(got fraction 0.75, donorFraction 0.5)"]),
    ("fraction-negative", {"exploit": {"fraction": -0.1}}, ["spec.exploit.fraction: must be in (0, 1)"]),
    ("donors-0.7", {"exploit": {"donorFraction": 0.7}}, ["spec.exploit.donorFraction: must be in (0, 0.5]", "(got 0.7)"]),
    ("donors-str", {"exploit": {"donorFraction": "top"}}, ["spec.exploit.donorFraction: must be a finite number"]),
    ("tournament-size", {"exploit": {"size": 5}}, ["spec.exploit.size: must be <= spec.population (4) (got 5)"]),
    ("tournament-size-1", {"exploit": {"size": 1}}, ["spec.exploit.size: must be >= 2 (got 1)"]),
    ("alpha-2", {"exploit": {"significance": {"alpha": 2}}}, ["spec.exploit.significance.alpha: must be in (0, 1)"]),
    ("window-1", {"exploit": {"significance": {"window": 1}}}, ["spec.exploit.significance.window: must be >= 2"]),
    ("factors-negative", {"explore": {"factors": [0.8, -1]}}, ["spec.explore.factors: must be a non-empty list"]),
    ("factors-empty", {"explore": {"factors": []}}, ["spec.explore.factors: must be a non-empty list"]),
    ("resample-p", {"explore": {"resampleProbability": 1.5}}, ["spec.explore.resampleProbability: must be in [0, 1]"]),
    ("kappa", {"explore": {"pb2": {"kappa": -1}}}, ["spec.explore.pb2.kappa: must be >= 0"]),
    ("pb2-parallel", {"explore": {"pb2": {"parallel": "magic"}}}, ["spec.explore.pb2.parallel: must be one of"]),
    ("retries", {"failurePolicy": {"maxRetries": -1}}, ["spec.failurePolicy.maxRetries: must be >= 0 (got -1)"]),
    ("exhausted", {"failurePolicy": {"onExhausted": "ignore"}}, ["spec.failurePolicy.onExhausted: must be one of"]),
    # the worker
    ("missing-function", {"worker": {"function": None}},
     ["spec.worker.function: is required when executor is inline"]),
    ("missing-command", {"worker": {"executor": "process", "function": None}},
     ["spec.worker.command: is required when executor is process"]),
    ("executor-choice", {"worker": {"executor": "docker"}}, ["spec.worker.executor: must be one of: process, inline"]),
    # hyperparameters
    ("hp-null-def", {"hyperparameters": {"lr": None}}, [f"{HP}.lr: must be a mapping"]),
    ("hp-list", {"hyperparameters": ["lr"]}, [f"{HP}: must be a mapping of name -> definition"]),
    ("hp-missing-type", {"hyperparameters": {"x": {"min": 0, "max": 1}}}, [f"{HP}.x.type: is required"]),
    ("hp-bad-type", {"hyperparameters": {"x": {"type": "double", "min": 0, "max": 1}}},
     [f"{HP}.x.type: must be one of: float, int, categorical (got 'double')"]),
    ("hp-bad-name", {"hyperparameters": {"bad name": {"type": "float", "min": 0, "max": 1}}},
     [f"{HP}.bad name: invalid hyperparameter name"]),
    ("hp-missing-min", {"hyperparameters": {"x": {"type": "float", "max": 1}}}, [f"{HP}.x.min: is required"]),
    ("hp-min-str", {"hyperparameters": {"x": {"type": "float", "min": "0", "max": 1}}},
     [f"{HP}.x.min: must be a finite number (got '0')"]),
    ("hp-reversed", {"hyperparameters": {"x": {"type": "float", "min": 2, "max": 1}}},
     [f"{HP}.x.max: must be > min (2) (got 1)"]),
    ("hp-equal", {"hyperparameters": {"x": {"type": "int", "min": 3, "max": 3}}}, [f"{HP}.x.max: must be > min (3)"]),
    ("hp-log-negative", {"hyperparameters": {"lr": {"type": "float", "min": -1, "max": 1, "log": True}}},
     [f"{HP}.lr.min: must be > 0 when log: true (got -1)"]),
    ("hp-log-zero", {"hyperparameters": {"n": {"type": "int", "min": 0, "max": 5, "log": True}}},
     [f"{HP}.n.min: must be > 0 when log: true (got 0)"]),
    ("hp-log-str", {"hyperparameters": {"lr": {"log": "yes"}}}, [f"{HP}.lr.log: must be true or false"]),
    ("hp-int-fraction", {"hyperparameters": {"n": {"type": "int", "min": 1.5, "max": 5}}},
     [f"{HP}.n.min: must be an integer for type: int (got 1.5)"]),
    ("hp-initial-outside", {"hyperparameters": {"x": {"type": "float", "min": 0, "max": 1, "initial": 2}}},
     [f"{HP}.x.initial: must be within [min, max] = [0, 1] (got 2)"]),
    ("hp-initial-int-fraction", {"hyperparameters": {"n": {"type": "int", "min": 0, "max": 4, "initial": 1.5}}},
     [f"{HP}.n.initial: must be an integer for type: int (got 1.5)"]),
    ("hp-initial-str", {"hyperparameters": {"x": {"type": "float", "min": 0, "max": 1, "initial": "a"}}},
     [f"{HP}.x.initial: must be a number or {{min, max}}"]),
    ("hp-initial-range-reversed",
     {"hyperparameters": {"x": {"type": "float", "min": 0, "max": 1, "initial": {"min": 0.5, "max": 0.2}}}},
     [f"{HP}.x.initial.max: initial range must satisfy min <= initial.min < initial.max <= max"]),
    ("hp-initial-range-outside",
     {"hyperparameters": {"x": {"type": "float", "min": 0, "max": 1, "initial": {"min": 0.5, "max": 2}}}},
     [f"{HP}.x.initial.max: initial range must satisfy"]),
    ("hp-initial-range-unknown",
     {"hyperparameters": {"x": {"type": "float", "min": 0, "max": 1, "initial": {"lo": 0.5, "max": 0.7}}}},
     [f"{HP}.x.initial.lo: unknown field", f"{HP}.x.initial.min: is required"]),
    ("hp-int-initial-range-fraction",
     {"hyperparameters": {"n": {"type": "int", "min": 1, "max": 5, "initial": {"min": 1.5, "max": 1.7}}}},
     [f"{HP}.n.initial.min: must be an integer for type: int (got 1.5)"]),
    ("cat-empty", {"hyperparameters": {"o": {"type": "categorical", "choices": []}}},
     [f"{HP}.o.choices: must be a non-empty list of strings, numbers or booleans (got [])"]),
    ("cat-missing", {"hyperparameters": {"o": {"type": "categorical"}}}, [f"{HP}.o.choices: must be a non-empty list"]),
    ("cat-repeat", {"hyperparameters": {"o": {"type": "categorical", "choices": ["a", "a"]}}},
     [f"{HP}.o.choices: must not repeat a value"]),
    ("cat-bool-mixed", {"hyperparameters": {"o": {"type": "categorical", "choices": [True, False, "maybe"]}}},
     [f"{HP}.o.choices: must not mix booleans with other values (got [true, false, 'maybe']); YAML reads"]),
    ("cat-bool-and-one", {"hyperparameters": {"o": {"type": "categorical", "choices": [True, 2]}}},
     [f"{HP}.o.choices: must not mix booleans with other values"]),
    # True == 1 in Python: an initial 1 is not the choice true
    ("cat-bool-initial-number", {"hyperparameters": {"o": {"type": "categorical", "choices": [True, False], "initial": 1}}},
     [f"{HP}.o.initial: must be one of [true, false] (got 1)"]),
    ("cat-number-initial-bool", {"hyperparameters": {"o": {"type": "categorical", "choices": [0, 1], "initial": True}}},
     [f"{HP}.o.initial: must be one of [0, 1] (got true)"]),
    ("cat-min", {"hyperparameters": {"o": {"type": "categorical", "choices": ["a"], "min": 0}}},
     [f"{HP}.o.min: is not allowed for type: categorical"]),
    ("cat-initial", {"hyperparameters": {"o": {"type": "categorical", "choices": ["a", "b"], "initial": "c"}}},
     [f"{HP}.o.initial: must be one of"]),
    ("cat-initial-subset",
     {"hyperparameters": {"o": {"type": "categorical", "choices": ["a", "b"], "initial": {"choices": ["c"]}}}},
     [f"{HP}.o.initial.choices: must be a non-empty subset of {HP}.o.choices"]),
    ("float-choices", {"hyperparameters": {"x": {"type": "float", "min": 0, "max": 1, "choices": [0.5]}}},
     [f"{HP}.x.choices: is only allowed for type: categorical"]),
    # sampling draws from max - min: a range wider than the largest float used to crash the run
    # PB2 fits at most maxRows rows: requiring more would make it perturb every time, silently
    ("pb2-min-rows-above-max", {"explore": {"strategy": "pb2", "pb2": {"minRows": 64, "maxRows": 32}}},
     ["spec.explore.pb2.minRows: must be <= maxRows (32)"]),
    ("pb2-default-min-rows-above-max",
     {"explore": {"strategy": "pb2", "pb2": {"maxRows": 8}}, "budget": {"segments": 40},
      "hyperparameters": {"a": {"type": "float", "min": 0, "max": 1}, "b": {"type": "float", "min": 0, "max": 1},
                          "c": {"type": "float", "min": 0, "max": 1}, "d": {"type": "float", "min": 0, "max": 1},
                          "e": {"type": "float", "min": 0, "max": 1}}},
     ["spec.explore.pb2.maxRows: must be >= minRows, whose default for these hyperparameters is 10"]),
    ("float-range-overflow", {"hyperparameters": {"x": {"type": "float", "min": -1e308, "max": 1e308}}},
     [f"{HP}.x.max: max - min must be a finite number"]),
]


def test_a_bad_command_is_one_problem(make_doc: Any) -> None:
    """A command written as one string is said once, with the list it should be: not also 'is required'."""
    with pytest.raises(SpecError) as ei:
        parse_manifest(make_doc({"worker": {"executor": "process", "function": None, "command": "python t.py"}}))
    assert ei.value.problems == ["spec.worker.command: must be a list of strings, one per argument, e.g. "
                                 "[python, t.py] (got 'python t.py')"]


def test_population_below_two_is_one_problem(make_doc: Any) -> None:
    """population: 1 says so once: not also that the (default, unused by truncation) tournament size 2
    exceeds it."""
    with pytest.raises(SpecError) as ei:
        parse_manifest(make_doc({"population": 1}))
    assert ei.value.problems == ["spec.population: must be >= 2: PBT needs members to exploit (got 1)"]


@pytest.mark.parametrize(("updates", "expected"), [(u, e) for _, u, e in BAD], ids=[i for i, _, _ in BAD])
def test_bad_manifest_names_the_field(make_doc: Any, deep_merge: Any, updates: dict[str, Any],
                                      expected: list[str]) -> None:
    doc = make_doc()
    if "hyperparameters" in updates:  # replace, don't merge: a test's space is exactly what it says
        doc["spec"]["hyperparameters"] = {"lr": {"type": "float", "min": 1e-4, "max": 0.1, "log": True}}
        hp = updates["hyperparameters"]
        if isinstance(hp, dict) and list(hp) == ["lr"] and isinstance(hp["lr"], dict) and "type" not in hp["lr"]:
            doc["spec"]["hyperparameters"]["lr"].update(hp["lr"])  # add one field to the base lr
        else:
            doc["spec"]["hyperparameters"] = hp
        updates = {k: v for k, v in updates.items() if k != "hyperparameters"}
    deep_merge(doc["spec"], updates)
    with pytest.raises(SpecError) as ei:
        parse_manifest(doc)
    text = str(ei.value)
    for part in expected:
        assert part in text, f"expected {part!r} in:\n{text}"
    # one line per problem, each starting with a field path
    assert all(":" in p for p in ei.value.problems)


def test_message_example_from_the_docs(make_doc: Any) -> None:
    doc = make_doc()
    doc["spec"]["hyperparameters"] = {"lr": {"type": "float", "min": -1, "max": 1, "log": True}}
    with pytest.raises(SpecError) as ei:
        parse_manifest(doc)
    assert ei.value.problems == ["spec.hyperparameters.lr.min: must be > 0 when log: true (got -1)"]


def test_empty_hyperparameters(make_doc: Any) -> None:
    doc = make_doc()
    doc["spec"]["hyperparameters"] = {}
    with pytest.raises(SpecError, match=r"spec.hyperparameters: must define at least one hyperparameter"):
        parse_manifest(doc)
    del doc["spec"]["hyperparameters"]
    with pytest.raises(SpecError, match=r"spec.hyperparameters: is required"):
        parse_manifest(doc)


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        ({"apiVersion": "v1"}, "apiVersion: must be pbt.dev/v1alpha1 (got 'v1')"),
        ({"kind": "Pod"}, "kind: must be PopulationTraining (got 'Pod')"),
        ({"metadata": {"name": "Bad_Name"}}, "metadata.name: must be a DNS label"),
        ({"metadata": {}}, "metadata.name: must be a DNS label"),
        ({"metadata": {"name": "x" * 41}}, "metadata.name: must be a DNS label of at most 40"),
        ({"metadata": ["t"]}, "metadata: must be a mapping"),
        ({"metadata": []}, "metadata: must be a mapping (got [])"),
        ({"metadata": {"name": "t", "lables": {"a": "b"}}}, "metadata.lables: unknown field; did you mean `labels`?; allowed: name, "),
        ({"colour": "blue"}, "colour: unknown field"),
        ({"spec": None}, "spec: must be a mapping (got None)"),
        ({"spec": [1]}, "spec: must be a mapping (got [1])"),
    ],
)
def test_bad_document_top_level(make_doc: Any, top: dict[str, Any], expected: str) -> None:
    doc = make_doc()
    doc.update(top)
    with pytest.raises(SpecError) as ei:
        parse_manifest(doc)
    assert expected in str(ei.value)


def test_not_a_mapping() -> None:
    with pytest.raises(SpecError, match="must be a mapping"):
        parse_manifest(["not", "a", "manifest"])


def test_every_problem_is_reported_at_once(make_doc: Any) -> None:
    doc = make_doc()
    doc["spec"].update({"population": 1, "mode": "sync", "popluation": 3})
    doc["spec"]["hyperparameters"] = {
        "lr": {"type": "float", "min": -1, "max": 1, "log": True},
        "n": {"type": "int", "min": 5, "max": 2},
    }
    doc["spec"]["exploit"] = {"fraction": 0.9}
    with pytest.raises(SpecError) as ei:
        parse_manifest(doc)
    probs = ei.value.problems
    for path in ("spec.population:", "spec.mode:", "spec.popluation:", "spec.hyperparameters.lr.min:",
                 "spec.hyperparameters.n.max:", "spec.exploit.fraction:"):
        assert any(p.startswith(path) for p in probs), (path, probs)
    assert len(probs) == len(set(probs))


def test_load_manifest_file_errors(tmp_path: Path, make_doc: Any) -> None:
    with pytest.raises(SpecError, match="no such file"):
        load_manifest(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("spec: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_manifest(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(SpecError, match="contains no PopulationTraining document"):
        load_manifest(empty)
    with pytest.raises(SpecError, match="is a folder; give the manifest file in it"):
        load_manifest(tmp_path)
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8 text"):
        load_manifest(latin)
    # a multi-document file: the PopulationTraining is picked out
    multi = tmp_path / "multi.yaml"
    multi.write_text(yaml.safe_dump_all([{"apiVersion": "v1", "kind": "Secret"}, make_doc()]))
    assert load_manifest(multi).name == "t"


def test_load_manifest_reads_numbers_and_keys_as_kubectl_does(tmp_path: Path, make_doc: Any) -> None:
    """`lr: {min: 1e-5}` is a number for kubectl (YAML 1.2) but a string for PyYAML's YAML 1.1: the same
    file must not be refused by `pbt run` and accepted by the cluster. A key written twice is refused (as
    kubectl does) rather than silently keeping the last value."""
    text = yaml.safe_dump(make_doc()).replace("lr:", "lr_unused:")
    sci = tmp_path / "sci.yaml"
    sci.write_text(text.replace("hyperparameters:", "hyperparameters:\n    lr: {type: float, min: 1e-5, max: 1E-1, "
                                                   "log: true, initial: .5e-2}", 1))
    lr = load_manifest(sci).space["lr"]
    assert (lr.low, lr.high, lr.initial) == (1e-5, 0.1, 0.005)
    for text_value in ("e5", "1e", "1e-5x", "1_0e5"):  # still strings
        assert yaml.load(f"v: {text_value}", Loader=spec_mod._manifest_loader())["v"] == text_value
    dup = tmp_path / "dup.yaml"
    dup.write_text("apiVersion: pbt.dev/v1alpha1\nkind: PopulationTraining\nmetadata: {name: t}\n"
                   "spec:\n  population: 4\n  seed: 1\n  population: 8\n")
    with pytest.raises(SpecError, match=r"key 'population' appears twice in one mapping \(first on line 5\)"):
        load_manifest(dup)
    # a YAML merge key is no repetition: the keys after it override the merged ones
    merged = tmp_path / "merged.yaml"
    doc = make_doc()
    doc["spec"].pop("hyperparameters")
    merged.write_text(yaml.safe_dump(doc) + "  hyperparameters:\n    a: &num {type: float, min: 0.0, max: 1.0}\n"
                                            "    b: {<<: *num, max: 2.0}\n")
    spec = load_manifest(merged)
    assert (spec.space["a"].high, spec.space["b"].high) == (1.0, 2.0)


def test_metadata_as_kubectl_get_writes_it(make_doc: Any) -> None:
    """A manifest saved with `kubectl get -o yaml` runs as it is: every ObjectMeta field is known."""
    meta = {"name": "t", "namespace": "ns", "labels": {"a": "b"}, "annotations": {"c": "d"}, "uid": "u",
            "resourceVersion": "1", "generation": 2, "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [], "finalizers": [], "ownerReferences": []}
    assert parse_manifest(make_doc(metadata=meta)).namespace == "ns"


def test_load_manifest_refuses_two_trainings(tmp_path: Path, make_doc: Any) -> None:
    """`pbt run` runs one training: a file with two must not silently run the first only."""
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump_all([make_doc(), make_doc(metadata={"name": "second"})]))
    with pytest.raises(SpecError, match=r"holds 2 PopulationTraining documents \(t, second\)"):
        load_manifest(two)


# --------------------------------------------------------------------------------------------------
# the command line: a bad manifest exits 2 with the message and creates no run folder


def _write(tmp_path: Path, doc: dict[str, Any], name: str = "m.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


def _bad_doc(make_doc: Any) -> dict[str, Any]:
    doc = make_doc()
    doc["spec"]["hyperparameters"] = {"lr": {"type": "float", "min": -1, "max": 1, "log": True}}
    doc["spec"]["popluation"] = 3
    return doc


def test_cli_validate_bad_manifest(tmp_path: Path, make_doc: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, _bad_doc(make_doc))
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.hyperparameters.lr.min: must be > 0 when log: true (got -1)" in err
    assert "spec.popluation: unknown field" in err


def test_cli_validate_good_manifest(tmp_path: Path, make_doc: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, make_doc())
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid PopulationTraining 't'" in out
    assert "\n  search: " in out and "exploit truncation: the bottom 0.25 copies the top 0.25" in out


def test_validate_shows_the_defaults_that_depend_on_other_fields(make_spec: Any) -> None:
    # exploit.fraction, donorFraction, pb2.retune and minRows are filled in from the population, the
    # budget and the space: neither the manifest nor `kubectl get -o yaml` shows them.
    def search(segments: int, **spec: Any) -> str:
        return describe_search(make_spec({"population": 4, "budget": {"segments": segments},
                                          "explore": {"strategy": "pb2"}, **spec}))

    assert "the bottom 0.75 copies the top 0.25" in search(20) and "retune 0.05," in search(20)
    many = search(100)
    assert "the bottom 0.25 copies the top 0.25" in many and "retune 0.01," in many
    assert "pb2 (liar-pessimistic, kappa 1, trustRegion 0.25" in many and "100 segments of" in many
    assert "minRows 4)" in many  # two numbers: 2 x 2, at least 4
    assert "minRows 2)" in search(5)  # 4 members x 5 segments: at most a tenth of the run's 20 rows
    assert "minRows 3)" in search(5, explore={"strategy": "pb2", "pb2": {"minRows": 3}})  # as written
    given = search(100, exploit={"fraction": 0.5, "donorFraction": 0.5}, mode="synchronous")
    assert "the bottom 0.5 copies the top 0.5" in given and "synchronous" in given
    assert "tournament of 3" in describe_search(make_spec({"exploit": {"strategy": "tournament", "size": 3}}))


def test_cli_run_bad_manifest_creates_nothing(tmp_path: Path, make_doc: Any, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, _bad_doc(make_doc))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert cli.main(["run", str(path), "--quiet"]) == 2
    assert "spec.hyperparameters.lr.min: must be > 0" in capsys.readouterr().err
    assert cli.main(["run", str(path), "--quiet", "--out", str(tmp_path / "out"), "--fresh"]) == 2
    assert list(work.iterdir()) == []
    assert not (tmp_path / "out").exists()


def test_cli_run_unimportable_function_creates_nothing(tmp_path: Path, make_doc: Any,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A function that cannot be imported is a bad manifest too: exit 2 with the field, no run folder
    (which would otherwise make the corrected manifest's next `pbt run` demand --resume)."""
    doc = make_doc({"worker": {"function": "no_such_module_xyz:fn"}})
    path = _write(tmp_path, doc)
    out = tmp_path / "out"
    assert cli.main(["run", str(path), "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "spec.worker.function" in err and "no_such_module_xyz" in err
    assert not out.exists()


def test_cli_process_exit_code(tmp_path: Path, make_doc: Any) -> None:
    """The real console entry point, as a user runs it."""
    path = _write(tmp_path, _bad_doc(make_doc))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": ""}
    for args in (["validate", str(path)], ["run", str(path), "--out", str(out)]):
        proc = subprocess.run([sys.executable, "-m", "pbt_operator.cli", *args], capture_output=True, text=True,
                              env=env, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "spec.hyperparameters.lr.min: must be > 0 when log: true (got -1)" in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_cli_output_into_a_closed_pipe(tmp_path: Path) -> None:
    """`pbt crds | head -1` (or `pbt status RUN | head`): the reader leaves early; no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "pbt_operator.cli", "crds"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": ""})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it writes anything (it is still starting Python)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_cli_run_multi_document_manifest(tmp_path: Path, make_doc: Any, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`pbt validate` accepts a file holding a Secret and a PopulationTraining; `pbt run` must too."""
    (tmp_path / "multimod.py").write_text("def fn(seg):\n    return float(seg.hyperparameters['lr'])\n")
    doc = make_doc({"worker": {"function": "multimod:fn"}, "budget": {"segments": 2}, "population": 2})
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump_all([{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}, doc]))
    assert cli.main(["validate", str(path)]) == 0
    out = tmp_path / "out"
    assert cli.main(["run", str(path), "--out", str(out), "--quiet", "--no-plot"]) == 0
    assert (out / "best.json").exists()
    assert cli.main(["run", str(path), "--out", str(out), "--quiet", "--no-plot", "--resume"]) == 0
    monkeypatch.delitem(sys.modules, "multimod")


def test_cli_name_override(tmp_path: Path, make_doc: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, make_doc())
    out = tmp_path / "out"
    assert cli.main(["run", str(tmp_path / "missing.yaml"), "--name", "x", "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["run", str(path), "--name", "Not_A_Name", "--out", str(out)]) == 2
    assert "--name: must be a DNS label" in capsys.readouterr().err  # the flag, not the manifest's field
    assert not out.exists()
    assert cli.main(["run", str(path), "--name", "", "--out", str(out)]) == 2  # not quietly metadata.name
    assert "--name: must be a DNS label" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(("flag", "value"), [("--parallelism", "0"), ("--parallelism", "-2"), ("--seed", "-1")])
def test_cli_run_rejects_bad_overrides(tmp_path: Path, make_doc: Any, capsys: pytest.CaptureFixture[str],
                                       flag: str, value: str) -> None:
    path = _write(tmp_path, make_doc())
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as ei:
        cli.main(["run", str(path), flag, value, "--out", str(out), "--quiet"])
    assert ei.value.code == 2
    assert flag in capsys.readouterr().err
    assert not out.exists()


def test_the_trainer_annotation_must_name_a_container(make_doc) -> None:
    tmpl = {"metadata": {"annotations": {"kubectl.kubernetes.io/default-container": "trainr"}},
            "spec": {"containers": [{"name": "sidecar", "image": "s"}, {"name": "trainer", "image": "t"}]}}
    doc = make_doc({"worker": {"executor": "process", "function": None, "command": ["python", "t.py"]},
                    "storage": {"uri": "s3://bucket/p"}, "template": tmpl})
    with pytest.raises(SpecError) as err:
        parse_manifest(doc)
    msg = str(err.value)
    assert "spec.template.metadata.annotations[kubectl.kubernetes.io/default-container]" in msg
    assert "'trainr'" in msg and "sidecar, trainer" in msg
    doc["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] = "trainer"
    assert parse_manifest(doc).template is not None


@pytest.mark.parametrize("text,name", [("n", "false"), ("off", "false"), ("on", "true")])
def test_a_hyperparameter_yaml_turned_into_a_boolean_is_refused_saying_quote_it(make_doc, text: str,
                                                                               name: str) -> None:
    # kubectl (YAML 1.1) sends an unquoted `n:` as "false"; PyYAML makes `on:` the key True. Either way the
    # worker got a hyperparameter it did not ask for and every segment failed with KeyError.
    doc = make_doc({})
    space = yaml.safe_load(f"{text}: {{type: int, min: 1, max: 8}}\nlr: {{type: float, min: 0.001, max: 1}}")
    if text == "n":
        space = {name: space.pop("n"), **space}  # what kubectl sends
    doc["spec"]["hyperparameters"] = space
    with pytest.raises(SpecError) as err:
        parse_manifest(doc)
    assert "quote the name" in str(err.value) and "spec.hyperparameters." in str(err.value)
    doc["spec"]["hyperparameters"] = yaml.safe_load(f'"{text}": {{type: int, min: 1, max: 8}}')
    assert [p.name for p in parse_manifest(doc).space.params] == [text]


def test_worker_env_in_a_containers_form(make_doc: Any) -> None:
    """spec.worker.env may be written as in a pod template ([{name, value}]), which users copy from
    spec.template; anything else in list form is still refused with the field named."""
    spec = parse_manifest(make_doc({"worker": {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": 2}]}}))
    assert dict(spec.worker.env) == {"A": "1", "B": "2"}
    for bad in ([{"name": "A", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
                [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]):
        with pytest.raises(SpecError, match=r"spec\.worker\.env: must map names to strings"):
            parse_manifest(make_doc({"worker": {"env": bad}}))
