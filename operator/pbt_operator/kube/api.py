"""The operator's only contact with the API server: read a training's world, apply a Plan.

Creates are create-if-absent: a 409 means an earlier pass, perhaps before a crash, already did it, but
only when the object that exists is ours (same owner UID); otherwise it is a `ForeignChild`. Children
are read through their owners' UIDs (`ownership`), never by label alone.
Writes go in the order that keeps the write-ahead promise: finished segments into member status
first, then the decided next segments into member specs, then the Jobs that run them.
"""

from __future__ import annotations

import json
import logging
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from . import metrics
from .apierrors import ApiError, classify
from .builders import LABEL_TRAINING
from .crds import GROUP, VERSION
from .membercache import MemberCache
from .mergepatch import merge_patch
from .ownership import ForeignChild, names, owner_uids, split_owned, uid_of
from .reconcile import Plan, world_selectors

log = logging.getLogger("pbt_operator")
TRAININGS = "populationtrainings"
MEMBERS = "populationmembers"


def load_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


class World(NamedTuple):
    """What one pass reads. `leftovers` maps a kind to the names of objects that carry this training's
    label but belong to another owner; it is only looked at while the training has no member yet."""

    training: dict[str, Any] | None
    members: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    pods: list[dict[str, Any]]
    leftovers: dict[str, list[str]]


def request_resource(url: str) -> str:
    """The resource (and subresource) a request's URL names, for counting: ".../namespaces/NS/
    populationmembers/NAME/status" -> "populationmembers/status", ".../namespaces/NS/jobs" -> "jobs"."""
    parts = [p for p in urllib.parse.urlsplit(str(url)).path.split("/") if p]
    if "namespaces" in parts and len(parts) > parts.index("namespaces") + 2:
        rest = parts[parts.index("namespaces") + 2:]
        return rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")
    return parts[-1] if parts else ""


def _counted(api_client: Any) -> Any:
    """Every request through this client counts in pbt_api_requests_total (API load per segment), by
    verb and resource."""
    call = api_client.call_api

    def call_api(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        metrics.API_REQUESTS.labels(str(method).upper(), request_resource(url)).inc()
        return call(method, url, *args, **kwargs)

    api_client.call_api = call_api
    return api_client


class Api:
    def __init__(self, on_member_deleted: Callable[[str, str], None] | None = None) -> None:
        """`on_member_deleted(namespace, training)`: called from the member watch's thread when a
        member is deleted (the handlers wake that training's pass, which recreates it)."""
        shared = _counted(client.ApiClient())
        self.custom = client.CustomObjectsApi(shared)
        self.batch = client.BatchV1Api(shared)
        self.core = client.CoreV1Api(shared)
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pbt-api")
        # The member watches have their own client: a watch holds its connection for minutes, and its
        # requests are not the passes' (pbt_api_requests_total).
        watcher = client.CustomObjectsApi(client.ApiClient())
        self.members = MemberCache(lambda ns, **kw: watcher.list_namespaced_custom_object(
            GROUP, VERSION, ns, MEMBERS, **kw), on_member_deleted)

    def crds(self, names: list[str]) -> dict[str, dict[str, Any] | None]:
        """The CustomResourceDefinitions of these names (None: not installed). A 403 is raised (the
        caller decides: the namespaced chart may not grant this read)."""
        ext = client.ApiextensionsV1Api(self.custom.api_client)
        out: dict[str, dict[str, Any] | None] = {}
        for name in names:
            try:
                resp: Any = ext.read_custom_resource_definition(name, _preload_content=False)
                out[name] = cast(dict[str, Any], json.loads(resp.data))
            except ApiException as e:
                if e.status != 404:
                    raise
                out[name] = None
        return out

    def training(self, ns: str, name: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, TRAININGS, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def world(self, ns: str, name: str) -> World:
        """The training (None once deleted), its members, and the Jobs and pods of their current
        segments. The training is read from the API server; the members come from memory
        (`membercache`: a watch per namespace, started with a fresh LIST, with our own writes' answers
        written through), so a pass costs what its running segments cost, not its population; then
        one round of parallel requests for the Jobs and pods those members' current segments need
        (`reconcile.world_selectors`), rather than every Job and pod the training ever had. Jobs and
        pods come back as plain dicts (the generic path).

        Only children owned by this very training (by UID, down the chain member -> Job -> pod) are
        returned: a previous training of the same name may still have members and Jobs with our
        labels and names. While the training has no member of its own, those are its `leftovers`,
        read from the API server itself (a new training's first passes: nothing may be missed there)."""
        sel = f"{LABEL_TRAINING}={name}"
        f_training: Future[Any] = self.pool.submit(self.training, ns, name)
        cached = self.members.members(ns, name)
        training = f_training.result()
        if training is None:
            return World(None, [], [], [], {})
        members, foreign = split_owned(cached if cached is not None else self.list_members(ns, name),
                                       [uid_of(training)])
        if not members and cached is not None:
            members, foreign = split_owned(self.list_members(ns, name), [uid_of(training)])
        if not members:
            # Before creating anything: no Job of an earlier training of this name may be left, or
            # the new members would meet its Jobs under the same names.
            # Pods too: a deleted Job's pods outlive it by their grace period, and would still write
            # checkpoints under the names the new training is about to use.
            f_jobs_left: Future[Any] = self.pool.submit(self.custom.list_namespaced_custom_object, "batch", "v1", ns,
                                                        "jobs", label_selector=sel, limit=20)
            pods_left = self.core_list_pods(ns, sel, limit=20)["items"]
            return World(training, [], [], [], {"PopulationMember": names(foreign),
                                                "Job": names(f_jobs_left.result()["items"]), "Pod": names(pods_left)})
        job_sel, pod_sel = world_selectors(name, members)
        if job_sel is None or pod_sel is None:  # no member has a segment yet: no Job to look at
            return World(training, cast(list[dict[str, Any]], members), [], [], {})
        f_jobs: Future[Any] = self.pool.submit(self.custom.list_namespaced_custom_object, "batch", "v1", ns, "jobs",
                                               label_selector=job_sel)
        f_pods: Future[Any] = self.pool.submit(self.core_list_pods, ns, pod_sel)
        jobs, _ = split_owned(f_jobs.result()["items"], [uid_of(m) for m in members])
        pods, _ = split_owned(f_pods.result()["items"], [uid_of(j) for j in jobs])
        return World(training, cast(list[dict[str, Any]], members), cast(list[dict[str, Any]], jobs),
                     cast(list[dict[str, Any]], pods), {})

    def list_members(self, ns: str, name: str) -> list[dict[str, Any]]:
        """The training's members as the API server holds them (a LIST: a consistent read)."""
        listed: Any = self.custom.list_namespaced_custom_object(GROUP, VERSION, ns, MEMBERS,
                                                                label_selector=f"{LABEL_TRAINING}={name}")
        return cast(list[dict[str, Any]], listed["items"])

    def events(self, ns: str, selectors: list[str]) -> list[dict[str, Any]]:
        """Events the pass needs to explain a waiting segment (reconcile.events_wanted: the Job
        controller's FailedCreate, a node autoscaler's Nominated or TriggeredScaleUp), read only while
        some segment waits that way, filtered by reason on the server."""
        futures = [self.pool.submit(self._list_events, ns, sel) for sel in selectors]
        return [e for f in futures for e in f.result()]

    def _list_events(self, ns: str, field_selector: str) -> list[dict[str, Any]]:
        resp: Any = self.core.list_namespaced_event(ns, field_selector=field_selector, _preload_content=False)
        return cast(list[dict[str, Any]], json.loads(resp.data).get("items") or [])

    def core_list_pods(self, ns: str, sel: str, limit: int | None = None) -> dict[str, Any]:
        # Raw JSON: building the client's model objects for every pod and serialising them back was
        # most of a reconcile pass's CPU with a few hundred pods.
        kw: dict[str, Any] = {"limit": limit} if limit else {}
        resp: Any = self.core.list_namespaced_pod(ns, label_selector=sel, _preload_content=False, **kw)
        return cast(dict[str, Any], json.loads(resp.data))

    def apply(self, ns: str, name: str, p: Plan) -> list[tuple[dict[str, Any], ApiError]]:
        """The plan's writes, phase by phase in the write-ahead order. Within a phase, writes that
        concern different members are independent and go out together, except the member specs of a
        synchronous training: they are written one by one in the plan's order, so that a crash leaves
        a prefix of them, which is what lets a rebuilt synchronous engine decide the rest exactly as
        before (each decision in a batch sees the earlier ones as pending).

        Returns the Jobs the API server refused (`apierrors`: invalid, forbidden, over quota) with the
        reason; every other failure raises once all writes of its phase are done."""
        self._together([lambda body=m: self.members.offer(ns, self._create(
            "PopulationMember", body, lambda: self.custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, MEMBERS, body),
            lambda: self.custom.get_namespaced_custom_object(GROUP, VERSION, ns, MEMBERS, body["metadata"]["name"])))
            for m in p.create_members])
        def noted(mname: str, obj: Any) -> None:
            """The member's resourceVersion after our write: the engine cache is valid while members stay
            exactly as we left them (reconcile.EngineCache). Written through to the member cache: the next
            pass may start before the watch delivers this write, and must not read an older member."""
            self.members.offer(ns, obj)
            rv = ((obj or {}).get("metadata") or {}).get("resourceVersion") if isinstance(obj, dict) else None
            if rv is not None:
                p.versions[mname] = str(rv)

        # Merge patches against the statuses as read: keys a new status no longer has are deleted
        # (kube/mergepatch.py); conditions are not the pass's to delete.
        self._together([lambda mname=mname, st=st: noted(mname, self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, MEMBERS, mname, {"status": merge_patch(p.prior_members.get(mname) or {}, st,
                                                                       keep=("conditions",))}))
            for mname, st in p.member_statuses.items()])
        specs = [lambda mname=mname, seg=seg: noted(mname, self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, ns, MEMBERS, mname, {"spec": {"segment": seg}})) for mname, seg in p.member_specs.items()]
        if p.spec is not None and p.spec.mode == "asynchronous":
            # No batch to replay exactly: each member is decided on its own when its segment ends, so
            # the specs go out together. One by one, they were most of a pass at population 1,000
            # (tens of sequential round trips on a busy API server: benchmarks/operator_scale.py).
            self._together(specs)
        else:
            for write in specs:
                write()
        # Jobs go through the generic path: the user's pod template goes to the API server as written
        # (ints for quantities and ports are valid there), not through the client's models. The
        # training's status is a report, ordered after nothing but the specs: it goes with them.
        refused: list[tuple[dict[str, Any], ApiError]] = []

        def create_job(body: dict[str, Any]) -> None:
            try:
                self._create("Job", body,
                             lambda: self.custom.create_namespaced_custom_object("batch", "v1", ns, "jobs", body),
                             lambda: self.custom.get_namespaced_custom_object("batch", "v1", ns, "jobs",
                                                                              body["metadata"]["name"]))
            except ApiException as e:
                err = classify(e)
                if not err.refused:
                    raise
                refused.append((body, err))

        writes: list[Any] = [lambda body=job: create_job(body) for job in p.create_jobs]
        writes += [lambda jname=jname, body=body: self._ignore_gone(lambda: self.custom.patch_namespaced_custom_object(
            "batch", "v1", ns, "jobs", jname, body)) for jname, body in p.patch_jobs.items()]
        if p.status and p.status_changed:
            writes.append(lambda: self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, ns, TRAININGS, name, {"status": merge_patch(p.prior_status, p.status, keep=("kopf",))}))
        self._together(writes)
        # Last: stopping a segment Job. Its segment's fate (recorded failure, finished training, or a
        # member spec that reruns it) is already written, so a crash before this leaves a Job the next
        # pass stops again, never a lost segment. Only the Job the pass saw (uid
        # precondition), its pods with it (background propagation).
        self._together([lambda jname=jname, uid=uid: self._ignore_gone(lambda: self.batch.delete_namespaced_job(
            jname, ns, body=client.V1DeleteOptions(propagation_policy="Background",
                                                   preconditions=client.V1Preconditions(uid=uid) if uid else None)))
            for jname, uid in p.delete_jobs])
        return refused

    def patch_training_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, TRAININGS, name, {"status": status})

    def patch_member_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.members.offer(ns, self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, MEMBERS, name, {"status": status}))

    def dry_run(self, ns: str, obj: dict[str, Any]) -> None:
        """Create `obj` (a Job or a Pod) as a server-side dry run: validation and every admission step,
        nothing stored. Raises the API server's refusal."""
        if obj["kind"] == "Pod":
            # The generic path, as for Jobs: the dict goes out as written (the typed client would refuse
            # an int GPU limit, which the API server accepts), errors come back as ApiException.
            api = self.core.api_client
            request = api.param_serialize(
                method="POST", resource_path="/api/v1/namespaces/{namespace}/pods", path_params={"namespace": ns},
                query_params=[("dryRun", "All")], body=obj, auth_settings=["BearerToken"],
                header_params={"Content-Type": "application/json", "Accept": "application/json"})
            response = api.call_api(*request)
            response.read()
            api.response_deserialize(response_data=response, response_types_map={
                "200": "object", "201": "object", "202": "object"})
        else:
            self.custom.create_namespaced_custom_object("batch", "v1", ns, "jobs", obj, dry_run="All")

    def _together(self, calls: list[Any]) -> None:
        """Run independent writes concurrently; wait for all, then raise the first failure."""
        if not calls:
            return
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
    def _ignore_gone(fn: Any) -> None:
        """A Job that is already gone, or was replaced by another of the same name (409 on the uid
        precondition), needs nothing more."""
        try:
            fn()
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    @staticmethod
    def _create(kind: str, body: dict[str, Any], create: Any, get: Any) -> Any:
        """Create-if-absent. A 409 is "already done" only when the existing object has the owner the new
        one would have; anything else of that name is someone else's and raises ForeignChild. Returns
        the object as the API server holds it (None when it went away in between)."""
        try:
            return create()
        except ApiException as e:
            if e.status != 409:
                raise
            try:
                existing = get()
            except ApiException as e2:
                if e2.status == 404:  # gone in between (being deleted): the next pass creates it
                    return None
                raise
            if not owner_uids(existing) & owner_uids(body):
                raise ForeignChild(kind, body["metadata"]["name"], owner_uids(existing)) from None
            return existing
