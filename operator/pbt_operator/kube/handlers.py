"""kopf handlers: thin. One daemon per PopulationTraining runs reconcile passes; watch events on the
training, its Jobs and pods (and the deletion of a member: kube/membercache.py) only wake that daemon.

A single writer per training (its daemon) means no two passes race over the same member, and every
pass starts from what the API server holds (members through a watch-fed cache that never goes back
behind our own writes), so the operator keeps nothing but caches in memory.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import time
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from ..spec import SpecError, parse_spec
from . import builders, crdcheck, lifecycle, metrics
from . import conditions as C
from .admission import cluster_problems, probe_job, probe_pod
from .api import Api, World, load_config
from .apierrors import classify
from .builders import LABEL_TRAINING
from .crds import GROUP, VERSION
from .ownership import ForeignChild, leftovers_message
from .reconcile import (
    EngineCache,
    EventSpec,
    collected_after,
    events_wanted,
    job_event_matters,
    next_cache,
    plan,
    pod_event_matters,
    storage_root,
)
from .throttle import EventThrottle

log = logging.getLogger("pbt_operator")
IDLE_RESYNC = 30.0  # seconds between passes when nothing wakes the daemon (a safety net for missed events)
LEFTOVER_RETRY = 1.0  # seconds between looks while an earlier training's children are being deleted
QUOTA_RETRY = 10.0  # seconds between dry runs while a ResourceQuota refuses the first segment


class Retry(Exception):
    """Not an error: look again after `after` seconds (a wait the training's status already explains)."""

    def __init__(self, after: float):
        super().__init__(f"retry in {after} s")
        self.after = after


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
_LOOP: asyncio.AbstractEventLoop | None = None  # kopf's event loop, where WAKEUPS live


def _wake_from_thread(ns: str, name: str) -> None:
    """WAKEUPS.wake from another thread (the member watch's)."""
    loop = _LOOP
    if loop is not None and not loop.is_closed():
        loop.call_soon_threadsafe(WAKEUPS.wake, ns, name)


def api() -> Api:
    global _API
    if _API is None:
        load_config()
        _API = Api(on_member_deleted=_wake_from_thread)
    return _API


WATCH_HANDLERS = ("training-events", "job-events", "pod-events")


class QuietWatchHandlers(logging.Filter):
    """Drops kopf's "Handler 'job-events' succeeded." lines: the watch handlers only wake a daemon, and
    run for every change of every Job and pod of every training, so at INFO they were nearly all of the
    operator's log (thousands of lines a minute at a few hundred members) and buried what passes did.
    Their failures still log."""

    DROPPED = frozenset(f"Handler '{h}' succeeded." for h in WATCH_HANDLERS)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.DROPPED


@kopf.on.startup(id="configure")
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    objects_log = logging.getLogger("kopf.objects")
    if not any(isinstance(f, QuietWatchHandlers) for f in objects_log.filters):
        objects_log.addFilter(QuietWatchHandlers())
    settings.persistence.finalizer = "pbt.dev/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="pbt.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="pbt.dev", key="last-handled-configuration")
    settings.posting.level = logging.INFO
    # Server-side label selectors on the Job and pod watches: only our segments' objects come over the
    # wire (the handlers' `labels=` filters alone are applied by kopf after receiving every pod and Job
    # of the cluster).
    settings.watching.label_selectors["batch", "v1", "jobs"] = LABEL_TRAINING
    settings.watching.label_selectors["", "v1", "pods"] = LABEL_TRAINING
    ttl = os.environ.get("PBT_JOB_TTL_SECONDS", "").strip()
    if ttl:
        builders.JOB_TTL_SECONDS = int(ttl) or None
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


OUTDATED_CRDS: list[crdcheck.OutdatedCrd] = []  # what the start-up check found (empty: current, or not checked)
_CRD_WARNED: set[str] = set()  # UIDs of the trainings told about OUTDATED_CRDS since this start


@kopf.on.startup(id="crd-check")
def check_crds(**_: Any) -> None:
    """An installed CRD that is not this version's (`helm upgrade` leaves the old ones) is logged as an ERROR
    with the command that fixes it, and each training gets a CRDOutdated Warning (training_daemon). The
    operator keeps running: refusing to start would stop every training, including those the difference
    does not touch. Never fails: without permission to read CRDs the check is skipped, saying so."""
    chart = os.environ.get("PBT_CHART_VERSION") or None
    try:
        installed = api().crds(list(crdcheck.EXPECTED))
    except ApiException as e:
        if e.status == 403:
            log.warning("CRD version check skipped: no permission to get customresourcedefinitions "
                        "(the chart's ClusterRole grants it for %s); after an upgrade, apply the new CRDs "
                        "yourself: %s", ", ".join(crdcheck.EXPECTED), crdcheck.fix_command(chart))
        else:
            log.warning("CRD version check skipped: reading the CRDs failed: %s", classify(e).summary())
        return
    except Exception as e:  # the check must never stop the operator
        log.warning("CRD version check skipped: reading the CRDs failed: %s", e)
        return
    OUTDATED_CRDS[:] = crdcheck.outdated(installed)
    for crd in OUTDATED_CRDS:
        log.error("%s", crdcheck.log_message(crd, chart))
    if not OUTDATED_CRDS:
        log.info("CRDs are this version's: %s", ", ".join(f"{n} {v}" for n, v in crdcheck.EXPECTED.items()))


def _warn_outdated_crds(body: dict[str, Any]) -> None:
    uid = body.get("metadata", {}).get("uid", "")
    if not OUTDATED_CRDS or uid in _CRD_WARNED:
        return
    _CRD_WARNED.add(uid)
    msg = crdcheck.event_message(OUTDATED_CRDS, os.environ.get("PBT_CHART_VERSION") or None)
    _post(body, {}, EventSpec("training", "Warning", C.EV_CRD_OUTDATED, msg))


def _post(training: dict[str, Any], members: dict[str, dict[str, Any]], ev: EventSpec) -> None:
    target = training if ev.target == "training" else members.get(ev.target, training)
    kopf.event(target, type=ev.type, reason=ev.reason, message=ev.message)  # type: ignore[arg-type]
    metrics.count_event(ev.reason, target["metadata"].get("namespace", ""), training["metadata"]["name"])


class CacheBox:
    """What the daemon keeps between passes: the engine cache (reconcile.EngineCache), None until a pass
    succeeded in full, and which repeated Warnings were posted when (throttle.EventThrottle)."""

    def __init__(self) -> None:
        self.cache: EngineCache | None = None
        self.throttle = EventThrottle()


def reconcile_once(ns: str, name: str, collected: set[tuple[int, int]],
                   box: CacheBox | None = None) -> tuple[bool, bool, Any]:
    """Returns (done, again, plan): `again` when members were just created, or a refused Job was just
    recorded as a failed attempt, and a second pass should follow at once. Raises Retry for a wait.
    `box`: the engine kept from the previous pass; dropped unless this pass's writes all succeed."""
    box = box if box is not None else CacheBox()
    cache, box.cache = box.cache, None
    a = api()
    w = a.world(ns, name)
    training = w.training
    if training is None:
        return True, False, None
    if not w.members:
        done = before_start(a, ns, w)
        if done is not None:
            return done, False, None
    wanted = events_wanted(w.jobs, w.pods)
    events = a.events(ns, wanted) if wanted else []
    t0 = time.perf_counter()
    p = plan(training, w.members, w.jobs, w.pods, _now(), collected, events, cache)
    metrics.observe_plan(ns, name, time.perf_counter() - t0, p)
    by_name = {m["metadata"]["name"]: m for m in w.members}
    try:
        refused = a.apply(ns, name, p)
    except ForeignChild as e:
        _accepted(a, training, p.status, False, C.NAME_CONFLICT, str(e), EventSpec(
            "training", "Warning", C.EV_NAME_CONFLICT, str(e)))
        raise Retry(LEFTOVER_RETRY * 5) from None
    # Replaced, not added to: the plan gives back what Jobs that never save held (reconcile.give_back)
    # and forgets what no rebuild can list again (reconcile.forget_collected: the set stays bounded).
    # Only after every write went out: a pass that raised leaves the previous set, which its successor needs.
    after = collected_after(p, [job["metadata"]["name"] for job, _ in refused])
    collected.clear()
    collected |= after
    post, held = box.throttle.admit(p.events, time.monotonic())
    for ev in post:
        _post(training, by_name, ev)
    for ev in held:
        metrics.count_event(ev.reason, ns, name)
    again = bool(p.create_members)
    for job, err in refused:
        mname = job["metadata"]["ownerReferences"][0]["name"]
        member = by_name.get(mname)
        rec = lifecycle.refused_segment(member, p.member_statuses.get(mname), job, err, _now()) if member else None
        if rec is None:
            continue
        a.patch_member_status(ns, mname, rec[0])
        _post(training, by_name, rec[1])
        again = True
    if not refused:
        box.cache = next_cache(training, w.members, p)
    if refused:
        job, err = refused[0]
        _accepted(a, training, p.status, False, lifecycle.refusal_reason(err),
                  f"the API server refused Job {job['metadata']['name']}: {err.summary()}", None)
    elif p.create_jobs:
        _accepted(a, training, p.status, True, C.ACCEPTED,
                  lifecycle.accepted_again([j["metadata"]["name"] for j in p.create_jobs]), None)
    return p.done, again, p


def _accepted(a: Api, training: dict[str, Any], status: dict[str, Any] | None, ok: bool, reason: str, message: str,
              event: EventSpec | None) -> None:
    patch = lifecycle.jobs_accepted(training, status, ok, reason, message, _now())
    if patch is not None:
        meta = training["metadata"]
        a.patch_training_status(meta["namespace"], meta["name"], patch)
        if event is not None:
            _post(training, {}, event)


def before_start(a: Api, ns: str, w: World) -> bool | None:
    """A training without members of its own yet. Waits (Retry) while children of an earlier training
    of the same name are still there; refuses at once, as InvalidSpec, a spec the cluster cannot run
    (`admission`: checks and a server-side dry run of the first segment's Job and pod), then waits for
    an edit; waits while a ResourceQuota refuses it. None: go ahead with the plan (which also reports
    unparseable specs)."""
    training = w.training
    assert training is not None
    name = training["metadata"]["name"]
    msg = leftovers_message(w.leftovers)
    if msg is not None:
        status, events = lifecycle.waiting_for_leftovers(training, msg, _now())
        if status is not None:
            a.patch_training_status(ns, name, status)
        for ev in events:
            _post(training, {}, ev)
        raise Retry(LEFTOVER_RETRY)
    try:
        spec = parse_spec(training.get("spec"), name=name, namespace=ns)
        root = storage_root(spec)
    except SpecError:
        return None  # the plan says what is wrong, field by field
    if spec.template is None:
        return None
    if lifecycle.refused_this_generation(training):
        raise Retry(IDLE_RESYNC)  # refused already, and not edited since: no new dry run until it is
    problems = cluster_problems(name, spec)
    if not problems:
        job = probe_job(training, spec, root)
        for obj in (job, probe_pod(job)):
            try:
                a.dry_run(ns, obj)
            except Exception as e:  # classified below; transient ones propagate and are retried
                err = classify(e)
                if not err.refused:
                    raise
                what = f"the API server refuses the first segment's {obj['kind']} (server-side dry run): {err.summary()}"
                if err.quota:  # quota may free up: wait and say why, rather than fail
                    _accepted(a, training, None, False, C.QUOTA_EXCEEDED, what,
                              EventSpec("training", "Warning", C.EV_JOB_REFUSED, what))
                    raise Retry(QUOTA_RETRY) from None
                problems.append(what)
                break
    if not problems:
        _accepted(a, training, None, True, C.ACCEPTED, "the first segment's Job and pod pass a server-side dry run",
                  None)
        return None
    status, events = lifecycle.invalid_spec(training, "; ".join(problems), _now())
    a.patch_training_status(ns, name, status)
    for ev in events:
        _post(training, {}, ev)
    raise Retry(IDLE_RESYNC)  # the daemon stays: an edit that fixes the spec starts the training


PASS_LOG = os.environ.get("PBT_PASS_LOG")  # benchmarks: a file that gets "unix-time seconds ns/name" per pass


def _pass_done(ns: str, name: str, seconds: float) -> None:
    metrics.PASS_SECONDS.observe(seconds)
    if PASS_LOG:
        with open(PASS_LOG, "a") as f:
            f.write(f"{time.time():.3f} {seconds:.4f} {ns}/{name}\n")


@kopf.daemon(GROUP, VERSION, "populationtrainings", id="reconcile", cancellation_timeout=10.0)  # type: ignore[arg-type]
async def training_daemon(name: str, namespace: str, stopped: kopf.DaemonStopped, logger: logging.Logger,
                          body: kopf.Body, **_: Any) -> None:
    global _LOOP
    _LOOP = asyncio.get_running_loop()
    wake = WAKEUPS.get(namespace, name)
    collected: set[tuple[int, int]] = set()
    box = CacheBox()
    failures = 0
    _warn_outdated_crds(dict(body))
    try:
        while not stopped:
            wake.clear()
            try:
                t0 = time.perf_counter()
                done, again, _p = await asyncio.to_thread(reconcile_once, namespace, name, collected, box)
                _pass_done(namespace, name, time.perf_counter() - t0)
                failures = 0
            except Retry as r:  # a wait the training's status explains: look again soon, or when woken
                try:
                    await asyncio.wait_for(wake.wait(), timeout=r.after)
                except asyncio.TimeoutError:
                    pass
                continue
            except Exception as e:  # an API hiccup must not kill the daemon; back off and retry
                if _API is not None:
                    # A write whose answer was lost may have landed all the same: the next pass reads
                    # this training's members with a fresh LIST rather than from the cache.
                    _API.members.forget(namespace, name)
                failures += 1
                metrics.RECONCILE_ERRORS.labels(namespace, name).inc()
                logger.warning("reconcile of %s/%s failed (%s); retrying", namespace, name, e)
                ev = lifecycle.pass_refused(classify(e))
                if ev is not None:
                    for posted in box.throttle.admit([ev], time.monotonic())[0]:
                        _post(dict(body), {}, posted)
                await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                continue
            if done:
                if _p is None:  # the training is gone
                    return
                logger.info("training %s/%s finished", namespace, name)
                # Stay, idle, until the spec is edited: a raised budget.segments (say) then continues the
                # training. Returning here ended the daemon, so such an edit was ignored until the
                # operator restarted, when it suddenly took effect.
                seen = lifecycle.generation_seen(_p)
                if _API is not None:  # idle: its members leave the cache (a pass after an edit LISTs them)
                    _API.members.forget(namespace, name)
                while not stopped and not lifecycle.edited_since(body, seen):
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), timeout=IDLE_RESYNC)
                    except asyncio.TimeoutError:
                        pass
                continue
            if again:
                continue
            try:
                await asyncio.wait_for(wake.wait(), timeout=IDLE_RESYNC)
            except asyncio.TimeoutError:
                pass
        if stopped.reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in stopped.reason:
            metrics.forget(namespace, name)
    finally:
        if _API is not None:  # a finished or deleted training's members leave the member cache
            _API.members.forget(namespace, name)


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
