"""The start-up check that the installed CRDs are this version's (kube/crdcheck.py, handlers.check_crds):
`helm upgrade` never updates a chart's CRDs, and an old schema silently prunes the fields it lacks."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from pbt_operator.kube import conditions as C
from pbt_operator.kube import crdcheck, handlers
from pbt_operator.kube.crds import SCHEMA_ANNOTATION, all_crds, expected_fingerprints
from test_crds import ROOT

TRAININGS, MEMBERS = "populationtrainings.pbt.dev", "populationmembers.pbt.dev"


def current() -> dict[str, dict[str, Any] | None]:
    return {c["metadata"]["name"]: c for c in all_crds()}


def with_fingerprint(crd: dict[str, Any] | None, fp: str | None) -> dict[str, Any]:
    crd = copy.deepcopy(crd) or {}
    annotations = crd.setdefault("metadata", {}).setdefault("annotations", {})
    if fp is None:
        del annotations[SCHEMA_ANNOTATION]
    else:
        annotations[SCHEMA_ANNOTATION] = fp
    return crd


def test_expected_is_what_the_generator_and_the_checked_in_files_say() -> None:
    assert expected_fingerprints() == crdcheck.EXPECTED
    for name in ("crds", "charts/pbt-operator/crds"):
        files = {}
        for path in sorted((ROOT / name).glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            files[crd["metadata"]["name"]] = crd["metadata"]["annotations"][SCHEMA_ANNOTATION]
        assert files == crdcheck.EXPECTED, name


def test_current_crds_are_not_outdated() -> None:
    assert crdcheck.outdated(current()) == []
    # what the API server adds (status, defaults, other annotations) does not matter
    served = {n: {**c, "status": {"acceptedNames": {}},
                  "metadata": {**c["metadata"], "resourceVersion": "7",
                               "annotations": {**c["metadata"]["annotations"], "other": "x"}}}
              for n, c in current().items() if c is not None}
    assert crdcheck.outdated(served) == []


def test_a_different_missing_or_absent_fingerprint_is_outdated() -> None:
    installed = current()
    installed[TRAININGS] = with_fingerprint(installed[TRAININGS], "0123456789abcdef")
    out = crdcheck.outdated(installed)
    assert out == [crdcheck.OutdatedCrd(TRAININGS, crdcheck.EXPECTED[TRAININGS], "0123456789abcdef")]
    installed[MEMBERS] = with_fingerprint(installed[MEMBERS], None)  # a CRD from before fingerprints
    installed[MEMBERS]["metadata"].pop("annotations")
    out = crdcheck.outdated(installed)
    assert [(o.name, o.installed, o.missing) for o in out] == [(TRAININGS, "0123456789abcdef", False),
                                                               (MEMBERS, None, False)]
    assert out[1].found() == "no fingerprint"
    out = crdcheck.outdated({TRAININGS: current()[TRAININGS], MEMBERS: None})
    assert [(o.name, o.missing, o.found()) for o in out] == [(MEMBERS, True, "not installed")]
    assert crdcheck.outdated({}, {"x.pbt.dev": "f"}) == [crdcheck.OutdatedCrd("x.pbt.dev", "f", None, True)]


def test_messages_name_the_crd_both_fingerprints_and_the_fix() -> None:
    crd = crdcheck.OutdatedCrd(TRAININGS, "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb")
    msg = crdcheck.log_message(crd, "1.2.3")
    for part in (TRAININGS, "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "helm upgrade",
                 "kubectl apply --server-side --force-conflicts -f charts/pbt-operator/crds/", "--version 1.2.3",
                 "docs/upgrading.md"):
        assert part in msg, (part, msg)
    assert "--version 0.1.0" in crdcheck.fix_command()  # without the chart's version: the operator's
    ev = crdcheck.event_message([crd, crdcheck.OutdatedCrd(MEMBERS, "c", None, True)])
    assert TRAININGS in ev and MEMBERS in ev and "not installed" in ev and "--server-side" in ev
    assert len(ev) <= 1000


class FakeApi:
    def __init__(self, result: dict[str, dict[str, Any] | None] | Exception):
        self.result = result

    def crds(self, names: list[str]) -> dict[str, dict[str, Any] | None]:
        assert names == list(crdcheck.EXPECTED)
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


@pytest.fixture
def startup(monkeypatch: pytest.MonkeyPatch) -> Any:
    posted: list[dict[str, Any]] = []
    monkeypatch.setattr(handlers, "OUTDATED_CRDS", [])
    monkeypatch.setattr(handlers, "_CRD_WARNED", set())
    monkeypatch.setattr(handlers.kopf, "event", lambda obj, **kw: posted.append({"uid": obj["metadata"]["uid"], **kw}))
    monkeypatch.setenv("PBT_CHART_VERSION", "9.9.9")

    def run(result: dict[str, dict[str, Any] | None] | Exception) -> list[dict[str, Any]]:
        monkeypatch.setattr(handlers, "api", lambda: FakeApi(result))
        handlers.check_crds()
        return posted

    return run


def body(uid: str) -> dict[str, Any]:
    return {"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining",
            "metadata": {"name": f"t-{uid}", "namespace": "ns", "uid": uid}}


def test_outdated_crd_logs_an_error_and_warns_each_training_once(startup: Any, caplog: Any) -> None:
    installed = current()
    installed[TRAININGS] = with_fingerprint(installed[TRAININGS], "0123456789abcdef")
    with caplog.at_level(logging.INFO, logger="pbt_operator"):
        posted = startup(installed)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and TRAININGS in errors[0] and "0123456789abcdef" in errors[0]
    assert crdcheck.EXPECTED[TRAININGS] in errors[0] and "--version 9.9.9" in errors[0]
    for uid in ("u1", "u2", "u1", "u2", "u1"):  # daemons (re)started: at most once per training
        handlers._warn_outdated_crds(body(uid))
    assert [(p["uid"], p["type"], p["reason"]) for p in posted] == [("u1", "Warning", C.EV_CRD_OUTDATED),
                                                                     ("u2", "Warning", C.EV_CRD_OUTDATED)]
    assert "0123456789abcdef" in posted[0]["message"] and "--server-side" in posted[0]["message"]


def test_current_crds_give_no_warning(startup: Any, caplog: Any) -> None:
    with caplog.at_level(logging.INFO, logger="pbt_operator"):
        posted = startup(current())
    handlers._warn_outdated_crds(body("u1"))
    assert not posted and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("CRDs are this version's" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("error,says", [
    (ApiException(status=403, reason="Forbidden"), "no permission to get customresourcedefinitions"),
    (ApiException(status=500, reason="InternalError"), "reading the CRDs failed"),
    (ConnectionError("refused"), "reading the CRDs failed"),
])
def test_an_unreadable_crd_never_stops_the_operator(startup: Any, caplog: Any, error: Exception,
                                                    says: str) -> None:
    with caplog.at_level(logging.INFO, logger="pbt_operator"):
        posted = startup(error)  # does not raise
    handlers._warn_outdated_crds(body("u1"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not posted and len(warnings) == 1 and says in warnings[0] and "skipped" in warnings[0], warnings
