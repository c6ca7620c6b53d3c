"""The member cache's ordering rules (kube/membercache.py): a pass must never read a member older than
one our own writes returned, deleted members leave, a re-LIST keeps what is newer than itself, and only
the members of trainings whose passes asked for them are kept."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from pbt_operator.kube.membercache import MemberCache, MemberStore, StoreUnusable
from pbt_operator.kube.ownership import split_owned


def member(name: str, rv: int | str, training: str = "t", owner: str = "uid-1", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": str(rv), "labels": {"pbt.dev/training": training},
                         "ownerReferences": [{"uid": owner}]}, "status": dict(status)}


def store(*trainings: str) -> MemberStore:
    st = MemberStore()
    for t in trainings or ("t",):
        st.track(t)
        st.load(t, [], 1)
    return st


def names(objs: Any) -> list[str]:
    return [m["metadata"]["name"] for m in objs]


def test_newest_wins_whatever_the_order_of_offers() -> None:
    st = store()
    assert st.offer(member("t-m000", 5, step=1))
    assert not st.offer(member("t-m000", 3, step=0))  # an older watch event after it
    assert st.of_training("t")[0]["status"] == {"step": 1}  # type: ignore[index]
    assert st.offer(member("t-m000", 7, step=2))
    assert st.of_training("t")[0]["status"] == {"step": 2}  # type: ignore[index]


def test_our_write_is_not_replaced_by_older_watch_events() -> None:
    """The write's answer (rv 10) arrives before the watch has delivered the events before it."""
    st = store()
    st.load("t", [member("t-m000", 4, step=0)], 4)
    assert st.offer(member("t-m000", 10, step=2))  # write-through
    for rv, step in ((6, 1), (8, 1), (10, 2)):  # the watch catches up: older events, then our own
        st.offer(member("t-m000", rv, step=step))
        assert st.of_training("t")[0]["status"] == {"step": 2}  # type: ignore[index]
    assert st.offer(member("t-m000", 11, step=3))  # someone else's later write is taken
    assert st.of_training("t")[0]["status"] == {"step": 3}  # type: ignore[index]


def test_a_deleted_member_leaves_and_a_late_answer_does_not_bring_it_back() -> None:
    st = store()
    st.load("t", [member("t-m000", 4), member("t-m001", 4)], 4)
    assert st.delete(member("t-m001", 12))
    assert names(st.of_training("t")) == ["t-m000"]
    assert not st.offer(member("t-m001", 10))  # a write's answer overtaken by the deletion's event
    assert names(st.of_training("t")) == ["t-m000"]
    assert st.offer(member("t-m001", 15, owner="uid-2"))  # created again under that name: newer, taken
    assert st.of_training("t")[1]["metadata"]["ownerReferences"] == [{"uid": "uid-2"}]  # type: ignore[index]


def test_an_old_deletion_does_not_remove_a_member_created_again() -> None:
    st = store()
    st.offer(member("t-m000", 15, owner="uid-2"))  # our create's answer, before the old one's DELETED event
    assert not st.delete(member("t-m000", 12, owner="uid-1"))
    assert st.of_training("t")[0]["metadata"]["resourceVersion"] == "15"  # type: ignore[index]


def test_a_list_keeps_what_is_newer_than_itself_and_drops_what_it_lacks() -> None:
    st = store()
    st.load("t", [member("t-m000", 3), member("t-m001", 3), member("t-m002", 3), member("t-m003", 3)], 3)
    st.offer(member("t-m000", 25, step=9))  # written after the list below was taken
    st.offer(member("t-m001", 18, step=1))  # older than the list
    st.delete(member("t-m003", 22))  # deleted after the list was taken
    st.delete(member("t-m004", 19))  # deleted before it
    st.load("t", [member("t-m000", 17, step=5), member("t-m001", 19, step=2), member("t-m003", 14)], 20)
    got = {m["metadata"]["name"]: m for m in st.of_training("t") or []}
    assert sorted(got) == ["t-m000", "t-m001"]  # m002 is gone (not listed), m003 deleted after the list
    assert got["t-m000"]["status"] == {"step": 9} and got["t-m001"]["status"] == {"step": 2}
    assert st.tombstones["t"] == {"t-m003": 22}  # older tombstones are covered by the list


def test_only_tracked_trainings_are_kept_and_a_forgotten_one_leaves_memory() -> None:
    st = store("t")
    assert not st.offer(member("u-m000", 5, "u"))  # a training nobody asked for (finished, say)
    assert st.of_training("u") is None  # not loaded: the caller LISTs it
    st.track("u")
    assert st.offer(member("u-m000", 6, "u"))
    assert st.of_training("u") is None  # tracked but not listed yet: still not to be read
    st.load("u", [member("u-m000", 5, "u"), member("u-m001", 5, "u")], 5)
    assert names(st.of_training("u")) == ["u-m000", "u-m001"]
    assert st.of_training("u")[0]["metadata"]["resourceVersion"] == "6"  # type: ignore[index]
    st.untrack("u")
    assert st.of_training("u") is None and "u" not in st.objs and not st.offer(member("u-m000", 9, "u"))
    assert st.of_training("t") == []


def test_members_of_a_previous_training_of_the_same_name_are_told_apart_by_owner() -> None:
    st = store()
    st.load("t", [member("t-m000", 3, owner="old"), member("t-m001", 3, owner="old")], 3)
    st.offer(member("t-m000", 9, owner="new"))  # the old one was deleted, ours created (its DELETED not seen yet)
    mine, other = split_owned(st.of_training("t") or [], ["new"])
    assert names(mine) == ["t-m000"]
    assert names(other) == ["t-m001"]


def test_a_non_numeric_resource_version_makes_the_training_unusable_until_listed() -> None:
    st = store()
    st.load("t", [member("t-m000", 3)], 3)
    assert not st.offer(member("t-m000", "abc"))
    with pytest.raises(StoreUnusable):
        st.of_training("t")
    st.load("t", [member("t-m000", 4)], 4)
    assert len(st.of_training("t") or []) == 1


class FakeResponse:
    """A watch response: JSON lines, as the API server streams them."""

    status = 200

    def __init__(self, events: list[dict[str, Any]]):
        self.data = "".join(json.dumps(e) + "\n" for e in events).encode()

    def stream(self, amt: Any = None, decode_content: bool = False) -> Any:
        yield self.data

    def close(self) -> None:
        pass

    def release_conn(self) -> None:
        pass


def test_the_cache_lists_a_training_once_follows_the_watch_and_lists_again_after_410() -> None:
    """MemberCache against a scripted API server: the watch is established (a LIST of one item for the
    position), the training's first read LISTs its members, the watch delivers a modification, a
    deletion and an expiry (410); the watch starts over and LISTs the tracked training again."""
    calls: list[dict[str, Any]] = []
    first_watch = threading.Event()
    relisted = threading.Event()
    watches = [[{"type": "MODIFIED", "object": member("t-m000", 8, step=1)},
                {"type": "MODIFIED", "object": member("u-m000", 8, "u")},  # untracked: ignored
                {"type": "DELETED", "object": member("t-m001", 9)},
                {"type": "ERROR", "object": {"code": 410, "reason": "Expired", "message": "too old"}}]]
    lists = {"t": [[member("t-m000", 4), member("t-m001", 5)], [member("t-m000", 20, step=7)]]}
    deleted: list[tuple[str, str]] = []

    def list_fn(ns: str, **kw: Any) -> Any:
        calls.append(kw)
        if kw.get("watch"):
            if len([c for c in calls if c.get("watch")]) == 1:
                first_watch.wait(5)  # the pass's read below comes first
                return FakeResponse(watches.pop(0))
            relisted.set()
            cache.watches["ns"].stopping.wait(5)
            return FakeResponse([])
        if kw.get("limit") == 1:
            return {"metadata": {"resourceVersion": "5" if len(calls) == 1 else "30"}, "items": []}
        t = kw["label_selector"].split("=")[1]
        return {"metadata": {"resourceVersion": "6" if len(lists[t]) == 2 else "30"}, "items": lists[t].pop(0)}

    cache = MemberCache(list_fn, lambda ns, t: deleted.append((ns, t)))
    assert names(cache.members("ns", "t") or []) == ["t-m000", "t-m001"]
    assert names(cache.members("ns", "t") or []) == ["t-m000", "t-m001"]  # from memory: no second LIST
    first_watch.set()
    assert relisted.wait(5)
    cache.stop()
    cache.watches["ns"].join(10)
    assert [m["status"] for m in cache.members("ns", "t") or []] == [{"step": 7}]
    assert "u" not in cache.stores["ns"].objs  # never asked for: its events were not kept
    assert deleted == [("ns", "t")]
    seen = [(c.get("watch"), c.get("limit"), c.get("resource_version"), c["label_selector"]) for c in calls[:6]]
    # The position comes first; then the pass's LIST of its training and the watch itself race (each
    # in its own thread, both after the position): their order is not part of the contract.
    assert seen[0] == (None, 1, None, "pbt.dev/training")
    assert sorted(seen[1:3], key=repr) == sorted([(None, None, None, "pbt.dev/training=t"),
                                                  (True, None, "5", "pbt.dev/training")], key=repr)
    assert seen[3:] == [(None, 1, None, "pbt.dev/training"), (None, None, None, "pbt.dev/training=t"),
                        (True, None, "30", "pbt.dev/training")]


def test_cache_reads_fall_back_when_the_watch_cannot_be_established() -> None:
    gate = threading.Event()

    def list_fn(ns: str, **kw: Any) -> Any:
        gate.wait(5)
        raise RuntimeError("API server unreachable")

    cache = MemberCache(list_fn)
    assert cache.members("ns", "t", timeout=0.05) is None  # the caller LISTs itself
    cache.stop()
    gate.set()
