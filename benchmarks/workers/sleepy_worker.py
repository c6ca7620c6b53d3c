"""Benchmark worker: restores, "trains" by sleeping (a GPU busy for a while), saves, reports, and
appends "member segment start end" (wall-clock seconds) to PBT_BENCH_TIMES.

PBT_BENCH_SECONDS (default 1.0) is the mean duration; PBT_BENCH_JITTER (default 0) varies it
uniformly by +-that fraction, deterministically per (member, segment)."""

import hashlib
import os
import time

start = time.time()
from pbt_worker import Segment  # noqa: E402

seg = Segment.from_env()
state = seg.restore()
x = float(state["x"]) if state is not None else 0.0
h = hashlib.sha256(f"{seg.member}:{seg.index}".encode()).digest()
u = int.from_bytes(h[:4], "big") / 2**32
base = float(os.environ.get("PBT_BENCH_SECONDS", "1.0"))
jitter = float(os.environ.get("PBT_BENCH_JITTER", "0"))
time.sleep(max(0.0, base * (1.0 + jitter * (2.0 * u - 1.0)) - (time.time() - start)))
x += float(seg.hyperparameters["lr"]) * seg.steps_budget
seg.save({"x": x})
seg.report(score=-abs(1.0 - x))
with open(os.environ["PBT_BENCH_TIMES"], "a") as f:
    f.write(f"{seg.member} {seg.index} {start:.6f} {time.time():.6f}\n")
