"""Faults and bad input against the real control plane: nothing lost, nothing repeated, nobody let in.

Every test here injects a fault into a running training (operator kill -9, failing / hanging / lying
workers, a lost node, an unreachable or tampered-with storage, hundreds of invalid manifests, many
trainings at once, a deletion mid-run) and checks the outcome: the run completes (or fails as its
failure policy says, with a condition and an Event that say why) and every (member, segment) ran as
many times as the fault explains, counted both from the Jobs and from the workers' own log lines.

Each test runs its own `pbt operator` process(es), scoped with --namespace to the namespaces the test
creates, so the kill -9 test never disturbs the others. The quadratic worker's fault knobs are
documented in tests/e2e/workers/quadratic_worker.py.
"""

from __future__ import annotations

import collections
import json
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterlib import Cluster, NodeAgent, start_moto
from test_operator import OperatorProcess, crds, jobs_of, segment_keys, training, wait_phase  # noqa: F401

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


class NsOperator(OperatorProcess):
    """`pbt operator --namespace ...`: watches only the given namespaces (globs allowed)."""

    def __init__(self, cluster: Cluster, log_path: Path, namespaces: list[str]):
        super().__init__(cluster, log_path)
        self.namespaces = namespaces

    def start(self) -> None:
        env = dict(self.cluster.env, PBT_METRICS_PORT="0", PYTHONUNBUFFERED="1")
        args = [a for ns in self.namespaces for a in ("--namespace", ns)]
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen([sys.executable, "-m", "pbt_operator.cli", "operator", "--log-format", "plain",
                                      "--health-port", "0", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def start_and_mark(self) -> None:
        self.mark = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.start()

    def new_log(self) -> str:
        """What the log gained since the last start_and_mark()."""
        with open(self.log_path, "rb") as f:
            f.seek(getattr(self, "mark", 0))
            return f.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def make_ns(cluster: Cluster) -> Iterator[Callable[[str], str]]:
    made: list[str] = []

    def make(prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        cluster.kubectl("create", "namespace", name)
        cluster.kubectl("label", "namespace", name, "pbt.dev/e2e=true")
        cluster.wait_for(lambda: cluster.get("serviceaccount", "default", name), 60, desc=f"default SA in {name}")
        made.append(name)
        return name

    yield make
    for name in made:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def operator_for(cluster: Cluster, crds: None, node_agent: NodeAgent,  # noqa: F811
                 tmp_path: Path) -> Iterator[Callable[..., NsOperator]]:
    ops: list[NsOperator] = []

    def start(*namespaces: str, tag: str = "op") -> NsOperator:
        op = NsOperator(cluster, tmp_path / f"{tag}.log", list(namespaces))
        op.start()
        ops.append(op)
        return op

    yield start
    for op in ops:
        op.stop()


def runs_of(log: Path) -> collections.Counter[tuple[int, int]]:
    if not log.exists():
        return collections.Counter()
    return collections.Counter((int(r.split()[0]), int(r.split()[1])) for r in log.read_text().splitlines() if r)


def events_of(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    return cluster.kubectl_json("get", "events", "-n", ns)["items"]


def members_of(cluster: Cluster, ns: str, name: str) -> dict[int, dict[str, Any]]:
    items = cluster.kubectl_json("get", "pbtm", "-n", ns, "-l", f"pbt.dev/training={name}")["items"]
    return {int(m["spec"]["index"]): m for m in items}


def failed_history(member: dict[str, Any]) -> list[dict[str, Any]]:
    return [h for h in (member.get("status") or {}).get("history") or [] if h["status"] != "done"]


def done_segments(member: dict[str, Any]) -> list[int]:
    return [h["suggestion"]["segment"] for h in (member.get("status") or {}).get("history") or []
            if h["status"] == "done"]


def job_attempts(jobs: list[dict[str, Any]]) -> collections.Counter[tuple[int, int]]:
    return collections.Counter(segment_keys(jobs))


def phases(cluster: Cluster, ns: str) -> dict[str, str]:
    items = cluster.kubectl_json("get", "pbt", "-n", ns)["items"]
    return {t["metadata"]["name"]: (t.get("status") or {}).get("phase", "") for t in items}


def wait_all(cluster: Cluster, ns: str, names: list[str], op: OperatorProcess, timeout: float,
             want: str = "Succeeded") -> dict[str, str]:
    def check() -> dict[str, str] | None:
        ph = phases(cluster, ns)
        bad = [n for n in names if ph.get(n) == "Failed" and want != "Failed"]
        if bad:
            raise AssertionError(f"{bad} failed: {json.dumps(cluster.get('pbt', bad[0], ns)['status'])[:1500]}")
        return ph if all(ph.get(n) == want for n in names) else None

    try:
        return cluster.wait_for(check, timeout, interval=1.0, desc=f"{len(names)} trainings {want} in {ns}")
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- operator log\n{op.tail()}") from None


# -- 1. operator crashes -----------------------------------------------------------------------------

SEEDS = (11, 12, 13)


@pytest.mark.slow
def test_operator_kill9_at_random_points_matches_uninterrupted_run(
        cluster: Cluster, make_ns: Callable[[str], str], operator_for: Callable[..., NsOperator],
        tmp_path: Path) -> None:
    """Three synchronous runs (different seeds) under an operator killed with SIGKILL at random moments
    (>= 5 kills while each run is unfinished), beside the same three runs under an operator left alone:
    each killed run succeeds, runs every (member, segment) exactly once (Jobs and worker log lines) and
    ends with the same best member and lineage (status.best, status.schedule) as its undisturbed twin."""
    ref_ns, crash_ns = make_ns("ref"), make_ns("crash")
    pop, segs = 4, 4
    names = [f"s{seed}" for seed in SEEDS]
    roots = {ns: tmp_path / f"ckpt-{kind}" for ns, kind in ((ref_ns, "ref"), (crash_ns, "crash"))}
    # The kills come at wall-clock moments, the runs progress at the machine's pace: on a fast machine
    # a run could finish before its fifth kill. So the killed runs' last segments wait at a gate that
    # opens once every run has had its five kills (a worker logs its start before the gate, and the
    # long timeout covers the wait); from then on the kills go on at random until the runs finish.
    gate = tmp_path / "gate"
    gated = {"PBT_TEST_GATE": ",".join(f"{m}:{segs - 1}:{gate}" for m in range(pop))}
    seg = {"steps": 10, "timeoutSeconds": 600}

    def manifest(ns: str, seed: int) -> dict[str, Any]:
        return training(f"s{seed}", roots[ns], population=pop, parallelism=pop, segments=segs, mode="synchronous",
                        seed=seed, segment=seg,
                        env={"PBT_TEST_LOG": str(tmp_path / f"{ns}-s{seed}.log"), "PBT_TEST_SLEEP": "1",
                             **(gated if ns == crash_ns else {})})

    ref_op = operator_for(ref_ns, tag="ref-op")
    crash_op = operator_for(crash_ns, tag="crash-op")
    # plus one asynchronous run under the killed operator: its decisions depend on timing, so only
    # exactly-once is promised for it, not equality with another run
    async_run = training("async", roots[crash_ns], population=pop, parallelism=pop, segments=segs, seed=14,
                         segment=seg, env={"PBT_TEST_LOG": str(tmp_path / f"{crash_ns}-async.log"),
                                           "PBT_TEST_SLEEP": "1", **gated})
    for ns in (crash_ns, ref_ns):
        items = [manifest(ns, s) for s in SEEDS] + ([async_run] if ns == crash_ns else [])
        cluster.apply({"apiVersion": "v1", "kind": "List", "items": items}, ns)
    rng = random.Random(20261127)
    kills = dict.fromkeys([*names, "async"], 0)
    deadline = time.monotonic() + 480
    while True:
        ph = phases(cluster, crash_ns)
        assert not any(ph.get(n) == "Failed" for n in kills), ph
        if all(ph.get(n) == "Succeeded" for n in kills):
            break
        assert time.monotonic() < deadline, f"crash runs not finished: {ph}, kills {kills}\n{crash_op.tail()}"
        if rng.random() < 0.2:  # a random point while it starts up (imports, login, first watches)
            time.sleep(rng.uniform(0.2, 3.0))
        else:  # a random point once it serves: daemons starting, reconciling, a plan applied halfway, idle
            # (kopf logs this just before it starts its watches; the watch handlers' own lines are
            # filtered out of the operator's log: handlers.QuietWatchHandlers)
            cluster.wait_for(lambda: "Initial authentication has finished" in crash_op.new_log(), 60, interval=0.1,
                             desc="restarted operator logged in")
            time.sleep(rng.uniform(3.0, 14.0))  # its daemons start 3-4 s after the first events on this machine
        crash_op.kill9()
        ph = phases(cluster, crash_ns)  # nothing can change a phase while the operator is dead
        for n in kills:
            kills[n] += ph.get(n) != "Succeeded"
        if min(kills.values()) >= 5:
            gate.touch()
        time.sleep(rng.uniform(0.0, 1.5))
        crash_op.start_and_mark()
    assert all(k >= 5 for k in kills.values()), kills
    wait_all(cluster, ref_ns, names, ref_op, 300)

    print(f"operator kills while each run was unfinished: {kills}")
    for name in [*names, "async"]:
        log = tmp_path / f"{crash_ns}-{name}.log"
        runs = runs_of(log)
        assert set(runs) == {(m, k) for m in range(pop) for k in range(segs)}, runs
        assert all(n == 1 for n in runs.values()), f"repeated segments: {runs}"
        jobs = jobs_of(cluster, crash_ns, name)
        assert len(jobs) == pop * segs and all(j["metadata"]["labels"]["pbt.dev/attempt"] == "0" for j in jobs)
        assert set(job_attempts(jobs)) == set(runs)
        for m in members_of(cluster, crash_ns, name).values():
            assert done_segments(m) == list(range(segs)) and not failed_history(m), m["status"]
        crash = cluster.get("pbt", name, crash_ns)["status"]
        assert crash["failures"] == 0 and crash["segmentsDone"] == pop * segs
        if name == "async":
            continue
        ref = cluster.get("pbt", name, ref_ns)["status"]

        def norm(x: Any, ns: str) -> str:
            return json.dumps(x, sort_keys=True).replace(roots[ns].as_uri(), "ROOT")

        assert norm(crash["best"], crash_ns) == norm(ref["best"], ref_ns), (name, crash["best"], ref["best"])
        assert norm(crash["schedule"], crash_ns) == norm(ref["schedule"], ref_ns), name
        assert len(runs_of(tmp_path / f"{ref_ns}-{name}.log")) == pop * segs


# -- 2. worker faults --------------------------------------------------------------------------------

def test_segment_failures_follow_the_failure_policy(
        cluster: Cluster, make_ns: Callable[[str], str], operator_for: Callable[..., NsOperator],
        node_agent: NodeAgent, tmp_path: Path) -> None:
    """Five trainings at once, each with one kind of worker fault:
    - retry:   member 1 segment 1 exits 3 twice; maxRetries 2 -> the third attempt succeeds.
    - replace: member 1 segment 1 exits 3 twice; maxRetries 1, onExhausted replace -> the member is
               replaced (re-exploits the other member) and the run succeeds.
    - fails:   member 0 segment 1 always exits 3; maxRetries 1, onExhausted fail -> the training fails
               with a Failed condition and a TrainingFailed Event naming the member, segment and exit code.
    - hang:    member 0 segment 1 hangs once; spec.segment.timeoutSeconds kills it, the retry succeeds.
    - garbage: each member's segment 1 writes a hostile result once (not JSON, too long, NaN score,
               unexpected keys): only that segment fails, with a reason, and its next attempt succeeds
               (for the NaN, a divergence, from the best checkpoint with explored hyperparameters).
    - permanent: member 1 segment 1 reports a permanent error (a PermanentError, a refused contract);
               maxRetries 2 -> the training fails at that first attempt, saying so, with no retry."""
    ns = make_ns("wfault")
    op = operator_for(ns, tag="op")

    def t(name: str, env: dict[str, str], policy: dict[str, Any], population: int = 2, segments: int = 3,
          timeout: int = 120) -> dict[str, Any]:
        log = tmp_path / name / "runs.log"
        log.parent.mkdir()
        return training(name, tmp_path / "ckpt", population=population, parallelism=population, segments=segments,
                        env={"PBT_TEST_LOG": str(log), **env}, failurePolicy=policy,
                        segment={"steps": 10, "timeoutSeconds": timeout})

    items = [
        t("retry", {"PBT_TEST_FAIL": "1:1:2"}, {"maxRetries": 2, "onExhausted": "fail"}),
        t("replace", {"PBT_TEST_FAIL": "1:1:2"}, {"maxRetries": 1, "onExhausted": "replace"}),
        t("fails", {"PBT_TEST_FAIL": "0:1:99"}, {"maxRetries": 1, "onExhausted": "fail"}),
        t("hang", {"PBT_TEST_HANG": "0:1:1"}, {"maxRetries": 1, "onExhausted": "fail"}, segments=2, timeout=20),
        t("garbage", {"PBT_TEST_GARBAGE": "0:1:notjson,1:1:toolong,2:1:nan,3:1:keys"},
          {"maxRetries": 1, "onExhausted": "fail"}, population=4, segments=2),
        t("permanent", {"PBT_TEST_PERMANENT": "1:1:no dataset at /data/train"},
          {"maxRetries": 2, "onExhausted": "replace"}),
    ]
    cluster.apply({"apiVersion": "v1", "kind": "List", "items": items}, ns)
    wait_all(cluster, ns, ["fails", "permanent"], op, 240, want="Failed")
    wait_all(cluster, ns, ["retry", "replace", "hang", "garbage"], op, 300)
    # (the TrainingFailed Event follows the status write that made "fails" Failed: when the others had
    # finished by then, a plain list here could come before it)
    cluster.events_once(ns, "TrainingFailed", name="permanent")  # then the list below has it as well
    events = cluster.events_once(ns, "TrainingFailed", name="fails")

    def ev(obj: str, reason: str) -> list[str]:
        return [e["message"] for e in events if e["involvedObject"]["name"] == obj and e["reason"] == reason]

    def runs(name: str) -> collections.Counter[tuple[int, int]]:
        return runs_of(tmp_path / name / "runs.log")

    # retry: attempts 0 and 1 fail, attempt 2 succeeds; everything else ran once
    r = runs("retry")
    assert r[(1, 1)] == 3 and all(n == 1 for k, n in r.items() if k != (1, 1)) and len(r) == 6, r
    assert job_attempts(jobs_of(cluster, ns, "retry"))[(1, 1)] == 3
    fh = failed_history(members_of(cluster, ns, "retry")[1])
    assert len(fh) == 2 and all("exit code 3" in h["error"] and "injected failure" in h["error"] for h in fh), fh
    assert len(ev("retry-m001", "SegmentFailed")) == 2 and len(ev("retry-m001", "SegmentRetried")) == 2
    assert cluster.get("pbt", "retry", ns)["status"]["failures"] == 2

    # replace: two failed attempts, then the member restarts from the other member's checkpoint
    r = runs("replace")
    assert r[(1, 1)] == 3 and len(r) == 6, r
    replaced = ev("replace-m001", "MemberReplaced")
    assert len(replaced) == 1 and "failed 2 times" in replaced[0] and "copying member 0" in replaced[0], replaced
    m1 = members_of(cluster, ns, "replace")[1]
    assert done_segments(m1) == [0, 1, 2] and len(failed_history(m1)) == 2
    last = next(h for h in m1["status"]["history"] if h["status"] == "done" and h["suggestion"]["segment"] == 1)
    assert last["suggestion"]["kind"] == "replace" and last["suggestion"]["restore"][0] == 0, last

    # fails: the training fails, saying why
    st = cluster.get("pbt", "fails", ns)["status"]
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "SegmentFailed", failed
    assert "member 0 segment 1 failed 2 times" in failed["message"] and "exit code 3" in failed["message"], failed
    assert any("member 0 segment 1 failed 2 times" in m for m in ev("fails", "TrainingFailed")), events
    assert runs("fails")[(0, 1)] == 2

    # permanent: one attempt, no retry and no replacement, and the reason is the worker's
    st = cluster.get("pbt", "permanent", ns)["status"]
    failed = next(c for c in st["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "SegmentFailed", failed
    assert ("member 1 segment 1 failed, not retried (the worker said that running it again cannot succeed): "
            "worker reported a permanent error: PermanentError: no dataset at /data/train (exit code 1)"
            in failed["message"]), failed
    assert any("not retried" in m for m in ev("permanent", "TrainingFailed")), events
    assert runs("permanent")[(1, 1)] == 1 and job_attempts(jobs_of(cluster, ns, "permanent"))[(1, 1)] == 1

    # hang: killed by the deadline, retried once, nothing left running
    fh = failed_history(members_of(cluster, ns, "hang")[0])
    assert len(fh) == 1 and "timed out" in fh[0]["error"], fh
    assert runs("hang")[(0, 1)] == 2 and len(runs("hang")) == 4
    assert not [p for p in node_agent.processes() if p["pod"].startswith(f"{ns}/hang-")], node_agent.processes()

    # garbage: each hostile result fails only its own segment, with a reason that says what was wrong
    expect = {0: "not JSON", 1: "not JSON", 2: "not finite", 3: "unexpected keys"}
    gm = members_of(cluster, ns, "garbage")
    for m, why in expect.items():
        fh = failed_history(gm[m])
        assert len(fh) == 1 and fh[0]["suggestion"]["segment"] == 1 and why in fh[0]["error"], (m, fh)
        assert done_segments(gm[m]) == [0, 1]
    r = runs("garbage")
    assert all(r[(m, 1)] == 2 and r[(m, 0)] == 1 for m in range(4)), r
    # the NaN is a divergence: the next attempt is not the same hyperparameters from the same checkpoint
    nan_failed = failed_history(gm[2])[0]["suggestion"]
    nan_next = next(h["suggestion"] for h in gm[2]["status"]["history"]
                    if h["status"] == "done" and h["suggestion"]["segment"] == 1)
    assert nan_next["attempt"] == 1 and "diverged" in nan_next["reason"], nan_next
    assert (nan_next["hyperparameters"], nan_next["restore"]) != (nan_failed["hyperparameters"], nan_failed["restore"])
    assert op.alive()


def test_node_lost_mid_segment_reruns_elsewhere(
        cluster: Cluster, make_ns: Callable[[str], str], operator_for: Callable[..., NsOperator],
        node_agent: NodeAgent, tmp_path: Path) -> None:
    """Two dedicated nodes; the one running a segment-1 pod is lost (heartbeats stop, processes die,
    out-of-service taint): the control plane deletes its pods as disrupted, the Jobs' pod failure policy
    ignores that, and the segments rerun on the other node from the same checkpoint, not as failures.

    Segment 1's trainers wait at a gate until the node is gone, so every pod the loss kills has
    provably started (logged its run) and cannot have finished: killing the node right after the first
    segment-1 log line raced both the other member's interpreter start (a pod killed before it logged
    counts one run, not two) and, under load, the segment's end."""
    ns = make_ns("nodeloss")
    op = operator_for(ns)
    taint = {"key": "pbt.dev/lossy", "value": "true", "effect": "NoSchedule"}
    nodes = [node_agent.add_node(gpus=2, labels={"pbt.dev/pool": "lossy"}, taints=[taint]) for _ in range(2)]
    gate = tmp_path / "gate"
    try:
        log = tmp_path / "runs.log"
        t = training("lossy", tmp_path / "ckpt", population=2, parallelism=2, segments=3,
                     env={"PBT_TEST_SLEEP": "1", "PBT_TEST_LOG": str(log), "PBT_TEST_GATE": f"0:1:{gate},1:1:{gate}"})
        pspec = t["spec"]["template"]["spec"]
        pspec["nodeSelector"] = {"pbt.dev/pool": "lossy"}
        pspec["tolerations"] = [{"key": "pbt.dev/lossy", "operator": "Equal", "value": "true", "effect": "NoSchedule"}]
        cluster.apply(t, ns)

        def held() -> list[dict[str, Any]] | None:
            """Both segment-1 pods Running, both trainers started and held at the gate."""
            if {m for m, k in runs_of(log) if k == 1} != {0, 1}:
                return None
            pods = cluster.kubectl_json("get", "pods", "-n", ns, "-l", "pbt.dev/segment=1")["items"]
            return pods if len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods) else None

        pods = cluster.wait_for(held, 120, interval=0.2, desc="both segment-1 trainers started and held")
        node = pods[0]["spec"]["nodeName"]
        killed = node_agent.lose_node(node)
        gate.touch()
        assert killed, node
        lost = sorted((int(p["metadata"]["labels"]["pbt.dev/member"]), int(p["metadata"]["labels"]["pbt.dev/segment"]))
                      for p in pods if p["spec"].get("nodeName") == node and f"{ns}/{p['metadata']['name']}" in killed)
        assert lost and len(lost) == sum(p["spec"].get("nodeName") == node for p in pods), (lost, killed)
        wait_phase(cluster, ns, "lossy", op, timeout=240)
        runs = runs_of(log)
        assert lost and all(runs[k] == 2 for k in lost), (lost, runs)
        assert all(n == 1 for k, n in runs.items() if k not in lost) and len(runs) == 6, runs
        restores = collections.defaultdict(set)
        for line in log.read_text().splitlines():
            m, k, restore = line.split()
            restores[(int(m), int(k))].add(restore)
        assert all(len(restores[k]) == 1 for k in lost), restores  # reran from the same checkpoint
        for mobj in members_of(cluster, ns, "lossy").values():
            assert not failed_history(mobj) and done_segments(mobj) == [0, 1, 2], mobj["status"]
        for j in jobs_of(cluster, ns, "lossy"):
            assert j["metadata"]["labels"]["pbt.dev/attempt"] == "0"
        after = cluster.kubectl_json("get", "pods", "-n", ns, "-l", "pbt.dev/segment=1")["items"]
        assert any(p["spec"].get("nodeName") not in (None, node) for p in after)
        assert any(e["reason"] == "SegmentDisrupted" for e in events_of(cluster, ns))
    finally:
        gate.touch()
        for n in nodes:
            node_agent.remove_node(n)


# -- 3. storage faults -------------------------------------------------------------------------------

class Moto:
    """`python -m moto.server` on loopback. The outage is simulated with SIGSTOP/SIGCONT: moto keeps its
    state only in memory (a restart would lose every checkpoint, which no real S3 does), while a stopped
    process is exactly an unresponsive server: connections hang, requests time out, clients retry."""

    def __init__(self, log: Path):
        self.proc, self.port = start_moto("127.0.0.1", log)
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[Moto]:
    pytest.importorskip("moto.server")
    m = Moto(tmp_path / "moto.log")
    yield m
    m.stop()


@pytest.mark.slow
def test_s3_outage_credentials_and_no_api_token(
        cluster: Cluster, make_ns: Callable[[str], str], operator_for: Callable[..., NsOperator],
        node_agent: NodeAgent, moto: Moto, tmp_path: Path) -> None:
    """s3:// storage with credentials from a Secret (spec.storage.credentialsSecret). The S3 server stops
    answering for 30 s mid-run: workers retry and the run completes with every segment run once. The
    secret values never show in the training/member status, Jobs, Events or the operator log, and the
    workers get no Kubernetes API token (automountServiceAccountToken: false; no KUBECONFIG)."""
    import boto3

    ns = make_ns("s3")
    op = operator_for(ns)
    key_id, secret_key = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                 aws_secret_access_key=secret_key).create_bucket(Bucket="pbt")
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
                   "stringData": {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret_key,
                                  "AWS_ENDPOINT_URL_S3": moto.endpoint, "AWS_REGION": "us-east-1"}}, ns)
    log, dump = tmp_path / "runs.log", tmp_path / "env"
    dump.mkdir()
    t = training("s3run", tmp_path / "unused", population=2, parallelism=2, segments=4,
                 env={"PBT_TEST_LOG": str(log), "PBT_TEST_SLEEP": "1", "PBT_TEST_ENV_DUMP": str(dump),
                      "AWS_EC2_METADATA_DISABLED": "true", "PBT_S3_READ_TIMEOUT": "3", "PBT_S3_CONNECT_TIMEOUT": "3",
                      "PBT_STORAGE_RETRY_SECONDS": "150"})
    t["spec"]["storage"] = {"uri": "s3://pbt/runs", "credentialsSecret": "s3-creds"}
    cluster.apply(t, ns)
    cluster.wait_for(lambda: any(k == 1 for _, k in runs_of(log)), 120, interval=0.2, desc="segment 1 running")
    moto.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(30)
    finally:
        moto.proc.send_signal(signal.SIGCONT)
    obj = wait_phase(cluster, ns, "s3run", op, timeout=300)
    runs = runs_of(log)
    assert len(runs) == 8 and all(n == 1 for n in runs.values()), runs
    for m in members_of(cluster, ns, "s3run").values():
        assert not failed_history(m) and done_segments(m) == [0, 1, 2, 3]
    assert obj["status"]["best"]["checkpoint"].startswith("s3://pbt/runs/s3run/")
    pod_logs = [node_agent.pod_log(ns, p["metadata"]["name"]) for p in
                cluster.kubectl_json("get", "pods", "-n", ns, "-l", "pbt.dev/training=s3run")["items"]]
    assert any("retrying" in text for text in pod_logs), "no worker saw the outage"
    listed = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1", aws_access_key_id=key_id,
                          aws_secret_access_key=secret_key).list_objects_v2(Bucket="pbt", Prefix="runs/s3run/")
    assert listed.get("KeyCount", 0) > 0

    # no API token for workers
    jobs = jobs_of(cluster, ns, "s3run")
    pods = cluster.kubectl_json("get", "pods", "-n", ns, "-l", "pbt.dev/training=s3run")["items"]
    for obj_spec in [j["spec"]["template"]["spec"] for j in jobs] + [p["spec"] for p in pods]:
        assert obj_spec["automountServiceAccountToken"] is False
        assert not [v for v in obj_spec.get("volumes") or [] if "projected" in v], obj_spec.get("volumes")
    dumps = [json.loads(p.read_text()) for p in dump.glob("*.json")]
    assert len(dumps) == 8
    for d in dumps:
        assert d["kubeconfig"] is None and not d["token"] and "KUBECONFIG" not in d["env"], d
        assert "AWS_SECRET_ACCESS_KEY" in d["env"]  # the worker did get its storage credentials

    # the secret values appear nowhere the operator writes
    texts = {
        "training": json.dumps(cluster.get("pbt", "s3run", ns)),
        "members": json.dumps(cluster.kubectl_json("get", "pbtm", "-n", ns)),
        "jobs": json.dumps(jobs),
        "events": json.dumps(events_of(cluster, ns)),
        "operator log": op.log_path.read_text(errors="replace"),
    }
    for where, text in texts.items():
        assert key_id not in text and secret_key not in text, f"credentials leaked into {where}"


@pytest.mark.slow
def test_operator_restarts_leave_exactly_the_promised_checkpoints_in_s3(
        cluster: Cluster, make_ns: Callable[[str], str], operator_for: Callable[..., NsOperator],
        moto: Moto, tmp_path: Path) -> None:
    """Garbage collection across operator restarts, against a real S3 server: 35 segments per member,
    so each member's oldest checkpoints leave its 32-segment history window (known to the operator's
    memory only, until member status.uncollected), and the operator is killed (-9) and restarted three
    times mid-run. At the end the bucket holds every checkpoint the docs promise to keep (each member's
    latest and the best, with their ancestors within the windows), and every other checkpoint left is
    one a restarted operator still knows to delete: inside a window, or in its member's
    status.uncollected. Before that list, the checkpoint the last result pushed out of its window was
    in nobody's memory once the run ended (and one pushed out just before a restart, for good)."""
    import re

    import boto3

    ns = make_ns("gc")
    op = operator_for(ns)
    s3 = boto3.client("s3", endpoint_url=moto.endpoint, region_name="us-east-1", aws_access_key_id="AKIATEST",
                      aws_secret_access_key="test")
    s3.create_bucket(Bucket="pbt")
    cluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-creds"},
                   "stringData": {"AWS_ACCESS_KEY_ID": "AKIATEST", "AWS_SECRET_ACCESS_KEY": "test",
                                  "AWS_ENDPOINT_URL_S3": moto.endpoint, "AWS_REGION": "us-east-1"}}, ns)
    log = tmp_path / "runs.log"
    segments = 35
    t = training("gcrun", tmp_path / "unused", population=2, parallelism=2, segments=segments,
                 env={"PBT_TEST_LOG": str(log), "AWS_EC2_METADATA_DISABLED": "true"})
    t["spec"]["storage"] = {"uri": "s3://pbt/runs", "credentialsSecret": "s3-creds"}
    cluster.apply(t, ns)
    for at in (24, 44, 62):  # the last two after evictions began (a member's 33rd segment)
        cluster.wait_for(lambda at=at: sum(runs_of(log).values()) >= at, 300, interval=0.1, desc=f"{at} segments run")
        op.kill9()
        op.start()
    obj = wait_phase(cluster, ns, "gcrun", op, timeout=400)
    members = members_of(cluster, ns, "gcrun")
    for m in members.values():
        assert not failed_history(m) and done_segments(m)[-1] == segments - 1, done_segments(m)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="pbt", Prefix="runs/gcrun/")
            for o in page.get("Contents", [])]
    stored = {(int(mm.group(1)), int(mm.group(2))) for k in keys if (mm := re.search(r"/m(\d{3})/(\d{5})/", k))}
    restore: dict[tuple[int, int], tuple[int, int] | None] = {}
    window: set[tuple[int, int]] = set()
    for i, m in members.items():
        for h in m["status"]["history"]:
            ref = (i, h["suggestion"]["segment"])
            window.add(ref)
            r = h["suggestion"].get("restore")
            restore[ref] = (int(r[0]), int(r[1])) if r else None
    best = (obj["status"]["best"]["member"], obj["status"]["best"]["segment"])
    keep: set[tuple[int, int]] = set()
    for live in [(i, segments - 1) for i in members] + [best]:
        cur: tuple[int, int] | None = live
        while cur is not None and cur not in keep and (cur == live or cur in window):
            keep.add(cur)
            cur = restore.get(cur)
    assert keep <= stored, sorted(keep - stored)  # nothing a member or the best needs was deleted
    assert len(window) < 2 * segments, "nothing ever left a window: the test would prove nothing"
    listed = {(i, int(s)) for i, m in members.items() for s in m["status"].get("uncollected") or []}
    forgotten = stored - keep - window - listed
    # What else is left, the last results made collectable (no segment started after them to delete
    # it): a few, or a whole window's lineage when an exploit replaced it in a member's last segment.
    assert not forgotten, (sorted(forgotten), sorted(stored - keep))
    # And the training's status says what is left (docs/operator.md): at least every checkpoint left
    # beyond the promise (a restart before the end may make it name some already deleted), by URI
    # when they all fit in the list.
    left = obj["status"].get("leftoverCheckpoints") or {"count": 0, "uris": [], "prefix": ""}
    named = {(int(mm.group(1)), int(mm.group(2))) for u in left["uris"] if (mm := re.search(r"/m(\d{3})/(\d{5})/$", u))}
    assert left["count"] >= len(stored - keep), (left, sorted(stored - keep))
    if left["count"] <= len(left["uris"]):
        assert stored - keep <= named, (left, sorted(stored - keep))
    assert not left["count"] or left["prefix"] == "s3://pbt/runs/gcrun/", left


def test_checkpoint_deleted_behind_the_operators_back(
        cluster: Cluster, make_ns: Callable[[str], str], operator_for: Callable[..., NsOperator],
        tmp_path: Path) -> None:
    """A queued segment's checkpoint is deleted before it starts: that segment fails on restore, is
    retried, fails again, and the member is replaced by re-exploiting another member (Event
    MemberReplaced); no other member notices, the operator does not crash, the run completes."""
    ns = make_ns("ckptdel")
    op = operator_for(ns)
    log = tmp_path / "runs.log"
    root = tmp_path / "ckpt"
    cluster.apply(training("gone", root, population=4, parallelism=1, segments=3, mode="synchronous",
                           env={"PBT_TEST_LOG": str(log), "PBT_TEST_SLEEP": "1"},
                           failurePolicy={"maxRetries": 1, "onExhausted": "replace"}), ns)

    def pick() -> tuple[int, dict[str, Any]] | None:
        ms = members_of(cluster, ns, "gone")
        if len(ms) < 4 or any(m["spec"]["segment"]["segment"] != 1 for m in ms.values()):
            return None
        restores = collections.Counter(tuple(m["spec"]["segment"]["restore"] or ()) for m in ms.values())
        started = {k for k in runs_of(log) if k[1] == 1}
        own = [i for i, m in ms.items() if tuple(m["spec"]["segment"]["restore"] or ()) == (i, 0)
               and restores[(i, 0)] == 1 and (i, 1) not in started]
        return (max(own), ms[max(own)]) if own else None

    victim, _ = cluster.wait_for(pick, 180, interval=0.2, desc="generation 1 decided")
    ckpt = root / "gone" / f"m{victim:03d}" / "00000"
    assert ckpt.is_dir(), ckpt
    shutil.rmtree(ckpt)
    wait_phase(cluster, ns, "gone", op, timeout=240)
    ms = members_of(cluster, ns, "gone")
    fh = failed_history(ms[victim])
    assert len(fh) == 2 and all(h["suggestion"]["segment"] == 1 for h in fh), fh
    assert done_segments(ms[victim]) == [0, 1, 2]
    for i, m in ms.items():
        if i != victim:
            assert not failed_history(m) and done_segments(m) == [0, 1, 2], (i, m["status"])
    events = events_of(cluster, ns)
    replaced = [e["message"] for e in events if e["reason"] == "MemberReplaced"]
    assert len(replaced) == 1 and f"member {victim} segment 1 failed 2 times" in replaced[0], replaced
    assert op.alive()


# -- 4. bad input ------------------------------------------------------------------------------------

def _valid(name: str, root: Path) -> dict[str, Any]:
    t = training(name, root, population=2, parallelism=2, segments=2)
    t["spec"]["objective"] = {"metric": "score", "direction": "max"}
    t["spec"]["failurePolicy"] = {"maxRetries": 1, "onExhausted": "replace"}
    return t


def _bad_manifests(root: Path, n: int) -> list[tuple[str, dict[str, Any]]]:
    """n distinct invalid mutations of a valid manifest, each with the dotted path of the field it broke
    (the generator of tests/unit/test_bad_manifests.py: hypothesis, derandomized)."""
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    from test_bad_manifests import generate

    return generate(_valid("x", root)["spec"], n)


@pytest.mark.slow
def test_generated_invalid_manifests_are_rejected_or_failed(
        cluster: Cluster, make_ns: Callable[[str], str], operator_for: Callable[..., NsOperator],
        tmp_path: Path) -> None:
    """240 generated invalid PopulationTrainings go in by server-side apply (strict field validation)
    beside a valid one. Each is refused by the API server's schema or marked Failed (InvalidSpec) with a
    condition naming the broken field; the operator survives all of them and the valid one succeeds."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ns = make_ns("badinput")
    op = operator_for(ns)
    cluster.apply(_valid("good", tmp_path / "ckpt"), ns)
    api = client.CustomObjectsApi(cluster.api_client())
    rejected: dict[str, str] = {}
    accepted: dict[str, str] = {}
    bads = _bad_manifests(tmp_path / "ckpt", 240)
    for i, (path, spec) in enumerate(bads):
        name = f"bad-{i:03d}"
        body = {"apiVersion": "pbt.dev/v1alpha1", "kind": "PopulationTraining",
                "metadata": {"name": name, "namespace": ns}, "spec": spec}
        try:
            api.patch_namespaced_custom_object("pbt.dev", "v1alpha1", ns, "populationtrainings", name, body,
                                               field_manager="pbt-e2e", force=True, field_validation="Strict",
                                               _content_type="application/apply-patch+yaml")
            accepted[name] = path
        except ApiException as e:
            # Server-side apply answers a value of the wrong type for the schema with 500 "failed to create
            # typed patch object" (the API server's own quirk, not a crash: it is the schema refusing it)
            typed = e.status == 500 and "failed to create typed patch object" in (e.body or "")
            assert 400 <= e.status < 500 or typed, (path, e.status, e.body)
            rejected[name] = path
    assert len(rejected) + len(accepted) == 240

    def all_failed() -> dict[str, Any] | None:
        items = {t["metadata"]["name"]: t for t in cluster.kubectl_json("get", "pbt", "-n", ns)["items"]}
        return items if all((items[n].get("status") or {}).get("phase") == "Failed" for n in accepted) else None

    items = cluster.wait_for(all_failed, 240, interval=2.0, desc="every accepted invalid training Failed")
    for name, path in accepted.items():
        cond = next(c for c in items[name]["status"]["conditions"] if c["type"] == "Failed")
        assert cond["reason"] == "InvalidSpec", (name, cond)
        parts = path.split(".")
        assert any(".".join(parts[:k]) in cond["message"] for k in range(2, len(parts) + 1)), (path, cond)
    jobs = cluster.kubectl_json("get", "jobs", "-n", ns)["items"]
    assert all(j["metadata"]["labels"]["pbt.dev/training"] == "good" for j in jobs)
    wait_phase(cluster, ns, "good", op, timeout=240)
    assert op.alive()
    text = op.log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    print(f"invalid manifests: {len(rejected)} rejected by the schema, {len(accepted)} marked Failed")


# -- 5. concurrency ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_twenty_trainings_in_five_namespaces_and_a_deletion(
        cluster: Cluster, make_ns: Callable[[str], str], operator_for: Callable[..., NsOperator],
        tmp_path: Path) -> None:
    """20 tiny trainings (population 2, 2 segments) applied at once across 5 namespaces all complete,
    each segment run once; a 21st training deleted mid-run takes its members, Jobs and pods with it
    (owner references + garbage collector) and leaves the others untouched."""
    nss = [make_ns(f"conc{i}") for i in range(5)]
    op = operator_for(*nss)
    logs: dict[tuple[str, str], Path] = {}
    for i, ns in enumerate(nss):
        items = []
        for j in range(4):
            name = f"t{i}{j}"
            logs[(ns, name)] = tmp_path / f"{ns}-{name}.log"
            items.append(training(name, tmp_path / "ckpt" / ns, population=2, parallelism=2, segments=2,
                                  env={"PBT_TEST_LOG": str(logs[(ns, name)])}))
        if i == 0:
            items.append(training("victim", tmp_path / "ckpt" / ns, population=2, parallelism=2, segments=3,
                                  env={"PBT_TEST_SLEEP": "30"}))
        cluster.apply({"apiVersion": "v1", "kind": "List", "items": items}, ns)
    cluster.wait_for(lambda: len(jobs_of(cluster, nss[0], "victim")) >= 2, 180, interval=1.0, desc="victim running")
    cluster.kubectl("delete", "pbt", "victim", "-n", nss[0], "--wait=false")

    def victim_gone() -> bool:
        left = [cluster.kubectl("get", kind, "-n", nss[0], "-l", "pbt.dev/training=victim", "-o", "name").stdout.strip()
                for kind in ("pbt", "pbtm", "jobs", "pods")]
        return not any(left) and cluster.get("pbt", "victim", nss[0]) is None

    cluster.wait_for(victim_gone, 120, interval=1.0, desc="victim's members, Jobs and pods deleted")
    for i, ns in enumerate(nss):
        wait_all(cluster, ns, [f"t{i}{j}" for j in range(4)], op, 420)
    for (ns, name), log in logs.items():
        runs = runs_of(log)
        assert sorted(runs) == [(m, k) for m in range(2) for k in range(2)] and set(runs.values()) == {1}, (name, runs)
        jobs = jobs_of(cluster, ns, name)
        assert len(jobs) == 4 and set(job_attempts(jobs).values()) == {1}, name
        for m in members_of(cluster, ns, name).values():
            assert done_segments(m) == [0, 1] and not failed_history(m)
    assert op.alive()
