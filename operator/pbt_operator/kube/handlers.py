"""kopf handlers: thin. One daemon per PopulationTraining runs reconcile passes; watch events on the
training, its members, Jobs and pods only wake that daemon.

A single writer per training (its daemon) means no two passes race over the same member, and every
pass starts from what the API server holds, so the operator keeps nothing but caches in memory.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from typing import Any

import kopf

from . import metrics
from .api import Api, load_config
from .builders import LABEL_TRAINING
from .crds import GROUP, VERSION
from .reconcile import EventSpec, job_event_matters, plan, pod_event_matters

log = logging.getLogger("pbt_operator")
IDLE_RESYNC = 30.0  # seconds between passes when nothing wakes the daemon (a safety net for missed events)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Wakeups:
    """One asyncio.Event per training, set by watch handlers, awaited by the training's daemon."""

    def __init__(self) -> None:
        self.events: dict[tuple[str, str], asyncio.Event] = {}

    def get(self, ns: str, name: str) -> asyncio.Event:
        return self.events.setdefault((ns, name), asyncio.Event())

    def wake(self, ns: str | None, name: str | None) -> None:
        if ns and name:
            self.get(ns, name).set()


WAKEUPS = Wakeups()
_API: Api | None = None


def api() -> Api:
    global _API
    if _API is None:
        load_config()
        _API = Api()
    return _API


@kopf.on.startup(id="configure")
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = "pbt.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="pbt.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="pbt.dev", key="last-handled-configuration")
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    # Watching given namespaces (the chart's namespaced RBAC: Roles only), kopf may not list namespaces
    # or watch CRDs, which are cluster-scoped: without this it retries those 403s for a minute first.
    settings.scanning.disabled = not settings.peering.clusterwide
    if settings.peering.mandatory:
        # Several replicas (--peering): kopf pauses *all* peers of equal priority, so each process draws its
        # own; the highest one works, the others stand by and take over when it leaves or its lease expires.
        settings.peering.priority = random.SystemRandom().randrange(1, 2**31)
    metrics.start_server_from_env()


def _post(training: dict[str, Any], members: dict[str, dict[str, Any]], ev: EventSpec) -> None:
    target = training if ev.target == "training" else members.get(ev.target, training)
    kopf.event(target, type=ev.type, reason=ev.reason, message=ev.message)  # type: ignore[arg-type]
    metrics.count_event(ev.reason, target["metadata"].get("namespace", ""), training["metadata"]["name"])


def reconcile_once(ns: str, name: str, collected: set[tuple[int, int]]) -> tuple[bool, bool, Any]:
    """Returns (done, again, plan): `again` when members were just created and need a second pass."""
    a = api()
    training, members, jobs, pods = a.world(ns, name)
    if training is None:
        return True, False, None
    t0 = time.perf_counter()
    p = plan(training, members, jobs, pods, _now(), collected)
    metrics.observe_plan(ns, name, time.perf_counter() - t0, p)
    a.apply(ns, name, p)
    collected |= p.collected
    by_name = {m["metadata"]["name"]: m for m in members}
    for ev in p.events:
        _post(training, by_name, ev)
    return p.done, bool(p.create_members), p


@kopf.daemon(GROUP, VERSION, "populationtrainings", id="reconcile", cancellation_timeout=10.0)  # type: ignore[arg-type]
async def training_daemon(name: str, namespace: str, stopped: kopf.DaemonStopped, logger: logging.Logger,
                          **_: Any) -> None:
    wake = WAKEUPS.get(namespace, name)
    collected: set[tuple[int, int]] = set()
    failures = 0
    while not stopped:
        wake.clear()
        try:
            done, again, _p = await asyncio.to_thread(reconcile_once, namespace, name, collected)
            failures = 0
        except Exception as e:  # an API hiccup must not kill the daemon; back off and retry
            failures += 1
            metrics.RECONCILE_ERRORS.labels(namespace, name).inc()
            logger.warning("reconcile of %s/%s failed (%s); retrying", namespace, name, e)
            await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
            continue
        if done:
            logger.info("training %s/%s finished", namespace, name)
            return
        if again:
            continue
        try:
            await asyncio.wait_for(wake.wait(), timeout=IDLE_RESYNC)
        except asyncio.TimeoutError:
            pass
    if stopped.reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in stopped.reason:
        metrics.forget(namespace, name)


@kopf.on.event(GROUP, VERSION, "populationtrainings", id="training-events")
def training_changed(name: str | None, namespace: str | None, **_: Any) -> None:
    WAKEUPS.wake(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_TRAINING: kopf.PRESENT}, id="job-events")  # type: ignore[arg-type]
def job_changed(event: dict[str, Any], body: Any, labels: dict[str, str], namespace: str | None, **_: Any) -> None:
    if job_event_matters(event.get("type"), body):
        WAKEUPS.wake(namespace, labels.get(LABEL_TRAINING))


@kopf.on.event("", "v1", "pods", labels={LABEL_TRAINING: kopf.PRESENT}, id="pod-events")  # type: ignore[arg-type]
def pod_changed(event: dict[str, Any], body: Any, labels: dict[str, str], namespace: str | None, **_: Any) -> None:
    if pod_event_matters(event.get("type"), body):
        WAKEUPS.wake(namespace, labels.get(LABEL_TRAINING))


__all__ = ["reconcile_once", "training_daemon"]
