"""The operator's Prometheus metrics, fed by real reconcile plans (the in-memory stand-in for the API
server from test_reconcile), the way kube/handlers.py feeds them: observe_plan per pass, count_event per
posted Event."""

from __future__ import annotations

import datetime
import random
import socket
import urllib.request
from typing import Any

import pytest
from pbt_operator.kube import metrics
from pbt_operator.kube.reconcile import job_seconds
from prometheus_client import REGISTRY
from test_reconcile import FakeCluster, training_obj

SEGMENT_SECONDS = 7.0


class MeteredCluster(FakeCluster):
    """Reports every pass to the metrics module as handlers.reconcile_once does; Jobs get a startTime."""

    def __init__(self, training: dict[str, Any], cache: bool = False):
        super().__init__(training, cache=cache)
        self.passes = 0

    def reconcile(self, limit: int | None = None) -> Any:
        p = super().reconcile(limit)
        self.passes += 1
        meta = self.training["metadata"]
        metrics.observe_plan(meta["namespace"], meta["name"], 0.002, p)
        for ev in p.events:
            metrics.count_event(ev.reason, meta["namespace"], meta["name"])
        return p

    def finish(self, job: dict[str, Any], fail: bool = False) -> None:
        super().finish(job, fail)
        st = job["status"]
        end = st.get("completionTime") or self.now()
        t1 = datetime.datetime.strptime(end, "%Y-%m-%dT%H:%M:%SZ")
        st["startTime"] = (t1 - datetime.timedelta(seconds=SEGMENT_SECONDS)).strftime("%Y-%m-%dT%H:%M:%SZ")


def drive(c: MeteredCluster, rng: random.Random, fail_jobs: frozenset[str] = frozenset()) -> None:
    for _ in range(2000):
        p = c.reconcile()
        if p.done:
            return
        running = c.running()
        if running and not p.create_members:
            job = rng.choice(running)
            c.finish(job, fail=job["metadata"]["name"] in fail_jobs)
    raise AssertionError("training did not finish")


def value(name: str, **labels: str) -> float:
    v = REGISTRY.get_sample_value(name, labels)
    return 0.0 if v is None else v


def make(ns: str, cache: bool = False, **spec: Any) -> MeteredCluster:
    t = training_obj(**spec)
    t["metadata"]["namespace"] = ns  # metrics are process-global: each test its own label set
    return MeteredCluster(t, cache)


def test_metrics_after_a_training_runs() -> None:
    ns = "metrics-run"
    lab = {"namespace": ns, "training": "toy"}
    plan_count0 = value("pbt_reconcile_plan_seconds_count")
    c = make(ns)
    drive(c, random.Random(0))
    st = c.training["status"]
    assert st["phase"] == "Succeeded"
    n_segments = 6 * 4
    assert value("pbt_segments_started_total", **lab) == len(c.jobs) == n_segments
    assert value("pbt_segments_finished_total", **lab) == n_segments
    assert value("pbt_segments_failed_total", **lab) == 0
    exploits = sum(1 for e in c.events if e.reason == "Exploited")
    assert exploits > 0
    assert value("pbt_exploits_total", strategy="truncation", **lab) == exploits
    assert value("pbt_explores_total", strategy="perturb", **lab) == exploits
    assert value("pbt_exploits_total", strategy="tournament", **lab) == 0
    # decision latency: one observation per pass
    assert value("pbt_reconcile_plan_seconds_count") - plan_count0 == c.passes
    # segment durations: startTime -> completionTime of every finished Job
    assert value("pbt_segment_duration_seconds_count", **lab) == n_segments
    assert value("pbt_segment_duration_seconds_sum", **lab) == pytest.approx(n_segments * SEGMENT_SECONDS)
    assert value("pbt_segment_duration_seconds_bucket", le="5.0", **lab) == 0
    assert value("pbt_segment_duration_seconds_bucket", le="15.0", **lab) == n_segments
    assert value("pbt_best_score", **lab) == st["best"]["score"]
    assert value("pbt_running_segments", **lab) == 0 and value("pbt_queued_members", **lab) == 0


def test_engine_rebuilds_are_counted() -> None:
    """Every pass rebuilds without the engine cache; with it, only the passes after members were
    created (their first resourceVersions are not ours yet)."""
    for cache, ns in ((False, "metrics-nocache"), (True, "metrics-cache")):
        c = make(ns, cache)
        drive(c, random.Random(0))
        n = value("pbt_engine_rebuilds_total", namespace=ns, training="toy")
        assert n == c.passes if not cache else 1 <= n <= 3, (cache, n, c.passes)


def test_running_and_queued_gauges_follow_the_status() -> None:
    ns = "metrics-gauges"
    lab = {"namespace": ns, "training": "toy"}
    c = make(ns, population=6, parallelism=2)
    c.reconcile()  # creates the members
    c.reconcile()  # admits 2 segments, 4 members wait
    assert value("pbt_running_segments", **lab) == 2
    assert value("pbt_queued_members", **lab) == 4
    assert value("pbt_waiting_segments", **lab) == 0  # (created a moment ago: starting is not waiting)
    assert value("pbt_segments_started_total", **lab) == 2
    metrics.forget(ns, "toy")  # the training was deleted
    assert REGISTRY.get_sample_value("pbt_running_segments", lab) is None
    assert REGISTRY.get_sample_value("pbt_waiting_segments", lab) is None
    assert REGISTRY.get_sample_value("pbt_queued_members", lab) is None
    metrics.forget(ns, "toy")  # twice is fine


def test_failures_are_counted_and_exploits_by_strategy() -> None:
    ns = "metrics-fail"
    lab = {"namespace": ns, "training": "toy"}
    c = make(ns, failurePolicy={"maxRetries": 1, "onExhausted": "replace"},
             exploit={"strategy": "tournament", "size": 2})
    drive(c, random.Random(0), fail_jobs=frozenset({"toy-m002-s00001-a0", "toy-m002-s00001-a1"}))
    assert c.training["status"]["phase"] == "Succeeded"
    assert value("pbt_segments_failed_total", **lab) == 2
    assert value("pbt_exploits_total", strategy="tournament", **lab) >= 1
    assert value("pbt_exploits_total", strategy="truncation", **lab) == 0
    # a failed Job has no completionTime: its duration ends when the pass saw it fail
    assert value("pbt_segment_duration_seconds_count", **lab) == len(c.jobs)
    metrics.count_event("SegmentDisrupted", ns, "toy")
    metrics.count_event("Explored", ns, "toy")  # not an event counter: counted from plans only
    assert value("pbt_segments_disrupted_total", **lab) == 1


def test_job_seconds() -> None:
    job = {"status": {"startTime": "2026-01-01T00:00:00Z", "completionTime": "2026-01-01T00:01:30Z"}}
    assert job_seconds(job, job["status"]["completionTime"]) == 90.0
    assert job_seconds({"status": {}}, "2026-01-01T00:01:30Z") is None
    assert job_seconds({"status": {"startTime": "garbage"}}, "2026-01-01T00:01:30Z") is None
    assert job_seconds(job, "2025-12-31T23:59:00Z") == 0.0  # clock skew never gives a negative duration
    # the pod's success seen before the Job controller's startTime write: the earliest pod start stands in
    pods = [{"status": {"startTime": "2026-01-01T00:00:40Z"}}, {"status": {"startTime": "2026-01-01T00:00:10Z"}},
            {"status": {}}]
    assert job_seconds({"status": {}}, "2026-01-01T00:01:30Z", pods) == 80.0
    assert job_seconds(job, "2026-01-01T00:01:30Z", pods) == 90.0  # the Job's own start wins when it has one
    assert job_seconds({"status": {}}, "2026-01-01T00:01:30Z", [{"status": {}}]) is None


def test_metrics_endpoint_serves_every_metric(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PBT_METRICS_PORT", str(port))
    monkeypatch.setenv("PBT_METRICS_ADDR", "127.0.0.1")
    metrics.RECONCILE_ERRORS.labels("metrics-http", "toy").inc()
    metrics.start_server_from_env()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in ("pbt_segments_started_total", "pbt_segments_finished_total", "pbt_segments_failed_total",
                 "pbt_segments_disrupted_total", "pbt_checkpoint_delete_failed_total", "pbt_exploits_total", "pbt_explores_total",
                 "pbt_reconcile_plan_seconds_bucket", "pbt_segment_duration_seconds_bucket",
                 "pbt_running_segments", "pbt_waiting_segments", "pbt_queued_members", "pbt_best_score", "pbt_reconcile_errors_total"):
        assert f"# TYPE {name.removesuffix('_bucket').removesuffix('_total')}" in text, name
    assert 'pbt_reconcile_errors_total{namespace="metrics-http",training="toy"} 1.0' in text
