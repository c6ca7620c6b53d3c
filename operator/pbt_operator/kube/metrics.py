"""Prometheus metrics of the operator (served on PBT_METRICS_PORT, default 8000; 0 turns them off).

Per training (labels namespace, training): segments started / finished / failed / disrupted, exploit and
explore decisions (label strategy), segment Job durations, running segments, queued members, best score,
reconcile errors. Process-wide: the time one reconcile pass takes to plan (the core's decisions included).
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_LABELS = ["namespace", "training"]
SEGMENTS_STARTED = Counter("pbt_segments_started_total", "Segment Jobs created", _LABELS)
SEGMENTS_FINISHED = Counter("pbt_segments_finished_total", "Segments finished with a score", _LABELS)
SEGMENTS_FAILED = Counter("pbt_segments_failed_total", "Segments that failed", _LABELS)
SEGMENTS_DISRUPTED = Counter("pbt_segments_disrupted_total", "Segment pods disrupted (rerun, not failed)", _LABELS)
CHECKPOINT_DELETE_FAILED = Counter("pbt_checkpoint_delete_failed_total",
                                   "Segments that saved but could not delete some of their old checkpoints", _LABELS)
EXPLOITS = Counter("pbt_exploits_total", "Exploit decisions", [*_LABELS, "strategy"])
EXPLORES = Counter("pbt_explores_total", "Explore decisions", [*_LABELS, "strategy"])
DECISION_SECONDS = Histogram("pbt_reconcile_plan_seconds",
                             "Decision latency: time to compute one reconcile plan (the core's decisions included)",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
SEGMENT_SECONDS = Histogram("pbt_segment_duration_seconds", "Segment Job duration (status.startTime to completion)",
                            _LABELS, buckets=(1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 4 * 3600))
RUNNING = Gauge("pbt_running_segments", "Segment Jobs running", _LABELS)
QUEUED = Gauge("pbt_queued_members", "Members waiting for a slot", _LABELS)
WAITING = Gauge("pbt_waiting_segments",
                "Segment Jobs created but not training: waiting for admission, a node, the scheduler, an image", _LABELS)
BEST = Gauge("pbt_best_score", "Best score so far", _LABELS)
ENGINE_REBUILDS = Counter("pbt_engine_rebuilds_total", "Passes that rebuilt the engine from the member histories "
                          "(the first pass, a restart, another writer, a failed write) instead of reusing the "
                          "previous pass's", _LABELS)
RECONCILE_ERRORS = Counter("pbt_reconcile_errors_total", "Reconcile passes that raised", _LABELS)
PASS_SECONDS = Histogram("pbt_reconcile_pass_seconds", "One whole reconcile pass: reads, plan and writes",
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
API_REQUESTS = Counter("pbt_api_requests_total", "Requests the reconcile passes sent to the API server "
                       "(kopf's own watches, finalizers and Events not included), by verb and resource "
                       "(populationmembers/status: the status subresource)", ["verb", "resource"])

_EVENT_COUNTERS = {
    "SegmentFailed": SEGMENTS_FAILED,
    "SegmentDisrupted": SEGMENTS_DISRUPTED,
    "CheckpointDeleteFailed": CHECKPOINT_DELETE_FAILED,
}


def start_server_from_env() -> None:
    port = int(os.environ.get("PBT_METRICS_PORT", "8000"))
    if port > 0:
        try:
            start_http_server(port, addr=os.environ.get("PBT_METRICS_ADDR", "0.0.0.0"))
        except OSError:
            pass  # a second operator in the same process (tests) or the port is taken: metrics are optional


def observe_plan(ns: str, name: str, seconds: float, plan: Any) -> None:
    DECISION_SECONDS.observe(seconds)
    if getattr(plan, "rebuilt", False):
        ENGINE_REBUILDS.labels(ns, name).inc()
    st = plan.status or {}
    RUNNING.labels(ns, name).set(st.get("running", 0))
    QUEUED.labels(ns, name).set(st.get("queued", 0))
    WAITING.labels(ns, name).set(st.get("waiting", 0))
    best = (st.get("best") or {}).get("score")
    if best is not None:
        BEST.labels(ns, name).set(best)
    if plan.started:
        SEGMENTS_STARTED.labels(ns, name).inc(len(plan.started))
    spec = plan.spec
    for ev in plan.events:
        if ev.reason == "Exploited" and spec is not None:
            EXPLOITS.labels(ns, name, spec.exploit.strategy).inc()
        if ev.reason == "Explored" and spec is not None:
            EXPLORES.labels(ns, name, spec.explore.strategy).inc()
    if plan.finished:
        SEGMENTS_FINISHED.labels(ns, name).inc(plan.finished)
    for secs in plan.segment_seconds:
        SEGMENT_SECONDS.labels(ns, name).observe(secs)


def count_event(reason: str, ns: str, name: str) -> None:
    c = _EVENT_COUNTERS.get(reason)
    if c is not None:
        c.labels(ns, name).inc()


def forget(ns: str, name: str) -> None:
    """A deleted training's gauges go away (its counters and histograms stay until the operator restarts,
    as Prometheus counters should)."""
    for g in (RUNNING, QUEUED, WAITING, BEST):
        try:
            g.remove(ns, name)
        except KeyError:
            pass
