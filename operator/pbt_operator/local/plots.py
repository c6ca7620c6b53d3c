"""Pictures of a run: score over time per member with exploit jumps, and the best schedule.

`plot_data(spec, engine)` turns a run into plain series (JSON-friendly); `figure(...)` draws them with
matplotlib (PNG), `html(...)` as a self-contained page (inline SVG, a few lines of JS, no CDN). Both
draw the same series, and `pbt plot` writes them next to each other with the series as a JSON sidecar,
so what a picture shows can be checked without looking at it.

Score panel, per member: one solid line per stretch of segments that continued from the member's own
weights; an exploit (or a replacement) ends the stretch and starts a new one at the donor's checkpoint
(step, score), drawn as a dashed jump to the first score after the copy, with an x at the donor's point.
A wide grey band marks the best model's lineage. Schedule panels (same step axis): each hyperparameter
along the best model's lineage (a step function over steps).
"""

from __future__ import annotations

import html as _html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..core.engine import Engine
from ..core.types import Record
from ..spec import TrainingSpec

MAX_PARAMS = 6


def plot_data(spec: TrainingSpec, engine: Engine) -> dict[str, Any]:
    per_member: dict[int, list[Record]] = defaultdict(list)
    for ref in engine.order:
        per_member[ref[0]].append(engine.records[ref])
    members = []
    for m, recs in sorted(per_member.items()):
        recs.sort(key=lambda r: r.segment)
        lines: list[list[list[float]]] = []
        jumps: list[dict[str, Any]] = []
        cur: list[list[float]] = []
        for r in recs:
            s = r.suggestion
            if s.kind in ("exploit", "replace") and s.score_before is not None:
                if cur:
                    lines.append(cur)
                start = [float(s.steps_start), float(s.score_before)]
                jumps.append({"donor": s.donor, "segment": r.segment, "from": start,
                              "to": [float(r.steps_end), float(r.score)]})  # type: ignore[arg-type]
                cur = [start]
            elif not cur and s.score_before is not None:
                cur = [[float(s.steps_start), float(s.score_before)]]
            cur.append([float(r.steps_end), float(r.score)])  # type: ignore[arg-type]
        if cur:
            lines.append(cur)
        members.append({"member": m, "lines": lines, "jumps": jumps})
    best = engine.best
    sched = engine.schedule()
    params = []
    for name in spec.space.names[:MAX_PARAMS]:
        p = spec.space[name]
        pts: list[list[Any]] = []
        if sched:
            pts = [[s["steps_start"], s["hyperparameters"].get(name)] for s in sched]
            pts.append([sched[-1]["steps_end"], sched[-1]["hyperparameters"].get(name)])
        params.append({"name": name, "log": bool(p.log), "categorical": not p.numeric, "points": pts})
    return {
        "training": spec.name,
        "metric": spec.objective.metric,
        "direction": spec.objective.direction,
        "title": (f"{spec.name}: {spec.objective.metric} per member ({spec.mode}, "
                  f"{spec.exploit.strategy} + {spec.explore.strategy}); x = exploit"),
        "population": spec.population,
        "members": members,
        "best": {"member": best.member, "segment": best.segment, "score": best.score,
                 "steps": best.steps_end} if best else None,
        "lineage": [[s["member"], s["segment"], s["steps_end"], s["score"]] for s in sched],
        "schedule": params,
    }


def figure(data: dict[str, Any]) -> Any:
    """A matplotlib Figure of `plot_data`'s series (axes[0]: scores; then one axis per hyperparameter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = data["schedule"]
    fig, axes = plt.subplots(1 + len(params), 1, figsize=(9, 3.2 + 1.6 * len(params)), squeeze=False,
                             sharex=True, gridspec_kw={"height_ratios": [3] + [1] * len(params)})
    ax = axes[0][0]
    cmap = plt.get_cmap("tab20" if data["population"] > 10 else "tab10")
    for mem in data["members"]:
        m = mem["member"]
        color = cmap(m % cmap.N)
        for i, line in enumerate(mem["lines"]):
            ax.plot([pt[0] for pt in line], [pt[1] for pt in line], color=color, lw=1.2, label=f"member {m}" if i == 0 else "_nolegend_",
                    gid=f"member-{m}-line-{i}")
        for j, jump in enumerate(mem["jumps"]):
            (x0, y0), (x1, y1) = jump["from"], jump["to"]
            ax.plot([x0, x1], [y0, y1], color=color, lw=1.2, ls="--", label="_nolegend_", gid=f"member-{m}-jump-{j}")
            ax.plot([x0], [y0], marker="x", color=color, ms=6, ls="none", label="_nolegend_",
                    gid=f"member-{m}-exploit-{j}")
    lineage = [(s[2], s[3]) for s in data["lineage"] if s[3] is not None]
    if lineage:
        ax.plot([x for x, _ in lineage], [y for _, y in lineage], color="black", lw=4, alpha=0.18,
                label="best lineage", gid="best-lineage", zorder=0)
    ax.set_title(data["title"], fontsize=10)
    ax.set_xlabel("steps")
    ax.set_ylabel(data["metric"])
    if len(data["members"]) <= 16:
        ax.legend(fontsize=7, ncol=4, loc="best")
    ax.grid(alpha=0.3)
    for i, p in enumerate(params, start=1):
        a = axes[i][0]
        if p["points"]:
            xs = [pt[0] for pt in p["points"]]
            vals = [pt[1] for pt in p["points"]]
            a.step(xs, vals, where="post", color="black", gid=f"schedule-{p['name']}")
            nums = [float(v) for v in vals] if not p["categorical"] else []
            if p["log"] and nums and min(nums) > 0 and max(nums) / min(nums) >= 10:  # a log axis needs a decade
                a.set_yscale("log")
        a.set_ylabel(p["name"], fontsize=8)
        a.tick_params(labelbottom=True)
        a.grid(alpha=0.3)
        if i == 1:
            a.set_title("hyperparameter schedule of the best model (its lineage)", fontsize=9)
    axes[-1][0].set_xlabel("steps")
    fig.tight_layout()
    return fig


def plot_run(spec: TrainingSpec, engine: Engine, path: Path, data: dict[str, Any] | None = None) -> Path:
    import matplotlib.pyplot as plt

    fig = figure(data if data is not None else plot_data(spec, engine))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(data: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


# -- interactive HTML --------------------------------------------------------------------------------
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
            "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
            "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"]


class _Scale:
    def __init__(self, lo: float, hi: float, a: float, b: float, log: bool = False):
        import math

        self.log = log and lo > 0
        f = math.log10 if self.log else (lambda v: v)
        self.f = f
        lo_f, hi_f = f(lo), f(hi)
        if hi_f == lo_f:
            lo_f, hi_f = lo_f - 0.5, hi_f + 0.5
        pad = (hi_f - lo_f) * 0.04
        self.lo, self.hi, self.a, self.b = lo_f - pad, hi_f + pad, a, b

    def __call__(self, v: float) -> float:
        return self.a + (self.f(v) - self.lo) / (self.hi - self.lo) * (self.b - self.a)

    def ticks(self, n: int = 5) -> list[float]:
        vals = [self.lo + (self.hi - self.lo) * i / (n - 1) for i in range(n)]
        return [10 ** v for v in vals] if self.log else vals


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def html(data: dict[str, Any]) -> str:
    """A self-contained page: hover a point for its values, click a legend entry to hide a member."""
    W, LEFT, RIGHT = 900, 70, 20
    top_h, sub_h = 360, 110
    parts: list[str] = []
    xs_all = [pt[0] for mem in data["members"] for line in mem["lines"] for pt in line]
    ys_all = [pt[1] for mem in data["members"] for line in mem["lines"] for pt in line]
    if not xs_all:
        xs_all, ys_all = [0.0, 1.0], [0.0, 1.0]
    xs = _Scale(min(xs_all), max(xs_all), LEFT, W - RIGHT)
    ys = _Scale(min(ys_all), max(ys_all), top_h - 40, 30)
    esc = _html.escape
    parts.append(f'<svg id="scores" width="{W}" height="{top_h}" xmlns="http://www.w3.org/2000/svg">')
    parts.append(_axes(xs, ys, top_h - 40, 30, data["metric"]))
    for mem in data["members"]:
        m = mem["member"]
        color = _PALETTE[m % len(_PALETTE)]
        parts.append(f'<g class="member" data-member="{m}">')
        for line in mem["lines"]:
            pts = " ".join(f"{xs(x):.1f},{ys(y):.1f}" for x, y in line)
            parts.append(f'<polyline class="series" points="{pts}" fill="none" stroke="{color}" stroke-width="1.5"/>')
            for x, y in line:
                parts.append(f'<circle cx="{xs(x):.1f}" cy="{ys(y):.1f}" r="2.5" fill="{color}">'
                             f'<title>member {m}: step {_fmt(x)}, {esc(data["metric"])} {_fmt(y)}</title></circle>')
        for jump in mem["jumps"]:
            (x0, y0), (x1, y1) = jump["from"], jump["to"]
            parts.append(f'<line class="jump" x1="{xs(x0):.1f}" y1="{ys(y0):.1f}" x2="{xs(x1):.1f}" y2="{ys(y1):.1f}" '
                         f'stroke="{color}" stroke-dasharray="4,3"/>')
            cx, cy = xs(x0), ys(y0)
            parts.append(f'<path d="M{cx - 4:.1f},{cy - 4:.1f}L{cx + 4:.1f},{cy + 4:.1f}M{cx - 4:.1f},{cy + 4:.1f}'
                         f'L{cx + 4:.1f},{cy - 4:.1f}" stroke="{color}" stroke-width="2">'
                         f'<title>member {m} copies member {jump["donor"]} at step {_fmt(x0)} '
                         f'({esc(data["metric"])} {_fmt(y0)})</title></path>')
        parts.append("</g>")
    if data["lineage"]:
        pts = " ".join(f"{xs(s[2]):.1f},{ys(s[3]):.1f}" for s in data["lineage"] if s[3] is not None)
        parts.append(f'<polyline id="best-lineage" points="{pts}" fill="none" stroke="black" stroke-width="1" '
                     f'stroke-opacity="0.5"><title>best lineage</title></polyline>')
    parts.append("</svg>")
    legend = "".join(
        f'<span class="legend" data-member="{mem["member"]}" style="color:{_PALETTE[mem["member"] % len(_PALETTE)]}">'
        f'&#9632; member {mem["member"]}</span> ' for mem in data["members"])
    subs: list[str] = []
    for p in data["schedule"]:
        pts_raw = p["points"]
        svg = [f'<svg class="schedule" width="{W}" height="{sub_h}" xmlns="http://www.w3.org/2000/svg">']
        if pts_raw and not p["categorical"]:
            vals = [float(v) for _, v in pts_raw]
            ps = _Scale(min(vals), max(vals), sub_h - 25, 10, log=p["log"])
            svg.append(_axes(xs, ps, sub_h - 25, 10, p["name"]))
            d = []
            for i, (x, v) in enumerate(pts_raw):
                if i == 0:
                    d.append(f"M{xs(x):.1f},{ps(float(v)):.1f}")
                else:
                    d.append(f"H{xs(x):.1f}V{ps(float(v)):.1f}")
            svg.append(f'<path d="{"".join(d)}" fill="none" stroke="black" stroke-width="1.5"/>')
            for x, v in pts_raw[:-1]:
                svg.append(f'<circle cx="{xs(x):.1f}" cy="{ps(float(v)):.1f}" r="2.5">'
                           f'<title>from step {_fmt(x)}: {esc(p["name"])}={_fmt(v)}</title></circle>')
        elif pts_raw:
            svg.append(f'<text x="{LEFT}" y="20" font-size="11">{esc(p["name"])}: ' + " &#8594; ".join(
                f"{esc(str(v))} (from step {_fmt(x)})" for x, v in pts_raw[:-1]) + "</text>")
        svg.append("</svg>")
        subs.append("".join(svg))
    best = data.get("best")
    best_line = (f"best: member {best['member']} segment {best['segment']} {esc(data['metric'])}="
                 f"{_fmt(best['score'])} at step {best['steps']}" if best else "no finished segment yet")
    embedded = json.dumps(data).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{esc(data['training'])}</title>
<style>body{{font-family:sans-serif;margin:20px}} .legend{{cursor:pointer;margin-right:8px;font-size:13px}}
.legend.off{{opacity:0.3}} svg text{{font-family:sans-serif}} circle:hover{{r:5}}</style></head>
<body><h2>{esc(data['title'])}</h2><p>{best_line}</p>
<div id="legend">{legend}</div>
{"".join(parts)}
<h3>hyperparameter schedule of the best model (its lineage)</h3>
{"".join(subs)}
<script id="plot-data" type="application/json">{embedded}</script>
<script>
document.querySelectorAll('.legend').forEach(function (el) {{
  el.addEventListener('click', function () {{
    el.classList.toggle('off');
    var g = document.querySelector('g.member[data-member="' + el.dataset.member + '"]');
    if (g) g.style.display = el.classList.contains('off') ? 'none' : '';
  }});
}});
</script></body></html>
"""


def _axes(xs: _Scale, ys: _Scale, y_bottom: float, y_top: float, label: str) -> str:
    out = [f'<line x1="{xs.a}" y1="{y_bottom}" x2="{xs.b}" y2="{y_bottom}" stroke="#999"/>',
           f'<line x1="{xs.a}" y1="{y_top}" x2="{xs.a}" y2="{y_bottom}" stroke="#999"/>']
    for t in xs.ticks():
        out.append(f'<text x="{xs(t):.1f}" y="{y_bottom + 14}" font-size="10" text-anchor="middle">{_fmt(t)}</text>')
    for t in ys.ticks(4):
        out.append(f'<text x="{xs.a - 4}" y="{ys(t) + 3:.1f}" font-size="10" text-anchor="end">{_fmt(t)}</text>')
        out.append(f'<line x1="{xs.a}" y1="{ys(t):.1f}" x2="{xs.b}" y2="{ys(t):.1f}" stroke="#eee"/>')
    out.append(f'<text x="12" y="{(y_top + y_bottom) / 2:.1f}" font-size="11" '
               f'transform="rotate(-90 12 {(y_top + y_bottom) / 2:.1f})" text-anchor="middle">{_html.escape(label)}</text>')
    return "".join(out)
