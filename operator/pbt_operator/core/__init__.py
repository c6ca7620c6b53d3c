"""The pure algorithm: no I/O, no clock, no global RNG.

Drivers (the local runner, the Kubernetes operator) own the loop; they rebuild an engine from their
journal with `policy.rebuild`, run the suggestions it has pending, `Engine.tell` it each result,
persist the records, and admit segments with `policy.admit`. Rebuilding an engine from the same
journal yields the same decisions, bit for bit. docs/architecture.md describes the layers.
"""

from .engine import Engine, TrainingState
from .space import Param, Space
from .types import Pb2Settings, Record, SegmentResult, Suggestion

__all__ = ["Engine", "Param", "Pb2Settings", "Record", "SegmentResult", "Space", "Suggestion", "TrainingState"]
