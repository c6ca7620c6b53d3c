"""Shared fixtures: build PopulationTraining manifests and specs without YAML files.

`make_doc(spec_updates)` returns a valid manifest document with `spec_updates` deep-merged into its
spec (a value of `DELETE` removes a key); `make_spec(...)` parses it. Both are session-scoped
factories so hypothesis tests can use them without function-scoped fixture warnings.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import pytest

DELETE = object()


def base_doc() -> dict[str, Any]:
    return {
        "apiVersion": "pbt.dev/v1alpha1",
        "kind": "PopulationTraining",
        "metadata": {"name": "t"},
        "spec": {
            "population": 4,
            "seed": 0,
            "segment": {"steps": 10},
            "budget": {"segments": 5},
            "hyperparameters": {"lr": {"type": "float", "min": 1e-4, "max": 1e-1, "log": True}},
            "worker": {"executor": "inline", "function": "mod:fn"},
        },
    }


def merge(dst: dict[str, Any], src: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in src.items():
        if v is DELETE:
            dst.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def make_doc_fn(spec_updates: Mapping[str, Any] | None = None, /, **top: Any) -> dict[str, Any]:
    doc = base_doc()
    merge(doc["spec"], spec_updates or {})
    merge(doc, top)
    return doc


def make_spec_fn(spec_updates: Mapping[str, Any] | None = None, /, **top: Any) -> Any:
    from pbt_operator.spec import parse_manifest

    return parse_manifest(make_doc_fn(spec_updates, **top))


@pytest.fixture(scope="session")
def make_doc() -> Callable[..., dict[str, Any]]:
    return make_doc_fn


@pytest.fixture(scope="session")
def make_spec() -> Callable[..., Any]:
    return make_spec_fn


@pytest.fixture(scope="session")
def delete_marker() -> object:
    return DELETE


@pytest.fixture(scope="session")
def deep_merge() -> Callable[[dict[str, Any], Mapping[str, Any]], dict[str, Any]]:
    return merge


def _run_order(item: pytest.Item) -> int:
    """Cheap tests first, then the tiers in the order of the builds they need (hack/prebuild.sh builds
    them in the background in that order while the earlier tiers run): the control plane, then Karpenter
    and Kueue, then the real node and its images."""
    parts = item.path.parts
    if "helm_binary" in getattr(item, "fixturenames", ()):
        return 2  # the chart's unit tests need helm, built with the control plane
    if "unit" in parts:
        return 0
    if "integration" in parts:
        return 1
    if item.get_closest_marker("node"):
        return 4
    if item.get_closest_marker("addons"):
        return 3
    return 2


# Tests that drive real processes (moto, the control plane, kubelet, the operator) on a shared 2-core
# machine run once more after a failure; pytest-rerunfailures prints each such test as RERUN in the summary
# and "N rerun" on the last line, so a flake stays visible and gets fixed. A test that fails twice fails
# the suite. Unit tests are pure and deterministic: a unit test never reruns.
RERUNS_REAL_PROCESS_TIERS = 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # a stable sort: a module's tests stay together and in their order (module fixtures start once)
    items.sort(key=_run_order)
    if not config.pluginmanager.hasplugin("rerunfailures"):
        return
    for item in items:
        if _run_order(item) > 0 and item.get_closest_marker("flaky") is None:
            item.add_marker(pytest.mark.flaky(reruns=RERUNS_REAL_PROCESS_TIERS, reruns_delay=2))
