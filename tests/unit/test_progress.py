"""The progress line of `pbt run` / `pbt_operator.run(progress=True)` (local/progress.py)."""

from __future__ import annotations

import io

from pbt_operator.core.engine import Engine
from pbt_operator.local.progress import Progress
from pbt_operator.spec import parse_manifest


def test_no_eta_before_a_segment_finished() -> None:
    """'ETA 0s' at 0% said the run was about to end before any segment had given a rate."""
    spec = parse_manifest({"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining", "metadata": {"name": "t"},
                           "spec": {"population": 2, "budget": {"segments": 2},
                                    "hyperparameters": {"lr": {"type": "float", "min": 0.1, "max": 1}},
                                    "worker": {"executor": "inline", "function": "m:f"}}})
    engine = Engine(spec)
    queued = engine.start()
    out = io.StringIO()
    Progress(spec, stream=out, live=False)(engine, {}, queued)
    line = out.getvalue()
    assert "segments 0/4 (0%)" in line and line.rstrip().endswith("ETA -")
