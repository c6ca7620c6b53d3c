"""Segment save/restore/report over file:// and mem://, plus the run/execute helpers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pbt_worker import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    PbtWorkerError,
    PermanentError,
    ReportError,
    Segment,
    execute,
    mem_storage,
    open_storage,
)


def make(uri_base: str, k: int, *, restore: bool = True, result: str | None = None,
         gc: list[str] | None = None, member: int = 0) -> Segment:
    data: dict[str, Any] = {
        "version": 1, "training": "t", "member": member, "segment": k,
        "hyperparameters": {"lr": 0.1}, "steps": {"start": 10 * k, "budget": 10},
        "restore": f"{uri_base}t/m{member:03d}/{k - 1:05d}/" if restore and k > 0 else None,
        "checkpoint": f"{uri_base}t/m{member:03d}/{k:05d}/",
        "result": result, "gc": gc or [],
    }
    return Segment(data)


@pytest.fixture(params=["file", "mem"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path}/ck/"
    mem_storage().clear()
    return f"mem://{tmp_path.name}/"


@pytest.mark.parametrize("obj", [b"\x00raw bytes", {"w": [1.0, 2.0], "n": 3}, ("a", 1), 42, None, "text"])
def test_object_round_trip(base: str, obj: Any) -> None:
    make(base, 0).save(obj)
    assert make(base, 1).restore() == obj


def test_first_segment_restores_nothing(base: str) -> None:
    seg = make(base, 0)
    assert seg.restore() is None and seg.restore_file() is None and seg.restore_dir() is None
    assert seg.restored() is None


def test_restored_object_is_private(base: str) -> None:
    state = {"w": [1, 2]}
    make(base, 0).save(state)
    state["w"].append(99)  # mutating after save must not change the checkpoint
    a = make(base, 1).restore()
    a["w"].append(7)  # nor must mutating a restored copy
    assert make(base, 1).restore() == {"w": [1, 2]}


def test_file_and_dir_round_trip(base: str, tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(3000))
    make(base, 0).save_file(src)
    seg = make(base, 1)
    restored = seg.restore_file(dest=tmp_path / "out.bin")
    assert restored is not None and restored.read_bytes() == src.read_bytes()
    assert Path(seg.restore()).read_bytes() == src.read_bytes()
    seg.close()

    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a.txt").write_text("a")
    (tree / "sub" / "deeper" / "b.bin").write_bytes(b"b" * 10)
    make(base, 0, member=1).save_dir(tree)
    out = make(base, 1, member=1).restore_dir(tmp_path / "restored")
    assert out is not None
    assert (out / "a.txt").read_text() == "a"
    assert (out / "sub" / "deeper" / "b.bin").read_bytes() == b"b" * 10


def test_multi_object_checkpoint(base: str, tmp_path: Path) -> None:
    f = tmp_path / "log.txt"
    f.write_text("hello")
    with make(base, 0).checkpoint() as ck:
        ck.put_object("model", {"w": 1})
        ck.put_bytes("rng", b"1234")
        ck.put_file("log.txt", f)
    seg = make(base, 1)
    reader = seg.restored()
    assert reader is not None and reader.names == ["log.txt", "model", "rng"]
    assert reader.get_object("model") == {"w": 1}
    assert reader.get_bytes("rng") == b"1234"
    with pytest.raises(PbtWorkerError, match="several objects"):
        seg.restore()


def test_checkpoint_is_immutable_within_a_segment(base: str) -> None:
    seg = make(base, 0)
    seg.save(1)
    with pytest.raises(PbtWorkerError, match="already saved"):
        seg.save(2)


def test_failed_writer_commits_nothing(base: str) -> None:
    seg = make(base, 0)
    with pytest.raises(RuntimeError), seg.checkpoint() as ck:
        ck.put_object("model", {"w": 1})
        raise RuntimeError("killed mid-save")
    storage = open_storage(seg.checkpoint_uri)
    assert not storage.exists(seg.checkpoint_uri)
    assert storage.list(seg.checkpoint_uri)  # the orphan object is there, but unreferenced
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint"):
        make(base, 1).restore()


def test_restore_after_a_segment_that_never_saved_says_so(base: str) -> None:
    """A worker that reports a score but never saves fails only at the next segment's restore: the
    error must point at the missing save, not only at storage."""
    make(base, 0).report(1.0)
    with pytest.raises(CheckpointNotFoundError, match=r"reported success without a checkpoint: every segment "
                                                      r"must call seg\.save"):
        make(base, 1).restore()


def test_restore_after_an_uncommitted_writer_says_so(base: str) -> None:
    """Objects under the prefix but no marker: the writer never committed; blaming a missing
    seg.save() (what the message said) sends the user looking for the wrong mistake."""
    make(base, 0).checkpoint().put_object("model", {"w": 1})  # no `with`, no commit
    with pytest.raises(CheckpointNotFoundError, match=r"holds objects but no commit marker.*ck\.commit\(\)"):
        make(base, 1).restore()


def test_rerun_replaces_a_committed_checkpoint(base: str) -> None:
    make(base, 0).save("first attempt")
    make(base, 0).save("second attempt")  # a retried segment writes the same prefix again
    assert make(base, 1).restore() == "second attempt"


def test_gc_after_save(base: str) -> None:
    make(base, 0, member=1).save("old")
    old = f"{base}t/m001/00000/"
    storage = open_storage(old)
    assert storage.exists(old)
    make(base, 0, gc=[old, f"{base}t/m009/00000/"]).save("new")  # a missing prefix is not an error
    assert not storage.exists(old) and storage.list(old) == []


def test_gc_failure_is_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    from pbt_worker.storage import FileStorage

    def refuse(self: FileStorage, prefix: str) -> None:
        raise PermissionError("read-only filesystem")

    monkeypatch.setattr(FileStorage, "delete", refuse)
    base = f"file://{tmp_path}/"
    seg = make(base, 0, gc=[f"{base}t/m005/00000/"])
    seg.save("x")  # the save succeeds although gc failed
    assert open_storage(base).exists(seg.checkpoint_uri)
    assert "could not delete" in caplog.text and "read-only filesystem" in caplog.text


def test_corrupt_object_detected(tmp_path: Path) -> None:
    base = f"file://{tmp_path}/"
    make(base, 0).save(b"x" * 100)
    ck = tmp_path / "t" / "m000" / "00000"
    (obj,) = [p for p in ck.rglob("state")]
    obj.write_bytes(b"y" * 100)
    with pytest.raises(CheckpointCorruptError, match="sha256"):
        make(base, 1).restore()
    obj.write_bytes(b"x" * 99)
    with pytest.raises(CheckpointCorruptError, match="size"):
        make(base, 1).restore()
    obj.unlink()
    with pytest.raises(CheckpointCorruptError, match="missing"):
        make(base, 1).restore()


def test_corrupt_large_object_is_reported_as_corrupt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An object over SMALL_OBJECT is restored through a temp file, which the failed verification
    removes: the CheckpointCorruptError must reach the user, not a FileNotFoundError about the temp file."""
    from pbt_worker import checkpoint

    monkeypatch.setattr(checkpoint, "SMALL_OBJECT", 64)
    base = f"file://{tmp_path}/"
    make(base, 0).save({"w": list(range(1000))})
    (obj,) = [p for p in (tmp_path / "t" / "m000" / "00000").rglob("state")]
    data = bytearray(obj.read_bytes())
    data[100] ^= 1
    obj.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="sha256"):
        make(base, 1).restore()


def test_delete_removes_marker_first(tmp_path: Path) -> None:
    base = f"file://{tmp_path}/"
    seg = make(base, 0)
    seg.save("x")
    storage = open_storage(base)
    assert "_COMMITTED" in storage.list(seg.checkpoint_uri)
    storage.delete(seg.checkpoint_uri)
    assert not storage.exists(seg.checkpoint_uri)
    storage.delete(seg.checkpoint_uri)  # idempotent


# -- report -------------------------------------------------------------------------------------------------

def test_report_writes_result(tmp_path: Path) -> None:
    result = tmp_path / "res" / "result.json"
    seg = make(f"file://{tmp_path}/", 2, result=str(result))
    seg.report(score=0.93, loss=0.21, name="ok", nan_metric=float("nan"))
    doc = json.loads(result.read_text())
    assert doc == {"score": 0.93, "metrics": {"loss": 0.21, "name": "ok", "nan_metric": None}, "steps": 30}
    seg.report(0.5, steps=25, metrics={"steps": 1})
    assert json.loads(result.read_text()) == {"score": 0.5, "metrics": {"steps": 1}, "steps": 25}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -math.inf])
def test_nan_score_is_a_failure(tmp_path: Path, bad: float) -> None:
    result = tmp_path / "result.json"
    seg = make(f"file://{tmp_path}/", 0, result=str(result))
    with pytest.raises(ReportError, match="diverged"):
        seg.report(score=bad)
    doc = json.loads(result.read_text())
    assert doc == {"error": f"score is {bad}: the segment diverged or failed", "diverged": True}
    assert execute(lambda s: bad, make("mem://x/", 0))["diverged"] is True  # returned, not reported


def test_report_too_large(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    seg = make(f"file://{tmp_path}/", 0, result=str(result))
    with pytest.raises(ReportError, match="4096"):
        seg.report(score=1.0, metrics={f"metric_{i}": float(i) for i in range(400)})
    doc = json.loads(result.read_text())
    assert "error" in doc and len(result.read_bytes()) <= 4096
    seg.write_error("x" * 10000)
    assert len(result.read_bytes()) <= 4096


def test_report_rejects_non_numbers(tmp_path: Path) -> None:
    seg = make(f"file://{tmp_path}/", 0)
    with pytest.raises(ReportError):
        seg.report(score="high")  # type: ignore[arg-type]
    with pytest.raises(ReportError):
        seg.report(score=True)


# -- execute / run ------------------------------------------------------------------------------------------

def test_execute_score_dict_and_error() -> None:
    mem_storage().clear()
    assert execute(lambda s: 0.5, make("mem://x/", 0))["score"] == 0.5
    assert execute(lambda s: {"score": 1, "loss": 2}, make("mem://x/", 0))["metrics"] == {"loss": 2}

    def boom(seg: Segment) -> float:
        raise ValueError("bad lr")

    assert execute(boom, make("mem://x/", 0)) == {"error": "ValueError: bad lr"}
    assert "error" in execute(lambda s: None, make("mem://x/", 0))
    assert "error" in execute(lambda s: float("nan"), make("mem://x/", 0))



def test_execute_says_once_that_a_returned_score_replaced_the_reported_one(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import pbt_worker.runner

    monkeypatch.setattr(pbt_worker.runner, "_warned_returned_over_reported", False)

    def both(seg: Segment) -> float:
        seg.report(0.25)
        return 0.75

    assert execute(both, make("mem://x/", 0))["score"] == 0.75
    assert "seg.report(score=0.25) and returned 0.75: the returned score counts" in caplog.text
    caplog.clear()
    execute(both, make("mem://x/", 0))
    execute(lambda s: s.report(0.5) and None, make("mem://x/", 0))
    assert "returned score" not in caplog.text

def test_execute_fails_a_segment_whose_checkpoint_writer_never_committed(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """seg.checkpoint() used without `with` (and without ck.commit()) wrote objects that no marker lists:
    the segment passed, and the member's next segment failed on restore blaming this one. A segment that
    saves nothing at all still passes (a stateless function never restores either), with a warning."""
    base = f"file://{tmp_path}/"
    result = tmp_path / "result.json"

    def unfinished(s: Segment) -> float:
        s.checkpoint().put_object("model", {"w": 1})
        return 0.5

    out = execute(unfinished, make(base, 0, result=str(result)))
    assert "never committed" in out["error"] and "'model'" in out["error"] and "with seg.checkpoint()" in out["error"]
    assert json.loads(result.read_text()) == out

    def committed(s: Segment) -> float:
        ck = s.checkpoint()
        ck.put_object("model", {"w": 1})
        ck.commit()
        return 0.5

    assert execute(committed, make(base, 1, restore=False))["score"] == 0.5
    assert execute(lambda s: 0.25, make(base, 2, restore=False))["score"] == 0.25
    assert "saved no checkpoint" in caplog.text


def _run_script(tmp_path: Path, body: str,
                contract: dict[str, Any] | None) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(body))
    env = dict(os.environ)
    env.pop("PBT_SEGMENT", None)
    if contract is not None:
        env["PBT_SEGMENT"] = json.dumps(contract)
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)


def _script_contract(tmp_path: Path, result: Path) -> dict[str, Any]:
    return {
        "version": 1, "training": "t", "member": 0, "segment": 0, "hyperparameters": {"x": 2.0},
        "steps": {"start": 0, "budget": 5}, "restore": None, "checkpoint": f"file://{tmp_path}/ck/",
        "result": str(result), "gc": [],
    }


def test_run_in_a_subprocess(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    contract = _script_contract(tmp_path, result)
    ok = _run_script(tmp_path, """
        import pbt_worker
        def train(seg):
            seg.save({"x": seg.hyperparameters["x"]})
            return {"score": seg.hyperparameters["x"] ** 2, "loss": 1.0}
        pbt_worker.run(train)
    """, contract)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(result.read_text()) == {"score": 4.0, "metrics": {"loss": 1.0}, "steps": 5}

    bad = _run_script(tmp_path, """
        import pbt_worker
        def train(seg):
            raise RuntimeError("out of memory")
        pbt_worker.run(train)
    """, contract)
    assert bad.returncode == 1
    assert json.loads(result.read_text()) == {"error": "RuntimeError: out of memory"}

    missing = _run_script(tmp_path, "import pbt_worker\npbt_worker.run(lambda s: 1.0)\n", None)
    assert missing.returncode == 2 and "PBT_SEGMENT is not set" in missing.stderr


def test_a_permanent_failure_says_so_in_the_result(tmp_path: Path) -> None:
    """A training function's PermanentError, and a contract this worker refuses (a driver newer than the
    image), write `"permanent": true`, which tells the driver not to retry; other errors do not."""
    result = tmp_path / "result.json"
    contract = _script_contract(tmp_path, result)
    gone = _run_script(tmp_path, """
        import pbt_worker
        def train(seg):
            raise pbt_worker.PermanentError("no dataset at /data/train")
        pbt_worker.run(train)
    """, contract)
    assert gone.returncode == 1
    assert json.loads(result.read_text()) == {"error": "PermanentError: no dataset at /data/train", "permanent": True}

    newer = _run_script(tmp_path, "import pbt_worker\npbt_worker.run(lambda s: 1.0)\n", {**contract, "version": 2})
    assert newer.returncode == 2 and "field 'version' is 2" in newer.stderr
    doc = json.loads(result.read_text())
    assert doc["permanent"] is True and doc["error"].startswith("ContractError: PBT_SEGMENT: field 'version' is 2")

    result.unlink()
    script = "import pbt_worker\npbt_worker.run(lambda s: 1.0)\n"
    assert _run_script(tmp_path, script, {**contract, "hyperparameters": [1]}).returncode == 2
    assert json.loads(result.read_text())["permanent"] is True  # any refused field, not only the version
    result.unlink()
    assert _run_script(tmp_path, script, {**contract, "result": 7}).returncode == 2
    assert not result.exists()  # nowhere to write: the message on stderr is all there is
    def huge(seg: Segment) -> float:
        raise PermanentError("x" * 9000)

    big = execute(huge, make("mem://x/", 0))
    assert big["permanent"] is True and len(json.dumps(big)) <= 4096


def test_mem_storage_is_thread_safe() -> None:
    """The inline executor runs many members at once on one mem:// store."""
    from concurrent.futures import ThreadPoolExecutor

    mem_storage().clear()
    base = "mem://threads/"

    def member(m: int) -> int:
        for k in range(200):
            seg = make(base, k, member=m, gc=[f"{base}t/m{m:03d}/{k - 2:05d}/"] if k >= 2 else [])
            state = seg.restore() or {"n": 0, "member": m}
            assert state["member"] == m
            state["n"] += 1
            seg.save(state)
        final = make(base, 200, member=m).restore()
        return int(final["n"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(member, range(16))) == [200] * 16
    store = mem_storage()
    assert all(len(store.list(f"{base}t/m{m:03d}/{k:05d}/")) == 0 for m in range(16) for k in range(198))


def test_mem_copy_preserves_aliasing_and_cycles() -> None:
    import collections

    mem_storage().clear()
    shared = [1.0, 2.0]
    state: dict[str, Any] = {"a": shared, "b": shared, "od": collections.OrderedDict(x=[1]), "t": (1, [2])}
    state["self"] = state
    make("mem://alias/", 0).save(state)
    back = make("mem://alias/", 1).restore()
    assert back["a"] is back["b"] and back["a"] is not shared and back["a"] == shared
    assert back["self"] is back
    assert back["od"] == state["od"] and back["od"]["x"] is not state["od"]["x"]
    assert back["t"] == (1, [2]) and back["t"][1] is not state["t"][1]


def test_without_a_writable_temp_dir_checkpoints_go_through_memory(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A container with a read-only root filesystem and no /tmp volume (the real-node tests run the worker
    image that way) has no temp directory: saving and restoring must still work, from memory."""
    moto = pytest.importorskip("moto")
    import boto3
    from pbt_worker.checkpoint import SMALL_OBJECT
    from pbt_worker.storage import s3 as s3mod

    for k, v in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("PBT_WORKER_TMPDIR", "/nonexistent/pbt-no-tmp")
    big = os.urandom(SMALL_OBJECT + 1000)  # restored through the large-object path
    with moto.mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="bucket")
        s0 = make("s3://bucket/p/", 0)
        s0.save({"w": big})
        s1 = make("s3://bucket/p/", 1)
        assert s1.restore() == {"w": big}
        # bytes larger than a part, which the S3 backend otherwise spools to a file for parallel parts
        st = s3mod.S3Storage(part_size=5 * 1024 * 1024)
        data = os.urandom(6 * 1024 * 1024)
        info = st.put("s3://bucket/q/", "blob", data)
        assert info.size == len(data) and st.get_bytes("s3://bucket/q/", "blob") == data
    assert "no writable temp directory" in caplog.text


def test_the_segment_record_is_written_beside_the_checkpoints(base: str, tmp_path: Path) -> None:
    """With `record` in the contract, report() writes the segment's complete record (decision, parent,
    checkpoint, result, timings) in one object; a rerun of the same attempt replaces it; a failure
    writes a record with the error."""
    from pbt_operator.contract import build_contract
    from pbt_operator.core.types import Suggestion
    from pbt_operator.results_source import record_from_storage

    root = base.rstrip("/")
    sug = Suggestion(2, 3, {"lr": 0.1}, (0, 2), 30, 10, "exploit", score_before=0.5, donor=0, reason="why", attempt=1)
    contract = build_contract("t", sug, root, str(tmp_path / "r.json"), record=True)
    uri = contract["record"]["uri"]
    assert uri == f"{root}/t/records/m002/00003-a1.json"
    store = open_storage(uri)
    prefix, key = uri.rsplit("/", 1)
    for score in (0.7, 0.8):  # the second: a rerun after a disruption
        seg = Segment(contract)
        seg.save({"w": score})
        seg.report(score, loss=0.1)
    doc = json.loads(store.get_bytes(prefix + "/", key))
    assert doc["score"] == 0.8 and doc["metrics"] == {"loss": 0.1} and doc["steps"] == {"start": 30, "end": 40}
    assert doc["restore"] == f"{root}/t/m000/00002/" and doc["checkpoint"] == f"{root}/t/m002/00003/"
    assert doc["decision"] == sug.to_dict() and doc["seconds"] >= 0 and doc["finished"] >= doc["started"]
    finished, rec = record_from_storage(doc)
    assert finished == doc["finished"]
    assert rec.suggestion == sug and rec.score == 0.8 and rec.steps_end == 40 and rec.status == "done"
    failing = dict(contract, record={"uri": f"{root}/t/records/m002/00003-a2.json", "decision": sug.to_dict()})
    with pytest.raises(ReportError):
        Segment(failing).report(float("nan"))
    _, bad = record_from_storage(json.loads(store.get_bytes(prefix + "/", "00003-a2.json")))
    assert bad.status == "failed" and bad.error == "diverged: score is nan: the segment diverged or failed"


def test_a_record_field_must_name_an_object() -> None:
    from pbt_worker.contract import parse_contract
    from pbt_worker.errors import ContractError

    data = {"version": 1, "training": "t", "member": 0, "segment": 0, "hyperparameters": {}, "restore": None,
            "steps": {"start": 0, "budget": 1}, "checkpoint": "file:///x/t/m000/00000/", "result": "r", "gc": []}
    for bad, why in (("file:///x/r.json", "must be an object"), ({"uri": "file:///x/records/"}, "not a prefix"),
                     ({"decision": {}}, "record.uri")):
        with pytest.raises(ContractError, match=why):
            parse_contract({**data, "record": bad})
    assert parse_contract({**data, "record": {"uri": "file:///x/r.json"}}).record == "file:///x/r.json"


# -- gc deletes that fail ----------------------------------------------------------------------------------

class DeniedDeletes:
    """A file:// storage whose delete of some prefixes raises, as an S3 delete does when the bucket
    denies it or the server is unreachable past the retry budget."""

    def __init__(self, denied: set[str]) -> None:
        from pbt_worker.storage.file import FileStorage

        self.inner = FileStorage()
        self.denied = denied
        self.deletes: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def delete(self, prefix: str) -> None:
        from pbt_worker import PermanentStorageError

        self.deletes.append(prefix)
        if prefix in self.denied:
            raise PermanentStorageError(f"AccessDenied deleting {prefix}")
        self.inner.delete(prefix)


def _gc_setup(tmp_path: Path, denied: int) -> tuple[Segment, DeniedDeletes, list[str], Path]:
    base = f"file://{tmp_path}/ck/"
    old = []
    for k in range(3):
        make(base, k, member=1, restore=False).save(b"old")
        old.append(f"{base}t/m001/{k:05d}/")
    storage = DeniedDeletes(set(old[:denied]))
    result = tmp_path / "result.json"
    raw = dict(make(base, 0, result=str(result), gc=old).contract.raw)
    return Segment(raw, storage), storage, old, result


def _save_and_report(seg: Segment, order: str, **metrics: float) -> None:
    """The two orders a program may call them in ("save-report" or "report-save")."""
    if order == "save-report":
        seg.save(b"new")
        seg.report(0.5, **metrics)
    else:
        seg.report(0.5, **metrics)
        seg.save(b"new")


@pytest.mark.parametrize("order", ["save-report", "report-save"])
def test_failed_gc_deletes_are_counted_in_the_result(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                     order: str) -> None:
    """A delete that fails after the save is counted in the result (gcFailed) so that the driver hands
    the gc list to a later segment; reported before the save, the result file is rewritten to say so."""
    seg, storage, old, result = _gc_setup(tmp_path, denied=2)
    _save_and_report(seg, order, loss=0.25)
    want = {"score": 0.5, "metrics": {"loss": 0.25}, "steps": 10, "gcFailed": 2}
    assert json.loads(result.read_text()) == want and seg.last_result == want
    assert seg.gc_failed == old[:2] and storage.deletes == old
    assert [Path(u[len("file://"):]).exists() for u in old] == [True, True, False]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and all("a later segment will retry" in w for w in warnings)
    assert old[0] in warnings[0] and "AccessDenied" in warnings[0]


@pytest.mark.parametrize("order", ["save-report", "report-save"])
def test_gc_deletes_that_succeed_leave_the_result_unchanged(tmp_path: Path, order: str) -> None:
    seg, _, old, result = _gc_setup(tmp_path, denied=0)
    _save_and_report(seg, order)
    assert json.loads(result.read_text()) == {"score": 0.5, "metrics": {}, "steps": 10}
    assert not any(Path(u[len("file://"):]).exists() for u in old)


def test_a_report_before_the_save_keeps_room_for_the_failed_delete_count(tmp_path: Path) -> None:
    """The rewritten result must still fit the 4096-byte termination message: a result reported before
    the save is checked with room for gcFailed (at most the gc list's length)."""
    seg, _, _, result = _gc_setup(tmp_path, denied=3)
    base = len(json.dumps({"score": 0.5, "metrics": {"m": ""}, "steps": 10}, separators=(",", ":")))
    with pytest.raises(ReportError, match="kept for gcFailed"):
        seg.report(0.5, m="x" * (4096 - base))  # exactly 4096 bytes: fits alone, not with the count
    seg.report(0.5, m="x" * (4096 - base - len(',"gcFailed":3')))
    seg.save(b"new")
    doc = json.loads(result.read_text())
    assert doc["gcFailed"] == 3 and len(result.read_bytes()) == 4096


def test_an_error_result_is_not_rewritten(tmp_path: Path) -> None:
    seg, _, _, result = _gc_setup(tmp_path, denied=1)
    seg.write_error("diverged")
    seg.save(b"new")
    assert json.loads(result.read_text()) == {"error": "diverged"}


@pytest.mark.parametrize("bad, where", [
    (lambda x: x, "state"),
    ({"model": {"w": [1.0]}, "fn": [0, lambda x: x]}, "state['fn'][1]"),
    ({"gen": (i for i in range(3))}, "state['gen']"),
])
def test_a_state_that_cannot_be_pickled_names_where_and_what_to_do(base: str, bad: Any, where: str) -> None:
    """pickle's own error ("cannot pickle 'generator' object") names neither the part of the state nor the
    fix; save() names both, and leaves nothing committed, so a corrected save can follow. mem:// (a deep
    copy, no pickling) fails the same way for what cannot be copied; a lambda it keeps."""
    from pbt_worker import SaveError

    seg = make(base, 0)
    if base.startswith("mem://") and "gen" not in where:
        seg.save(bad)  # functions deep-copy (by reference): nothing to refuse
        return
    with pytest.raises(SaveError, match=r"cannot be pickled") as info:
        seg.save(bad)
    if not base.startswith("mem://"):
        assert f"at {where}:" in str(info.value)
    assert "state_dict" in str(info.value)
    assert isinstance(info.value, TypeError) and seg.saved is None
    seg.save({"w": [1.0]})
    assert make(base, 1).restore() == {"w": [1.0]}


def test_a_full_disk_while_serialising_names_the_checkpoint_and_the_spool(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """save() serialises into a spool file first; a full disk there raised a bare
    "OSError: [Errno 28] No space left on device" naming neither the checkpoint nor the directory."""
    import errno

    from pbt_worker import PermanentStorageError
    from pbt_worker.storage import base as storage_base

    def full(self: Any, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage_base.HashingWriter, "write", full)
    seg = make(f"file://{tmp_path}/", 0)
    with pytest.raises(PermanentStorageError, match="No space left") as info:
        seg.save({"w": [1.0] * 10})
    assert seg.checkpoint_uri in str(info.value) and "spool file" in str(info.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # the spool file is gone


def test_save_dir_of_an_empty_folder_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An empty folder (the training wrote its files elsewhere) was saved silently as an empty checkpoint."""
    (tmp_path / "out").mkdir()
    make(f"file://{tmp_path}/ck/", 0).save_dir(tmp_path / "out")
    assert "holds no files" in caplog.text and str(tmp_path / "out") in caplog.text
    assert list(make(f"file://{tmp_path}/ck/", 1).restore_dir(tmp_path / "back").iterdir()) == []


def test_numpy_integer_metrics_stay_integers(tmp_path: Path) -> None:
    """A count kept in numpy (np.int64, e.g. from .sum()) was reported as 3.0, a float."""
    np = pytest.importorskip("numpy")
    result = tmp_path / "r.json"
    make(f"file://{tmp_path}/", 0, result=str(result)).report(np.float32(0.5), n=np.int64(3), acc=np.float64(0.25))
    doc = json.loads(result.read_text())
    assert doc["metrics"] == {"n": 3, "acc": 0.25} and isinstance(doc["metrics"]["n"], int)
