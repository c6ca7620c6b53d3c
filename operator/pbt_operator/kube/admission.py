"""What is checked when a training is created, before any member or Job exists.

The CRD schema (OpenAPI + CEL) refuses what it can see at `kubectl apply`. It cannot see inside the
pod template (kept as written, so unknown to CEL), and it cannot know what the cluster's admission
(ResourceQuota, LimitRange, Pod Security, webhooks) will say about the pods. So on its first pass the
operator builds the first segment's Job and its pod exactly as it would run them and sends both to the
API server as a server-side dry run: nothing is created, and any refusal comes back at once with the
API server's message and field path, instead of 30-second retries in the operator's log.

Pure here: the checks on the spec that need no API server, and the objects to dry-run.
"""

from __future__ import annotations

import copy
import posixpath
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlparse

from ..core.engine import Engine
from ..spec import TrainingSpec
from .builders import build_job

# The API server's own pattern for resource quantities ("500m", "1Gi", "2"). A value that does not match
# fails the whole Job at decoding, with a message that names neither the field nor the value.
QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$")
MAX_NAME = 40  # <name>-m000-s00000-a0 must stay a 63-byte label value (the Job name is a label on its pods)


def cluster_problems(name: str, spec: TrainingSpec) -> list[str]:
    """Spec problems that only exist on a cluster, each naming the field (the schema refuses most of
    them already; this catches objects created before it did, and file:// storage, whose check needs
    the pod template)."""
    out: list[str] = []
    if len(name) > MAX_NAME:
        out.append(f"metadata.name: must be at most {MAX_NAME} characters on a cluster, so that Job names "
                   f"(NAME-m000-s00000-a0) stay within 63 (got {len(name)})")
    out += quantity_problems(spec.template or {})
    uri = spec.storage.uri or ""
    if uri.startswith("mem://"):
        out.append("spec.storage.uri: mem:// keeps checkpoints in the memory of `pbt run`; on a cluster use "
                   "s3://BUCKET/PREFIX (or file:// on a volume mounted in spec.template)")
    elif uri.startswith("file://"):
        path = posixpath.normpath(unquote(urlparse(uri).path) or "/")
        mounts = _mount_paths(spec.template or {})
        if not any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts):
            out.append(f"spec.storage.uri: {uri} is a path inside each segment pod: mount a shared volume there "
                       "(a ReadWriteMany PersistentVolumeClaim) with a volumeMount in spec.template's first "
                       f"container whose mountPath contains {path} (mounted: {', '.join(mounts) or 'none'}), "
                       "or use s3://BUCKET/PREFIX")
    return out


def quantity_problems(template: Mapping[str, Any]) -> list[str]:
    """Resource requests and limits that are not quantities, each with its field path (the API server
    only says "quantities must match the regular expression ..." for the whole Job)."""
    out: list[str] = []
    pod = template.get("spec")
    if not isinstance(pod, Mapping):
        return out
    for group in ("initContainers", "containers"):
        for i, c in enumerate(pod.get(group) or []):
            res = c.get("resources") if isinstance(c, Mapping) else None
            for kind in ("requests", "limits"):
                values = res.get(kind) if isinstance(res, Mapping) else None
                for name, v in (values or {}).items() if isinstance(values, Mapping) else ():
                    if isinstance(v, bool) or not QUANTITY.match(str(v)):
                        out.append(f"spec.template.spec.{group}[{i}].resources.{kind}[{name}]: {v!r} is not a "
                                   "quantity (e.g. 500m, 2, 1Gi)")
    return out


def _mount_paths(template: Mapping[str, Any]) -> list[str]:
    containers = ((template.get("spec") or {}).get("containers") or [{}])
    first = containers[0] if containers and isinstance(containers[0], Mapping) else {}
    return sorted(posixpath.normpath(str(m.get("mountPath"))) for m in first.get("volumeMounts") or []
                  if isinstance(m, Mapping) and m.get("mountPath"))


def probe_job(training: Mapping[str, Any], spec: TrainingSpec, root: str) -> dict[str, Any]:
    """The first member's first segment Job, exactly as it will be created, owned by the training (its
    member does not exist yet); for a dry run."""
    first = Engine(spec).start()[0]
    return build_job(training, training, first, root, [], spec.template or {}, spec.storage.credentials_secret,
                     spec.segment, queue_name=spec.queue_name, job_labels=spec.job_labels,
                     job_annotations=spec.job_annotations)


def probe_pod(job: Mapping[str, Any]) -> dict[str, Any]:
    """The pod the Job controller would make from `job` (for a dry run: quota, LimitRange, Pod Security
    and webhooks judge pods, not Jobs)."""
    tmpl = copy.deepcopy(dict(job["spec"]["template"]))
    meta = dict(tmpl.get("metadata") or {})
    meta["name"] = f"{job['metadata']['name']}-probe"
    meta["namespace"] = job["metadata"]["namespace"]
    meta["labels"] = {**(meta.get("labels") or {}), "batch.kubernetes.io/job-name": job["metadata"]["name"]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tmpl.get("spec") or {}}


__all__ = ["MAX_NAME", "cluster_problems", "probe_job", "probe_pod", "quantity_problems"]
