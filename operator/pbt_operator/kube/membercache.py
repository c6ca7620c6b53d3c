"""PopulationMembers from memory: a watch-fed cache, so that a reconcile pass reads what its active
members cost rather than LISTing every member of its training (with their histories) each time.

One watch per namespace (server-side label selector: objects with a training label), started by the
first pass that needs it, begins with a fresh LIST (a consistent read): a restarted operator starts
from what the API server holds, never from anything older. Passes read from `MemberStore`, which
follows two ordering rules so that a pass never decides on a member older than one it wrote itself
(the next pass can start before the watch delivers that write):

- newest wins: the object a write of ours returned (write-through) and every watch event are offered
  to the store, which keeps whichever has the higher resourceVersion. resourceVersions of one resource
  are etcd revisions, increasing with every write, and the API server itself compares them that way
  (watch resumption, `resourceVersionMatch=NotOlderThan`); an object whose resourceVersion is not a
  number makes the store unusable (`StoreUnusable`) and the pass LISTs as before.
- deletions leave a tombstone (name, resourceVersion of the deletion), so that an older object offered
  late (a write's answer overtaken by the delete's event) does not bring the member back; a member
  created again under that name has a higher resourceVersion and is taken.

A re-LIST (the watch's resourceVersion expired: 410 Gone) replaces the store with the list, except
objects newer than the list (written after it was taken), which stay.
Whose member is whose is still decided by owner UID (`ownership.split_owned`), as for a LIST.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from .builders import LABEL_TRAINING

log = logging.getLogger("pbt_operator")
SYNC_TIMEOUT = 20.0  # seconds a pass waits for a namespace's first LIST before reading the API server itself
WATCH_SECONDS = 300  # server-side timeout of one watch request; it is then resumed from the last resourceVersion


class StoreUnusable(Exception):
    """An object without a numeric resourceVersion: ordering cannot be decided, read the API server."""


def rv_of(obj: Mapping[str, Any]) -> int:
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    try:
        return int(str(rv))
    except ValueError:
        raise StoreUnusable(f"resourceVersion {rv!r} is not a number") from None


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name"))


class MemberStore:
    """The members of one namespace as last known, with the ordering rules above. Pure logic and a lock:
    the watch thread and every training's pass share it. Objects are stored as given and handed out
    as they are: callers must not modify them (the reconcile pass does not)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objs: dict[str, Mapping[str, Any]] = {}
        self.tombstones: dict[str, int] = {}  # name -> resourceVersion of its deletion
        self.synced = threading.Event()  # set once a LIST was applied
        self.broken: str | None = None  # why the store cannot be trusted (a non-numeric resourceVersion)

    def offer(self, obj: Mapping[str, Any]) -> bool:
        """A watch event's object (ADDED, MODIFIED) or the answer to one of our writes: kept when it is
        newer than what the store holds of that name and than that name's deletion. True when kept."""
        with self.lock:
            try:
                return self._offer(obj)
            except StoreUnusable as e:
                self.broken = str(e)
                return False

    def _offer(self, obj: Mapping[str, Any]) -> bool:
        name, rv = _name(obj), rv_of(obj)
        cur = self.objs.get(name)
        if cur is not None and rv_of(cur) >= rv:
            return False
        if cur is None and self.tombstones.get(name, -1) >= rv:
            return False
        self.objs[name] = obj
        return True

    def delete(self, obj: Mapping[str, Any]) -> bool:
        """A DELETED event (its object carries the resourceVersion of the deletion). A stored object of
        that name that is newer (created again after the deletion) stays. True when one was removed."""
        with self.lock:
            try:
                name, rv = _name(obj), rv_of(obj)
                cur = self.objs.get(name)
                if cur is not None and rv_of(cur) > rv:
                    return False
            except StoreUnusable as e:
                self.broken = str(e)
                return False
            self.tombstones[name] = max(rv, self.tombstones.get(name, -1))
            return self.objs.pop(name, None) is not None

    def replace(self, items: Iterable[Mapping[str, Any]], list_rv: str | int) -> None:
        """A fresh LIST at `list_rv`: it is the truth as of then. What the store holds that is newer (a
        write of ours answered after the list was taken) stays; tombstones newer than the list keep their
        members out; older tombstones are no longer needed."""
        with self.lock:
            try:
                at = int(str(list_rv))
                new: dict[str, Mapping[str, Any]] = {}
                for it in items:
                    name = _name(it)
                    if self.tombstones.get(name, -1) >= rv_of(it):
                        continue
                    new[name] = it
                for name, cur in self.objs.items():
                    if rv_of(cur) > at and (name not in new or rv_of(new[name]) < rv_of(cur)):
                        new[name] = cur
                self.tombstones = {n: rv for n, rv in self.tombstones.items() if rv > at}
            except (StoreUnusable, ValueError) as e:
                self.broken = str(e)
                return
            self.objs = new
            self.broken = None
            self.synced.set()

    def of_training(self, training: str) -> list[Mapping[str, Any]]:
        """Members labelled with this training's name, by name (as a LIST returns them); owners are
        checked by the caller. Raises StoreUnusable when the store cannot be trusted."""
        with self.lock:
            if self.broken is not None:
                raise StoreUnusable(self.broken)
            return [o for n, o in sorted(self.objs.items())
                    if ((o.get("metadata") or {}).get("labels") or {}).get(LABEL_TRAINING) == training]


class NamespaceWatch(threading.Thread):
    """LIST, then WATCH from the list's resourceVersion, forever; a new LIST when the watch's
    resourceVersion has expired (410) or after repeated failures. `on_delete(training)` is called for
    each deleted member (its training's pass recreates a member deleted by hand)."""

    def __init__(self, ns: str, store: MemberStore, list_fn: Callable[..., Any],
                 on_delete: Callable[[str, str], None] | None = None):
        super().__init__(name=f"pbt-members-{ns}", daemon=True)
        self.ns = ns
        self.store = store
        # CustomObjectsApi.list_namespaced_custom_object bound to our group and plural, as a plain function
        # (no model return type): the watch then hands events over as plain dicts
        self.list_fn = list_fn
        self.on_delete = on_delete
        self.stopping = threading.Event()

    def run(self) -> None:
        rv: str | None = None
        failures = 0
        while not self.stopping.is_set():
            try:
                if rv is None:
                    listed = self.list_fn(self.ns, label_selector=LABEL_TRAINING)
                    rv = str(listed["metadata"]["resourceVersion"])
                    self.store.replace(listed.get("items") or [], rv)
                rv = self._watch(rv)
                failures = 0
            except ApiException as e:
                if e.status == 410:  # expired: start again from a fresh LIST
                    rv = None
                    continue
                failures += 1
                log.warning("watch of PopulationMembers in %s failed (%s); retrying", self.ns, e)
            except Exception as e:  # the network, the API server restarting: retry, re-LIST after a few
                failures += 1
                log.warning("watch of PopulationMembers in %s failed (%s); retrying", self.ns, e)
            if failures:
                if failures >= 3:
                    rv = None
                self.stopping.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))

    def _watch(self, rv: str) -> str:
        w = watch.Watch()
        for ev in w.stream(self.list_fn, self.ns, label_selector=LABEL_TRAINING, resource_version=rv,
                           allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS,
                           _request_timeout=(10, WATCH_SECONDS + 30)):
            kind, obj = ev.get("type"), ev.get("object") or {}
            new_rv = (obj.get("metadata") or {}).get("resourceVersion")
            if kind in ("ADDED", "MODIFIED"):
                self.store.offer(obj)
            elif kind == "DELETED" and self.store.delete(obj) and self.on_delete is not None:
                training = ((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_TRAINING)
                if training:
                    self.on_delete(self.ns, str(training))
            if new_rv:
                rv = str(new_rv)
            if self.stopping.is_set():
                w.stop()
        return rv


class MemberCache:
    """A MemberStore and its watch per namespace, started on first use."""

    def __init__(self, list_fn: Callable[..., Any], on_delete: Callable[[str, str], None] | None = None):
        self.list_fn = list_fn
        self.on_delete = on_delete
        self.lock = threading.Lock()
        self.stores: dict[str, MemberStore] = {}
        self.watches: dict[str, NamespaceWatch] = {}

    def store(self, ns: str) -> MemberStore:
        with self.lock:
            st = self.stores.get(ns)
            if st is None:
                st = self.stores[ns] = MemberStore()
                w = self.watches[ns] = NamespaceWatch(ns, st, self.list_fn, self.on_delete)
                w.start()
            return st

    def members(self, ns: str, training: str, timeout: float = SYNC_TIMEOUT) -> list[Mapping[str, Any]] | None:
        """The training's members from memory, or None when the namespace's first LIST has not come
        within `timeout` or the store cannot be trusted (the caller then reads the API server)."""
        st = self.store(ns)
        t0 = time.monotonic()
        if not st.synced.wait(timeout):
            log.warning("PopulationMembers in %s not listed after %.0f s; reading them directly", ns,
                        time.monotonic() - t0)
            return None
        try:
            return st.of_training(training)
        except StoreUnusable as e:
            log.warning("member cache of %s unusable (%s); reading members directly", ns, e)
            return None

    def offer(self, ns: str, obj: Any) -> None:
        """Write-through: the object one of our writes returned."""
        if isinstance(obj, Mapping) and ns in self.stores:
            self.stores[ns].offer(obj)

    def stop(self) -> None:
        for w in self.watches.values():
            w.stopping.set()


__all__ = ["MemberCache", "MemberStore", "NamespaceWatch", "StoreUnusable", "rv_of"]
