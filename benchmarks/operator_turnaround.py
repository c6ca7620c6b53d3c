"""Operator turnaround, throughput and footprint on the local test control plane.

    .venv/bin/python benchmarks/operator_turnaround.py [--population 64] [--parallelism 16] [--segments 3]

Starts its own control plane (hack/testcluster.sh), a node agent with enough GPUs, and the operator as
a real process; applies PopulationTrainings whose workers sleep about 1 s per segment, and measures:
- turnaround: from a segment's worker exiting to the next segment Job appearing in a watch (each new
  Job is paired with the earliest unpaired finished segment before it: the slot it refills);
- segments per minute; operator CPU seconds and peak resident memory (VmHWM);
- GPU-busy fraction (worker running time over slots x wall time) in asynchronous vs synchronous
  mode with segment durations varied +-50%, for runs of 4 and 12 segments per member
  (`--busy-segments`): the end of a run, when slots run dry one by one while the last segments
  finish, weighs less the longer the run, so the table splits idle time into gaps between segments
  (what the operator and the cluster cost per segment) and that final drain;
- the slot-refill chain hop by hop (node agent, operator, Job controller, scheduler, process start).
Prints tables; asserts nothing (tests never assert times).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from clusterlib import Cluster, NodeAgent, parse_env_file, run_testcluster  # noqa: E402

WORKER = ROOT / "benchmarks" / "workers" / "sleepy_worker.py"


def manifest(name: str, storage: Path, times: Path, population: int, parallelism: int, segments: int,
             mode: str, seconds: float, jitter: float) -> dict[str, Any]:
    env = {"PBT_BENCH_TIMES": str(times), "PBT_BENCH_SECONDS": str(seconds), "PBT_BENCH_JITTER": str(jitter)}
    return {
        "apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining", "metadata": {"name": name},
        "spec": {
            "population": population, "parallelism": parallelism, "mode": mode, "seed": 1,
            "segment": {"steps": 1}, "budget": {"segments": segments},
            "hyperparameters": {"lr": {"type": "float", "min": 0.01, "max": 1.0, "log": True}},
            "storage": {"uri": storage.as_uri()},
            "template": {"spec": {"terminationGracePeriodSeconds": 2, "containers": [{
                "name": "w", "image": "bench", "command": ["python", str(WORKER)],
                "env": [{"name": k, "value": v} for k, v in env.items()],
                "volumeMounts": [{"name": "checkpoints", "mountPath": str(storage)}],  # file:// needs a volume
                "resources": {"limits": {"nvidia.com/gpu": 1}}}],
                "volumes": [{"name": "checkpoints", "hostPath": {"path": str(storage)}}]}},
        },
    }


class JobWatch(threading.Thread):
    """Records the local time each segment Job is first seen, and each pod is first seen Succeeded;
    for pods also when each was first seen at all (created by the Job controller) and bound to a node
    (scheduled), keyed by (member, segment), for the slot-refill breakdown."""

    def __init__(self, cluster: Cluster, ns: str, kind: str = "jobs"):
        super().__init__(daemon=True)
        from kubernetes import client, watch

        self.kind = kind
        self.lister = (client.BatchV1Api(cluster.api_client()).list_namespaced_job if kind == "jobs"
                       else client.CoreV1Api(cluster.api_client()).list_namespaced_pod)
        self.w = watch.Watch()
        self.ns = ns
        self.seen: dict[str, float] = {}
        self.by_segment: dict[tuple[int, int], dict[str, float]] = {}  # (member, segment) -> event -> time

    def run(self) -> None:
        try:
            for ev in self.w.stream(self.lister, self.ns, timeout_seconds=3600):
                now = time.time()
                obj = ev["object"]
                name = obj.metadata.name
                labels = obj.metadata.labels or {}
                key = (int(labels.get("pbt.dev/member", -1)), int(labels.get("pbt.dev/segment", -1)))
                marks = self.by_segment.setdefault(key, {})
                if self.kind == "jobs":
                    marks.setdefault("job", now)
                else:
                    marks.setdefault("pod", now)
                    if obj.spec is not None and obj.spec.node_name:
                        marks.setdefault("bound", now)
                    if obj.status is not None and obj.status.phase == "Succeeded":
                        marks.setdefault("succeeded", now)
                if name in self.seen:
                    continue
                added = self.kind == "jobs" and ev["type"] == "ADDED"
                succeeded = self.kind == "pods" and obj.status is not None and obj.status.phase == "Succeeded"
                if added or succeeded:
                    self.seen[name] = now
        except Exception:  # the stream ends when stop() closes it
            pass

    def stop(self) -> None:
        self.w.stop()


def proc_stats(pid: int) -> tuple[float, float]:
    import psutil

    p = psutil.Process(pid)
    cpu = p.cpu_times()
    hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024.0
    return cpu.user + cpu.system, hwm


def run_one(cluster: Cluster, ns: str, name: str, work: Path, **kw: Any) -> dict[str, Any]:
    times = work / f"{name}.times"
    cluster.kubectl("create", "namespace", ns)
    watcher = JobWatch(cluster, ns)
    watcher.start()
    pod_watcher = JobWatch(cluster, ns, "pods")
    pod_watcher.start()
    t0 = time.time()
    cluster.apply(manifest(name, work / "ckpt", times, **kw), ns)

    def done() -> bool:
        obj = cluster.get("pbt", name, ns)
        return ((obj or {}).get("status") or {}).get("phase") in ("Succeeded", "Failed")

    cluster.wait_for(done, 1800, interval=0.5, desc=f"{name} finished")
    wall = time.time() - t0
    time.sleep(1.0)
    watcher.stop()
    pod_watcher.stop()
    rows = [line.split() for line in times.read_text().splitlines()]
    runs = [(int(m), int(k), float(s), float(e)) for m, k, s, e in rows]
    finishes = sorted(e for *_, e in runs)
    first_jobs = sorted(watcher.seen.values())
    turn = _pair(first_jobs[kw["parallelism"]:], finishes)
    # the same, from the moment the API server shows the pod Succeeded (what the operator can react to)
    turn_api = _pair(first_jobs[kw["parallelism"]:], sorted(pod_watcher.seen.values()))
    busy = sum(e - s for *_, s, e in runs)
    span = max(e for *_, e in runs) - min(s for *_, s, _e in runs)
    obj = cluster.get("pbt", name, ns)
    return {"wall": wall, "segments": len(runs), "turnaround": turn, "turnaround_api": turn_api, "busy": busy / (kw["parallelism"] * span),
            "phase": obj["status"]["phase"], "hops": hops(runs, watcher, pod_watcher, kw["parallelism"]),
            "idle": idle_parts(runs, kw["parallelism"], span)}


HOPS = ("worker exit -> pod Succeeded in the API", "-> next Job created (operator)", "-> its pod created (Job controller)",
        "-> pod bound (scheduler)", "-> next worker started (node agent, process start)")


def hops(runs: list[tuple[int, int, float, float]], jobs: JobWatch, pods: JobWatch, parallelism: int) -> list[list[float]]:
    """The slot-refill chain, hop by hop: each new segment (in Job-creation order, after the first
    `parallelism`) is paired with the earliest unpaired finished segment before it, as in `_pair`."""
    start = {(m, k): s for m, k, s, _e in runs}
    finished = sorted(runs, key=lambda r: r[3])
    new = sorted((t["job"], key) for key, t in jobs.by_segment.items() if "job" in t)[parallelism:]
    out: list[list[float]] = [[] for _ in HOPS]
    fi = 0
    for t_job, key in new:
        if fi >= len(finished) or finished[fi][3] > t_job:
            continue
        m, k, _s, end = finished[fi]
        fi += 1
        old = pods.by_segment.get((m, k), {})
        pod = pods.by_segment.get(key, {})
        marks = [end, old.get("succeeded"), t_job, pod.get("pod"), pod.get("bound"), start.get(key)]
        for i in range(len(HOPS)):
            a, b = marks[i], marks[i + 1]
            if a is not None and b is not None:
                out[i].append(b - a)
    return out


def idle_parts(runs: list[tuple[int, int, float, float]], parallelism: int, span: float) -> dict[str, float]:
    """Where slot time went that no worker used: gaps between segments while work remained, and the
    tail (slots with nothing left to run while the last segments finish). As fractions of slot time."""
    t0 = min(s for *_, s, _e in runs)
    t_end = max(e for *_, e in runs)
    events = sorted([(s, 1) for *_, s, _e in runs] + [(e, -1) for *_, e in runs])
    last_start = max(s for *_, s, _e in runs)
    busy_before_last_start = 0.0
    running, prev = 0, t0
    for t, d in events:
        cut = min(t, last_start)
        if cut > prev:
            busy_before_last_start += running * (cut - prev)
            prev = cut
        running += d
    gaps = parallelism * (last_start - t0) - busy_before_last_start
    total_idle = parallelism * span - sum(e - s for *_, s, e in runs)
    return {"gaps": gaps / (parallelism * span), "tail": (total_idle - gaps) / (parallelism * span),
            "span": t_end - t0, "steady": busy_before_last_start / max(1e-9, parallelism * (last_start - t0))}


def _pair(jobs: list[float], finishes: list[float]) -> list[float]:
    """Each new Job is paired with the earliest unpaired finish before it: the slot it refills."""
    out: list[float] = []
    fi = 0
    for t in jobs:
        if fi < len(finishes) and finishes[fi] <= t:
            out.append(t - finishes[fi])
            fi += 1
    return out


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--population", type=int, default=64)
    ap.add_argument("--parallelism", type=int, default=16)
    ap.add_argument("--segments", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--busy-population", type=int, default=16)
    ap.add_argument("--busy-parallelism", type=int, default=8)
    ap.add_argument("--busy-segments", default="4,12",
                    help="segments per member for the GPU-busy runs; a comma-separated list runs each length")
    ap.add_argument("--busy-seconds", type=float, default=5.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pbt-bench-"))
    run_testcluster("build")
    cdir = str(work / "cluster")
    run_testcluster("up", cdir, env={"PBT_CLUSTER_OWNER_PID": str(os.getpid())}, timeout=600)
    cluster = Cluster(cdir, parse_env_file(run_testcluster("env", cdir).stdout))
    agent = NodeAgent(cluster, work / "agent", nodes=4, gpus=max(args.parallelism, args.busy_parallelism), prefix="bench")
    cluster.kubectl("apply", "-f", str(ROOT / "crds"))
    import subprocess

    env = dict(cluster.env, PBT_METRICS_PORT="0")
    op_log = open(work / "operator.log", "wb")  # noqa: SIM115
    op = subprocess.Popen([sys.executable, "-m", "pbt_operator.cli", "operator", "--log-format", "plain",
                           "--health-port", "0"], env=env, stdout=op_log, stderr=subprocess.STDOUT)
    try:
        time.sleep(3)
        cpu0, _ = proc_stats(op.pid)
        main_run = run_one(cluster, "bench-turn", "turn", work, population=args.population,
                           parallelism=args.parallelism, segments=args.segments, mode="asynchronous",
                           seconds=args.seconds, jitter=0.0)
        cpu1, hwm = proc_stats(op.pid)
        busy: dict[tuple[int, str], dict[str, Any]] = {}
        for segs in (int(x) for x in str(args.busy_segments).split(",") if x.strip()):
            for mode in ("asynchronous", "synchronous"):
                busy[segs, mode] = run_one(cluster, f"bench-{mode[:4]}-{segs}", f"busy-{mode[:4]}-{segs}", work,
                                           population=args.busy_population, parallelism=args.busy_parallelism,
                                           segments=segs, mode=mode, seconds=args.busy_seconds, jitter=0.5)
        _, hwm2 = proc_stats(op.pid)
    finally:
        op.terminate()
        op.wait(20)
        agent.stop()
        run_testcluster("down", cdir, check=False, timeout=120)
    t = main_run["turnaround"]
    print(f"\nmachine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; control plane, node agent, operator and workers share it")
    print(f"\nturnaround (population {args.population}, parallelism {args.parallelism}, "
          f"{args.segments} segments of ~{args.seconds:g}s, asynchronous)")
    print("| metric | value |\n|---|---|")
    print(f"| segments | {main_run['segments']} ({main_run['phase']}) |")
    print(f"| pod finished -> next Job created, median | {statistics.median(t):.3f} s |" if t else "| turnaround | n/a |")
    print(f"| ... p95 | {pct(t, 0.95):.3f} s |")
    print(f"| ... samples | {len(t)} |")
    ta = main_run["turnaround_api"]
    if ta:
        print(f"| pod shown Succeeded by the API -> next Job created, median | {statistics.median(ta):.3f} s |")
        print(f"| ... p95 | {pct(ta, 0.95):.3f} s |")
    print(f"| segments per minute | {60 * main_run['segments'] / main_run['wall']:.1f} |")
    print(f"| operator CPU during the run | {cpu1 - cpu0:.1f} s over {main_run['wall']:.0f} s wall |")
    print(f"| operator peak memory (VmHWM) | {max(hwm, hwm2):.0f} MiB |")
    print(f"\nGPU-busy fraction (population {args.busy_population}, parallelism {args.busy_parallelism}, "
          f"durations {args.busy_seconds:g}s +-50%): worker running time over parallelism x (last end - first start);")
    print("'steady' is the same up to the last segment start (before the final drain); the idle columns split")
    print("the rest into gaps between segments while work remained and the drain after the last start")
    print("| segments per member | mode | busy fraction | steady | idle: gaps | idle: drain | wall s | phase |")
    print("|---|---|---|---|---|---|---|---|")
    for (segs, mode), r in busy.items():
        i = r["idle"]
        print(f"| {segs} | {mode} | {r['busy']:.3f} | {i['steady']:.3f} | {i['gaps']:.3f} | {i['tail']:.3f} "
              f"| {r['wall']:.1f} | {r['phase']} |")
    async_runs = [(segs, r) for (segs, mode), r in busy.items() if mode == "asynchronous"]
    for title, r in [("turnaround run", main_run)] + [(f"asynchronous GPU-busy run, {s} segments", r) for s, r in async_runs]:
        print(f"\nslot refill, hop by hop ({title}): median and p95 in seconds")
        print("| hop | median | p95 | samples |\n|---|---|---|---|")
        for label, xs in zip(HOPS, r["hops"], strict=True):
            if xs:
                print(f"| {label} | {statistics.median(xs):.3f} | {pct(xs, 0.95):.3f} | {len(xs)} |")


if __name__ == "__main__":
    main()
