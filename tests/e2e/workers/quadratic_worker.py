"""A tiny segment worker for the operator's e2e tests: the PBT paper's quadratic toy with real
checkpoints (pbt_worker, file:// storage shared with the node agent's processes).

Env knobs: PBT_TEST_SLEEP (seconds to sleep per segment, for disruption tests), PBT_TEST_LOG (a file
each run appends "member segment attempt restore" to, to count executions).
"""

import os
import time

from pbt_worker import Segment

seg = Segment.from_env()
state = seg.restore()
theta = list(state["theta"]) if state is not None else [0.9, 0.9]
h0, h1 = float(seg.hyperparameters["h0"]), float(seg.hyperparameters["h1"])
log = os.environ.get("PBT_TEST_LOG")
if log:
    with open(log, "a") as f:
        f.write(f"{seg.member} {seg.index} {seg.restore_uri}\n")
time.sleep(float(os.environ.get("PBT_TEST_SLEEP", "0")))
for _ in range(seg.steps_budget):
    theta[0] -= 0.02 * h0 * theta[0]
    theta[1] -= 0.02 * h1 * theta[1]
seg.save({"theta": theta})
seg.report(score=1.2 - (theta[0] ** 2 + theta[1] ** 2), theta0=theta[0], theta1=theta[1])
