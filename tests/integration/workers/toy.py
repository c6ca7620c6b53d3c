"""A tiny segment worker for the local runner's integration tests (the process executor).

It trains a scalar "model" x: each step moves x by hyperparameter `lr` towards 3; the score is -(x-3)^2.
Test knobs come through the environment (what a manifest's `spec.worker.env` sets):

  PBT_TEST_LOG        file to append one JSON line to at start and end (a side channel counting invocations)
  PBT_TEST_SLEEP      seconds to sleep per segment (so a test can kill the run mid-way)
  PBT_TEST_FAIL       "always", or "M:S,M:S" segments that exit 1 ...
  PBT_TEST_FAIL_TIMES ... only on their first N attempts (counted from the side channel)
  PBT_TEST_HANG       "M:S,..." segments that sleep for an hour (for timeouts)
  PBT_TEST_HANG_ONCE  "1": ... only on their first attempt
  PBT_TEST_CRASH      "M:S,..." segments whose process kills itself with SIGKILL, on their first attempt

The metric `process_segments` counts the segments this process has run (a `pbt_worker.cached` value):
always 1 with a fresh process per segment, more in a warm worker.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from pbt_worker import Segment, cached


def log(event: str, seg: Segment) -> None:
    path = os.environ.get("PBT_TEST_LOG")
    if not path:
        return
    line = json.dumps({"event": event, "member": seg.member, "segment": seg.index, "pid": os.getpid(),
                       "time": time.time(), "restore": seg.restore_uri,
                       "fsync": os.environ.get("PBT_FILE_FSYNC"),
                       "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one write of a short line: atomic with O_APPEND
    finally:
        os.close(fd)


def starts(seg: Segment) -> int:
    path = os.environ.get("PBT_TEST_LOG")
    if not path or not os.path.exists(path):
        return 0
    n = 0
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            n += d["event"] == "start" and d["member"] == seg.member and d["segment"] == seg.index
    return n


def listed(var: str, seg: Segment) -> bool:
    v = os.environ.get(var, "")
    return v == "always" or f"{seg.member}:{seg.index}" in v.split(",")


def main() -> int:
    seg = Segment.from_env()
    log("start", seg)
    runs = cached("toy-process-segments", lambda: [0])
    runs[0] += 1
    if listed("PBT_TEST_CRASH", seg) and starts(seg) <= 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if listed("PBT_TEST_HANG", seg) and (os.environ.get("PBT_TEST_HANG_ONCE") != "1" or starts(seg) <= 1):
        time.sleep(3600)
    time.sleep(float(os.environ.get("PBT_TEST_SLEEP", "0")))
    if listed("PBT_TEST_FAIL", seg) and starts(seg) <= int(os.environ.get("PBT_TEST_FAIL_TIMES", "1000000")):
        print(f"failing member {seg.member} segment {seg.index} on purpose", file=sys.stderr)
        return 1
    state = seg.restore()
    x = state["x"] if state is not None else 0.0
    lr = float(seg.hyperparameters["lr"])
    for _ in range(seg.steps_budget):
        x += lr * (3.0 - x)
    seg.save({"x": x})
    seg.report(score=-((x - 3.0) ** 2), x=x, process_segments=runs[0])
    log("end", seg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
