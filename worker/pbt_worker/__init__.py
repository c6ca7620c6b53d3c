"""pbt_worker: what runs inside one PBT segment.

    from pbt_worker import Segment
    seg = Segment.from_env()
    state = seg.restore()            # None on a member's first segment
    ...                              # train seg.steps_budget steps with seg.hyperparameters
    seg.save(state)                  # atomic; then the contract's gc prefixes are deleted
    seg.report(score=acc, loss=loss)

``cached(key, factory)`` keeps a dataset or a compiled model for the life of the process, which under
``pbt run``'s warm workers and the inline executor spans many segments.

Dependencies are deliberately minimal: the standard library, boto3 only when an ``s3://`` URI is used,
torch only when a torch object is saved or loaded.
"""

from __future__ import annotations

from .cache import cache_clear, cached
from .checkpoint import CheckpointReader, CheckpointWriter
from .contract import CONTRACT_VERSION, ENV_VAR, RESULT_MAX_BYTES, Contract, parse_contract
from .errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    ContractError,
    PbtWorkerError,
    PermanentError,
    PermanentStorageError,
    ReportError,
    SaveError,
    StorageError,
    TransientStorageError,
)
from .runner import execute, run
from .segment import Segment
from .storage import Storage, mem_storage, open_storage

__all__ = [
    "CONTRACT_VERSION",
    "ENV_VAR",
    "RESULT_MAX_BYTES",
    "CheckpointCorruptError",
    "CheckpointNotFoundError",
    "CheckpointReader",
    "CheckpointWriter",
    "Contract",
    "ContractError",
    "PbtWorkerError",
    "PermanentError",
    "PermanentStorageError",
    "ReportError",
    "SaveError",
    "Segment",
    "Storage",
    "StorageError",
    "TransientStorageError",
    "cache_clear",
    "cached",
    "execute",
    "mem_storage",
    "open_storage",
    "parse_contract",
    "run",
]
