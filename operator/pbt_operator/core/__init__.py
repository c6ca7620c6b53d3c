"""The pure algorithm: no I/O, no clock, no global RNG.

Drivers (the local runner, the Kubernetes operator) own the loop; they call `Engine.start` and
`Engine.tell`, run the suggestions they get back, and persist records. Rebuilding an engine from the
same records and pending suggestions yields the same decisions, bit for bit.
"""

from .engine import Engine, TrainingState
from .space import Param, Space
from .types import Pb2Settings, Record, SegmentResult, Suggestion

__all__ = ["Engine", "Param", "Pb2Settings", "Record", "SegmentResult", "Space", "Suggestion", "TrainingState"]
