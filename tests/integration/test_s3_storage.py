"""pbt_worker against a real S3-compatible server process (moto server mode) on loopback."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

import pytest
from pbt_worker import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    PermanentStorageError,
    Segment,
    TransientStorageError,
    open_storage,
)
from pbt_worker.storage.s3 import S3Storage

MiB = 1024 * 1024


def make(base: str, k: int, *, member: int = 0, gc: list[str] | None = None,
         storage: Any = None) -> Segment:
    data: dict[str, Any] = {
        "version": 1, "training": "t", "member": member, "segment": k, "hyperparameters": {"lr": 0.1},
        "steps": {"start": 10 * k, "budget": 10},
        "restore": f"{base}t/m{member:03d}/{k - 1:05d}/" if k > 0 else None,
        "checkpoint": f"{base}t/m{member:03d}/{k:05d}/", "result": None, "gc": gc or [],
    }
    return Segment(data, storage)


@pytest.mark.parametrize(
    "obj",
    [b"", b"raw bytes", os.urandom(20 * MiB), {"w": list(range(1000)), "name": "m"}, 3.5, None],
    ids=["empty-bytes", "bytes", "bytes-20MiB-multipart", "dict", "float", "none"],
)
def test_object_round_trip(s3_env: dict[str, str], obj: Any) -> None:
    base = s3_env["PBT_TEST_BASE"]
    make(base, 0).save(obj)
    assert make(base, 1).restore() == obj


def test_large_pickle_goes_through_a_file(s3_env: dict[str, str]) -> None:
    base = s3_env["PBT_TEST_BASE"]
    big = {"blob": os.urandom(12 * MiB), "n": 1}  # > SMALL_OBJECT: restored via a temp file
    make(base, 0).save(big)
    assert make(base, 1).restore() == big


def test_file_dir_and_multi_round_trip(s3_env: dict[str, str], tmp_path: Path) -> None:
    base = s3_env["PBT_TEST_BASE"]
    src = tmp_path / "weights.bin"
    src.write_bytes(os.urandom(17 * MiB + 5))  # multipart with a short last part
    make(base, 0).save_file(src)
    seg = make(base, 1)
    out = seg.restore_file(dest=tmp_path / "restored.bin")
    assert out is not None and out.read_bytes() == src.read_bytes()

    tree = tmp_path / "tree"
    for i in range(20):
        (tree / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 3}" / f"f{i}.txt").write_text(f"file {i}")
    make(base, 0, member=1).save_dir(tree)
    restored = make(base, 1, member=1).restore_dir(tmp_path / "tree-out")
    assert restored is not None
    assert sorted(p.relative_to(restored).as_posix() for p in restored.rglob("*.txt")) == \
        sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*.txt"))
    assert (restored / "d1" / "f4.txt").read_text() == "file 4"

    with make(base, 0, member=2).checkpoint() as ck:
        ck.put_object("model", {"w": 1})
        ck.put_bytes("rng", b"seed")
        ck.put_file("weights.bin", src)
    reader = make(base, 1, member=2).restored()
    assert reader is not None
    assert reader.get_object("model") == {"w": 1} and reader.get_bytes("rng") == b"seed"
    assert reader.get_file("weights.bin", tmp_path / "w2").read_bytes() == src.read_bytes()


@pytest.mark.torch
def test_torch_round_trip(s3_env: dict[str, str]) -> None:
    torch = pytest.importorskip("torch")
    base = s3_env["PBT_TEST_BASE"]
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": 7}
    make(base, 0).save(state)
    restored = make(base, 1).restore()
    assert restored["step"] == 7
    for k, v in state["model"].items():
        assert torch.equal(restored["model"][k], v)
    # A whole module needs the full unpickler; the default falls back to it, weights_only=True refuses.
    make(base, 0, member=1).save(model)
    assert isinstance(make(base, 1, member=1).restore(), torch.nn.Linear)
    with pytest.raises(pickle.UnpicklingError):
        make(base, 1, member=1).restore(weights_only=True)


def test_commit_marker_lists_sizes_and_checksums(s3_env: dict[str, str], moto_server: Any) -> None:
    base = s3_env["PBT_TEST_BASE"]
    seg = make(base, 0)
    seg.save(b"x" * 1000)
    manifest = open_storage(base).manifest(seg.checkpoint_uri)
    assert manifest is not None
    entry = manifest.objects["state"]
    assert entry.size == 1000 and len(entry.sha256) == 64 and entry.encoding == "raw"
    assert manifest.meta["training"] == "t" and manifest.meta["steps"] == 10


def test_uncommitted_prefix_is_not_restorable(s3_env: dict[str, str], moto_server: Any) -> None:
    base = s3_env["PBT_TEST_BASE"]
    bucket = s3_env["PBT_TEST_BUCKET"]
    moto_server.client().put_object(Bucket=bucket, Key="ck/t/m000/00000/abc/state", Body=b"partial")
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        make(base, 1).restore()


def test_corruption_detected(s3_env: dict[str, str], moto_server: Any) -> None:
    base = s3_env["PBT_TEST_BASE"]
    seg = make(base, 0)
    seg.save(b"y" * 100)
    manifest = open_storage(base).manifest(seg.checkpoint_uri)
    assert manifest is not None
    key = "ck/t/m000/00000/" + manifest.objects["state"].key
    client = moto_server.client()
    client.put_object(Bucket=s3_env["PBT_TEST_BUCKET"], Key=key, Body=b"z" * 100)
    with pytest.raises(CheckpointCorruptError, match="sha256"):
        make(base, 1).restore()
    client.delete_object(Bucket=s3_env["PBT_TEST_BUCKET"], Key=key)
    with pytest.raises(CheckpointCorruptError, match="missing"):
        make(base, 1).restore()


def test_gc_and_delete(s3_env: dict[str, str]) -> None:
    base = s3_env["PBT_TEST_BASE"]
    storage = open_storage(base)
    make(base, 0, member=4).save(b"old")
    old = f"{base}t/m004/00000/"
    assert storage.exists(old) and len(storage.list(old)) == 2
    make(base, 0, gc=[old]).save(b"new")
    assert not storage.exists(old) and storage.list(old) == []
    storage.delete(old)  # idempotent


@pytest.mark.parametrize("order", ["save-report", "report-save"])
def test_a_gc_delete_that_fails_is_reported_in_the_result(s3_env: dict[str, str], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture, order: str) -> None:
    """A gc delete the server refuses (here: its bucket does not exist, as after a bucket was removed or
    renamed; a denied delete fails the same way) does not fail the segment, and its result says how many
    failed, so the driver hands the list to a later segment."""
    import json

    base = s3_env["PBT_TEST_BASE"]
    make(base, 0, member=4).save(b"old")
    old, gone = f"{base}t/m004/00000/", "s3://no-such-bucket-pbt-gc/t/m004/00001/"
    result = tmp_path / "result.json"
    data = {**make(base, 0, gc=[gone, old]).contract.raw, "result": str(result)}
    seg = Segment(data)
    if order == "save-report":
        seg.save(b"new")
        seg.report(0.5)
    else:
        seg.report(0.5)
        seg.save(b"new")
    assert json.loads(result.read_text()) == {"score": 0.5, "metrics": {}, "steps": 10, "gcFailed": 1}
    assert seg.gc_failed == [gone] and not open_storage(base).exists(old)
    assert "no-such-bucket-pbt-gc" in caplog.text and "a later segment will retry" in caplog.text


def test_many_objects_delete_in_batches(s3_env: dict[str, str], tmp_path: Path) -> None:
    base = s3_env["PBT_TEST_BASE"]
    tree = tmp_path / "many"
    tree.mkdir()
    for i in range(1100):  # > 1000: DeleteObjects takes at most 1000 keys per call
        (tree / f"{i}.txt").write_text(str(i))
    seg = make(base, 0)
    seg.save_dir(tree)
    storage = open_storage(base)
    assert len(storage.list(seg.checkpoint_uri)) == 1101
    storage.delete(seg.checkpoint_uri)
    assert storage.list(seg.checkpoint_uri) == []


# -- errors -------------------------------------------------------------------------------------------------

def test_missing_bucket_fails_fast_and_names_it(s3_env: dict[str, str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    base = "s3://no-such-bucket-pbt/ck/"
    start = time.monotonic()
    with pytest.raises(PermanentStorageError) as info:
        make(base, 0).save(b"x")
    assert "retrying" not in caplog.text and time.monotonic() - start < 60
    assert "no-such-bucket-pbt" in str(info.value) and "bucket does not exist" in str(info.value)
    with pytest.raises(PermanentStorageError, match="bucket does not exist"):
        make(base, 1).restore()


def test_server_down_is_transient_and_bounded(s3_env: dict[str, str], moto_server: Any) -> None:
    storage = S3Storage(retry_seconds=2.0)
    base = s3_env["PBT_TEST_BASE"]
    moto_server.stop()
    try:
        start = time.monotonic()
        with pytest.raises(TransientStorageError) as info:
            make(base, 0, storage=storage).save(b"x")
        assert time.monotonic() - start < 60  # budget 2 s + one last attempt, even on a loaded machine
        assert base in str(info.value) and "attempts" in str(info.value)
    finally:
        moto_server.start()


def _storage_via(proxy: Any, **kw: Any) -> S3Storage:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=proxy.endpoint,
                          config=Config(retries={"mode": "standard", "max_attempts": 3},
                                        s3={"addressing_style": "path"}))
    return S3Storage(client, **kw)


def test_outage_shorter_than_budget_is_survived(s3_env: dict[str, str], fault_proxy: Any) -> None:
    import threading

    base = s3_env["PBT_TEST_BASE"]
    storage = _storage_via(fault_proxy, retry_seconds=60.0)
    fault_proxy.fail(10**9, "reset")  # every connection is reset until the outage ends
    threading.Timer(2.0, fault_proxy.fail, args=(0,)).start()
    start = time.monotonic()
    make(base, 0, storage=storage).save({"survived": True})
    assert time.monotonic() - start >= 1.5
    assert make(base, 1, storage=storage).restore() == {"survived": True}
    assert fault_proxy.injected > 3


@pytest.mark.parametrize("mode", ["503", "drop", "reset"])
def test_injected_faults_are_retried(s3_env: dict[str, str], fault_proxy: Any, tmp_path: Path,
                                     mode: str) -> None:
    base = s3_env["PBT_TEST_BASE"]
    storage = _storage_via(fault_proxy, retry_seconds=60.0)
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(20 * MiB))  # multipart: faults hit the create, part and complete calls
    fault_proxy.fail(8, mode)  # more than botocore's own 3 attempts: the outer retry loop is needed too
    make(base, 0, storage=storage).save_file(src)
    assert fault_proxy.injected == 8
    fault_proxy.fail(8, mode)
    out = make(base, 1, storage=storage).restore_file(dest=tmp_path / "out.bin")
    assert out is not None and out.read_bytes() == src.read_bytes()
    fault_proxy.fail(5, mode)
    make(base, 0, member=1, storage=storage).save({"small": 1})
    fault_proxy.fail(5, mode)
    assert make(base, 1, member=1, storage=storage).restore() == {"small": 1}


def test_persistent_503_gives_up_within_budget(s3_env: dict[str, str], fault_proxy: Any) -> None:
    base = s3_env["PBT_TEST_BASE"]
    storage = _storage_via(fault_proxy, retry_seconds=3.0)
    fault_proxy.fail(10**9, "503")
    start = time.monotonic()
    with pytest.raises(TransientStorageError) as info:
        make(base, 0, storage=storage).save(b"x")
    elapsed = time.monotonic() - start
    assert elapsed < 60, elapsed  # budget 3 s + one last attempt, even on a loaded machine
    assert "ServiceUnavailable" in str(info.value) and base in str(info.value)


@pytest.mark.parametrize("stored_size", [9 * MiB, 11 * MiB, 100])
def test_object_of_wrong_size_is_corrupt_at_once(s3_env: dict[str, str], moto_server: Any, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture, stored_size: int) -> None:
    base = s3_env["PBT_TEST_BASE"]
    src = tmp_path / "w.bin"
    src.write_bytes(os.urandom(10 * MiB))  # two ranges on restore
    seg = make(base, 0)
    seg.save_file(src)
    manifest = open_storage(base).manifest(seg.checkpoint_uri)
    assert manifest is not None
    key = "ck/t/m000/00000/" + manifest.objects["w.bin"].key
    moto_server.client().put_object(Bucket=s3_env["PBT_TEST_BUCKET"], Key=key, Body=os.urandom(stored_size))
    start = time.monotonic()
    with pytest.raises(CheckpointCorruptError, match="commit marker"):
        make(base, 1).restore_file(dest=tmp_path / "out.bin")
    assert "retrying" not in caplog.text, "a corrupt object must not be retried"
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out.bin").exists()


def test_storage_with_env_reads_the_mapping_not_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an inline function's segments get (spec.worker.env over this environment): every setting comes
    from the mapping, os.environ is neither read for them nor changed."""
    from pbt_worker.storage import FileStorage, storage_with_env

    for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    env = {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_REGION": "eu-west-3", "AWS_ACCESS_KEY_ID": "ak",
           "AWS_SECRET_ACCESS_KEY": "sk", "PBT_S3_PART_SIZE": str(6 * 1024 * 1024),
           "PBT_WORKER_TMPDIR": str(tmp_path), "PBT_FILE_FSYNC": "0"}
    before = dict(os.environ)
    s3 = storage_with_env("s3://b/p/", env)
    assert isinstance(s3, S3Storage) and s3.part_size == 6 * 1024 * 1024
    assert s3.client.meta.endpoint_url == "http://127.0.0.1:9" and s3.client.meta.region_name == "eu-west-3"
    creds = s3.client._request_signer._credentials
    assert (creds.access_key, creds.secret_key) == ("ak", "sk")
    assert s3.spool_dir("s3://b/p/") == str(tmp_path)
    files = storage_with_env(f"file://{tmp_path}/", env)
    assert isinstance(files, FileStorage) and files.fsync is False
    assert dict(os.environ) == before
