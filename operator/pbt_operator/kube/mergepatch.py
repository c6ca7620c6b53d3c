"""JSON merge patches (RFC 7386) that make an object's status exactly what a pass computed.

Status writes are merge patches (the client's default for a dict body): keys the patch leaves out are
kept, and nested objects are merged, so writing the new status as it is left behind whatever the old
one had and the new one has not: a member's `waiting` after its segment started, keys of an older
`evictedBest` that the newer one leaves at their defaults, the training's `retainedCheckpoints` once
empty. The object then never equals what the pass computes, so every pass wrote it again (11 member
status writes per segment at population 20 x 300, benchmarks/README.md), and `evictedBest` became a
mix of two records. `merge_patch(old, new)` sets every such key to null (delete); `stored_form(new)`
is what the API server keeps of a patch (a null deletes its key), for comparing with what was read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any], keep: Iterable[str] = ()) -> dict[str, Any]:
    """The merge patch that turns `old` into `new`: keys of `old` missing from `new` become None,
    nested objects recurse, anything else (lists, scalars) is replaced whole. Top-level keys in
    `keep` are never deleted (written by someone else)."""
    kept = set(keep)
    out: dict[str, Any] = {}
    for k, v in new.items():
        o = old.get(k)
        out[k] = merge_patch(o, v) if isinstance(v, Mapping) and isinstance(o, Mapping) else v
    for k in old:
        if k not in new and k not in kept:
            out[k] = None
    return out


def apply_merge_patch(target: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> dict[str, Any]:
    """What RFC 7386 makes of `target` with `patch` (the API server's behaviour, for tests and
    `stored_form`)."""
    out = dict(target or {})
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, Mapping):
            cur = out.get(k)
            out[k] = apply_merge_patch(cur if isinstance(cur, Mapping) else {}, v)
        else:
            out[k] = v
    return out


def stored_form(new: Mapping[str, Any]) -> dict[str, Any]:
    """`new` as the API server stores it from a merge patch: object keys whose value is None are
    absent (values inside lists are kept as they are)."""
    return apply_merge_patch({}, new)


__all__ = ["apply_merge_patch", "merge_patch", "stored_form"]
