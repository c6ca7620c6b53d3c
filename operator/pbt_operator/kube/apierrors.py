"""API errors, classified once: which ones a retry can fix, and which ones only the user can.

Before this, every error from the API server was logged and retried every 30 s, so a Job the server
would never accept (an invalid quantity in the template, a name over 63 bytes, a ResourceQuota or an
admission webhook saying no) left a training showing Running and Ready with nothing running and nothing
said outside the operator's log. Now a *refusal* (the request itself is wrong or not allowed: 400, 403,
413, 422) is reported on the training with the API server's own message, and a *transient* error
(throttling, timeouts, a server restarting) is retried with back-off.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..core.display import shorten

REFUSED_STATUSES = frozenset({400, 403, 405, 413, 415, 422})


@dataclass(frozen=True)
class ApiError:
    status: int  # HTTP status; 0 when no response came back (connection refused, timeout)
    reason: str  # the API server's reason: Invalid, Forbidden, BadRequest... ("" without a response)
    message: str  # the API server's message, with the field paths of an Invalid error
    refused: bool  # True: the same request will fail again; the user must change something
    quota: bool = False  # refused by a ResourceQuota (it may pass later, once other work frees quota)

    def summary(self) -> str:
        return f"{self.status} {self.reason}: {self.message}" if self.status else self.message


def _body(exc: Any) -> dict[str, Any]:
    raw = getattr(exc, "body", None)
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str) and raw.strip().startswith("{"):
        try:
            out = json.loads(raw)
            return out if isinstance(out, dict) else {}
        except ValueError:
            return {}
    return {}


def status_message(body: dict[str, Any], fallback: str = "") -> str:
    """The message of a Status object; for Invalid errors the causes with their field paths, which is
    what tells the user where the problem is ("spec.template.spec.containers[0].resources.limits[cpu]:
    Invalid value: "lots": ...")."""
    msg = str(body.get("message") or fallback).strip()
    causes = (body.get("details") or {}).get("causes") or []
    parts = []
    for c in causes:
        field, cmsg = c.get("field"), c.get("message")
        if cmsg and field and field not in msg:
            parts.append(f"{field}: {cmsg}")
    if parts:
        msg = f"{msg} ({'; '.join(parts)})" if msg else "; ".join(parts)
    return msg


def classify(exc: BaseException) -> ApiError:
    """Any exception from a call to the API server -> ApiError. Exceptions without an HTTP status
    (connection errors, timeouts) are transient."""
    status = getattr(exc, "status", None)
    if not isinstance(status, int) or status <= 0:
        return ApiError(0, "", shorten(f"{type(exc).__name__}: {exc}", 1000), refused=False)
    body = _body(exc)
    reason = str(body.get("reason") or getattr(exc, "reason", "") or "")
    message = shorten(status_message(body, str(getattr(exc, "reason", "") or "")), 2000)
    quota = status == 403 and "exceeded quota" in message
    # RBAC saying the operator itself may not do this is the installation's problem, not the
    # training's: it is retried (and logged) rather than counted against the training's segments.
    rbac = status == 403 and "cannot " in message and "in API group" in message
    # A namespace's default service account appears a moment after the namespace: not the spec's fault.
    young = status == 403 and "error looking up service account" in message
    # A namespace being deleted refuses every create in it: not the spec's fault either. Counted as
    # refusals, a training whose namespace was deleted under it burned its retries on Jobs the server
    # could never create (JobRefused, SegmentRetried, MemberReplaced...) until its own deletion came.
    terminating = status == 403 and "because it is being terminated" in message
    return ApiError(status, reason, message,
                    refused=status in REFUSED_STATUSES and not rbac and not young and not terminating, quota=quota)


__all__ = ["ApiError", "classify", "status_message"]
