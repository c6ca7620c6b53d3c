"""Parsing and validation of the segment contract (``docs/segment-contract.md``).

The contract is the only interface between the drivers (local runner, Kubernetes Job) and user code, so a
malformed contract must fail loudly and say *which* field is wrong: the user cannot fix a driver bug by
staring at their own traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ContractError

ENV_VAR = "PBT_SEGMENT"
CONTRACT_VERSION = 1
RESULT_MAX_BYTES = 4096
URI_SCHEMES = ("file", "s3", "mem")

HyperValue = bool | float | int | str


@dataclass(frozen=True)
class Contract:
    """A validated ``PBT_SEGMENT`` object. Field names follow the contract document."""

    version: int
    training: str
    member: int
    segment: int
    hyperparameters: dict[str, HyperValue]
    steps_start: int
    steps_budget: int
    restore: str | None
    checkpoint: str
    result: str | None
    gc: tuple[str, ...] = ()
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Optional: where the worker writes the segment's complete record (an object URI ending in .json),
    # and the driver's decision that started the segment, which goes into it.
    record: str | None = None
    decision: Mapping[str, Any] | None = None


def _is_int(value: Any) -> bool:
    # bool is an int subclass in Python; a JSON `true` is never a valid count or index.
    return isinstance(value, int) and not isinstance(value, bool)


def _require(obj: Mapping[str, Any], name: str, where: str = "") -> Any:
    if name not in obj:
        raise ContractError(f"{ENV_VAR}: missing required field '{where}{name}'")
    return obj[name]


def _int_field(obj: Mapping[str, Any], name: str, where: str = "", minimum: int = 0) -> int:
    value = _require(obj, name, where)
    if not _is_int(value) or value < minimum:
        raise ContractError(
            f"{ENV_VAR}: field '{where}{name}' must be an integer >= {minimum}, got {value!r}"
        )
    return int(value)


def _str_field(obj: Mapping[str, Any], name: str) -> str:
    value = _require(obj, name)
    if not isinstance(value, str) or not value:
        raise ContractError(f"{ENV_VAR}: field '{name}' must be a non-empty string, got {value!r}")
    return value


def validate_uri(value: Any, where: str) -> str:
    """Check that ``value`` is a checkpoint prefix URI: known scheme, trailing slash."""
    if not isinstance(value, str) or not value:
        raise ContractError(f"{ENV_VAR}: field '{where}' must be a checkpoint URI string, got {value!r}")
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in URI_SCHEMES or not rest:
        raise ContractError(
            f"{ENV_VAR}: field '{where}' must be a URI with scheme {'/'.join(URI_SCHEMES)}://, got {value!r}"
        )
    if not value.endswith("/"):
        raise ContractError(
            f"{ENV_VAR}: field '{where}' must name a checkpoint prefix ending with '/', got {value!r}"
        )
    return value


def parse_contract(data: Mapping[str, Any], *, require_result: bool = True) -> Contract:
    """Validate a decoded contract object.

    ``require_result=False`` lets an in-process driver (the local runner's inline executor) omit
    ``result``: it reads the result from ``Segment.last_result`` instead of a file.
    """
    if not isinstance(data, Mapping):
        raise ContractError(f"{ENV_VAR}: must be a JSON object, got {type(data).__name__}")
    version = _int_field(data, "version", minimum=1)
    if version != CONTRACT_VERSION:
        raise ContractError(
            f"{ENV_VAR}: field 'version' is {version}, this pbt_worker understands version "
            f"{CONTRACT_VERSION}; upgrade pbt-operator[worker] in the training image"
        )
    training = _str_field(data, "training")
    member = _int_field(data, "member")
    segment = _int_field(data, "segment")

    hps = _require(data, "hyperparameters")
    if not isinstance(hps, Mapping):
        raise ContractError(f"{ENV_VAR}: field 'hyperparameters' must be an object, got {hps!r}")
    hyperparameters: dict[str, HyperValue] = {}
    for key, value in hps.items():
        if not isinstance(value, int | float | str):  # bool is an int: a categorical's [true, false]
            raise ContractError(
                f"{ENV_VAR}: field 'hyperparameters.{key}' must be a float, int, str or bool, got {value!r}"
            )
        hyperparameters[str(key)] = value

    steps = _require(data, "steps")
    if not isinstance(steps, Mapping):
        raise ContractError(f"{ENV_VAR}: field 'steps' must be an object {{start, budget}}, got {steps!r}")
    steps_start = _int_field(steps, "start", "steps.")
    steps_budget = _int_field(steps, "budget", "steps.")

    restore = _require(data, "restore")
    if restore is not None:
        restore = validate_uri(restore, "restore")
    checkpoint = validate_uri(_require(data, "checkpoint"), "checkpoint")
    if restore == checkpoint:
        raise ContractError(f"{ENV_VAR}: fields 'restore' and 'checkpoint' are the same URI {checkpoint!r}")

    result: str | None
    result = _str_field(data, "result") if require_result or data.get("result") is not None else None

    gc_value = _require(data, "gc")
    if not isinstance(gc_value, list):
        raise ContractError(f"{ENV_VAR}: field 'gc' must be a list of URIs, got {gc_value!r}")
    gc = tuple(validate_uri(uri, f"gc[{i}]") for i, uri in enumerate(gc_value))
    for uri in gc:
        if uri == checkpoint:
            raise ContractError(f"{ENV_VAR}: field 'gc' lists {uri!r}, the checkpoint this segment saves to")

    record = data.get("record")
    decision = None
    if record is not None:
        if not isinstance(record, Mapping):
            raise ContractError(f"{ENV_VAR}: field 'record' must be an object {{uri, decision}}, got {record!r}")
        uri = _require(record, "uri", "record.")
        if isinstance(uri, str) and uri.endswith("/"):
            raise ContractError(f"{ENV_VAR}: field 'record.uri' must name an object, not a prefix: {uri!r}")
        uri = validate_uri(uri + "/" if isinstance(uri, str) else uri, "record.uri")[:-1]
        decision = record.get("decision")
        if decision is not None and not isinstance(decision, Mapping):
            raise ContractError(f"{ENV_VAR}: field 'record.decision' must be an object, got {decision!r}")
        record = uri

    return Contract(
        version=version,
        training=training,
        member=member,
        segment=segment,
        hyperparameters=hyperparameters,
        steps_start=steps_start,
        steps_budget=steps_budget,
        restore=restore,
        checkpoint=checkpoint,
        result=result,
        gc=gc,
        raw=data,
        record=record,
        decision=decision,
    )


def contract_from_env(environ: Mapping[str, str] | None = None) -> Contract:
    """Read and validate ``PBT_SEGMENT`` from the environment."""
    env = os.environ if environ is None else environ
    text = env.get(ENV_VAR)
    if text is None or not text.strip():
        raise ContractError(
            f"{ENV_VAR} is not set: this program expects to be started by a pbt driver "
            "(`pbt run` or a PopulationTraining Job), which passes the segment as JSON in that variable"
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ContractError(f"{ENV_VAR} is not valid JSON: {exc}") from None
    return parse_contract(data)
