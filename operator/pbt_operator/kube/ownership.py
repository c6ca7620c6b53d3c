"""Which children are ours: ownership by UID, never by name or label alone.

A training deleted and re-created under the same name gets a new UID, but for a few seconds the old
one's members, Jobs and pods still exist (the garbage collector removes them in the background) and
carry the same labels and names the new training would use. Read by label, they made the new training
start from the old run's results; taken by name, a Job that already existed (409) counted as a segment
that had already run. Here a child belongs to a training only through its ownerReferences chain:
member -> training UID, Job -> member UID, pod -> Job UID.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..core.display import counted


def uid_of(obj: Mapping[str, Any]) -> str | None:
    uid = (obj.get("metadata") or {}).get("uid")
    return str(uid) if uid else None


def owner_uids(obj: Mapping[str, Any]) -> set[str]:
    """UIDs of the objects that own `obj` (any ownerReference, controller or not)."""
    return {str(o["uid"]) for o in (obj.get("metadata") or {}).get("ownerReferences") or [] if o.get("uid")}


def split_owned(objs: Sequence[Mapping[str, Any]], owners: Iterable[str | None]
                ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(objects owned by one of `owners`, the others): the others belong to someone else, typically a
    previous training of the same name that the garbage collector has not finished removing."""
    want = {o for o in owners if o}
    mine: list[Mapping[str, Any]] = []
    other: list[Mapping[str, Any]] = []
    for o in objs:
        (mine if owner_uids(o) & want else other).append(o)
    return mine, other


def names(objs: Iterable[Mapping[str, Any]]) -> list[str]:
    return sorted(str((o.get("metadata") or {}).get("name")) for o in objs)


def leftovers_message(kind_names: Mapping[str, Sequence[str]]) -> str | None:
    """Why a new training waits before creating anything, or None when nothing is left over.

    `kind_names` maps a kind (PopulationMember, Job) to the names of objects that carry this training's
    label but are owned by another object: children of an earlier training of the same name still
    being deleted, or objects someone else created with our names."""
    parts = []
    for kind, ns in kind_names.items():
        if ns:
            shown = ", ".join(list(ns)[:3]) + (f" and {len(ns) - 3} more" if len(ns) > 3 else "")
            parts.append(f"{counted(len(ns), kind)} ({shown})")
    if not parts:
        return None
    return ("waiting for " + " and ".join(parts) + " that carry this training's name but belong to another "
            "owner (a previous training of the same name still being deleted?) to go away; nothing of theirs "
            "is read as this training's, and it starts from segment 0 once they are gone")


class ForeignChild(Exception):
    """A create found an object of the same name that another owner holds (not a retry of our own)."""

    def __init__(self, kind: str, name: str, owners: Iterable[str]):
        self.kind = kind
        self.name = name
        self.owners = sorted(owners)
        who = ", ".join(self.owners) or "no owner"
        super().__init__(f"{kind} {name} already exists and is not this training's (owned by {who}); "
                         "delete it, or wait for a previous training of the same name to be cleaned up")


__all__ = ["ForeignChild", "leftovers_message", "names", "owner_uids", "split_owned", "uid_of"]
