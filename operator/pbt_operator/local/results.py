"""The files a finished run leaves behind, for people and for `pbt status | plot | export | replay`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoints import checkpoint_uri
from ..core.engine import Engine
from ..spec import TrainingSpec


def best_document(spec: TrainingSpec, engine: Engine, root: str) -> dict[str, Any]:
    best = engine.best
    fatal = engine.failure.attempt if engine.failure is not None else None
    # The attempt that failed the training, for RunResult.open's failure_log (runner.failed_attempt).
    failed_at = {"failedAttempt": dict(zip(("member", "segment", "attempt"), fatal, strict=True))} if fatal else {}
    if best is None:  # every attempt failed, say: how it ended still matters (`pbt status`'s phase)
        return {"training": spec.name, "best": None, "finished": engine.finished, "failed": engine.failed,
                **failed_at}
    return {
        "training": spec.name,
        "metric": spec.objective.metric,
        "direction": spec.objective.direction,
        "member": best.member,
        "segment": best.segment,
        "score": best.score,
        "steps": best.steps_end,
        "hyperparameters": dict(best.suggestion.hyperparameters),
        "checkpoint": checkpoint_uri(root, spec.name, best.ref),
        "schedule": engine.schedule(best.ref),
        "finished": engine.finished,
        "failed": engine.failed,
        **failed_at,
    }


def lineage_document(spec: TrainingSpec, engine: Engine) -> dict[str, Any]:
    """Every finished segment with the checkpoint it started from: the population's family tree."""
    nodes = [
        {
            "member": r.member, "segment": r.segment, "parent": list(r.suggestion.restore) if r.suggestion.restore else None,
            "kind": r.suggestion.kind, "score": r.score, "steps_start": r.suggestion.steps_start,
            "steps_end": r.steps_end, "hyperparameters": dict(r.suggestion.hyperparameters),
        }
        for r in (engine.records[ref] for ref in engine.order)
    ]
    best = engine.best
    return {"training": spec.name, "nodes": nodes,
            "best": [[s["member"], s["segment"]] for s in engine.schedule(best.ref)] if best else []}


def write_outputs(spec: TrainingSpec, engine: Engine, run_dir: Path, root: str, *, plot: bool = True) -> None:
    (run_dir / "best.json").write_text(json.dumps(best_document(spec, engine, root), indent=2) + "\n")
    (run_dir / "lineage.json").write_text(json.dumps(lineage_document(spec, engine), indent=2) + "\n")
    if plot and engine.records:
        from .plots import plot_run

        plot_run(spec, engine, run_dir / "plot.png")
