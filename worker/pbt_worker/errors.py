"""Exceptions raised by the worker SDK.

They are separate classes (rather than bare ``ValueError``/``RuntimeError``) so that a driver or a user's
training script can tell "the driver handed me a bad contract" apart from "storage is down" apart from
"the checkpoint is corrupt", and react differently (fail fast, retry the segment, or alert).
"""

from __future__ import annotations


class PbtWorkerError(Exception):
    """Base class of every error this package raises on purpose."""


class ContractError(PbtWorkerError, ValueError):
    """``PBT_SEGMENT`` is missing, not JSON, or a field is missing or has the wrong type.

    The message always names the offending field, because the person reading it is usually debugging a
    driver (local runner or operator) rather than their training script.
    """


class PermanentError(PbtWorkerError):
    """Raise it from a training function when running the segment again cannot succeed: a dataset that
    does not exist, a script argument that is wrong, a model that does not fit the hyperparameters' space.

    The worker reports it as permanent (``{"error": ..., "permanent": true}``) and the driver fails the
    training at once instead of retrying the segment ``maxRetries`` times, each retry holding a GPU for as
    long as the failure takes to show. Fix the cause and resume (``pbt run --resume``, or re-apply the
    PopulationTraining): completed segments and their checkpoints are kept.
    """


class ReportError(PbtWorkerError, ValueError):
    """``Segment.report`` was given something the contract cannot carry (NaN score, > 4096 bytes, ...)."""


class SaveError(PbtWorkerError, TypeError):
    """The object given to ``save``/``put_object`` cannot be serialised (a lambda, an open file, a
    generator, a lock ...); the message names where in the object it sits."""


class StorageError(PbtWorkerError):
    """A storage operation failed. ``uri`` names the object or prefix involved."""

    def __init__(self, message: str, uri: str | None = None) -> None:
        super().__init__(message)
        self.uri = uri


class PermanentStorageError(StorageError):
    """Retrying cannot help: missing bucket, access denied, bad credentials, malformed URI."""


class TransientStorageError(StorageError):
    """The storage service did not answer usefully within the retry budget (throttling, 5xx, resets)."""


class CheckpointNotFoundError(StorageError):
    """No committed checkpoint exists at the prefix (it was never committed, or it was deleted)."""


class CheckpointCorruptError(StorageError):
    """A committed checkpoint's object is missing or its size or sha256 differs from the commit marker."""
