"""Api.apply's write phases: independent writes go out together, and a failure fails the pass only
after every write of its phase has finished (none is left half-sent behind the error)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from pbt_operator.kube.api import Api
from pbt_operator.kube.membercache import MemberCache


def bare_api() -> Api:
    api = Api.__new__(Api)
    api.pool = ThreadPoolExecutor(max_workers=8)
    api.members = MemberCache(lambda ns, **kw: None)  # no namespace watched: write-through does nothing
    return api


def test_writes_of_a_phase_run_concurrently() -> None:
    api = bare_api()
    barrier = threading.Barrier(3, timeout=5)  # only passes if all three writes are in flight at once
    done: list[int] = []
    api._together([lambda i=i: (barrier.wait(), done.append(i)) for i in range(3)])
    assert sorted(done) == [0, 1, 2]


def test_a_failed_write_raises_after_the_others_finish() -> None:
    api = bare_api()
    done: list[int] = []

    def boom() -> None:
        raise RuntimeError("409? no: 500")

    def slow(i: int) -> None:
        threading.Event().wait(0.05)
        done.append(i)

    with pytest.raises(RuntimeError, match="500"):
        api._together([lambda: slow(0), boom, lambda: slow(2)])
    assert sorted(done) == [0, 2]


def test_member_specs_are_written_one_by_one_in_plan_order() -> None:
    from pbt_operator.kube.reconcile import Plan

    api = bare_api()
    calls: list[str] = []

    class Custom:
        def patch_namespaced_custom_object(self, *args: object) -> None:
            calls.append(f"spec {args[4]} start")
            threading.Event().wait(0.01)
            calls.append(f"spec {args[4]} end")

    api.custom = Custom()  # type: ignore[assignment]
    p = Plan()
    p.member_specs = {"toy-m002": {}, "toy-m000": {}, "toy-m001": {}}
    p.status = {}
    api.apply("ns", "toy", p)
    assert calls == [f"spec toy-m00{i} {w}" for i in (2, 0, 1) for w in ("start", "end")]


def test_member_specs_of_an_asynchronous_training_go_out_together() -> None:
    from pbt_operator.kube.reconcile import Plan
    from pbt_operator.spec import parse_spec
    from test_reconcile import training_obj

    api = bare_api()
    barrier = threading.Barrier(3, timeout=5)  # only passes if all three patches are in flight at once
    done: list[str] = []

    class Custom:
        def patch_namespaced_custom_object(self, *args: object) -> None:
            barrier.wait()
            done.append(str(args[4]))

    api.custom = Custom()  # type: ignore[assignment]
    p = Plan()
    p.spec = parse_spec(training_obj(mode="asynchronous")["spec"], name="toy")
    p.member_specs = {"toy-m002": {}, "toy-m000": {}, "toy-m001": {}}
    p.status = {}
    api.apply("ns", "toy", p)
    assert sorted(done) == ["toy-m000", "toy-m001", "toy-m002"]


def test_requests_are_counted_by_resource_and_subresource() -> None:
    from pbt_operator.kube.api import request_resource

    base = "https://127.0.0.1:6443"
    assert request_resource(f"{base}/apis/pbt.dev/v1alpha1/namespaces/ns/populationmembers/t-m000/status") == \
        "populationmembers/status"
    assert request_resource(f"{base}/apis/pbt.dev/v1alpha1/namespaces/ns/populationmembers/t-m000") == \
        "populationmembers"
    assert request_resource(f"{base}/apis/batch/v1/namespaces/ns/jobs?labelSelector=a%3Db") == "jobs"
    assert request_resource(f"{base}/api/v1/namespaces/ns/pods") == "pods"
    assert request_resource(f"{base}/apis/pbt.dev/v1alpha1/namespaces/ns/populationtrainings/t/status") == \
        "populationtrainings/status"
