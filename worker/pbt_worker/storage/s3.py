"""``s3://bucket/prefix/`` storage on AWS S3 or any S3-compatible service (MinIO, Ceph, moto, ...).

Configuration is the standard AWS one, read when the backend is first opened: credentials from the usual
chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profile, instance role), the endpoint from
``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``), the region from ``AWS_REGION`` /
``AWS_DEFAULT_REGION`` (optional). Tuning knobs (env): ``PBT_S3_PART_SIZE`` (bytes, default 8 MiB),
``PBT_S3_CONCURRENCY`` (default 10), ``PBT_STORAGE_RETRY_SECONDS`` (total retry budget per operation,
default 120), ``PBT_S3_ADDRESSING_STYLE`` (``path``/``virtual``; default path when an endpoint is set).

Large objects stream through boto3's transfer manager (multipart upload and ranged parallel download,
part-sized buffers only). Retries happen at two levels: botocore retries each HTTP request a few times
(so one failed part of a 1 GiB upload does not restart the upload), and :meth:`S3Storage._call` retries
whole operations with jittered exponential backoff until a total deadline, for outages longer than a
few seconds. Permanent errors (missing bucket, access denied, bad credentials) are never retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, ClassVar, TypeVar

import boto3
import botocore.exceptions as bex
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from s3transfer.exceptions import RetriesExceededError

from ..errors import (
    CheckpointCorruptError,
    PermanentStorageError,
    StorageError,
    TransientStorageError,
)
from .base import (
    CHUNK,
    MARKER,
    HashingReader,
    ObjectInfo,
    Source,
    Storage,
    check_key,
    check_prefix,
    sha256_file,
    spool_file,
    verify,
)

log = logging.getLogger("pbt_worker")
T = TypeVar("T")

MiB = 1024 * 1024

#: Error codes that mean "try again later". Anything else in the 4xx range is a permanent failure.
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "ProvisionedThroughputExceededException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete", "InternalError", "ServiceUnavailable", "OperationAborted",
    "500", "502", "503", "504", "429",
})
CREDENTIAL_CODES = frozenset({
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "AuthorizationHeaderMalformed", "InvalidSecurity", "MissingSecurityHeader",
})
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    bex.ConnectionError,  # EndpointConnectionError, ConnectTimeoutError, SSLError, ProxyConnectionError
    bex.HTTPClientError,  # ConnectionClosedError, ReadTimeoutError, ResponseStreamingError
    bex.IncompleteReadError,
    ConnectionError,  # builtin: resets, broken pipes surfacing from sockets
    TimeoutError,
)


def _env_int(name: str, default: int, environ: Mapping[str, str] = os.environ) -> int:
    value = environ.get(name)
    return int(value) if value else default


def _env_float(name: str, default: float, environ: Mapping[str, str] = os.environ) -> float:
    value = environ.get(name)
    return float(value) if value else default


def _boto_session(environ: Mapping[str, str]) -> Any:
    """A boto3 session configured from ``environ`` instead of this process's environment: botocore's
    settings that come from variables (profile, region, config and credentials files, CA bundle, ...)
    and the ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN`` credentials."""
    import botocore.session

    if environ is os.environ:
        return boto3.session.Session()
    core = botocore.session.Session()
    for name, (_, variables, _, convert) in core.session_var_map.items():
        for variable in [variables] if isinstance(variables, str) else (variables or []):
            value = environ.get(variable)
            if value is not None:
                core.set_config_variable(name, convert(value) if convert is not None else value)
    key, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        core.set_credentials(key, secret, environ.get("AWS_SESSION_TOKEN") or None)
    return boto3.session.Session(botocore_session=core)


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> (``bucket``, ``a/b/``)."""
    if not uri.startswith("s3://"):
        raise PermanentStorageError(f"not an s3:// URI: {uri!r}", uri)
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise PermanentStorageError(f"s3:// URI without a bucket: {uri!r}", uri)
    return bucket, key


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 8:
        seen.append(cur)
        if isinstance(cur, RetriesExceededError) and cur.last_exception is not None:
            cur = cur.last_exception
        else:
            cur = cur.__cause__ or cur.__context__
    return seen


def classify(exc: BaseException) -> tuple[str, str]:
    """Return (``"transient"`` | ``"permanent"`` | ``"other"``, human-readable cause) for an exception
    raised by boto3/botocore/s3transfer, looking through wrappers such as ``S3UploadFailedError``."""
    for e in _chain(exc):
        if isinstance(e, bex.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            message = err.get("Message") or ""
            cause = f"{code or status}{': ' + message if message else ''}"
            if code in CREDENTIAL_CODES:
                return "permanent", f"invalid credentials ({cause})"
            if code in ("NoSuchBucket",):
                return "permanent", f"bucket does not exist ({cause})"
            if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
                return "permanent", f"access denied ({cause})"
            if code in TRANSIENT_CODES or status >= 500 or status == 429:
                return "transient", cause
            return "permanent", cause
        if isinstance(e, bex.NoCredentialsError | bex.PartialCredentialsError):
            return "permanent", f"no usable AWS credentials ({e}); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
        if isinstance(e, bex.ParamValidationError):
            return "permanent", f"invalid request ({e})"
        if isinstance(e, NETWORK_ERRORS):
            return "transient", f"{type(e).__name__}: {e}"
    return "other", f"{type(exc).__name__}: {exc}"


def _not_found(exc: BaseException) -> bool:
    for e in _chain(exc):
        if isinstance(e, bex.ClientError):
            return e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404")
    return False


class S3Storage(Storage):
    """One boto3 client (thread-safe, pooled connections) shared by all buckets."""

    scheme: ClassVar[str] = "s3"

    def __init__(self, client: Any = None, *, part_size: int | None = None, concurrency: int | None = None,
                 retry_seconds: float | None = None, environ: Mapping[str, str] | None = None) -> None:
        # Where the settings below come from: this process's environment, or (an inline function's
        # segments, given spec.worker.env over it) a mapping read instead, os.environ left alone.
        self.environ = environ
        env = self.env
        self.part_size = part_size or _env_int("PBT_S3_PART_SIZE", 8 * MiB, env)
        self.concurrency = concurrency or _env_int("PBT_S3_CONCURRENCY", 10, env)
        self.retry_seconds = (retry_seconds if retry_seconds is not None
                              else _env_float("PBT_STORAGE_RETRY_SECONDS", 120.0, env))
        self.client = client if client is not None else self._make_client()
        self.transfer = TransferConfig(
            multipart_threshold=self.part_size,
            multipart_chunksize=self.part_size,
            max_concurrency=self.concurrency,
            use_threads=True,
        )
        # Bound what the transfer manager may buffer for non-file streams: memory stays O(parts in flight).
        self.transfer.max_in_memory_upload_chunks = max(2, self.concurrency)
        self.transfer.max_in_memory_download_chunks = max(2, self.concurrency)

    def _make_client(self) -> Any:
        env = self.env
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        style = env.get("PBT_S3_ADDRESSING_STYLE") or ("path" if endpoint else "auto")
        config = Config(
            retries={"mode": "standard", "max_attempts": _env_int("AWS_MAX_ATTEMPTS", 3, env)},
            connect_timeout=_env_float("PBT_S3_CONNECT_TIMEOUT", 10.0, env),
            read_timeout=_env_float("PBT_S3_READ_TIMEOUT", 60.0, env),
            max_pool_connections=max(10, self.concurrency * 2),
            s3={"addressing_style": style},
        )
        session = _boto_session(env)
        return session.client("s3", endpoint_url=endpoint, region_name=region, config=config)

    # -- retry -----------------------------------------------------------------------------------------
    def _call(self, what: str, uri: str, fn: Callable[[], T]) -> T:
        """Run ``fn``; retry transient failures with jittered backoff until ``retry_seconds`` have passed."""
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return fn()
            except StorageError:
                raise
            except Exception as exc:
                kind, cause = classify(exc)
                if kind == "other":
                    raise
                if kind == "permanent":
                    raise PermanentStorageError(f"{what} {uri} failed: {cause}", uri) from exc
                attempt += 1
                elapsed = time.monotonic() - start
                delay = min(10.0, 0.25 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                if elapsed + delay > self.retry_seconds:
                    raise TransientStorageError(
                        f"{what} {uri} failed after {attempt} attempt{'s' if attempt != 1 else ''} in {elapsed:.1f}s "
                        f"(retry budget {self.retry_seconds:.0f}s, PBT_STORAGE_RETRY_SECONDS): {cause}",
                        uri) from exc
                log.warning("%s %s: %s; retrying in %.1fs (attempt %d)", what, uri, cause, delay, attempt)
                time.sleep(delay)

    # -- objects ---------------------------------------------------------------------------------------
    def _loc(self, prefix: str, key: str) -> tuple[str, str, str]:
        check_prefix(prefix)
        check_key(key, prefix)
        bucket, base = split_uri(prefix)
        return bucket, base + key, prefix + key

    def put(self, prefix: str, key: str, source: Source, known: tuple[int, str] | None = None) -> ObjectInfo:
        bucket, name, uri = self._loc(prefix, key)
        if isinstance(source, bytes | bytearray | memoryview):
            data = source if isinstance(source, bytes) else bytes(source)
            if len(data) <= self.part_size:
                self._call("upload", uri, lambda: self.client.put_object(Bucket=bucket, Key=name, Body=data))
                return ObjectInfo(key, len(data), hashlib.sha256(data).hexdigest())
            # Large bytes go through a spool file: boto3's upload_fileobj reads and copies a stream's
            # parts one after another (~0.7x of upload_file measured), while the file path uploads
            # parts in parallel and hashes alongside. The spool sits in the page cache, not in RSS.
            spool = spool_file(".pbt-spool-", self.spool_dir(prefix))
            if spool is None:  # no writable temp directory: stream from memory
                return self._put_stream(bucket, name, uri, key, io.BytesIO(data))
            fd, path = spool
            try:
                with open(fd, "wb") as f:
                    f.write(data)
                return self._put_path(bucket, name, uri, key, path, None)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        if isinstance(source, str | os.PathLike):
            return self._put_path(bucket, name, uri, key, os.fspath(source), known)
        return self._put_stream(bucket, name, uri, key, source)

    def _put_path(self, bucket: str, name: str, uri: str, key: str, path: str,
                  known: tuple[int, str] | None) -> ObjectInfo:
        # The transfer manager reads parts at their own offsets in parallel, so the checksum is computed
        # by one more sequential reader running alongside the upload (the file is in the page cache).
        hashing: Future[tuple[int, str]] | None = None
        pool: ThreadPoolExecutor | None = None
        if known is None:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pbt-sha256")
            hashing = pool.submit(sha256_file, path)
        try:
            self._call("upload", uri, lambda: self.client.upload_file(path, bucket, name, Config=self.transfer))
            if hashing is not None:
                size, sha = hashing.result()
            else:
                assert known is not None
                size, sha = known
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        if os.path.getsize(path) != size:
            raise PermanentStorageError(f"upload {uri}: {path} changed while it was being saved", uri)
        return ObjectInfo(key, size, sha)

    def _put_stream(self, bucket: str, name: str, uri: str, key: str, stream: IO[bytes]) -> ObjectInfo:
        # A one-way stream cannot be re-read for a retry: one attempt (botocore still retries each part).
        reader = HashingReader(stream)
        try:
            self.client.upload_fileobj(reader, bucket, name, Config=self.transfer)
        except Exception as exc:
            kind, cause = classify(exc)
            if kind == "other":
                raise
            cls = PermanentStorageError if kind == "permanent" else TransientStorageError
            raise cls(f"upload {uri} failed: {cause}", uri) from exc
        return ObjectInfo(key, reader.size, reader.hexdigest())

    def get_bytes(self, prefix: str, key: str, expect: ObjectInfo | None = None) -> bytes:
        bucket, name, uri = self._loc(prefix, key)

        def fetch() -> bytes:
            response = self.client.get_object(Bucket=bucket, Key=name)
            return bytes(response["Body"].read())

        data = self._get(uri, fetch)
        verify(uri, expect, len(data), hashlib.sha256(data).hexdigest())
        return data

    def _get(self, uri: str, fn: Callable[[], T]) -> T:
        try:
            return self._call("download", uri, fn)
        except PermanentStorageError as exc:
            if _not_found(exc):
                raise CheckpointCorruptError(f"{uri}: object listed in the marker is missing", uri) from exc
            raise

    def get_file(self, prefix: str, key: str, dest: str | os.PathLike[str],
                 expect: ObjectInfo | None = None) -> Path:
        """Parallel ranged GETs written in place (``pwrite``) into a temp file beside ``dest``.

        The sha256 is computed while the download runs: the calling thread hashes part after part, in
        order, as soon as each has landed (re-reading it from the page cache), so verification costs no
        extra pass at the end and memory stays at one 1 MiB buffer per transfer thread.
        """
        bucket, name, uri = self._loc(prefix, key)
        if expect is not None:
            size = expect.size
        else:
            head = self._get(uri, lambda: self.client.head_object(Bucket=bucket, Key=name))
            size = int(head["ContentLength"])
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part-{uuid.uuid4().hex[:8]}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            ranges = [(off, min(self.part_size, size - off)) for off in range(0, size, self.part_size)]
            if len(ranges) <= 1:
                sha = self._get(uri, lambda: self._get_range(bucket, name, fd, 0, size, True, size)).hexdigest()
            else:
                sha = self._get_parallel(uri, bucket, name, fd, tmp, ranges, size)
            os.close(fd)
            fd = -1
            verify(uri, expect, size, sha)
            os.replace(tmp, target)
        finally:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return target

    def _get_parallel(self, uri: str, bucket: str, name: str, fd: int, tmp: Path,
                      ranges: list[tuple[int, int]], size: int) -> str:
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="pbt-s3-get")
        try:
            futures = [pool.submit(self._get, uri, lambda o=off, n=n: self._get_range(bucket, name, fd, o, n,
                                                                                       o == 0, size))
                       for off, n in ranges]
            h = futures[0].result()  # the first range hashes itself while streaming
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            with open(tmp, "rb", buffering=0) as back:
                for (off, n), fut in zip(ranges[1:], futures[1:], strict=True):
                    fut.result()
                    back.seek(off)
                    remaining = n
                    while remaining:
                        got = back.readinto(view[: min(CHUNK, remaining)])
                        if not got:
                            raise CheckpointCorruptError(f"{uri}: short local file while hashing", uri)
                        h.update(view[:got])
                        remaining -= got
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return h.hexdigest()

    def _get_range(self, bucket: str, name: str, fd: int, offset: int, length: int,
                   hash_inline: bool = False, expected_total: int | None = None) -> Any:
        """One (retryable) ranged GET into ``fd`` at ``offset``; returns a sha256 object of the range when
        ``hash_inline`` (used for the range starting at 0, whose hash can be computed as it streams)."""
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": name}
        if length:
            kwargs["Range"] = f"bytes={offset}-{offset + length - 1}"
        response = self.client.get_object(**kwargs)
        body = response["Body"]
        # An object of another size than the marker says is corrupt: say so now instead of retrying
        # short reads until the retry budget runs out.
        content_range = str(response.get("ContentRange") or "")
        total = content_range.rpartition("/")[2] if content_range else str(response.get("ContentLength", ""))
        if total.isdigit() and expected_total is not None and int(total) != expected_total:
            body.close()
            uri = f"s3://{bucket}/{name}"
            raise CheckpointCorruptError(
                f"{uri}: object is {total} bytes, the commit marker says {expected_total}", uri)
        hasher = hashlib.sha256() if hash_inline else None  # fresh per attempt: a retry must not hash twice
        pos = offset
        try:
            while chunk := body.read(CHUNK):
                view = memoryview(chunk)
                while view:
                    written = os.pwrite(fd, view, pos)
                    pos += written
                    view = view[written:]
                if hasher is not None:
                    hasher.update(chunk)
        finally:
            body.close()
        if pos - offset != length:
            raise bex.IncompleteReadError(actual_bytes=pos - offset, expected_bytes=length)
        return hasher

    # -- commit protocol -------------------------------------------------------------------------------
    def _write_marker(self, prefix: str, data: bytes) -> None:
        bucket, base = split_uri(prefix)
        self._call("commit", prefix + MARKER, lambda: self.client.put_object(
            Bucket=bucket, Key=base + MARKER, Body=data, ContentType="application/json"))

    def _read_marker(self, prefix: str) -> bytes | None:
        bucket, base = split_uri(prefix)

        def fetch() -> bytes | None:
            try:
                return bytes(self.client.get_object(Bucket=bucket, Key=base + MARKER)["Body"].read())
            except bex.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise

        return self._call("read marker", prefix + MARKER, fetch)

    def list(self, prefix: str) -> list[str]:
        check_prefix(prefix)
        bucket, base = split_uri(prefix)

        def fetch() -> list[str]:
            keys: list[str] = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base):
                keys.extend(obj["Key"][len(base):] for obj in page.get("Contents", []))
            return sorted(keys)

        return self._call("list", prefix, fetch)

    def delete(self, prefix: str) -> None:
        check_prefix(prefix)
        bucket, base = split_uri(prefix)
        # Marker first: from this moment the checkpoint is not restorable, whatever happens next.
        self._call("delete", prefix + MARKER,
                   lambda: self.client.delete_object(Bucket=bucket, Key=base + MARKER))
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": base + k} for k in keys[i:i + 1000]]

            def remove(batch: list[dict[str, str]] = batch) -> None:
                response = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                errors = response.get("Errors") or []
                if errors:
                    first = errors[0]
                    raise PermanentStorageError(
                        f"delete {prefix}: {len(errors)} object{'s' if len(errors) != 1 else ''} not deleted, e.g. "
                        f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}", prefix)

            self._call("delete", prefix, remove)
        self._abort_uploads(bucket, base, prefix)

    def _abort_uploads(self, bucket: str, base: str, prefix: str) -> None:
        """Abort multipart uploads left by a writer killed mid-save (their parts cost storage too)."""
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket,
                                                                                    Prefix=base):
                for upload in page.get("Uploads", []):
                    self.client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"],
                                                       UploadId=upload["UploadId"])
        except Exception as exc:  # optional on some S3-compatible stores; never worth failing a gc for
            log.debug("could not abort multipart uploads under %s: %s", prefix, exc)

