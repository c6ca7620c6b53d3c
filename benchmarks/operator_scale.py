"""Operator scale: does a reconcile pass, a segment's turnaround and the operator's memory stay flat as a
training runs more and more segments, and does any object grow past what etcd should hold?

    .venv/bin/python benchmarks/operator_scale.py                     # both runs at full size
    .venv/bin/python benchmarks/operator_scale.py --wide 100x3x16 --long 6x40x6   # smaller, for development

Two runs on the local test control plane (hack/testcluster.sh), sleeping workers on the node agent, the
operator as a real process:
- wide: population 1,000 x 3 segments, parallelism 64 (many members, short histories);
- long: population 20 x 300 segments, parallelism 20 (few members, long histories).
Each reports: the operator's peak resident memory (sampled every second) and its first/last-quarter
medians, its CPU seconds per finished segment (whole run, first and last quarter: less moved by the
machine's other work than wall times), the load average during the run, pass time (one whole reconcile pass: reads, plan, writes; PBT_PASS_LOG) median and p95, overall
and in the first and last quarter of the run, API requests per segment (the passes' own requests,
pbt_api_requests_total, plus the Events posted), turnaround (a segment's worker exiting -> the next
segment Job created) median and p95, overall and by quarter, and the largest object (JSON bytes as the
API server returns it) among the training, its members and a sample of its Jobs.
Targets (issue 15): memory < 500 MiB; pass time and turnaround flat from the first to the last quarter;
turnaround median < 1 s, p95 < 3 s; no object over 256 KiB. Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests" / "e2e"), str(ROOT / "benchmarks")]

from clusterlib import Cluster, NodeAgent, parse_env_file, run_testcluster  # noqa: E402
from operator_turnaround import JobWatch, _pair, manifest, pct  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MemorySampler(threading.Thread):
    """The operator's resident memory, once a second: (unix time, MiB)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []
        self.load: list[float] = []  # the machine's 1-minute load average, once a second (it is shared)
        self.cpu: list[tuple[float, float]] = []  # (unix time, the operator's CPU seconds so far)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.load.append(os.getloadavg()[0])
            try:
                fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
                self.cpu.append((time.time(), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")))
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.samples.append((time.time(), int(line.split()[1]) / 1024.0))
            except OSError:
                return
            self.stopped.wait(1.0)


def scrape(port: int) -> dict[str, float]:
    """pbt_api_requests_total by verb and resource: {"PATCH populationmembers/status": count, ...}; and
    pbt_engine_rebuilds_total as "rebuilds" (passes that rebuilt the engine rather than reuse the
    previous pass's; not an API request)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("pbt_api_requests_total{"):
            verb = line.split('verb="')[1].split('"')[0]
            resource = line.split('resource="')[1].split('"')[0] if 'resource="' in line else "?"
            key = f"{verb} {resource}"
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("pbt_engine_rebuilds_total{"):
            out["rebuilds"] = out.get("rebuilds", 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def by_verb(requests: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, n in requests.items():
        verb = key.split(" ", 1)[0]
        out[verb] = out.get(verb, 0.0) + n
    return out


def quarters(samples: list[tuple[float, float]], t0: float, t1: float) -> tuple[list[float], list[float]]:
    """Values in the first and the last quarter of [t0, t1] (samples are (time, value))."""
    q = (t1 - t0) / 4
    return [v for t, v in samples if t <= t0 + q], [v for t, v in samples if t >= t1 - q]


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def largest_object(cluster: Cluster, ns: str, name: str) -> tuple[str, int]:
    sizes: list[tuple[int, str]] = []
    obj = cluster.kubectl_json("get", "pbt", name, "-n", ns)
    sizes.append((len(json.dumps(obj)), f"PopulationTraining {name}"))
    for m in cluster.kubectl_json("get", "pbtm", "-n", ns, "-l", f"pbt.dev/training={name}", timeout=300)["items"]:
        sizes.append((len(json.dumps(m)), f"PopulationMember {m['metadata']['name']}"))
    jobs = cluster.kubectl_json("get", "jobs", "-n", ns, "-l", f"pbt.dev/training={name}", "--chunk-size=200",
                                timeout=300)["items"]
    for j in jobs[:: max(1, len(jobs) // 200)]:
        sizes.append((len(json.dumps(j)), f"Job {j['metadata']['name']}"))
    size, what = max(sizes)
    return what, size


def run(cluster: Cluster, work: Path, label: str, population: int, segments: int, parallelism: int,
        seconds: float) -> dict[str, Any]:
    ns = f"scale-{label}"
    name = label
    cluster.kubectl("create", "namespace", ns)
    port = free_port()
    pass_log = work / f"{label}.passes"
    env = dict(cluster.env, PBT_METRICS_PORT=str(port), PBT_METRICS_ADDR="127.0.0.1", PBT_PASS_LOG=str(pass_log),
               OPENBLAS_NUM_THREADS="1")
    log = open(work / f"{label}.operator.log", "wb")  # noqa: SIM115 (the child owns it)
    op = subprocess.Popen([sys.executable, "-m", "pbt_operator.cli", "operator", "--log-format", "plain",
                           "--health-port", "0", "--namespace", ns], env=env, stdout=log, stderr=subprocess.STDOUT)
    mem = MemorySampler(op.pid)
    mem.start()
    jobs = JobWatch(cluster, ns)
    jobs.start()
    try:
        cluster.wait_for(lambda: _up(port), 60, desc="operator metrics")
        before = scrape(port)
        times = work / f"{label}.times"
        t0 = time.time()
        cluster.apply(manifest(name, work / f"ckpt-{label}", times, population, parallelism, segments,
                               "asynchronous", seconds, 0.0), ns)

        def finished() -> bool:
            obj = cluster.get("pbt", name, ns)
            return ((obj or {}).get("status") or {}).get("phase") in ("Succeeded", "Failed")

        cluster.wait_for(finished, 4 * 3600, interval=2.0, desc=f"{name} finished")
        t1 = time.time()
        time.sleep(2.0)
        after = scrape(port)
    finally:
        jobs.stop()
        mem.stopped.set()
        op.terminate()
        try:
            op.wait(20)
        except subprocess.TimeoutExpired:
            op.kill()
    obj = cluster.get("pbt", name, ns) or {}
    rows = [line.split() for line in times.read_text().splitlines()]
    ends = sorted(float(r[3]) for r in rows)
    created = sorted(jobs.seen.values())[parallelism:]
    turn_pairs: list[tuple[float, float]] = []
    fi = 0
    for t in created:  # as operator_turnaround._pair, keeping when each sample happened
        if fi < len(ends) and ends[fi] <= t:
            turn_pairs.append((t, t - ends[fi]))
            fi += 1
    assert [d for _, d in turn_pairs] == _pair(created, ends)
    passes = [(float(a), float(b)) for a, b, *_ in (line.split() for line in pass_log.read_text().splitlines())]
    passes = [(t, s) for t, s in passes if t0 <= t <= t1]
    events = cluster.kubectl_json("get", "events", "-n", ns, "--chunk-size=500", timeout=300)["items"]
    n_events = sum(e.get("count", 1) for e in events
                   if e["involvedObject"]["kind"] in ("PopulationTraining", "PopulationMember"))
    rebuilds = after.pop("rebuilds", 0.0) - before.pop("rebuilds", 0.0)
    requests = sum(after.values()) - sum(before.values())
    what, size = largest_object(cluster, ns, name)
    return {"label": label, "population": population, "segments": segments, "parallelism": parallelism,
            "seconds": seconds, "phase": (obj.get("status") or {}).get("phase"), "ran": len(rows), "wall": t1 - t0,
            "t0": t0, "t1": t1, "mem": mem.samples, "passes": passes, "turn": turn_pairs,
            "requests": requests, "by_request": {k: after.get(k, 0) - before.get(k, 0) for k in after},
            "events": n_events, "largest": (what, size), "load": mem.load, "cpu": mem.cpu, "ends": ends,
            "rebuilds": rebuilds}


def _up(port: int) -> bool:
    try:
        scrape(port)
        return True
    except OSError:
        return False


def report(r: dict[str, Any]) -> None:
    t0, t1 = r["t0"], r["t1"]
    mem = r["mem"]
    m_first, m_last = quarters(mem, t0, t1)
    p_all = [s for _, s in r["passes"]]
    p_first, p_last = quarters(r["passes"], t0, t1)
    t_all = [d for _, d in r["turn"]]
    t_first, t_last = quarters(r["turn"], t0, t1)
    what, size = r["largest"]
    print(f"\n{r['label']}: population {r['population']} x {r['segments']} segments, parallelism {r['parallelism']}, "
          f"~{r['seconds']:g} s segments: {r['ran']} segments ran, {r['phase']}, {r['wall']:.0f} s "
          f"({60 * r['ran'] / r['wall']:.0f} segments/min); load average during the run: min "
          f"{min(r['load'], default=float('nan')):.1f}, median {med(r['load']):.1f}, max "
          f"{max(r['load'], default=float('nan')):.1f}")
    print("| metric | whole run | first quarter | last quarter | target |\n|---|---|---|---|---|")
    print(f"| operator memory (RSS), peak / medians | {max(v for _, v in mem):.0f} MiB | {med(m_first):.0f} MiB "
          f"| {med(m_last):.0f} MiB | < 500 MiB |")
    print(f"| pass time, median | {med(p_all):.3f} s | {med(p_first):.3f} s | {med(p_last):.3f} s | flat |")
    print(f"| pass time, p95 | {pct(p_all, 0.95):.3f} s | {pct(p_first, 0.95):.3f} s | {pct(p_last, 0.95):.3f} s "
          f"| flat |")
    print(f"| passes (of which rebuilt the engine) | {len(p_all)} ({r.get('rebuilds', 0):.0f}) | {len(p_first)} "
          f"| {len(p_last)} | |")
    print(f"| turnaround (worker exit -> next Job), median | {med(t_all):.3f} s | {med(t_first):.3f} s "
          f"| {med(t_last):.3f} s | < 1 s, flat |")
    print(f"| turnaround, p95 | {pct(t_all, 0.95):.3f} s | {pct(t_first, 0.95):.3f} s | {pct(t_last, 0.95):.3f} s "
          f"| < 3 s |")
    cpu, ends = r.get("cpu") or [], r.get("ends") or []
    if len(cpu) > 8:
        q = (t1 - t0) / 4

        def per_segment(a: float, b: float) -> float:
            """The operator's CPU seconds per segment finished in [a, b]: unlike wall times, barely
            moved by other work on a shared machine."""
            inside = [c for t, c in cpu if a <= t <= b]
            done = sum(1 for e in ends if a <= e <= b)
            return (inside[-1] - inside[0]) / done if len(inside) > 1 and done else float("nan")

        print(f"| operator CPU per segment | {per_segment(t0, t1) * 1e3:.0f} ms | {per_segment(t0, t0 + q) * 1e3:.0f} ms "
              f"| {per_segment(t1 - q, t1) * 1e3:.0f} ms | flat |")
    verbs = ", ".join(f"{k} {v / max(1, r['ran']):.2f}" for k, v in sorted(by_verb(r["by_request"]).items()) if v)
    print(f"| API requests per segment (passes) | {r['requests'] / max(1, r['ran']):.2f} ({verbs}) | | | |")
    each = ", ".join(f"{k} {v / max(1, r['ran']):.2f}" for k, v in sorted(r["by_request"].items()) if v)
    print(f"| the same by resource | {each} | | | |")
    print(f"| Events per segment | {r['events'] / max(1, r['ran']):.2f} | | | |")
    print(f"| largest object | {size / 1024:.1f} KiB ({what}) | | | < 256 KiB |")


def parse_size(text: str) -> tuple[int, int, int]:
    p, s, k = (int(x) for x in text.split("x"))
    return p, s, k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wide", default="1000x3x64", help="POPULATIONxSEGMENTSxPARALLELISM ('' skips it)")
    ap.add_argument("--long", default="20x300x20", help="POPULATIONxSEGMENTSxPARALLELISM ('' skips it)")
    ap.add_argument("--seconds", type=float, default=0.5, help="segment duration (workers sleep)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pbt-scale-"))
    run_testcluster("build")
    cdir = str(work / "cluster")
    run_testcluster("up", cdir, env={"PBT_CLUSTER_OWNER_PID": str(os.getpid())}, timeout=600)
    cluster = Cluster(cdir, parse_env_file(run_testcluster("env", cdir).stdout))
    runs = [(label, parse_size(v)) for label, v in (("wide", args.wide), ("long", args.long)) if v]
    gpus = max(k for _, (_, _, k) in runs)
    agent = NodeAgent(cluster, work / "agent", nodes=4, gpus=(gpus + 3) // 4, prefix="scale")
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    load0 = os.getloadavg()
    results = []
    try:
        for label, (p, s, k) in runs:
            results.append(run(cluster, work, label, p, s, k, args.seconds))
    finally:
        agent.stop()
        run_testcluster("down", cdir, check=False, timeout=120)
    print(f"\nmachine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}; control plane, node agent, operator and workers share it; load average "
          f"{load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    for r in results:
        report(r)


if __name__ == "__main__":
    main()
