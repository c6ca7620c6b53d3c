"""The operator's only contact with the API server: read a training's world, apply a Plan.

Creates are create-if-absent (409 means an earlier pass, perhaps before a crash, already did it).
Writes go in the order that keeps the write-ahead promise: finished segments into member status
first, then the decided next segments into member specs, then the Jobs that run them.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .builders import LABEL_TRAINING
from .crds import GROUP, VERSION
from .reconcile import Plan, world_selectors

log = logging.getLogger("pbt_operator")
TRAININGS = "populationtrainings"
MEMBERS = "populationmembers"


def load_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


class Api:
    def __init__(self) -> None:
        self.custom = client.CustomObjectsApi()
        self.batch = client.BatchV1Api()
        self.core = client.CoreV1Api()
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pbt-api")

    def training(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, TRAININGS, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def world(self, ns: str, name: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]], list[dict[str, Any]],
                                                list[dict[str, Any]]]:
        """The training (None once deleted), its members, and the Jobs and pods of their current
        segments. Reads in two rounds of parallel requests (they sit on the path from a pod finishing
        to the next Job being created): the training and its members, then the Jobs and pods those
        members' current segments need (`reconcile.world_selectors`), rather than every Job and pod
        the training ever had. Jobs and pods come back as plain dicts (the generic path)."""
        sel = f"{LABEL_TRAINING}={name}"
        f_training: Future[Any] = self.pool.submit(self.training, ns, name)
        f_members: Future[Any] = self.pool.submit(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, ns, MEMBERS, label_selector=sel)
        training, members = f_training.result(), f_members.result()["items"]
        if training is None:
            return None, [], [], []
        job_sel, pod_sel = world_selectors(name, members)
        if job_sel is None or pod_sel is None:  # no member has a segment yet: no Job to look at
            return training, members, [], []
        f_jobs: Future[Any] = self.pool.submit(self.custom.list_namespaced_custom_object, "batch", "v1", ns, "jobs",
                                               label_selector=job_sel)
        f_pods: Future[Any] = self.pool.submit(self.core_list_pods, ns, pod_sel)
        return training, members, f_jobs.result()["items"], f_pods.result()["items"]

    def core_list_pods(self, ns: str, sel: str) -> dict[str, Any]:
        # Raw JSON: building the client's model objects for every pod and serialising them back was
        # most of a reconcile pass's CPU with a few hundred pods.
        resp: Any = self.core.list_namespaced_pod(ns, label_selector=sel, _preload_content=False)
        return cast(dict[str, Any], json.loads(resp.data))

    def apply(self, ns: str, name: str, p: Plan) -> None:
        """The plan's writes, phase by phase in the write-ahead order. Within a phase, writes that
        concern different members are independent and go out together, except the member specs:
        they are written one by one in the plan's order, so that a crash leaves a prefix of them,
        which is what lets a rebuilt synchronous engine decide the rest exactly as before (each
        decision in a batch sees the earlier ones as pending)."""
        self._together([lambda body=m: self._create(lambda: self.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, MEMBERS, body)) for m in p.create_members])
        self._together([lambda mname=mname, st=st: self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, MEMBERS, mname, {"status": st}) for mname, st in p.member_statuses.items()])
        for mname, seg in p.member_specs.items():
            self.custom.patch_namespaced_custom_object(GROUP, VERSION, ns, MEMBERS, mname, {"spec": {"segment": seg}})
        # Jobs go through the generic path: the user's pod template goes to the API server as written
        # (ints for quantities and ports are valid there), not through the client's models. The
        # training's status is a report, ordered after nothing but the specs: it goes with them.
        writes: list[Any] = [lambda body=job: self._create(lambda: self.custom.create_namespaced_custom_object(
            "batch", "v1", ns, "jobs", body)) for job in p.create_jobs]
        if p.status and p.status_changed:
            writes.append(lambda: self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, ns, TRAININGS, name, {"status": p.status}))
        self._together(writes)

    def _together(self, calls: list[Any]) -> None:
        """Run independent writes concurrently; wait for all, then raise the first failure."""
        if len(calls) == 1:
            calls[0]()
            return
        errors: list[BaseException] = []
        for f in [self.pool.submit(c) for c in calls]:
            try:
                f.result()
            except Exception as e:  # every write must finish before the pass fails
                errors.append(e)
        if errors:
            raise errors[0]

    @staticmethod
    def _create(fn: Any) -> None:
        try:
            fn()
        except ApiException as e:
            if e.status != 409:
                raise
