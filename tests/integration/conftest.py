"""Integration fixtures: a real S3-compatible server (moto in server mode) on loopback.

The server runs as a separate process, so the worker SDK talks real HTTP through botocore exactly as it
would to MinIO or AWS; tests can stop and restart it to simulate an outage.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """A ``python -m moto.server`` process on 127.0.0.1 with start/stop/restart.

    ``extra_env`` configures it, e.g. ``{"INITIAL_NO_AUTH_ACTION_COUNT": "4"}`` to turn on real
    credential checks after the first four requests. Its state lives in memory: a restart forgets it.
    """

    def __init__(self, log_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"moto-{self.port}.log"
        self.extra_env = dict(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = False  # once it has served, its port is its clients' endpoint: restarts keep it

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until it serves. free_port() only found a port free: the server binds
        it about a second later, when another process may have taken it; the first start then moves to
        another port, while a restart (its clients already hold the endpoint) fails, saying so."""
        if self.proc is not None and self.proc.poll() is None:
            return
        for _ in range(5):
            if self._spawn(timeout):
                self.started = True
                return
            if self.started:
                raise RuntimeError(f"moto server could not restart: port {self.port} was taken while it was "
                                   f"stopped:\n{self.log_path.read_text()[-2000:]}")
            self.port = free_port()
        raise RuntimeError(f"moto server found its port taken 5 times:\n{self.log_path.read_text()[-2000:]}")

    def _spawn(self, timeout: float) -> bool:
        """True once this process listens on self.port and answers; False when the port was taken."""
        import psutil

        env = dict(os.environ, **self.extra_env)
        mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                with open(self.log_path, "rb") as f:
                    f.seek(mark)
                    said = f.read().decode(errors="replace")
                if "Address already in use" in said:
                    self.proc = None
                    return False
                raise RuntimeError(f"moto server exited: {said[-2000:]}")
            try:
                # Ours, not whatever else may have taken the port: the answer counts once this process
                # is the one listening there.
                me = psutil.Process(self.proc.pid)
                conns = me.net_connections("tcp") if hasattr(me, "net_connections") else me.connections("tcp")
                if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in conns):
                    with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1):
                        return True
            except (OSError, psutil.Error):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not start within {timeout}s on port {self.port}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def env(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict[str, str]:
        """Environment for a worker talking to this server."""
        return {
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY, **kw: Any) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=access_key, aws_secret_access_key=secret_key, **kw)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Point the worker SDK at the moto server (env + fresh client) and give the test its own bucket.

    Yields the environment, plus ``PBT_TEST_BUCKET`` and ``PBT_TEST_BASE`` (an ``s3://`` base URI).
    """
    from pbt_worker.storage import reset_storage_cache

    moto_server.start()  # a previous test may have stopped it
    env = moto_server.env()
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bucket = f"pbt-{uuid.uuid4().hex[:12]}"
    moto_server.client().create_bucket(Bucket=bucket)
    reset_storage_cache()
    try:
        yield dict(env, PBT_TEST_BUCKET=bucket, PBT_TEST_BASE=f"s3://{bucket}/ck/")
    finally:
        reset_storage_cache()
        with contextlib.suppress(Exception):
            client = moto_server.client()
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                for obj in page.get("Contents", []):
                    client.delete_object(Bucket=bucket, Key=obj["Key"])
            client.delete_bucket(Bucket=bucket)


class FaultProxy:
    """A loopback TCP proxy in front of the S3 server that injects faults into the next N connections.

    Modes: ``"503"`` answers ``503 Service Unavailable`` (after draining the request, or at once when the
    client sent ``Expect: 100-continue``), ``"drop"`` closes the connection without answering, ``"reset"``
    aborts it with a TCP RST. Once ``failures`` reaches zero, connections are relayed untouched.
    """

    def __init__(self, upstream_port: int) -> None:
        import threading

        self.upstream_port = upstream_port
        self.mode = "503"
        self.failures = 0
        self.injected = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = int(self._sock.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fail(self, n: int, mode: str = "503") -> None:
        with self._lock:
            self.mode, self.failures = mode, n

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()

    def _accept(self) -> None:
        import threading

        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                inject = self.failures > 0
                if inject:
                    self.failures -= 1
                    self.injected += 1
                mode = self.mode
            target = self._fault if inject else self._relay
            threading.Thread(target=target, args=(conn, mode), daemon=True).start()

    @staticmethod
    def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        return head, rest

    def _fault(self, conn: socket.socket, mode: str) -> None:
        import struct

        try:
            head, rest = self._read_head(conn)
            if mode == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if mode == "drop":
                return
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("expect", "").lower() != "100-continue":
                remaining = int(headers.get("content-length", "0") or 0) - len(rest)
                while remaining > 0:
                    chunk = conn.recv(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            body = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>ServiceUnavailable</Code>"
                    b"<Message>injected by FaultProxy</Message></Error>")
            conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _relay(self, conn: socket.socket, mode: str) -> None:
        import threading

        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            conn.close()
            return

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while chunk := src.recv(1 << 20):
                    dst.sendall(chunk)
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
        t.start()
        pump(conn, upstream)
        t.join()
        conn.close()
        upstream.close()


@pytest.fixture
def fault_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture(scope="session")
def moto_server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start extra, differently configured moto servers: ``factory(extra_env) -> MotoServer`` (stopped
    at the end of the session). Tests import nothing from this conftest, so fixtures are the interface."""
    pytest.importorskip("moto.server")
    servers: list[MotoServer] = []

    def factory(extra_env: dict[str, str] | None = None) -> MotoServer:
        server = MotoServer(tmp_path_factory.mktemp("moto"), extra_env)
        server.start()
        servers.append(server)
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.stop()
