"""The background durability barrier (local/durability.py): numbered, coalesced, errors surface in the
driver's thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pbt_operator.local.durability import Barrier, fsync_tree


def test_barrier_is_durable_only_after_its_sync_and_coalesces_what_piled_up() -> None:
    release = threading.Event()
    started = threading.Semaphore(0)
    syncs: list[int] = []
    wakes: list[int] = []
    b: Barrier

    def sync() -> None:
        syncs.append(b.requested)  # what this sync covers: everything requested before it started
        started.release()
        release.wait()

    b = Barrier(sync, wake=lambda: wakes.append(b.durable))
    assert b.request() == 1
    assert started.acquire(timeout=5)
    assert b.durable == 0  # the sync has not returned: nothing decided from batch 1 may start
    assert b.request() == 2 and b.request() == 3  # arrive while the first sync runs
    release.set()
    b.wait(3)
    assert b.durable == 3
    assert syncs == [1, 3]  # batches 2 and 3 shared one sync
    b.close()
    assert wakes == [1, 3]


def test_barrier_error_is_raised_in_the_driver() -> None:
    def sync() -> None:
        raise OSError("disk gone")

    b = Barrier(sync)
    b.request()
    with pytest.raises(OSError, match="disk gone"):
        b.wait()
    with pytest.raises(OSError, match="disk gone"):
        b.request()
    assert b.durable == 0


def test_barrier_without_sync_is_durable_at_once() -> None:
    b = Barrier(None)
    assert b.request() == 1 and b.durable == 1
    b.wait()
    b.close()


def test_fsync_tree_syncs_the_new_files_their_folders_and_parents(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    ckpt = tmp_path / "t" / "m000" / "00003"
    ckpt.mkdir(parents=True)
    (ckpt / "state").write_bytes(b"x")
    (ckpt / "_marker").write_bytes(b"{}")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with open(tmp_path / "journal", "a") as j:
        datasynced: list[int] = []
        monkeypatch.setattr(os, "fdatasync", datasynced.append)
        fsync_tree([ckpt, tmp_path / "t" / "m001" / "gone"], [j.fileno()], tmp_path / "t")
        assert datasynced == [j.fileno()]
    assert sorted(synced) == sorted(str(p) for p in [ckpt / "state", ckpt / "_marker", ckpt, ckpt.parent,
                                                     tmp_path / "t"])
