#!/usr/bin/env python3
"""A tiny stand-in for the kubelet, for the local test control plane (hack/testcluster.sh).

It registers Nodes (with `nvidia.com/gpu` capacity), keeps their Leases and Ready condition fresh,
and runs every pod bound to them as local processes: the image is ignored, `command` + `args` run
with the pod's env (``value``, ``valueFrom`` secretKeyRef/configMapKeyRef/fieldRef/resourceFieldRef,
``envFrom``) in a per-pod directory (or ``workingDir``). ``python`` on the PATH is the interpreter
that runs this agent.

Termination messages: every occurrence of the container's ``terminationMessagePath`` (default
``/dev/termination-log``) in command, args and env values is replaced by a per-pod file, whose path
is also exported as ``PBT_TERMINATION_LOG``; its content (at most 4096 bytes) becomes
``state.terminated.message``.

Adopting nodes (``--adopt-selector``): the agent also serves Nodes that someone else creates, such as
the Nodes Karpenter's KWOK cloud provider creates for its NodeClaims (label ``kwok.x-k8s.io/node=fake``).
It leaves them NotReady for ``--adopt-ready-delay`` seconds after their creation (the boot time of a
cloud instance; a ``pbt.dev/ready-delay-seconds`` label on the Node, e.g. from a NodePool's template,
overrides it), then posts Ready, keeps their Lease fresh and runs their pods; their capacity
(``nvidia.com/gpu`` included) stays what the creator set. When the Node is deleted the agent stops its
processes and forgets it. So the autoscaler, not the agent, decides when nodes come and go.

Deleting a pod sends SIGTERM to its processes and SIGKILL after the grace period. For fault tests
the agent can lose a node (heartbeats stop, the node is marked NotReady, its processes die) or
preempt a pod like the kubelet does (DisruptionTarget condition, phase Failed); see the control
API below and ``tests/e2e/clusterlib.py``.

Control API (HTTP on 127.0.0.1, port written to --control-file as JSON):
  GET  /healthz
  GET  /nodes                           -> {"nodes": [{"name", "gpus", "lost", "adopted"}]}
  POST /nodes {"name", "gpus", "labels", "taints", "cpu", "memory"}     register one more node
  POST /nodes/<name>/lose {"out_of_service": true}                      simulate a node loss
  DELETE /nodes/<name>                                                  stop serving and delete a node
  POST /pods/<ns>/<name>/evict {"mode": "api"|"preempt", "message"}     evict a pod
  GET  /pods                            -> processes this agent runs

Only loopback addresses are used. Standard library + urllib3 + the kubernetes client's kubeconfig
loader.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import http.server
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
from typing import Any

import urllib3

log = logging.getLogger("nodeagent")

DEFAULT_TERMINATION_PATH = "/dev/termination-log"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_BYTES = 2048
FALLBACK_LOG_LINES = 80
READY_DELAY_LABEL = "pbt.dev/ready-delay-seconds"  # on an adopted Node: its boot time instead of the default


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiError(Exception):
    def __init__(self, status: int, body: Any, what: str):
        super().__init__(f"{what}: HTTP {status}: {body}")
        self.status = status
        self.body = body


class Api:
    """A minimal thread-safe JSON client for the API server (urllib3 pool, kubeconfig credentials)."""

    def __init__(self, kubeconfig: str):
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.base = cfg.host.rstrip("/")
        host = urllib.parse.urlparse(self.base).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit(f"refusing a non-loopback API server: {self.base}")
        self.headers = {"Accept": "application/json", "User-Agent": "pbt-nodeagent"}
        auth = cfg.get_api_key_with_prefix("authorization") if cfg.api_key else None
        if auth:
            self.headers["Authorization"] = auth
        kw: dict[str, Any] = {}
        self.ca_file = cfg.ssl_ca_cert if cfg.verify_ssl else None
        if cfg.verify_ssl and cfg.ssl_ca_cert:
            kw.update(cert_reqs="CERT_REQUIRED", ca_certs=cfg.ssl_ca_cert)
        else:
            kw.update(cert_reqs="CERT_NONE")
        if cfg.cert_file:
            kw.update(cert_file=cfg.cert_file, key_file=cfg.key_file)
        self.pool = urllib3.PoolManager(num_pools=2, maxsize=64, **kw)
        self.port = urllib.parse.urlparse(self.base).port or 443

    def request(self, method: str, path: str, body: Any = None, params: dict | None = None,
                content_type: str = "application/json", timeout: float = 30.0) -> Any:
        url = self.base + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = dict(self.headers)
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        r = self.pool.request(method, url, body=data, headers=headers,
                              timeout=urllib3.Timeout(connect=5.0, read=timeout), retries=False)
        text = r.data.decode("utf-8", "replace")
        try:
            payload = json.loads(text) if text else None
        except ValueError:
            payload = text
        if r.status >= 300:
            raise ApiError(r.status, payload, f"{method} {path}")
        return payload

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def watch(self, path: str, params: dict, stop: threading.Event):
        """Yield watch events (dicts) until the server closes the stream or `stop` is set."""
        params = dict(params, watch="1", allowWatchBookmarks="true")
        url = self.base + path + "?" + urllib.parse.urlencode(params)
        timeout = float(params.get("timeoutSeconds", 300)) + 30.0
        r = self.pool.request("GET", url, headers=self.headers, preload_content=False,
                              timeout=urllib3.Timeout(connect=5.0, read=timeout), retries=False)
        try:
            if r.status >= 300:
                raise ApiError(r.status, r.data.decode("utf-8", "replace"), f"WATCH {path}")
            buf = b""
            for chunk in r.stream(65536):
                if stop.is_set():
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            r.release_conn()


# ------------------------------------------------------------------------------------------------
# helpers for pod specs

_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")
_SUFFIX = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
           "E": 1e18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def parse_quantity(q: str | int | float) -> float:
    if isinstance(q, (int, float)):
        return float(q)
    m = _QUANTITY.match(str(q).strip())
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"bad quantity {q!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: $$ escapes, unknown references stay as they are."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(sub, value)


class ConfigError(Exception):
    """The container cannot be configured yet (missing secret/config map key): CreateContainerConfigError."""


# ------------------------------------------------------------------------------------------------


class Node:
    def __init__(self, name: str, gpus: int, cpu: str = "16", memory: str = "64Gi",
                 labels: dict | None = None, taints: list | None = None):
        self.name = name
        self.gpus = int(gpus)
        self.cpu = str(cpu)
        self.memory = str(memory)
        self.labels = dict(labels or {})
        self.taints = list(taints or [])
        self.lost = False
        self.boot_id = str(uuid.uuid4())
        self.adopted = False  # created by someone else (e.g. Karpenter): keep its capacity, never delete it
        self.uid = ""  # the Node object's uid once known (owner of its Lease)


class ContainerRun:
    """One container's process and its reported state."""

    def __init__(self, spec: dict, init: bool):
        self.spec = spec
        self.name = spec["name"]
        self.init = init
        self.proc: subprocess.Popen | None = None
        self.restart_count = 0
        self.state: dict = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict = {}
        self.started_at: str | None = None
        self.exit_code: int | None = None
        self.termination_file = ""
        self.log_file = ""

    def status(self, pod_image_default: str = "") -> dict:
        st = {
            "name": self.name,
            "image": self.spec.get("image") or pod_image_default or "none",
            "imageID": "pbt-nodeagent://" + (self.spec.get("image") or "none"),
            "ready": "running" in self.state and not self.init,
            "started": "running" in self.state,
            "restartCount": self.restart_count,
            "state": self.state,
        }
        if self.last_state:
            st["lastState"] = self.last_state
        if self.proc is not None:
            st["containerID"] = f"pbt://{self.proc.pid}"
        return st


class PodWorker(threading.Thread):
    """Runs one pod: init containers, then containers, until they finish or the pod goes away."""

    def __init__(self, agent: NodeAgent, pod: dict):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.agent = agent
        self.api = agent.api
        self.pod = pod
        self.uid = meta["uid"]
        self.ns = meta["namespace"]
        self.pod_name = meta["name"]
        self.node = pod["spec"]["nodeName"]
        self.dir = os.path.join(agent.root, self.ns, f"{self.pod_name}-{self.uid[:8]}")
        self.wake = threading.Condition()
        self.stop_request: dict | None = None  # {"grace": s, "kind": "delete"|"preempt"|"lost", ...}
        self.init_runs = [ContainerRun(c, True) for c in pod["spec"].get("initContainers") or []]
        self.runs = [ContainerRun(c, False) for c in pod["spec"].get("containers") or []]
        self.start_time = (pod.get("status") or {}).get("startTime") or now_iso()
        self.phase = "Pending"
        self.conditions: dict[str, dict] = {}
        self.done = threading.Event()
        self.sa_dir: str | None = None  # None: not looked at yet, "": the pod has no service-account token

    # -- called from other threads ------------------------------------------------------------
    def update(self, pod: dict) -> None:
        with self.wake:
            self.pod = pod
            dts = pod["metadata"].get("deletionTimestamp")
            if dts and self.stop_request is None:
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                if grace is None:
                    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
                self.stop_request = {"kind": "delete", "grace": float(grace), "t": time.monotonic()}
            self.wake.notify_all()

    def request_stop(self, kind: str, grace: float | None = None, message: str = "") -> None:
        with self.wake:
            if grace is None:
                grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
            if self.stop_request is None or kind == "lost":
                self.stop_request = {"kind": kind, "grace": grace, "t": time.monotonic(), "message": message}
            self.wake.notify_all()

    def _notify(self) -> None:
        with self.wake:
            self.wake.notify_all()

    # -- status ------------------------------------------------------------------------------
    def _set_condition(self, ctype: str, status: bool, reason: str | None = None, message: str = "") -> None:
        s = "True" if status else "False"
        old = self.conditions.get(ctype)
        if old and old["status"] == s and old.get("reason") == reason:
            return
        c = {"type": ctype, "status": s, "lastProbeTime": None, "lastTransitionTime": now_iso()}
        if reason:
            c["reason"] = reason
        if message:
            c["message"] = message
        self.conditions[ctype] = c

    def _push_status(self, extra_conditions: list | None = None) -> None:
        if self.agent.node_lost(self.node):
            return  # a dead kubelet reports nothing
        status = {
            "phase": self.phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": self.start_time,
            "conditions": list(self.conditions.values()) + list(extra_conditions or []),
            "containerStatuses": [r.status() for r in self.runs],
        }
        if self.init_runs:
            status["initContainerStatuses"] = [r.status() for r in self.init_runs]
        try:
            self.api.request("PATCH", f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}/status",
                             {"metadata": {"uid": self.uid}, "status": status},
                             content_type="application/strategic-merge-patch+json")
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("status of %s/%s: %s", self.ns, self.pod_name, e)

    # -- environment -------------------------------------------------------------------------
    def _get_obj(self, kind: str, name: str) -> dict | None:
        try:
            return self.api.get(f"/api/v1/namespaces/{self.ns}/{kind}/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def _field(self, path: str) -> str:
        pod = self.pod
        meta = pod["metadata"]
        simple = {
            "metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"], "spec.nodeName": pod["spec"].get("nodeName", ""),
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
            "status.hostIP": "127.0.0.1", "status.hostIPs": "127.0.0.1",
            "status.podIP": "127.0.0.1", "status.podIPs": "127.0.0.1",
        }
        if path in simple:
            return simple[path]
        m = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            d = meta.get(path.split(".")[1]) or {}
            return "\n".join(f'{k}="{v}"' for k, v in sorted(d.items()))
        raise ConfigError(f"unsupported fieldRef {path}")

    def _resource_field(self, ref: dict, spec: dict) -> str:
        res = ref["resource"]
        cname = ref.get("containerName") or spec["name"]
        cspec = next((c for c in self.pod["spec"]["containers"] if c["name"] == cname), spec)
        kind, _, rname = res.partition(".")
        value = (cspec.get("resources") or {}).get(kind, {}).get(rname)
        if value is None:
            node = self.agent.nodes.get(self.node)
            value = {"cpu": node.cpu if node else "1", "memory": node.memory if node else "1Gi"}.get(rname, "0")
        divisor = parse_quantity(ref.get("divisor") or "1")
        return str(math.ceil(parse_quantity(value) / divisor))

    def _env(self, spec: dict, run: ContainerRun) -> dict[str, str]:
        env: dict[str, str] = dict(self.agent.base_env)
        env["HOSTNAME"] = self.pod_name
        sa_dir = self._service_account_dir()
        if sa_dir:
            env["KUBECONFIG"] = os.path.join(sa_dir, "kubeconfig")
        for src in spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
                if key not in src:
                    continue
                ref = src[key]
                obj = self._get_obj(kind, ref["name"])
                if obj is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError(f"{kind[:-1]} {ref['name']!r} not found")
                for k, v in (obj.get("data") or {}).items():
                    env[prefix + k] = base64.b64decode(v).decode() if kind == "secrets" else v
        declared: dict[str, str] = {}
        for e in spec.get("env") or []:
            name = e["name"]
            if "value" in e or "valueFrom" not in e:
                val = expand(e.get("value", ""), declared | {k: v for k, v in env.items() if k not in declared})
            else:
                vf = e["valueFrom"]
                if "fieldRef" in vf:
                    val = self._field(vf["fieldRef"]["fieldPath"])
                elif "resourceFieldRef" in vf:
                    val = self._resource_field(vf["resourceFieldRef"], spec)
                elif "secretKeyRef" in vf or "configMapKeyRef" in vf:
                    kind, ref = (("secrets", vf["secretKeyRef"]) if "secretKeyRef" in vf
                                 else ("configmaps", vf["configMapKeyRef"]))
                    obj = self._get_obj(kind, ref["name"])
                    data = (obj or {}).get("data") or {}
                    binary = (obj or {}).get("binaryData") or {}
                    if kind == "configmaps" and ref["key"] in binary:
                        data = {ref["key"]: base64.b64decode(binary[ref["key"]]).decode()}
                    if obj is None or ref["key"] not in data:
                        if ref.get("optional"):
                            continue
                        what = "secret" if kind == "secrets" else "configmap"
                        raise ConfigError(f"couldn't find key {ref['key']} in {what} {self.ns}/{ref['name']}")
                    val = base64.b64decode(data[ref["key"]]).decode() if kind == "secrets" else data[ref["key"]]
                else:
                    raise ConfigError(f"unsupported valueFrom in env {name}")
            declared[name] = val
            env[name] = val
        # the termination message file: rewrite the path in env values, and export it
        tpath = spec.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        for k, v in list(env.items()):
            env[k] = self._rewrite_paths(v, tpath, run)
        env["PBT_TERMINATION_LOG"] = run.termination_file
        return env

    def _rewrite_paths(self, value: str, tpath: str, run: ContainerRun) -> str:
        value = value.replace(tpath, run.termination_file)
        if self.sa_dir and SERVICE_ACCOUNT_DIR in value:
            value = value.replace(SERVICE_ACCOUNT_DIR, self.sa_dir)
        return value

    def _service_account_dir(self) -> str | None:
        """Like the kubelet's projected service-account volume: a bound token for the pod's service account,
        ca.crt and namespace in `<pod dir>/serviceaccount/`, plus a kubeconfig there (exported as KUBECONFIG:
        clients that fall back from in-cluster config to a kubeconfig then authenticate as the pod)."""
        if self.sa_dir is not None:
            return self.sa_dir or None
        vols = self.pod["spec"].get("volumes") or []
        wants = any("serviceAccountToken" in src for v in vols for src in (v.get("projected") or {}).get("sources", []))
        if not wants:
            self.sa_dir = ""
            return None
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [], "expirationSeconds": 86400,
                         "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid}}}
        try:
            tr = self.api.request("POST", f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body)
        except ApiError as e:
            raise ConfigError(f"service account token for {sa}: {e}") from None
        d = os.path.join(self.dir, "serviceaccount")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "token"), "w") as f:
            f.write(tr["status"]["token"])
        with open(os.path.join(d, "namespace"), "w") as f:
            f.write(self.ns)
        if self.agent.api.ca_file:
            shutil.copyfile(self.agent.api.ca_file, os.path.join(d, "ca.crt"))
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "pod",
            "clusters": [{"name": "local", "cluster": {"server": self.agent.api.base,
                                                       "certificate-authority": os.path.join(d, "ca.crt")}}],
            "users": [{"name": sa, "user": {"tokenFile": os.path.join(d, "token")}}],
            "contexts": [{"name": "pod", "context": {"cluster": "local", "user": sa, "namespace": self.ns}}],
        }
        with open(os.path.join(d, "kubeconfig"), "w") as f:
            json.dump(kubeconfig, f, indent=1)
        self.sa_dir = d
        return d

    # -- processes ---------------------------------------------------------------------------
    def _start(self, run: ContainerRun) -> bool:
        spec = run.spec
        os.makedirs(self.dir, exist_ok=True)
        run.termination_file = os.path.join(self.dir, f"{run.name}.termination-log")
        run.log_file = os.path.join(self.dir, f"{run.name}.log")
        with open(run.termination_file, "w"):
            pass
        env = self._env(spec, run)  # may raise ConfigError
        tpath = spec.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        argv = [self._rewrite_paths(expand(a, env), tpath, run)
                for a in (spec.get("command") or []) + (spec.get("args") or [])]
        cwd = spec.get("workingDir") or self.dir
        run.started_at = now_iso()
        try:
            if not argv:
                raise OSError("the node agent needs an explicit command (it ignores images)")
            os.makedirs(cwd, exist_ok=True)
            with open(run.log_file, "ab") as out:
                proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            run.proc = None
            run.exit_code = 128
            run.state = {"terminated": {"exitCode": 128, "reason": "StartError", "message": str(e)[:4096],
                                        "startedAt": run.started_at, "finishedAt": now_iso()}}
            return False
        run.proc = proc
        run.exit_code = None
        run.state = {"running": {"startedAt": run.started_at}}
        self.agent.register_proc(self, run, proc)

        def waiter() -> None:
            proc.wait()
            self._notify()

        threading.Thread(target=waiter, name=f"wait-{proc.pid}", daemon=True).start()
        log.info("started %s/%s[%s] pid %d: %s", self.ns, self.pod_name, run.name, proc.pid, argv[:4])
        return True

    def _message(self, run: ContainerRun, code: int) -> str:
        msg = ""
        with contextlib.suppress(OSError), open(run.termination_file, "rb") as f:
            msg = f.read(MAX_TERMINATION_MESSAGE).decode("utf-8", "replace")
        if not msg and code != 0 and run.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            with contextlib.suppress(OSError), open(run.log_file, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - FALLBACK_LOG_BYTES))
                tail = f.read().decode("utf-8", "replace").splitlines()[-FALLBACK_LOG_LINES:]
                msg = "\n".join(tail)
        return msg

    def _reap(self, run: ContainerRun) -> bool:
        """If the process has exited, record its terminated state. Returns True if it did."""
        proc = run.proc
        if proc is None or run.exit_code is not None:
            return False
        rc = proc.poll()
        if rc is None:
            return False
        code = rc if rc >= 0 else 128 - rc
        run.exit_code = code
        term = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                "startedAt": run.started_at, "finishedAt": now_iso(), "containerID": f"pbt://{proc.pid}"}
        if rc < 0:
            term["signal"] = -rc
        msg = self._message(run, code)
        if msg:
            term["message"] = msg
        run.state = {"terminated": term}
        self.agent.unregister_proc(proc)
        log.info("%s/%s[%s] exited %d", self.ns, self.pod_name, run.name, code)
        return True

    def _kill(self, runs: list[ContainerRun], grace: float) -> None:
        """SIGTERM the live processes, SIGKILL whatever is left after `grace` seconds."""
        live = [(r, p) for r in runs if (p := r.proc) is not None and r.exit_code is None and p.poll() is None]
        for _, proc in live:
            _signal_group(proc, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        deadline = time.monotonic() + grace
        for _, proc in live:
            remaining = deadline - time.monotonic()
            try:
                proc.wait(timeout=max(0.0, remaining))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        for r, proc in live:
            _signal_group(proc, signal.SIGKILL)  # stray children of the group
            self._reap(r)

    def kill_now(self) -> None:
        self.request_stop("lost", 0.0)

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except Exception:
            log.error("pod %s/%s crashed:\n%s", self.ns, self.pod_name, traceback.format_exc())
            self._kill(self.init_runs + self.runs, 0)
        finally:
            self.done.set()
            self.agent.worker_done(self)

    def _wait(self, timeout: float | None) -> None:
        with self.wake:
            if self.stop_request is None and not any(
                    r.proc is not None and r.exit_code is None and r.proc.poll() is not None
                    for r in self.init_runs + self.runs):
                self.wake.wait(timeout)

    def _restart_policy(self) -> str:
        return self.pod["spec"].get("restartPolicy", "Always")

    def _run(self) -> None:
        self._set_condition("PodReadyToStartContainers", True)
        self._set_condition("Initialized", not self.init_runs, None if not self.init_runs else "ContainersNotInitialized")
        self._set_condition("ContainersReady", False, "ContainersNotReady")
        self._set_condition("Ready", False, "ContainersNotReady")
        if self.stop_request is None:
            self._push_status()
        ok = self._run_group(self.init_runs, sequential=True) if self.init_runs else True
        if ok and self.stop_request is None:
            self._set_condition("Initialized", True)
            self._run_group(self.runs, sequential=False)
        self._finish()

    def _run_group(self, runs: list[ContainerRun], sequential: bool) -> bool:
        """Run containers (init containers one by one); returns True if they all succeeded."""
        policy = self._restart_policy()
        pending = list(runs)
        backoff: dict[str, float] = {}
        while True:
            if self.stop_request is not None:
                return False
            # start what should run now
            to_start = pending[:1] if sequential else list(pending)
            if sequential and any(r.proc is not None and r.exit_code is None for r in runs):
                to_start = []
            changed = False
            next_wake: float | None = None
            for r in to_start:
                if backoff.get(r.name, 0) > time.monotonic():
                    next_wake = min(next_wake or 1e9, backoff[r.name] - time.monotonic())
                    continue
                pending.remove(r)
                try:
                    self._start(r)
                except ConfigError as e:
                    r.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
                    pending.insert(0, r)
                    backoff[r.name] = time.monotonic() + 1.0
                    next_wake = min(next_wake or 1e9, 1.0)
                    changed = True
                    continue
                changed = True
            for r in runs:
                if self._reap(r):
                    changed = True
                    failed = r.exit_code != 0
                    if (policy == "Always" and not r.init) or (failed and policy in ("Always", "OnFailure")):
                        r.last_state, r.state = r.state, {"waiting": {"reason": "CrashLoopBackOff"}}
                        r.restart_count += 1
                        r.exit_code = None
                        r.proc = None
                        delay = min(10.0, 0.5 * 2 ** min(r.restart_count, 5))
                        backoff[r.name] = time.monotonic() + delay
                        pending.append(r)
                        next_wake = min(next_wake or 1e9, delay)
                    elif failed and sequential:
                        # an init container failed for good: the pod fails
                        self._update_phase()
                        self._push_status()
                        return False
            if changed:
                self._update_phase()
                self._push_status()
            if not pending and all(r.exit_code is not None for r in runs):
                return all(r.exit_code == 0 for r in runs)
            self._wait(next_wake)

    def _update_phase(self) -> None:
        policy = self._restart_policy()
        inits_ok = all(r.exit_code == 0 for r in self.init_runs)
        init_failed = any(r.exit_code not in (None, 0) for r in self.init_runs) and policy == "Never"
        running = [r for r in self.runs if "running" in r.state]
        finished = all(r.exit_code is not None for r in self.runs) and inits_ok
        if init_failed:
            self.phase = "Failed"
        elif finished and policy != "Always" and all(r.exit_code == 0 for r in self.runs):
            self.phase = "Succeeded"
        elif finished and policy == "Never":
            self.phase = "Failed"
        elif running or (inits_ok and any(r.exit_code is not None for r in self.runs)):
            self.phase = "Running"
        else:
            self.phase = "Pending"
        all_ready = bool(self.runs) and all("running" in r.state for r in self.runs)
        if self.phase in ("Succeeded", "Failed"):
            self._set_condition("PodReadyToStartContainers", False)
            self._set_condition("ContainersReady", False, "PodCompleted")
            self._set_condition("Ready", False, "PodCompleted")
        else:
            self._set_condition("ContainersReady", all_ready, None if all_ready else "ContainersNotReady")
            self._set_condition("Ready", all_ready, None if all_ready else "ContainersNotReady")

    def _finish(self) -> None:
        req = self.stop_request
        all_runs = self.init_runs + self.runs
        if req is None:
            self._update_phase()
            self._push_status()
            return
        kind = req["kind"]
        if kind == "lost":
            self._kill(all_runs, 0)
            return
        grace = max(0.0, req["grace"] - (time.monotonic() - req["t"]))
        self._kill(all_runs, grace)
        for r in all_runs:
            if r.exit_code is None and "terminated" not in r.state:
                # never started: report it as terminated without a process
                r.state = {"terminated": {"exitCode": 137, "reason": "ContainerStatusUnknown",
                                          "message": "The container could not be located when the pod was "
                                                     "terminated", "finishedAt": now_iso()}}
                r.exit_code = 137
        self._update_phase()
        if self.phase not in ("Succeeded", "Failed"):
            self.phase = "Failed"
            self._set_condition("ContainersReady", False, "PodCompleted")
            self._set_condition("Ready", False, "PodCompleted")
        extra = []
        if kind == "preempt":
            extra.append({"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                          "message": req.get("message") or "Pod was preempted by the node agent",
                          "lastTransitionTime": now_iso()})
            self.phase = "Failed"
        self._push_status(extra)
        if kind == "delete":
            self._delete_for_good()

    def _delete_for_good(self) -> None:
        if self.agent.node_lost(self.node):
            return
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{self.ns}/pods/{self.pod_name}",
                             {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                              "preconditions": {"uid": self.uid}})
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("final delete of %s/%s: %s", self.ns, self.pod_name, e)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


# ------------------------------------------------------------------------------------------------


class NodeAgent:
    def __init__(self, kubeconfig: str, root: str, lease_interval: float = 2.0, status_interval: float = 20.0,
                 pass_env: list[str] | None = None, kubelet_version: str = "v1.36.0",
                 adopt_selector: str = "", adopt_ready_delay: float = 0.0):
        self.api = Api(kubeconfig)
        self.adopt_selector = adopt_selector
        self.adopt_ready_delay = adopt_ready_delay
        self.adopting: set[str] = set()  # names seen and waiting for their ready delay
        self.root = root
        self.lease_interval = lease_interval
        self.status_interval = status_interval
        self.kubelet_version = kubelet_version
        self.nodes: dict[str, Node] = {}
        self.workers: dict[str, PodWorker] = {}
        self.procs: dict[int, tuple[PodWorker, ContainerRun]] = {}
        self.lock = threading.RLock()
        self.stop = threading.Event()
        self.watch_ready = threading.Event()
        self.finished: dict[str, float] = {}  # uid -> when its worker ended (tombstones)
        pybin = os.path.dirname(os.path.abspath(sys.executable))
        env = {"PATH": pybin + os.pathsep + os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
               "HOME": os.environ.get("HOME", "/tmp"), "PYTHONUNBUFFERED": "1",
               "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.api.port)}
        for k in ("LANG", "LC_ALL", "TMPDIR", "TZ", *(pass_env or [])):
            if k in os.environ:
                env[k] = os.environ[k]
        self.base_env = env
        os.makedirs(root, exist_ok=True)

    # -- nodes -------------------------------------------------------------------------------
    def node_lost(self, name: str) -> bool:
        n = self.nodes.get(name)
        return n is None or n.lost

    def _node_status(self, n: Node, ready: bool = True) -> dict:
        res = {"cpu": n.cpu, "memory": n.memory, "pods": "250", "ephemeral-storage": "100Gi",
               "nvidia.com/gpu": str(n.gpus)}
        t = now_iso()

        def cond(ctype: str, status: str, reason: str, msg: str) -> dict:
            return {"type": ctype, "status": status, "reason": reason, "message": msg,
                    "lastHeartbeatTime": t, "lastTransitionTime": t}

        status: dict[str, Any] = {} if n.adopted else {"capacity": res, "allocatable": res}
        return status | {
            "conditions": [
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID"),
                cond("Ready", "True", "KubeletReady", "pbt node agent is posting ready status") if ready else
                cond("Ready", "Unknown", "NodeStatusUnknown", "Kubelet stopped posting node status."),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": n.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {"machineID": n.boot_id.replace("-", ""), "systemUUID": n.boot_id, "bootID": n.boot_id,
                         "kernelVersion": os.uname().release, "osImage": "pbt node agent",
                         "containerRuntimeVersion": "pbt-nodeagent://0.1", "kubeletVersion": self.kubelet_version,
                         "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        }

    def add_node(self, n: Node) -> None:
        if n.name in self.nodes and not self.nodes[n.name].lost:
            raise ValueError(f"node {n.name} exists")
        labels = {"kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  "pbt.dev/node-agent": "true", **n.labels}
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name, "labels": labels},
                "spec": {"taints": n.taints} if n.taints else {}, "status": self._node_status(n)}
        try:
            self.api.request("POST", "/api/v1/nodes", body)
        except ApiError as e:
            if e.status != 409:
                raise
            self.api.request("PATCH", f"/api/v1/nodes/{n.name}",
                             {"metadata": {"labels": labels}, "spec": {"taints": n.taints or None}},
                             content_type="application/merge-patch+json")
        self.api.request("PATCH", f"/api/v1/nodes/{n.name}/status", {"status": self._node_status(n)},
                         content_type="application/merge-patch+json")
        self._renew_lease(n)
        with self.lock:
            self.nodes[n.name] = n
        log.info("node %s registered with %d GPUs", n.name, n.gpus)
        # pods may already be bound to this name (re-registration): pick them up
        if self.watch_ready.is_set():
            for p in self.api.get("/api/v1/pods", fieldSelector=f"spec.nodeName={n.name}")["items"]:
                self.on_pod("ADDED", p)

    def _renew_lease(self, n: Node) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{n.name}"
        spec = {"holderIdentity": n.name, "leaseDurationSeconds": 40, "renewTime": now_micro()}
        try:
            self.api.request("PATCH", path, {"spec": spec}, content_type="application/merge-patch+json")
        except ApiError as e:
            if e.status != 404:
                raise
            meta: dict[str, Any] = {"name": n.name, "namespace": "kube-node-lease"}
            if n.uid:  # like the kubelet: the Node owns its Lease (autoscalers collect ownerless ones)
                meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": n.name, "uid": n.uid}]
            self.api.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                             {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
                              "spec": spec})

    def _heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self.stop.wait(self.lease_interval):
            status_due = time.monotonic() - last_status >= self.status_interval
            with self.lock:
                nodes = [n for n in self.nodes.values() if not n.lost]
            for n in nodes:
                try:
                    self._renew_lease(n)
                    if status_due:
                        self.api.request("PATCH", f"/api/v1/nodes/{n.name}/status",
                                         {"status": {"conditions": self._node_status(n)["conditions"]}},
                                         content_type="application/strategic-merge-patch+json")
                except Exception as e:
                    log.warning("heartbeat of %s: %s", n.name, e)
            if status_due:
                last_status = time.monotonic()

    def lose_node(self, name: str, out_of_service: bool = True) -> list[str]:
        """Simulate a node loss: heartbeats stop, processes die, the node is marked NotReady.

        With out_of_service the node also gets the `node.kubernetes.io/out-of-service` taint, so the
        control plane's taint-eviction and pod GC controllers delete its pods promptly (otherwise they
        stay Terminating forever, as with a real dead kubelet)."""
        with self.lock:
            n = self.nodes[name]
            n.lost = True
            victims = [w for w in self.workers.values() if w.node == name]
        for w in victims:
            w.kill_now()
        for w in victims:
            w.done.wait(10)
        self.api.request("PATCH", f"/api/v1/nodes/{name}/status",
                         {"status": {"conditions": [self._node_status(n, ready=False)["conditions"][-1]]}},
                         content_type="application/strategic-merge-patch+json")
        if out_of_service:
            node = self.api.get(f"/api/v1/nodes/{name}")
            taints = [t for t in node["spec"].get("taints") or [] if t["key"] != "node.kubernetes.io/out-of-service"]
            taints.append({"key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown",
                           "effect": "NoExecute", "timeAdded": now_iso()})
            self.api.request("PATCH", f"/api/v1/nodes/{name}", {"spec": {"taints": taints}},
                             content_type="application/merge-patch+json")
        log.info("node %s lost (%d pods killed)", name, len(victims))
        return [f"{w.ns}/{w.pod_name}" for w in victims]

    def remove_node(self, name: str) -> list[str]:
        """Stop serving a node, kill its processes and delete its Node and Lease objects."""
        with self.lock:
            n = self.nodes.pop(name, None)
            victims = [w for w in self.workers.values() if w.node == name]
        if n is None:
            raise KeyError(f"unknown node {name}")
        for w in victims:
            w.kill_now()
        for w in victims:
            w.done.wait(10)
        for path in (f"/api/v1/nodes/{name}",
                     f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"):
            try:
                self.api.request("DELETE", path)
            except ApiError as e:
                if e.status != 404:
                    raise
        log.info("node %s removed", name)
        return [f"{w.ns}/{w.pod_name}" for w in victims]

    # -- adopted nodes ---------------------------------------------------------------------
    def _on_foreign_node(self, etype: str, node: dict) -> None:
        """A Node matching --adopt-selector was added, changed or deleted by its creator."""
        name = node["metadata"]["name"]
        if etype == "DELETED":
            self._release(name)
            return
        with self.lock:
            if name in self.nodes or name in self.adopting:
                return
            self.adopting.add(name)
        created = node["metadata"].get("creationTimestamp")
        age = 0.0
        if created:
            t0 = dt.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
            age = (dt.datetime.now(dt.timezone.utc) - t0).total_seconds()
        boot = self.adopt_ready_delay
        with contextlib.suppress(ValueError):  # a pool can model slower machines with a node label
            boot = float((node["metadata"].get("labels") or {}).get(READY_DELAY_LABEL, boot))
        delay = max(0.0, boot - age)
        log.info("node %s appeared; ready in %.1fs", name, delay)
        timer = threading.Timer(delay, self._adopt, args=(name,))
        timer.daemon = True
        timer.start()

    def _adopt(self, name: str) -> None:
        """Boot finished: post Ready for a foreign Node and start serving its pods."""
        try:
            node = self.api.get(f"/api/v1/nodes/{name}")
        except ApiError as e:
            with self.lock:
                self.adopting.discard(name)
            if e.status != 404:
                log.warning("adopting %s: %s", name, e)
            return
        if self.stop.is_set():
            return
        cap = (node.get("status") or {}).get("capacity") or {}
        n = Node(name, int(parse_quantity(cap.get("nvidia.com/gpu", 0))), str(cap.get("cpu", "1")),
                 str(cap.get("memory", "1Gi")))
        n.adopted = True
        n.uid = node["metadata"]["uid"]
        try:
            self.api.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": self._node_status(n)},
                             content_type="application/strategic-merge-patch+json")
            self._renew_lease(n)
        except ApiError as e:
            with self.lock:
                self.adopting.discard(name)
            log.warning("adopting %s: %s", name, e)
            return
        with self.lock:
            self.adopting.discard(name)
            self.nodes[name] = n
        log.info("node %s adopted with %d GPUs (capacity %s)", name, n.gpus, cap)
        if self.watch_ready.is_set():
            for p in self.api.get("/api/v1/pods", fieldSelector=f"spec.nodeName={name}")["items"]:
                self.on_pod("ADDED", p)

    def _release(self, name: str) -> None:
        """The creator deleted an adopted Node (the instance is gone): its processes die with it."""
        with self.lock:
            self.adopting.discard(name)
            n = self.nodes.get(name)
            if n is None or not n.adopted:
                return
            del self.nodes[name]
            victims = [w for w in self.workers.values() if w.node == name]
        for w in victims:
            w.kill_now()
        with contextlib.suppress(ApiError):
            self.api.request("DELETE", f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}")
        log.info("node %s deleted by its owner (%d pods killed)", name, len(victims))

    def _node_loop(self) -> None:
        """List+watch the Nodes to adopt (like the pod loop)."""
        path = "/api/v1/nodes"
        rv = None
        delay = 0.2
        while not self.stop.is_set():
            try:
                if rv is None:
                    lst = self.api.get(path, labelSelector=self.adopt_selector)
                    rv = lst["metadata"]["resourceVersion"]
                    live = {n["metadata"]["name"] for n in lst["items"]}
                    for n in lst["items"]:
                        self._on_foreign_node("ADDED", n)
                    with self.lock:
                        gone = [k for k, n in self.nodes.items() if n.adopted and k not in live]
                    for k in gone:
                        self._release(k)
                for ev in self.api.watch(path, {"labelSelector": self.adopt_selector, "resourceVersion": rv,
                                                "timeoutSeconds": 240}, self.stop):
                    obj = ev.get("object") or {}
                    if ev["type"] == "ERROR":
                        if obj.get("code") == 410:
                            rv = None
                        raise ApiError(obj.get("code", 500), obj, "watch nodes")
                    rv = obj["metadata"]["resourceVersion"]
                    if ev["type"] != "BOOKMARK":
                        self._on_foreign_node(ev["type"], obj)
                delay = 0.2
            except Exception as e:
                if isinstance(e, ApiError) and e.status == 410:
                    rv = None
                elif not self.stop.is_set():
                    log.warning("node watch: %s", e)
                self.stop.wait(delay)
                delay = min(delay * 2, 5.0)

    # -- pods --------------------------------------------------------------------------------
    def register_proc(self, w: PodWorker, run: ContainerRun, proc: subprocess.Popen) -> None:
        """Index the container by its process id (the process is passed: run.proc may be reset later)."""
        with self.lock:
            self.procs[proc.pid] = (w, run)

    def unregister_proc(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.pop(proc.pid, None)

    def worker_done(self, w: PodWorker) -> None:
        with self.lock:
            if self.workers.get(w.uid) is w:
                # keep a tombstone so later events for the same (terminal) pod do not restart it
                self.finished[w.uid] = time.monotonic()
                del self.workers[w.uid]

    def on_pod(self, etype: str, pod: dict) -> None:
        meta = pod["metadata"]
        node = pod["spec"].get("nodeName")
        uid = meta["uid"]
        with self.lock:
            if node not in self.nodes or self.nodes[node].lost:
                return
            w = self.workers.get(uid)
            if etype == "DELETED":
                self.finished.pop(uid, None)
                if w is not None:
                    w.kill_now()
                return
            if w is not None:
                w.update(pod)
                return
            phase = (pod.get("status") or {}).get("phase")
            terminal = phase in ("Succeeded", "Failed")
            if terminal or uid in self.finished:
                if meta.get("deletionTimestamp") and meta.get("deletionGracePeriodSeconds") != 0:
                    threading.Thread(target=self._confirm_delete, args=(pod,), daemon=True).start()
                return
            w = PodWorker(self, pod)
            self.workers[uid] = w
            if meta.get("deletionTimestamp"):
                w.update(pod)
            w.start()

    def _confirm_delete(self, pod: dict) -> None:
        """A terminal pod being deleted: the kubelet confirms the deletion with a zero grace period."""
        meta = pod["metadata"]
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                             {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                              "preconditions": {"uid": meta["uid"]}})
        except ApiError as e:
            if e.status not in (404, 409):
                log.warning("delete of %s/%s: %s", meta["namespace"], meta["name"], e)

    def _pod_loop(self) -> None:
        path = "/api/v1/pods"
        selector = "spec.nodeName!="
        rv = None
        delay = 0.2
        while not self.stop.is_set():
            try:
                if rv is None:
                    lst = self.api.get(path, fieldSelector=selector)
                    rv = lst["metadata"]["resourceVersion"]
                    live = set()
                    for p in lst["items"]:
                        live.add(p["metadata"]["uid"])
                        self.on_pod("ADDED", p)
                    with self.lock:
                        gone = [w for uid, w in self.workers.items() if uid not in live]
                    for w in gone:
                        w.kill_now()
                    self.watch_ready.set()
                for ev in self.api.watch(path, {"fieldSelector": selector, "resourceVersion": rv,
                                                "timeoutSeconds": 240}, self.stop):
                    obj = ev.get("object") or {}
                    if ev["type"] == "ERROR":
                        if obj.get("code") == 410:
                            rv = None
                        raise ApiError(obj.get("code", 500), obj, "watch pods")
                    rv = obj["metadata"]["resourceVersion"]
                    if ev["type"] != "BOOKMARK":
                        self.on_pod(ev["type"], obj)
                delay = 0.2
            except Exception as e:
                if isinstance(e, ApiError) and e.status == 410:
                    rv = None
                elif not self.stop.is_set():
                    log.warning("pod watch: %s", e)
                self.stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def _gc_tombstones(self) -> None:
        while not self.stop.wait(60):
            cutoff = time.monotonic() - 600
            with self.lock:
                for uid in [u for u, t in self.finished.items() if t < cutoff]:
                    del self.finished[uid]

    def evict(self, ns: str, name: str, mode: str = "api", message: str = "") -> dict:
        if mode == "api":
            return self.api.request("POST", f"/api/v1/namespaces/{ns}/pods/{name}/eviction",
                                    {"apiVersion": "policy/v1", "kind": "Eviction",
                                     "metadata": {"name": name, "namespace": ns}})
        if mode != "preempt":
            raise ValueError(f"unknown eviction mode {mode}")
        with self.lock:
            w = next((w for w in self.workers.values() if w.ns == ns and w.pod_name == name), None)
        if w is None:
            raise KeyError(f"pod {ns}/{name} does not run on this agent")
        w.request_stop("preempt", message=message or "Preempted by the pbt node agent (simulated)")
        w.done.wait(120)
        return {"status": "preempted"}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._pod_loop, name="pod-watch", daemon=True).start()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
        threading.Thread(target=self._gc_tombstones, name="tombstones", daemon=True).start()
        if not self.watch_ready.wait(60):
            raise RuntimeError("could not list pods")
        if self.adopt_selector:
            threading.Thread(target=self._node_loop, name="node-watch", daemon=True).start()

    def shutdown(self) -> None:
        self.stop.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w.kill_now()
        for w in workers:
            w.done.wait(5)


# ------------------------------------------------------------------------------------------------
# control API


def make_handler(agent: NodeAgent):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("control: " + fmt, *args)

        def _reply(self, code: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}") if n else {}

        def do_GET(self) -> None:
            if self.path == "/healthz":
                return self._reply(200, {"ok": True})
            if self.path == "/nodes":
                with agent.lock:
                    nodes = [{"name": n.name, "gpus": n.gpus, "lost": n.lost, "adopted": n.adopted}
                             for n in agent.nodes.values()]
                return self._reply(200, {"nodes": nodes})
            if self.path == "/pods":
                with agent.lock:
                    procs = [{"pod": f"{w.ns}/{w.pod_name}", "container": r.name, "pid": pid, "node": w.node}
                             for pid, (w, r) in agent.procs.items()]
                return self._reply(200, {"processes": procs})
            return self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:
            parts = [urllib.parse.unquote(p) for p in self.path.strip("/").split("/")]
            try:
                body = self._body()
                if parts == ["nodes"]:
                    n = Node(body["name"], body.get("gpus", 0), body.get("cpu", "16"), body.get("memory", "64Gi"),
                             body.get("labels"), body.get("taints"))
                    agent.add_node(n)
                    return self._reply(200, {"name": n.name})
                if len(parts) == 3 and parts[0] == "nodes" and parts[2] == "lose":
                    pods = agent.lose_node(parts[1], bool(body.get("out_of_service", True)))
                    return self._reply(200, {"killed": pods})
                if len(parts) == 4 and parts[0] == "pods" and parts[3] == "evict":
                    return self._reply(200, agent.evict(parts[1], parts[2], body.get("mode", "api"),
                                                        body.get("message", "")))
                return self._reply(404, {"error": "not found"})
            except ApiError as e:
                return self._reply(e.status, {"error": str(e), "body": e.body})
            except (KeyError, ValueError) as e:
                return self._reply(400, {"error": repr(e)})

        def do_DELETE(self) -> None:
            parts = [urllib.parse.unquote(p) for p in self.path.strip("/").split("/")]
            try:
                if len(parts) == 2 and parts[0] == "nodes":
                    return self._reply(200, {"killed": agent.remove_node(parts[1])})
                return self._reply(404, {"error": "not found"})
            except ApiError as e:
                return self._reply(e.status, {"error": str(e), "body": e.body})
            except (KeyError, ValueError) as e:
                return self._reply(400, {"error": repr(e)})

    return Handler


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    p.add_argument("--nodes", type=int, default=1, help="nodes to register at start")
    p.add_argument("--gpus", type=int, default=4, help="nvidia.com/gpu per node")
    p.add_argument("--cpu", default="16")
    p.add_argument("--memory", default="64Gi")
    p.add_argument("--name-prefix", default="pbt-node")
    p.add_argument("--root", default=None, help="directory for per-pod files (default: a temp dir)")
    p.add_argument("--control-file", default=None, help="write {port, pid, root} here when ready")
    p.add_argument("--lease-interval", type=float, default=2.0)
    p.add_argument("--pass-env", default=os.environ.get("PBT_NODEAGENT_PASS_ENV", ""),
                   help="comma-separated environment variables passed through to pod processes")
    p.add_argument("--kubelet-version", default=os.environ.get("PBT_K8S_VERSION", "v1.36.5"))
    p.add_argument("--exit-with-parent", action="store_true",
                   help="shut down (killing the pods' processes) when the parent process dies")
    p.add_argument("--adopt-selector", default=os.environ.get("PBT_ADOPT_SELECTOR", ""),
                   help="also serve Nodes created by others that match this label selector, e.g. "
                        "kwok.x-k8s.io/node=fake for Karpenter's KWOK provider")
    p.add_argument("--adopt-ready-delay", type=float, default=float(os.environ.get("PBT_ADOPT_READY_DELAY", "0")),
                   help="seconds from an adopted Node's creation until it turns Ready (simulated boot time)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s nodeagent %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    if not a.kubeconfig:
        p.error("--kubeconfig (or KUBECONFIG) is required")
    root = a.root or tempfile.mkdtemp(prefix="pbt-nodeagent-")
    agent = NodeAgent(a.kubeconfig, root, lease_interval=a.lease_interval,
                      pass_env=[x for x in a.pass_env.split(",") if x], kubelet_version=a.kubelet_version,
                      adopt_selector=a.adopt_selector, adopt_ready_delay=a.adopt_ready_delay)
    agent.start()
    for i in range(a.nodes):
        agent.add_node(Node(f"{a.name_prefix}-{i}", a.gpus, a.cpu, a.memory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(agent))
    server.daemon_threads = True
    port = server.server_address[1]

    def on_signal(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if a.exit_with_parent:
        parent = os.getppid()

        def watch_parent() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            log.warning("parent process %d went away: shutting down", parent)
            server.shutdown()

        threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    if a.control_file:
        tmp = a.control_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"port": port, "pid": os.getpid(), "root": root}, f)
        os.replace(tmp, a.control_file)
    print(f"READY http://127.0.0.1:{port}", flush=True)
    log.info("control API on 127.0.0.1:%d, pod files under %s", port, root)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        agent.shutdown()
        if a.control_file:
            with contextlib.suppress(OSError):
                os.unlink(a.control_file)
        if not a.root:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main())
