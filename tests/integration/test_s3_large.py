"""Large checkpoints: bounded memory while streaming, and no restorable partial checkpoint after SIGKILL.

Both run the worker in a subprocess, as a real segment would run: memory is measured there (peak RSS),
and the kill is a real SIGKILL in the middle of a multipart upload.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from pbt_worker import CheckpointNotFoundError, Segment, open_storage

MiB = 1024 * 1024

pytestmark = pytest.mark.slow

CHILD_PRELUDE = """
import json, os, sys, time
MiB = 1024 * 1024

def rss_mib(field):
    # VmRSS = now, VmHWM = peak since the last reset through /proc/self/clear_refs.
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

from pbt_worker import Segment
def seg(k, member=0):
    base = os.environ["BASE"]
    return Segment({"version": 1, "training": "t", "member": member, "segment": k, "hyperparameters": {},
                    "steps": {"start": 0, "budget": 1},
                    "restore": f"{base}m{member}/{k - 1}/" if k else None,
                    "checkpoint": f"{base}m{member}/{k}/", "result": None, "gc": []})
"""


def _run_child(body: str, env: dict[str, str], tmp_path: Path, timeout: float = 300) -> dict[str, Any]:
    script = tmp_path / "child.py"
    script.write_text(CHILD_PRELUDE + textwrap.dedent(body))
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child_env(s3_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, **s3_env, BASE=s3_env["PBT_TEST_BASE"], WORK=str(tmp_path),
                PBT_WORKER_TMPDIR=str(tmp_path))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_200mib_file_streams_with_bounded_memory(s3_env: dict[str, str], tmp_path: Path) -> None:
    result = _run_child("""
        path = os.path.join(os.environ["WORK"], "big.bin")
        with open(path, "wb") as f:
            for i in range(200):
                f.write(os.urandom(MiB))
        s = seg(0)
        s.storage_for(s.checkpoint_uri).exists(s.checkpoint_uri)  # client built, modules imported
        base = rss_mib("VmRSS")
        reset_peak()
        t = time.monotonic()
        s.save_file(path)
        save_peak = rss_mib("VmHWM")
        reset_peak()
        out = seg(1).restore_file(dest=os.path.join(os.environ["WORK"], "back.bin"))
        restore_peak = rss_mib("VmHWM")
        same = open(path, "rb").read(MiB) == open(out, "rb").read(MiB) and os.path.getsize(out) == 200 * MiB
        print(json.dumps({"base": base, "save_peak": save_peak, "restore_peak": restore_peak, "same": same,
                          "seconds": time.monotonic() - t}))
    """, _child_env(s3_env, tmp_path), tmp_path)
    print(result)
    assert result["same"]
    assert result["save_peak"] - result["base"] < 100, result
    assert result["restore_peak"] - result["base"] < 100, result


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_200mib_object_is_never_held_twice(s3_env: dict[str, str], tmp_path: Path) -> None:
    result = _run_child("""
        s = seg(0)
        s.storage_for(s.checkpoint_uri).exists(s.checkpoint_uri)
        state = {"blob": os.urandom(200 * MiB), "step": 3}
        base = rss_mib("VmRSS")
        reset_peak()
        s.save(state)
        save_peak = rss_mib("VmHWM")
        del state
        base2 = rss_mib("VmRSS")
        reset_peak()
        back = seg(1).restore()
        restore_peak = rss_mib("VmHWM")
        print(json.dumps({"base": base, "save_peak": save_peak, "base2": base2, "restore_peak": restore_peak,
                          "ok": len(back["blob"]) == 200 * MiB and back["step"] == 3}))
    """, _child_env(s3_env, tmp_path), tmp_path)
    print(result)
    assert result["ok"]
    assert result["save_peak"] - result["base"] < 100, result  # the object is already in base
    assert result["restore_peak"] - result["base2"] < 200 + 100, result  # one copy: the restored object


def _wait_requests_done(server: Any, timeout: float = 60) -> None:
    """Until the S3 server holds no connection but this test process's own: every request the killed
    writer had sent has been answered (or dropped), so what it did (a part, the CompleteMultipartUpload)
    is in the bucket. The server keeps a request's connection open while it works on it, even after
    the client died: its answer fails to go out only afterwards, and then it closes the connection.
    (A bucket that stays unchanged for a while says less: on a loaded machine the server can take
    longer than that to assemble a 64 MiB object.)"""
    import psutil

    def tcp(p: psutil.Process) -> list[Any]:
        return p.net_connections("tcp") if hasattr(p, "net_connections") else p.connections("tcp")

    me, srv = psutil.Process(), psutil.Process(server.proc.pid)
    deadline = time.monotonic() + timeout
    while True:
        ours = {c.laddr.port for c in tcp(me)}  # this test's own clients, kept alive between requests
        others = [c for c in tcp(srv) if c.raddr and c.raddr.port not in ours]
        if not others:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the S3 server still worked on connections {others} {timeout} s after "
                                 "the writer died")
        time.sleep(0.05)


@pytest.mark.parametrize("previous", [False, True], ids=["fresh-prefix", "rerun-over-committed"])
@pytest.mark.parametrize("kill_at", ["upload", "marker"])
def test_sigkill_mid_save_leaves_nothing_restorable(s3_env: dict[str, str], tmp_path: Path,
                                                     moto_server: Any, previous: bool, kill_at: str) -> None:
    """SIGKILL in the middle of a 64 MiB multipart upload ("upload"), or after every object is complete
    and only the commit marker is still to be written ("marker"): neither leaves a restorable checkpoint
    (or, over an earlier commit, anything but that commit), and deleting the prefix leaves nothing."""
    base = s3_env["PBT_TEST_BASE"]
    bucket = s3_env["PBT_TEST_BUCKET"]
    ckpt = f"{base}m0/0/"
    if previous:
        Segment({"version": 1, "training": "t", "member": 0, "segment": 0, "hyperparameters": {},
                 "steps": {"start": 0, "budget": 1}, "restore": None, "checkpoint": ckpt,
                 "result": None, "gc": []}).save({"version": "committed earlier"})
    script = tmp_path / "child.py"
    # The writer uploads two parts and then holds every further one until the kill: left to run, a fast
    # machine can finish the whole 64 MiB upload (and commit it) between two polls of the loop below,
    # and the kill would land after the save instead of in the middle of it.
    script.write_text(CHILD_PRELUDE + textwrap.dedent("""
        import threading
        import botocore.client
        real_call = botocore.client.BaseClient._make_api_call
        uploads, lock = [0], threading.Lock()
        KILL_AT = os.environ["KILL_AT"]
        def held_call(self, operation, params):
            if KILL_AT == "upload" and operation == "UploadPart":
                with lock:
                    n, uploads[0] = uploads[0], uploads[0] + 1
                if n >= 2:
                    time.sleep(3600)  # until the test's SIGKILL
            if KILL_AT == "marker" and operation == "PutObject" and params["Key"].endswith("/_COMMITTED"):
                print("marker", flush=True)
                time.sleep(3600)
            return real_call(self, operation, params)
        botocore.client.BaseClient._make_api_call = held_call
        path = os.path.join(os.environ["WORK"], "big.bin")
        with open(path, "wb") as f:
            for i in range(64):
                f.write(os.urandom(MiB))
        print("saving", flush=True)
        with seg(0).checkpoint() as ck:
            ck.put_object("small", {"first": "object"})
            ck.put_file("big.bin", path)
        print("finished", flush=True)
    """))
    env = dict(_child_env(s3_env, tmp_path), PBT_S3_CONCURRENCY="2", KILL_AT=kill_at)
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "saving"
        client = moto_server.client()
        if kill_at == "upload":
            deadline = time.monotonic() + 60
            parts = 0
            while time.monotonic() < deadline and parts < 2:  # until the two parts it lets through are in
                for up in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
                    parts = len(client.list_parts(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
                                .get("Parts", []))
                time.sleep(0.05)
            assert parts >= 2, "the upload never started"
        else:
            # The marker is written only after every object's upload has returned (completed).
            assert proc.stdout.readline().strip() == "marker"
            assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # The server may still be working on requests the writer sent before it died (a part, or the
    # CompleteMultipartUpload when the kill came after the last part): a gc that starts later sees
    # their results, so this one does too.
    _wait_requests_done(moto_server)

    storage = open_storage(ckpt)
    reader_seg = Segment({"version": 1, "training": "t", "member": 0, "segment": 1, "hyperparameters": {},
                          "steps": {"start": 1, "budget": 1}, "restore": ckpt, "checkpoint": f"{base}m0/1/",
                          "result": None, "gc": []})
    keys = storage.list(ckpt)
    assert any(k.endswith("/small") for k in keys), keys  # the killed writer got that far
    if kill_at == "marker":  # every object is whole in the bucket; only the marker is missing
        big = [k for k in keys if k.endswith("/big.bin")]
        assert len(big) == 1, keys
        key = ckpt.removeprefix(f"s3://{bucket}/") + big[0]
        assert client.head_object(Bucket=bucket, Key=key)["ContentLength"] == 64 * MiB
    if previous:
        # The earlier commit still points at its own complete attempt: restorable and intact.
        assert reader_seg.restore() == {"version": "committed earlier"}
    else:
        assert not storage.exists(ckpt)
        with pytest.raises(CheckpointNotFoundError):
            reader_seg.restore()
    # gc of the prefix removes the orphaned objects and aborts the dangling multipart upload.
    storage.delete(ckpt)
    assert storage.list(ckpt) == []
    assert not moto_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads")
