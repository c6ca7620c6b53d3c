"""Helpers for the e2e tests: the local control plane (hack/testcluster.sh) and the node agent
(hack/nodeagent.py). conftest.py turns them into fixtures; other e2e suites (the operator's) use the
same fixtures: `cluster`, `namespace`, `node_agent`, `node_agent_factory`."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TESTCLUSTER = REPO / "hack" / "testcluster.sh"
NODEAGENT = REPO / "hack" / "nodeagent.py"


def wait_for(fn: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25, desc: str = "condition") -> Any:
    """Call fn until it returns something truthy (and return that); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while True:
        try:
            value = fn()
            if value:
                return value
        except Exception as e:  # keep trying until the deadline, then report the last error
            last_exc = e
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {desc}"
                               + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def start_moto(host: str, log: Path, timeout: float = 30.0, **popen: Any) -> tuple[subprocess.Popen[bytes], int]:
    """`python -m moto.server` on `host`, on a port the server binds itself (-p 0): the port it reports
    in its log is one nobody else can hold. (A port found free by binding and closing a socket could be
    taken by another process in the second before moto binds it.) Returns the process and its port once
    it answers."""
    import re

    mark = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", "0"], stdout=f,
                                stderr=subprocess.STDOUT, **popen)
    deadline = time.monotonic() + timeout
    port = 0
    while True:
        if not port:
            with open(log, "rb") as f:
                f.seek(mark)
                m = re.search(rb"Running on http://[^:/\s]+:(\d+)", f.read())
            port = int(m.group(1)) if m else 0
        if port:
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/moto-api/", timeout=1):
                    return proc, port
            except OSError:
                pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"moto did not start on {host} within {timeout:.0f} s:\n"
                               + log.read_text(errors="replace")[-2000:])
        time.sleep(0.1)


def parse_env_file(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("export ") and "=" in line:
            k, v = line[len("export "):].split("=", 1)
            env[k] = v
    return env


def run_testcluster(cmd: str, cluster_dir: str | None = None, check: bool = True,
                    env: dict | None = None, timeout: float | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, **(env or {}))
    if cluster_dir:
        e["PBT_CLUSTER_DIR"] = cluster_dir
    return subprocess.run(["bash", str(TESTCLUSTER), cmd], env=e, check=check, text=True,
                          capture_output=cmd != "build", timeout=timeout)


class Cluster:
    """A running control plane: kubeconfig, binaries and helpers around kubectl and helm."""

    def __init__(self, cluster_dir: str, env: dict[str, str]):
        self.dir = Path(cluster_dir)
        self.kubeconfig = env["KUBECONFIG"]
        self.bin_dir = Path(env["PBT_TESTCLUSTER_BIN"])
        self.server = env["PBT_APISERVER"]
        self.version = env.get("PBT_K8S_VERSION", "")
        self.env = dict(os.environ)
        self.env.update(KUBECONFIG=self.kubeconfig, PATH=f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                        HELM_CACHE_HOME=str(self.dir / "helm" / "cache"),
                        HELM_CONFIG_HOME=str(self.dir / "helm" / "config"),
                        HELM_DATA_HOME=str(self.dir / "helm" / "data"))
        self._api_client = None

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    def _run(self, binary: str, args: tuple, input: str | None, check: bool, timeout: float) -> subprocess.CompletedProcess:
        argv = [str(self.bin_dir / binary), *map(str, args)]
        p = subprocess.run(argv, input=input, env=self.env, text=True, capture_output=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
        return p

    def kubectl(self, *args: Any, input: str | None = None, check: bool = True,
                timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run the cluster's kubectl; raises AssertionError on failure unless check=False."""
        return self._run("kubectl", args, input, check, timeout)

    def kubectl_json(self, *args: Any, timeout: float = 60.0) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json", timeout=timeout).stdout)

    def apply(self, manifest: str | dict | list, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        if isinstance(manifest, (dict, list)):
            docs = manifest if isinstance(manifest, list) else [manifest]
            manifest = "\n---\n".join(json.dumps(d) for d in docs)
        ns = ("-n", namespace) if namespace else ()
        return self.kubectl("apply", *ns, "-f", "-", input=manifest, check=check)

    def helm(self, *args: Any, input: str | None = None, check: bool = True,
             timeout: float = 300.0) -> subprocess.CompletedProcess:
        return self._run("helm", args, input, check, timeout)

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        """The object as a dict, or None if it does not exist."""
        ns = ("-n", namespace) if namespace else ()
        p = self.kubectl("get", kind, name, *ns, "-o", "json", "--ignore-not-found", check=True)
        return json.loads(p.stdout) if p.stdout.strip() else None

    def api_client(self):
        """A kubernetes.client.ApiClient for this cluster (cached)."""
        if self._api_client is None:
            from kubernetes import client, config

            self._api_client = config.new_client_from_config(config_file=self.kubeconfig)
            assert isinstance(self._api_client, client.ApiClient)
        return self._api_client

    def wait_for(self, fn: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25,
                 desc: str = "condition") -> Any:
        try:
            return wait_for(fn, timeout, interval, desc)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.debug_dump()}") from None

    def wait_phase(self, ns: str, name: str, phase: str = "Succeeded", timeout: float = 240,
                   describe: Callable[[], str] = lambda: "") -> dict[str, Any]:
        """Wait until PopulationTraining `name` reaches `phase` and return it. A training that fails
        while another phase is awaited fails the wait at once; on failure or timeout the message ends
        with `describe()` (the operator's log, wherever the test's operator runs)."""
        def check() -> dict[str, Any] | None:
            obj = self.get("pbt", name, ns)
            st = (obj or {}).get("status") or {}
            if st.get("phase") == "Failed" and phase != "Failed":
                raise AssertionError(f"training failed: {json.dumps(st)[:3000]}")
            return obj if st.get("phase") == phase else None

        try:
            return self.wait_for(check, timeout, interval=1.0, desc=f"pbt/{name} {phase}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{describe()}") from None

    def events_once(self, ns: str, reason: str, kind: str | None = None, name: str | None = None,
                    timeout: float = 30.0) -> list[dict[str, Any]]:
        """Every Event in `ns`, once one with `reason` (about an object of `kind` / `name`, when given) is
        among them. The operator posts a pass's Events after that pass's status writes, and kopf sends
        them from a queue: a test that has seen what a pass wrote can list the Events before the pass's
        own are there."""
        def listed() -> list[dict[str, Any]] | None:
            items: list[dict[str, Any]] = self.kubectl_json("get", "events", "-n", ns)["items"]
            hit = any(e["reason"] == reason and kind in (None, e["involvedObject"].get("kind"))
                      and name in (None, e["involvedObject"].get("name")) for e in items)
            return items if hit else None

        what = " ".join(filter(None, [kind, name]))
        return self.wait_for(listed, timeout, interval=0.5, desc=f"a {reason} Event{' on ' + what if what else ''}")

    def wait_established(self, *crds: str, timeout: float = 60.0) -> None:
        """Wait until each CRD (by name) is Established. `kubectl wait --for=condition=Established`
        fails at once instead of waiting while a CRD just created has no status.conditions yet
        (".status.conditions accessor error: <nil>"), which a loaded machine makes likely."""
        jsonpath = 'jsonpath={.status.conditions[?(@.type=="Established")].status}'
        for crd in crds:
            self.wait_for(lambda crd=crd: self.kubectl("get", f"crd/{crd}", "-o", jsonpath,
                                                       check=False).stdout.strip() == "True",
                          timeout, desc=f"CRD {crd} Established")

    def debug_dump(self, namespace: str | None = None) -> str:
        ns = ("-n", namespace) if namespace else ("-A",)
        out = self.kubectl("get", "nodes,pods,jobs", *ns, "-o", "wide", check=False, timeout=30)
        ev = self.kubectl("get", "events", *ns, "--sort-by=.lastTimestamp", check=False, timeout=30)
        return f"--- kubectl get nodes,pods,jobs\n{out.stdout}{out.stderr}\n--- events (tail)\n" + \
            "\n".join(ev.stdout.splitlines()[-30:])


class NodeAgent:
    """A hack/nodeagent.py subprocess serving some Nodes of the cluster."""

    def __init__(self, cluster: Cluster, workdir: Path, nodes: int = 2, gpus: int = 4, prefix: str | None = None,
                 extra_args: tuple = (), pass_env: tuple = ()):
        self.cluster = cluster
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix or f"node-{uuid.uuid4().hex[:5]}"
        self.gpus = gpus
        self.initial_nodes = [f"{self.prefix}-{i}" for i in range(nodes)]
        self.control_file = self.workdir / "control.json"
        self.log_path = self.workdir / "nodeagent.log"
        self.pods_root = self.workdir / "pods"
        argv = [sys.executable, str(NODEAGENT), "--kubeconfig", cluster.kubeconfig, "--nodes", str(nodes),
                "--gpus", str(gpus), "--name-prefix", self.prefix, "--root", str(self.pods_root),
                "--control-file", str(self.control_file), "--exit-with-parent", *extra_args]
        if pass_env:
            argv += ["--pass-env", ",".join(pass_env)]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (lives as long as the agent)
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=cluster.env)
        try:
            wait_for(lambda: self.control_file.exists() or self.proc.poll() is not None, 60, 0.1, "node agent start")
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"node agent exited {self.proc.returncode}:\n{self.log_tail()}")
        self.port = json.loads(self.control_file.read_text())["port"]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 150.0) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method,
                                     data=json.dumps(body or {}).encode() if method != "GET" else None,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"node agent {method} {path}: {e.code} {e.read().decode(errors='replace')}") from None

    # -- API used by tests ---------------------------------------------------------------------
    @property
    def nodes(self) -> list[dict]:
        return self._call("GET", "/nodes")["nodes"]

    def processes(self) -> list[dict]:
        """The pod processes the agent runs now: [{pod: ns/name, container, pid, node}]."""
        return self._call("GET", "/pods")["processes"]

    def add_node(self, name: str | None = None, gpus: int | None = None, labels: dict | None = None,
                 taints: list | None = None, cpu: str = "16", memory: str = "64Gi") -> str:
        name = name or f"{self.prefix}-x{uuid.uuid4().hex[:4]}"
        self._call("POST", "/nodes", {"name": name, "gpus": self.gpus if gpus is None else gpus,
                                      "labels": labels or {}, "taints": taints or [], "cpu": cpu, "memory": memory})
        return name

    def remove_node(self, name: str) -> list[str]:
        return self._call("DELETE", f"/nodes/{name}")["killed"]

    def lose_node(self, name: str, out_of_service: bool = True) -> list[str]:
        """Heartbeats stop, the node turns NotReady and its processes die. Returns the pods it ran."""
        return self._call("POST", f"/nodes/{name}/lose", {"out_of_service": out_of_service})["killed"]

    def evict_pod(self, namespace: str, name: str, mode: str = "api", message: str = "") -> dict:
        """mode="api": the Eviction API (DisruptionTarget, graceful delete); mode="preempt": kubelet-style
        preemption (processes killed, DisruptionTarget condition, phase Failed, pod kept)."""
        return self._call("POST", f"/pods/{namespace}/{name}/evict", {"mode": mode, "message": message})

    def pod_log(self, namespace: str, name: str, container: str | None = None) -> str:
        """stdout+stderr of a pod's container (there is no kubelet, so `kubectl logs` does not work)."""
        base = self.pods_root / namespace
        for d in sorted(base.glob(f"{name}-*"), key=lambda p: p.stat().st_mtime, reverse=True):
            logs = sorted(d.glob(f"{container or '*'}.log"))
            if logs:
                return logs[0].read_text(errors="replace")
        raise FileNotFoundError(f"no log for pod {namespace}/{name} under {base}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
