"""The member cache's ordering rules (kube/membercache.py): a pass must never read a member older than
one our own writes returned, deleted members leave, and a re-LIST keeps what is newer than itself."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest

from pbt_operator.kube.membercache import MemberCache, MemberStore, NamespaceWatch, StoreUnusable
from pbt_operator.kube.ownership import split_owned


def member(name: str, rv: int | str, training: str = "t", owner: str = "uid-1", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": str(rv), "labels": {"pbt.dev/training": training},
                         "ownerReferences": [{"uid": owner}]}, "status": dict(status)}


def test_newest_wins_whatever_the_order_of_offers() -> None:
    st = MemberStore()
    assert st.offer(member("t-m000", 5, step=1))
    assert not st.offer(member("t-m000", 3, step=0))  # an older watch event after it
    assert st.of_training("t")[0]["status"] == {"step": 1}
    assert st.offer(member("t-m000", 7, step=2))
    assert st.of_training("t")[0]["status"] == {"step": 2}


def test_our_write_is_not_replaced_by_older_watch_events() -> None:
    """The write's answer (rv 10) arrives before the watch has delivered the events before it."""
    st = MemberStore()
    st.replace([member("t-m000", 4, step=0)], 4)
    assert st.offer(member("t-m000", 10, step=2))  # write-through
    for rv, step in ((6, 1), (8, 1), (10, 2)):  # the watch catches up: older events, then our own
        st.offer(member("t-m000", rv, step=step))
        assert st.of_training("t")[0]["status"] == {"step": 2}
    assert st.offer(member("t-m000", 11, step=3))  # someone else's later write is taken
    assert st.of_training("t")[0]["status"] == {"step": 3}


def test_a_deleted_member_leaves_and_a_late_answer_does_not_bring_it_back() -> None:
    st = MemberStore()
    st.replace([member("t-m000", 4), member("t-m001", 4)], 4)
    assert st.delete(member("t-m001", 12))
    assert [m["metadata"]["name"] for m in st.of_training("t")] == ["t-m000"]
    assert not st.offer(member("t-m001", 10))  # a write's answer overtaken by the deletion's event
    assert st.of_training("t") == [st.objs["t-m000"]]
    assert st.offer(member("t-m001", 15, owner="uid-2"))  # created again under that name: newer, taken
    assert st.of_training("t")[1]["metadata"]["ownerReferences"] == [{"uid": "uid-2"}]


def test_an_old_deletion_does_not_remove_a_member_created_again() -> None:
    st = MemberStore()
    st.offer(member("t-m000", 15, owner="uid-2"))  # our create's answer, before the old one's DELETED event
    assert not st.delete(member("t-m000", 12, owner="uid-1"))
    assert st.of_training("t")[0]["metadata"]["resourceVersion"] == "15"


def test_relist_keeps_what_is_newer_than_itself_and_drops_what_it_lacks() -> None:
    st = MemberStore()
    st.replace([member("t-m000", 3), member("t-m001", 3), member("t-m002", 3), member("t-m003", 3)], 3)
    st.offer(member("t-m000", 25, step=9))  # written after the list below was taken
    st.offer(member("t-m001", 18, step=1))  # older than the list
    st.delete(member("t-m003", 22))  # deleted after the list was taken
    st.delete(member("t-m004", 19))  # deleted before it
    st.replace([member("t-m000", 17, step=5), member("t-m001", 19, step=2), member("t-m003", 14)], 20)
    got = {m["metadata"]["name"]: m for m in st.of_training("t")}
    assert sorted(got) == ["t-m000", "t-m001"]  # m002 is gone (not listed), m003 deleted after the list
    assert got["t-m000"]["status"] == {"step": 9} and got["t-m001"]["status"] == {"step": 2}
    assert st.tombstones == {"t-m003": 22}  # older tombstones are covered by the list
    assert st.synced.is_set()


def test_members_of_a_previous_training_of_the_same_name_are_told_apart_by_owner() -> None:
    st = MemberStore()
    st.replace([member("t-m000", 3, owner="old"), member("t-m001", 3, owner="old"), member("u-m000", 3, "u")], 3)
    st.offer(member("t-m000", 9, owner="new"))  # the old one was deleted, ours created (its DELETED not seen yet)
    mine, other = split_owned(st.of_training("t"), ["new"])
    assert [m["metadata"]["name"] for m in mine] == ["t-m000"]
    assert [m["metadata"]["name"] for m in other] == ["t-m001"]


def test_a_non_numeric_resource_version_makes_the_store_unusable_until_relisted() -> None:
    st = MemberStore()
    st.replace([member("t-m000", 3)], 3)
    assert not st.offer(member("t-m000", "abc"))
    with pytest.raises(StoreUnusable):
        st.of_training("t")
    st.replace([member("t-m000", 4)], 4)
    assert len(st.of_training("t")) == 1


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


def test_the_watch_lists_follows_events_and_relists_after_410() -> None:
    """NamespaceWatch against a scripted API server: LIST, a watch with a modification, a deletion and
    an expiry (410), a new LIST, then a watch that blocks until stopped."""
    calls: list[dict[str, Any]] = []
    lists = [{"metadata": {"resourceVersion": "5"}, "items": [member("t-m000", 4), member("t-m001", 5)]},
             {"metadata": {"resourceVersion": "30"}, "items": [member("t-m000", 20, step=7)]}]
    watches = [[{"type": "MODIFIED", "object": member("t-m000", 8, step=1)},
                {"type": "DELETED", "object": member("t-m001", 9)},
                {"type": "ERROR", "object": {"code": 410, "reason": "Expired", "message": "too old"}}]]
    deleted: list[tuple[str, str]] = []
    relisted = threading.Event()

    def list_fn(ns: str, **kw: Any) -> Any:
        calls.append(kw)
        if kw.get("watch"):
            if watches:
                return FakeResponse(watches.pop(0))
            relisted.set()
            w.stopping.wait(5)
            return FakeResponse([])
        return lists.pop(0)

    st = MemberStore()
    w = NamespaceWatch("ns", st, list_fn, lambda ns, t: deleted.append((ns, t)))
    w.start()
    assert relisted.wait(5)
    w.stopping.set()
    w.join(10)
    assert [m["status"] for m in st.of_training("t")] == [{"step": 7}]
    assert deleted == [("ns", "t")]
    assert [c.get("resource_version") for c in calls] == [None, "5", None, "30"]
    assert all(c["label_selector"] == "pbt.dev/training" for c in calls)


def test_cache_reads_fall_back_when_the_first_list_does_not_come() -> None:
    gate = threading.Event()

    def list_fn(ns: str, **kw: Any) -> Any:
        gate.wait(5)
        raise RuntimeError("API server unreachable")

    cache = MemberCache(list_fn)
    assert cache.members("ns", "t", timeout=0.05) is None  # the caller LISTs itself
    cache.stop()
    gate.set()
