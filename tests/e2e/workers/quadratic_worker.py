"""A tiny segment worker for the operator's e2e tests: the PBT paper's quadratic toy with real
checkpoints (pbt_worker, file:// or s3:// storage shared with the node agent's processes).

Env knobs:
- PBT_TEST_SLEEP: seconds to sleep per segment (for disruption tests).
- PBT_TEST_SLEEPS="m:s:secs[,...]": member m's segment s sleeps secs instead (one slow member).
- PBT_TEST_LOG: a file each run appends "member segment restore" to (to count executions).
- PBT_TEST_STATE: a folder for per-(member, segment) run counters (default: PBT_TEST_LOG's folder); the
  fault knobs below use it to fault only the first runs of a segment.
- PBT_TEST_FAIL="m:s:n[,m:s:n...]": the first n runs of member m's segment s exit 3 (a crash).
- PBT_TEST_PERMANENT="m:s:message[,...]": member m's segment s fails with a permanent error (what
  `pbt_worker.PermanentError` writes) every time, and exits 1.
- PBT_TEST_HANG="m:s:n[,...]": the first n runs of member m's segment s hang (sleep an hour).
- PBT_TEST_GATE="m:s:path[,...]": member m's segment s, once it has logged its start and restored, waits
  until `path` exists (a test can act while the trainer is provably mid-segment, then let it go on).
- PBT_TEST_GARBAGE="m:s:kind[,...]": the first run of member m's segment s writes a hostile result
  (kind: notjson | toolong | nan | keys) instead of reporting, and exits 0.
- PBT_TEST_ENV_DUMP: a folder; each run writes its environment's variable names and whether a
  service-account token is reachable to <folder>/<member>-<segment>.json.
"""

import json
import os
import sys
import time

from pbt_worker import Segment

seg = Segment.from_env()
log = os.environ.get("PBT_TEST_LOG")
state_dir = os.environ.get("PBT_TEST_STATE") or (os.path.dirname(log) if log else None)


def runs_so_far() -> int:
    """How many runs of this (member, segment) started before this one (a counter file per segment)."""
    if not state_dir:
        return 0
    path = os.path.join(state_dir, f"runs-{seg.member}-{seg.index}")
    with open(path, "a") as f:
        f.write("x")
    return os.path.getsize(path) - 1


def knob(name: str) -> str | None:
    for item in filter(None, os.environ.get(name, "").split(",")):
        m, s, arg = item.split(":")
        if int(m) == seg.member and int(s) == seg.index:
            return arg
    return None


if log:
    with open(log, "a") as f:
        f.write(f"{seg.member} {seg.index} {seg.restore_uri}\n")
earlier = runs_so_far()
dump = os.environ.get("PBT_TEST_ENV_DUMP")
if dump:
    token_dirs = ["/var/run/secrets/kubernetes.io/serviceaccount", os.path.join(os.getcwd(), "serviceaccount")]
    with open(os.path.join(dump, f"{seg.member}-{seg.index}.json"), "w") as f:
        json.dump({"env": sorted(os.environ), "kubeconfig": os.environ.get("KUBECONFIG"),
                   "token": [d for d in token_dirs if os.path.exists(os.path.join(d, "token"))]}, f)
fail = knob("PBT_TEST_FAIL")
if fail is not None and earlier < int(fail):
    print(f"injected failure: run {earlier + 1} of member {seg.member} segment {seg.index}", file=sys.stderr)
    sys.exit(3)
permanent = knob("PBT_TEST_PERMANENT")
if permanent is not None:
    seg.write_error(f"PermanentError: {permanent}", permanent=True)
    sys.exit(1)
hang = knob("PBT_TEST_HANG")
if hang is not None and earlier < int(hang):
    time.sleep(3600)
state = seg.restore()
theta = list(state["theta"]) if state is not None else [0.9, 0.9]
gate = knob("PBT_TEST_GATE")
while gate is not None and not os.path.exists(gate):
    time.sleep(0.05)
h0, h1 = float(seg.hyperparameters["h0"]), float(seg.hyperparameters["h1"])
time.sleep(float(knob("PBT_TEST_SLEEPS") or os.environ.get("PBT_TEST_SLEEP", "0")))
for _ in range(seg.steps_budget):
    theta[0] -= 0.02 * h0 * theta[0]
    theta[1] -= 0.02 * h1 * theta[1]
seg.save({"theta": theta})
garbage = knob("PBT_TEST_GARBAGE")
if garbage is not None and earlier == 0:
    text = {"notjson": "this is not json {", "toolong": json.dumps({"score": 1.0, "metrics": {"pad": "x" * 5000}}),
            "nan": '{"score": NaN}', "keys": '{"score": 1.0, "evil": "yes"}'}[garbage]
    with open(seg.result, "w") as f:
        f.write(text)
    sys.exit(0)
seg.report(score=1.2 - (theta[0] ** 2 + theta[1] ** 2), theta0=theta[0], theta1=theta[1])
