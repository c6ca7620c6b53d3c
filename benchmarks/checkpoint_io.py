"""Checkpoint I/O throughput: pbt_worker save/restore vs plain boto3 upload_file/download_file.

    python benchmarks/checkpoint_io.py                   # 10MiB,100MiB,1GiB, 3 repeats
    python benchmarks/checkpoint_io.py --sizes 10MiB,100MiB --repeats 5

Starts a moto S3 server on a free loopback port (or uses ``--endpoint`` / ``AWS_ENDPOINT_URL_S3``), then
for each size alternates the plain boto3 transfer and the pbt_worker one on the same file, so drifts in
the server affect both. Medians of the repeats are printed, one size at a time as it completes.
``save_file``/``restore_file`` rows include what the SDK does beyond the transfer: sha256 of the data,
the commit marker write, the marker read and verification on restore. ``save(bytes)``/``restore() bytes``
rows save and restore a ``bytes`` object instead of a file (compared with the same plain file transfer).
The server is a single Python process: on a small or busy machine it, not the client, sets the pace.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
SIZES = {"10MiB": 10 * MiB, "100MiB": 100 * MiB, "1GiB": 1024 * MiB}


def parse_size(text: str) -> int:
    text = text.strip()
    if text in SIZES:
        return SIZES[text]
    units = {"KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def human(n: int) -> str:
    return f"{n / 1024 / MiB:g}GiB" if n >= 1024 * MiB else f"{n / MiB:g}MiB"


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return time.perf_counter() - start, value


def bench_size(size: int, repeats: int, tmp: Path, client: Any, bucket: str, objects: bool
               ) -> dict[str, list[float]]:
    """Seconds per repeat for each transfer of one size, plain boto3 and pbt_worker interleaved."""
    from boto3.s3.transfer import TransferConfig
    from pbt_worker import Segment
    from pbt_worker.storage import open_storage

    plain_config = TransferConfig()  # boto3 defaults: 8 MiB parts, 10 threads, as pbt_worker's defaults
    storage = open_storage(f"s3://{bucket}/")

    def segment(k: int, run: str) -> Segment:
        base = f"s3://{bucket}/{run}/"
        return Segment({"version": 1, "training": "bench", "member": 0, "segment": k, "hyperparameters": {},
                        "steps": {"start": 0, "budget": 1},
                        "restore": f"{base}{k - 1}/" if k else None, "checkpoint": f"{base}{k}/",
                        "result": None, "gc": []})

    src = tmp / "src.bin"
    with open(src, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.write(os.urandom(size % MiB))
    dst = tmp / "dst.bin"
    times: dict[str, list[float]] = {k: [] for k in ("plain up", "plain down", "pbt up", "pbt down",
                                                     "obj up", "obj down")}
    for rep in range(repeats):
        key = f"plain/{uuid.uuid4().hex}"
        times["plain up"].append(timed(client.upload_file, str(src), bucket, key, Config=plain_config)[0])
        times["plain down"].append(timed(client.download_file, bucket, key, str(dst), Config=plain_config)[0])
        client.delete_object(Bucket=bucket, Key=key)
        dst.unlink()

        run = f"pbt-{rep}-{uuid.uuid4().hex[:6]}"
        times["pbt up"].append(timed(segment(0, run).save_file, src)[0])
        times["pbt down"].append(timed(segment(1, run).restore_file, dest=dst)[0])
        storage.delete(f"s3://{bucket}/{run}/0/")
        dst.unlink()

        if objects:
            data = src.read_bytes()
            run = f"obj-{rep}-{uuid.uuid4().hex[:6]}"
            times["obj up"].append(timed(segment(0, run).save, data)[0])
            del data
            seconds, back = timed(segment(1, run).restore)
            assert len(back) == size
            del back
            times["obj down"].append(seconds)
            storage.delete(f"s3://{bucket}/{run}/0/")
    src.unlink()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10MiB,100MiB,1GiB", help="comma-separated, e.g. 10MiB,1GiB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL_S3"),
                        help="S3 endpoint (default: start a local moto server)")
    parser.add_argument("--no-object", action="store_true", help="skip the save(bytes)/restore() rows")
    parser.add_argument("--tmpdir", default=None, help="where test files are written")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]

    proc = None
    endpoint = args.endpoint
    if not endpoint:
        proc, endpoint = start_moto()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    os.environ["AWS_ENDPOINT_URL_S3"] = endpoint

    print(f"checkpoint I/O against {'moto server' if proc else endpoint}, median of {args.repeats} "
          f"(MiB/s; ratio = pbt_worker / plain boto3)")
    print(f"{'size':>7} {'operation':<16} {'boto3 MiB/s':>12} {'pbt MiB/s':>10} {'ratio':>6}", flush=True)

    def row(size_s: str, op: str, plain: float, ours: float) -> None:
        print(f"{size_s:>7} {op:<16} {plain:>12.1f} {ours:>10.1f} {ours / plain:>6.2f}", flush=True)

    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        client.create_bucket(Bucket=bucket)
        with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
            for size in sizes:
                times = bench_size(size, args.repeats, Path(tmp), client, bucket, not args.no_object)

                def mbps(key: str, size: int = size, times: dict[str, list[float]] = times) -> float:
                    return size / MiB / statistics.median(times[key])

                row(human(size), "save_file", mbps("plain up"), mbps("pbt up"))
                row(human(size), "restore_file", mbps("plain down"), mbps("pbt down"))
                if times["obj up"]:
                    row(human(size), "save(bytes)", mbps("plain up"), mbps("obj up"))
                    row(human(size), "restore() bytes", mbps("plain down"), mbps("obj down"))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)

    return 0


if __name__ == "__main__":
    sys.exit(main())
