"""Are the installed CRDs the ones this operator was built with? Pure: the kopf start-up handler
(handlers.check_crds) reads the two CRDs and acts on what `outdated` says.

`helm upgrade` never updates the files in a chart's crds/ folder (Helm installs them on `helm install`
only). An API server whose CRD schema lacks a field refuses it where the client validates strictly
(kubectl's default, with an "unknown field" error that never mentions the CRDs) and elsewhere prunes it
from the object without an error (`--validate=false`, client libraries, some GitOps tools): a manifest
with `exploit.donorFraction` would run with the default. The generated CRDs carry a
fingerprint (crds.SCHEMA_ANNOTATION); this module compares the installed one with the one the operator's
own generator computes at import (`EXPECTED`), so the two cannot drift apart: the checked-in CRD files are
kept equal to the generator by tests/unit/test_crds.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import __version__
from .crds import SCHEMA_ANNOTATION, expected_fingerprints

EXPECTED: dict[str, str] = expected_fingerprints()  # CRD name -> fingerprint
DOCS = "docs/upgrading.md"


@dataclass(frozen=True)
class OutdatedCrd:
    name: str
    expected: str
    installed: str | None  # None: no fingerprint (a CRD from before fingerprints, or written by hand)
    missing: bool = False  # the CRD is not installed at all

    def found(self) -> str:
        if self.missing:
            return "not installed"
        return f"fingerprint {self.installed}" if self.installed else "no fingerprint"


def outdated(installed: dict[str, dict[str, Any] | None], expected: dict[str, str] = EXPECTED) -> list[OutdatedCrd]:
    """The expected CRDs whose installed object (name -> CRD object, None when absent) does not carry the
    expected fingerprint, in the order of `expected`."""
    out = []
    for name, want in expected.items():
        crd = installed.get(name)
        if crd is None:
            out.append(OutdatedCrd(name, want, None, missing=True))
            continue
        have = ((crd.get("metadata") or {}).get("annotations") or {}).get(SCHEMA_ANNOTATION)
        if have != want:
            out.append(OutdatedCrd(name, want, have or None))
    return out


def fix_command(chart_version: str | None = None) -> str:
    """The command that installs this version's CRDs. Server-side: a CRD's spec.versions is one atomic
    field there, so the new list replaces the old whole, fields and columns a version removed included;
    --force-conflicts: `helm install` created the CRDs as another field manager, whose fields a plain
    server-side apply refuses to take over (the command runs on the test cluster, tests/e2e/test_upgrade.py,
    over CRDs that kubectl applied, so the conflict with Helm's field manager is not exercised there)."""
    v = chart_version or __version__
    return (f"kubectl apply --server-side --force-conflicts -f charts/pbt-operator/crds/ (the crds/ folder of "
            f"chart version {v}; a released chart: `helm pull <repo>/pbt-operator --version {v} --untar`, then "
            f"`kubectl apply --server-side --force-conflicts -f pbt-operator/crds/`)")


def log_message(crd: OutdatedCrd, chart_version: str | None = None) -> str:
    return (f"CRD {crd.name} is outdated: installed {crd.found()}, this operator ({__version__}) expects "
            f"{SCHEMA_ANNOTATION}={crd.expected} (or it is another version's: after a rollback, apply that "
            f"version's CRDs). The API server drops every spec field the installed schema does not know (kubectl "
            f"refuses them as unknown fields), so trainings may run with defaults instead of what their manifests "
            f"say (`helm upgrade` never updates CRDs). Fix: {fix_command(chart_version)}; see {DOCS}")


def event_message(crds: list[OutdatedCrd], chart_version: str | None = None) -> str:
    names = ", ".join(f"{c.name} ({c.found()}, expected {c.expected})" for c in crds)
    return (f"outdated CRDs: {names}. Spec fields the installed schema does not know are dropped (kubectl refuses "
            f"them as unknown fields): the training may run with defaults. Apply this version's CRDs: {fix_command(chart_version)}; "
            f"then apply the training's manifest again. See {DOCS}")
