"""PopulationMembers from memory: a watch-fed cache, so that a reconcile pass reads what its active
members cost rather than LISTing every member of its training (with their histories) each time.

One watch per namespace (server-side label selector: objects with a training label), started by the
first pass that needs it. The cache holds the members of the trainings whose passes asked for them
(a running training's), not every member in the namespace: finished trainings' members cost no
memory. A training's members are loaded by a fresh LIST (a consistent read) on its first pass after
the operator starts, after the watch was established, and again whenever the watch has to start over
(its resourceVersion expired: 410 Gone), so a restarted operator starts from what the API server
holds, never from anything older; from then on the watch keeps them. Passes read from `MemberStore`,
which follows two ordering rules so that a pass never decides on a member older than one it wrote
itself (the next pass can start before the watch delivers that write):

- newest wins: the object a write of ours returned (write-through) and every watch event are offered
  to the store, which keeps whichever has the higher resourceVersion. resourceVersions of one resource
  are etcd revisions, increasing with every write, and the API server itself compares them that way
  (watch resumption, `resourceVersionMatch=NotOlderThan`); an object whose resourceVersion is not a
  number makes the store unusable (`StoreUnusable`) and the pass LISTs as before.
- deletions leave a tombstone (name, resourceVersion of the deletion), so that an older object offered
  late (a write's answer overtaken by the delete's event) does not bring the member back; a member
  created again under that name has a higher resourceVersion and is taken.

A training's LIST replaces what the store holds of it, except objects newer than the list (written
after it was taken), which stay. Tracking begins before that LIST and the watch is established before
either, so no event after the list is missed.
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
    """The members of the tracked trainings of one namespace, as last known, with the ordering rules
    above. Pure logic and a lock: the watch thread and every training's pass share it. Objects are
    stored as given and handed out as they are: callers must not modify them (the reconcile pass does
    not)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objs: dict[str, dict[str, Mapping[str, Any]]] = {}  # tracked training -> member name -> object
        self.tombstones: dict[str, dict[str, int]] = {}  # training -> member name -> resourceVersion of its deletion
        self.loaded: set[str] = set()  # trainings whose LIST was applied
        self.broken: dict[str, str] = {}  # training -> why its members cannot be trusted (a non-numeric resourceVersion)

    def track(self, training: str) -> None:
        """Keep this training's members from now on (watch events are ignored for untracked ones)."""
        with self.lock:
            self.objs.setdefault(training, {})
            self.tombstones.setdefault(training, {})

    def untrack(self, training: str) -> None:
        """Forget a training (its daemon ended: finished or deleted)."""
        with self.lock:
            for d in (self.objs, self.tombstones, self.broken):
                d.pop(training, None)
            self.loaded.discard(training)

    def tracked(self) -> list[str]:
        with self.lock:
            return sorted(self.objs)

    def offer(self, obj: Mapping[str, Any]) -> bool:
        """A watch event's object (ADDED, MODIFIED) or the answer to one of our writes: kept when its
        training is tracked and it is newer than what the store holds of that name and than that name's
        deletion. True when kept."""
        with self.lock:
            found = self._locate(obj)
            if found is None:
                return False
            training, name, rv, cur_rv = found
            if cur_rv is not None and cur_rv >= rv:
                return False
            if cur_rv is None and self.tombstones[training].get(name, -1) >= rv:
                return False
            self.objs[training][name] = obj
            return True

    def delete(self, obj: Mapping[str, Any]) -> bool:
        """A DELETED event (its object carries the resourceVersion of the deletion). A stored object of
        that name that is newer (created again after the deletion) stays. True when one was removed."""
        with self.lock:
            found = self._locate(obj)
            if found is None:
                return False
            training, name, rv, cur_rv = found
            if cur_rv is not None and cur_rv > rv:
                return False
            tombs = self.tombstones[training]
            tombs[name] = max(rv, tombs.get(name, -1))
            return self.objs[training].pop(name, None) is not None

    def _locate(self, obj: Mapping[str, Any]) -> tuple[str, str, int, int | None] | None:
        """(training, name, resourceVersion, that of the stored object of that name or None) for an
        offered or deleted object; None when its training is not tracked or an ordering cannot be
        decided (the training is then marked broken). Called with the lock held."""
        training = _training(obj)
        bucket = self.objs.get(training)
        if bucket is None:
            return None
        try:
            name, rv = _name(obj), rv_of(obj)
            cur = bucket.get(name)
            return training, name, rv, (rv_of(cur) if cur is not None else None)
        except StoreUnusable as e:
            self.broken[training] = str(e)
            return None

    def load(self, training: str, items: Iterable[Mapping[str, Any]], list_rv: str | int) -> None:
        """A fresh LIST of the training's members at `list_rv`: the truth as of then. What the store
        holds that is newer (a write of ours answered after the list was taken) stays; tombstones newer
        than the list keep their members out; older tombstones are no longer needed. Nothing happens
        for an untracked training."""
        with self.lock:
            if training not in self.objs:
                return
            tombs = self.tombstones[training]
            try:
                at = int(str(list_rv))
                new: dict[str, Mapping[str, Any]] = {}
                for it in items:
                    name = _name(it)
                    if tombs.get(name, -1) >= rv_of(it):
                        continue
                    new[name] = it
                for name, cur in self.objs[training].items():
                    if rv_of(cur) > at and (name not in new or rv_of(new[name]) < rv_of(cur)):
                        new[name] = cur
            except (StoreUnusable, ValueError) as e:
                self.broken[training] = str(e)
                return
            self.objs[training] = new
            self.tombstones[training] = {n: rv for n, rv in tombs.items() if rv > at}
            self.broken.pop(training, None)
            self.loaded.add(training)

    def of_training(self, training: str) -> list[Mapping[str, Any]] | None:
        """The training's members by name (as a LIST returns them; owners are checked by the caller),
        None until its LIST was applied. Raises StoreUnusable when they cannot be trusted."""
        with self.lock:
            if training in self.broken:
                raise StoreUnusable(self.broken[training])
            if training not in self.loaded:
                return None
            return [o for _, o in sorted(self.objs[training].items())]


def _training(obj: Mapping[str, Any]) -> str:
    return str(((obj.get("metadata") or {}).get("labels") or {}).get(LABEL_TRAINING) or "")


class NamespaceWatch(threading.Thread):
    """Establishes a WATCH of the namespace's members at a current resourceVersion (a LIST of one item
    gives it), reloads the tracked trainings (a LIST each), then follows the watch, forever; starts over
    when the watch's resourceVersion has expired (410) or after repeated failures. `on_delete(ns,
    training)` is called for each deleted member of a tracked training (its pass recreates it)."""

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
        self.established = threading.Event()  # a watch position is known: trainings may be loaded

    def load(self, training: str) -> None:
        """LIST one training's members into the store (tracking it first: no event after the LIST is lost)."""
        self.store.track(training)
        listed = self.list_fn(self.ns, label_selector=f"{LABEL_TRAINING}={training}")
        self.store.load(training, listed.get("items") or [], listed["metadata"]["resourceVersion"])

    def run(self) -> None:
        rv: str | None = None
        failures = 0
        while not self.stopping.is_set():
            try:
                if rv is None:
                    rv = str(self.list_fn(self.ns, label_selector=LABEL_TRAINING, limit=1)["metadata"]["resourceVersion"])
                    for training in self.store.tracked():  # what happened while the watch was down
                        self.load(training)
                    self.established.set()
                rv = self._watch(rv)
                failures = 0
            except ApiException as e:
                if e.status == 410:  # expired: start over
                    rv = None
                    continue
                failures += 1
                log.warning("watch of PopulationMembers in %s failed (%s); retrying", self.ns, e)
            except Exception as e:  # the network, the API server restarting: retry, start over after a few
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
                self.on_delete(self.ns, _training(obj))
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

    def watch(self, ns: str) -> NamespaceWatch:
        with self.lock:
            w = self.watches.get(ns)
            if w is None:
                st = self.stores[ns] = MemberStore()
                w = self.watches[ns] = NamespaceWatch(ns, st, self.list_fn, self.on_delete)
                w.start()
            return w

    def members(self, ns: str, training: str, timeout: float = SYNC_TIMEOUT) -> list[Mapping[str, Any]] | None:
        """The training's members from memory (LISTed into it on the training's first call), or None when
        the namespace's watch is not established within `timeout` or the store cannot be trusted (the
        caller then reads the API server)."""
        w = self.watch(ns)
        t0 = time.monotonic()
        if not w.established.wait(timeout):
            log.warning("no watch of PopulationMembers in %s after %.0f s; reading them directly", ns,
                        time.monotonic() - t0)
            return None
        try:
            got = w.store.of_training(training)
            if got is None:
                w.load(training)
                got = w.store.of_training(training)
            return got
        except StoreUnusable as e:
            log.warning("member cache of %s/%s unusable (%s); reading members directly", ns, training, e)
            return None

    def offer(self, ns: str, obj: Any) -> None:
        """Write-through: the object one of our writes returned."""
        st = self.stores.get(ns)
        if isinstance(obj, Mapping) and st is not None:
            st.offer(obj)

    def forget(self, ns: str, training: str) -> None:
        """The training's daemon ended (finished, deleted): its members leave memory."""
        st = self.stores.get(ns)
        if st is not None:
            st.untrack(training)

    def stop(self) -> None:
        for w in self.watches.values():
            w.stopping.set()


__all__ = ["MemberCache", "MemberStore", "NamespaceWatch", "StoreUnusable", "rv_of"]
