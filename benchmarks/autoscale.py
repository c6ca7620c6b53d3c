"""A training on an autoscaled GPU pool: the real Karpenter (KWOK cloud provider) on the local test
control plane, GPU nodes that boot for --ready-delay seconds before they turn Ready (hack/nodeagent.py
--adopt-ready-delay), the operator as a real process.

    .venv/bin/python benchmarks/autoscale.py [--repeats 3] [--ready-delay 10] [--seconds 20]

Each repeat starts from an empty NodePool (examples/autoscaling/karpenter-nodepool.yaml: 1, 2 and 4-GPU
instance types, at most 8 GPUs, consolidation after 5 s) and applies one training (population 16,
parallelism 8, asynchronous, segments that sleep --seconds +-20%), then waits until Karpenter has removed
every node again. It measures:
- apply -> first segment running: from `kubectl apply` to the first trainer process running (a node had
  to be launched, boot and register; the pod bound and started);
- GPU-node-seconds: the GPUs of Karpenter's nodes integrated from each node's launch to its removal
  (booting and draining included: what a cloud bills), against GPU-seconds of segment work (the
  workers' own start/end times); idle share = 1 - work / node-seconds. The Ready-only node-seconds are
  shown too;
- node count over time (PNG, the first repeat): Ready nodes, booting nodes, running segments.
Prints a table (medians over repeats); asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from autoscalelib import AutoscaleCluster, Sampler, build_addons  # noqa: E402
from clusterlib import Cluster, run_testcluster  # noqa: E402
from operator_turnaround import manifest as turnaround_manifest  # noqa: E402


def manifest(name: str, storage: Path, times: Path, population: int, parallelism: int, segments: int,
             seconds: float, jitter: float) -> dict[str, Any]:
    """The turnaround benchmark's sleeping-worker training, asynchronous."""
    return turnaround_manifest(name, storage, times, population, parallelism, segments, "asynchronous",
                               seconds, jitter)


def pool_empty(c: Cluster) -> bool:
    return not c.kubectl_json("get", "nodes", "-l", "karpenter.sh/nodepool")["items"] and \
        not c.kubectl_json("get", "nodeclaims")["items"]


def run_one(asc: AutoscaleCluster, i: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    c = asc.cluster
    c.wait_for(lambda: pool_empty(c), 300, interval=1.0, desc="an empty pool before the run")
    ns = f"bench-{i}"
    c.kubectl("create", "namespace", ns)
    c.wait_for(lambda: c.get("serviceaccount", "default", ns), 60, desc="default SA")
    times = work / f"times-{i}.txt"
    sampler = Sampler(c, ns, interval=0.25)
    sampler.start()
    t_apply = time.monotonic()
    c.apply(manifest("auto", work / f"ckpt-{i}", times, args.population, args.parallelism, args.segments,
                     args.seconds, args.jitter), ns)
    first_running = None
    phase = ""
    while time.monotonic() - t_apply < args.timeout:
        if first_running is None and sampler.samples and sampler.samples[-1].running:
            first_running = sampler.samples[-1].t - (t_apply - sampler.t0)
        status = (c.get("pbt", "auto", ns) or {}).get("status") or {}
        phase = status.get("phase", "")
        if phase == "Failed":
            raise SystemExit(f"the training failed: {status.get('conditions')}")
        if phase == "Succeeded":
            break
        time.sleep(1.0)
    t_done = time.monotonic()
    c.wait_for(lambda: pool_empty(c), 300, interval=1.0, desc="Karpenter removing the nodes after the run")
    time.sleep(1.0)
    sampler.stop()
    if first_running is None:
        first_running = next((s.t for s in sampler.samples if s.running), float("nan")) - (t_apply - sampler.t0)
    work_s = 0.0
    for line in times.read_text().splitlines():
        _, _, a, b = line.split()
        work_s += float(b) - float(a)
    billed = sampler.gpu_node_seconds(billed=True)
    ready = sampler.gpu_node_seconds(billed=False)
    return {"phase": phase, "first_running": first_running, "work": work_s, "billed": billed, "ready": ready,
            "idle": 1.0 - work_s / billed if billed else float("nan"),
            "idle_ready": 1.0 - work_s / ready if ready else float("nan"),
            "wall": t_done - t_apply, "peak_nodes": sampler.peak_nodes(), "peak_running": sampler.peak_running(),
            "segments": len(times.read_text().splitlines()), "samples": sampler.samples, "t_apply": t_apply - sampler.t0,
            "disrupted": len(sampler.ever_disrupted)}


def plot(r: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ss = r["samples"]
    t = [s.t - r["t_apply"] for s in ss]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    ax.step(t, [sum(s.billed.values()) for s in ss], where="post", label="GPUs on launched nodes (billed)", color="#999")
    ax.step(t, [sum(s.nodes.values()) for s in ss], where="post", label="GPUs on Ready nodes", color="#1f77b4")
    ax.step(t, [len(s.running) for s in ss], where="post", label="segments running (1 GPU each)", color="#2ca02c")
    ax.step(t, [len(s.billed) for s in ss], where="post", label="nodes", color="#d62728", linestyle="--")
    ax.set_xlabel("seconds since kubectl apply")
    ax.set_ylabel("count")
    ax.set_title(f"Karpenter GPU pool: population {args.population}, parallelism {args.parallelism}, "
                 f"node boot {args.ready_delay:g} s", fontsize=10)
    ax.legend(fontsize=8, loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--parallelism", type=int, default=8)
    ap.add_argument("--segments", type=int, default=4, help="segments per member")
    ap.add_argument("--seconds", type=float, default=20.0, help="mean segment duration")
    ap.add_argument("--jitter", type=float, default=0.2)
    ap.add_argument("--ready-delay", type=float, default=10.0, help="simulated node boot time (s)")
    ap.add_argument("--timeout", type=float, default=1200.0)
    ap.add_argument("--plot", default=str(ROOT / "benchmarks" / "autoscale-nodes.png"))
    args = ap.parse_args()
    run_testcluster("build")
    if build_addons("karpenter").returncode != 0:
        raise SystemExit("hack/addons.sh build karpenter failed")
    work = Path(tempfile.mkdtemp(prefix="pbt-bench-autoscale-"))
    asc = AutoscaleCluster(work, addons="karpenter", ready_delay=args.ready_delay)
    c = asc.cluster
    c.kubectl("apply", "-f", str(ROOT / "crds"))
    env = dict(c.env, PBT_METRICS_PORT="0")
    op_log = open(work / "operator.log", "wb")  # noqa: SIM115
    op = subprocess.Popen([sys.executable, "-m", "pbt_operator.cli", "operator", "--log-format", "plain",
                           "--health-port", "0"], env=env, stdout=op_log, stderr=subprocess.STDOUT)
    runs = []
    try:
        time.sleep(3)
        for i in range(args.repeats):
            r = run_one(asc, i, work, args)
            runs.append(r)
            print(f"repeat {i}: {r['phase']}, first segment after {r['first_running']:.1f} s, idle {r['idle']:.3f} "
                  f"(ready-only {r['idle_ready']:.3f}), peak {r['peak_nodes']} nodes, wall {r['wall']:.0f} s",
                  flush=True)
            if i == 0:
                plot(r, Path(args.plot), args)
    finally:
        op.terminate()
        op.wait(20)
        asc.stop()
    load = os.getloadavg()
    print(f"\nmachine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, python "
          f"{platform.python_version()}; load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"\nKarpenter GPU pool (population {args.population}, parallelism {args.parallelism}, {args.segments} "
          f"segments of {args.seconds:g} s +-{args.jitter:.0%}, node boot {args.ready_delay:g} s), median of "
          f"{len(runs)} repeats")
    med = {k: statistics.median(r[k] for r in runs) for k in
           ("first_running", "work", "billed", "ready", "idle", "idle_ready", "wall", "peak_nodes")}
    print("| metric | median | all repeats |\n|---|---|---|")

    def row(label: str, key: str, fmt: str) -> None:
        print(f"| {label} | {format(med[key], fmt)} | {', '.join(format(r[key], fmt) for r in runs)} |")

    row("apply -> first segment running (s)", "first_running", ".1f")
    row("GPU-seconds of segment work", "work", ".0f")
    row("GPU-node-seconds, launch to removal", "billed", ".0f")
    row("idle GPU share (billed)", "idle", ".3f")
    row("GPU-node-seconds, Ready only", "ready", ".0f")
    row("idle GPU share (Ready only)", "idle_ready", ".3f")
    row("wall, apply -> training ended (s)", "wall", ".0f")
    row("peak nodes", "peak_nodes", ".0f")
    print(f"| segments run / disrupted | {', '.join(str(r['segments']) + '/' + str(r['disrupted']) for r in runs)} | |")
    print(f"\nfigure: {args.plot}")


if __name__ == "__main__":
    main()
