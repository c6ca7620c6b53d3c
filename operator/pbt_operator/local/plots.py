"""Pictures of a run: score over time per member with exploit jumps, and the best schedule."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..core.engine import Engine
from ..core.types import Record
from ..spec import TrainingSpec


def plot_run(spec: TrainingSpec, engine: Engine, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = spec.space.names[:6]
    fig, axes = plt.subplots(1 + len(params), 1, figsize=(9, 3.2 + 1.6 * len(params)), squeeze=False,
                             gridspec_kw={"height_ratios": [3] + [1] * len(params)})
    ax = axes[0][0]
    per_member: dict[int, list[Record]] = defaultdict(list)
    for ref in engine.order:
        per_member[ref[0]].append(engine.records[ref])
    cmap = plt.get_cmap("tab20" if spec.population > 10 else "tab10")
    for m, recs in sorted(per_member.items()):
        color = cmap(m % cmap.N)
        recs.sort(key=lambda r: r.segment)
        xs: list[float] = []
        ys: list[float] = []
        for r in recs:
            s = r.suggestion
            if s.kind in ("exploit", "replace") and s.score_before is not None:
                if xs:
                    ax.plot(xs, ys, color=color, lw=1.2, label=f"member {m}")
                ax.plot([s.steps_start, r.steps_end], [s.score_before, r.score], color=color, lw=1.2, ls="--")
                ax.plot([s.steps_start], [s.score_before], marker="x", color=color, ms=6)
                xs, ys = [s.steps_start], [s.score_before]
            elif not xs and s.score_before is not None:
                xs, ys = [s.steps_start], [s.score_before]
            xs.append(r.steps_end)
            ys.append(r.score)  # type: ignore[arg-type]
        ax.plot(xs, ys, color=color, lw=1.2, label=f"member {m}")
    ax.set_title(f"{spec.name}: {spec.objective.metric} per member ({spec.mode}, "
                 f"{spec.exploit.strategy} + {spec.explore.strategy}); x = exploit")
    ax.set_xlabel("steps")
    ax.set_ylabel(spec.objective.metric)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=False))
    if len(uniq) <= 16:
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, ncol=4, loc="lower right")
    ax.grid(alpha=0.3)
    sched = engine.schedule()
    for i, name in enumerate(params, start=1):
        a = axes[i][0]
        if sched:
            xs = [s["steps_start"] for s in sched] + [sched[-1]["steps_end"]]
            vals = [s["hyperparameters"][name] for s in sched]
            vals = [*vals, vals[-1]]
            a.step(xs, vals, where="post", color="black")
            p = spec.space[name]
            if p.log:
                a.set_yscale("log")
        a.set_ylabel(name, fontsize=8)
        a.grid(alpha=0.3)
        if i == 1:
            a.set_title("hyperparameter schedule of the best model (its lineage)", fontsize=9)
    axes[-1][0].set_xlabel("steps")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
