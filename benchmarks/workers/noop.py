"""Benchmark objective that costs nothing: restore the member's tiny state, add one, save, report.

`segment(seg)` for the inline executor; run as a script (`python noop.py`) it is a process-executor
worker. The metric `ck_ms` is the time spent in restore + save (the checkpoint's share of the overhead).
"""

from __future__ import annotations

import time

from pbt_worker import Segment, run


def segment(seg: Segment) -> dict[str, float]:
    t0 = time.perf_counter()
    state = seg.restore()
    x = float(state["x"]) if state is not None else 0.0
    x += 1.0
    seg.save({"x": x})
    ck_ms = (time.perf_counter() - t0) * 1e3
    lr = float(seg.hyperparameters["lr"])
    return {"score": x * lr - (lr - 0.1) ** 2, "ck_ms": ck_ms}


if __name__ == "__main__":
    run(segment)
