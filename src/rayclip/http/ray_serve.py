"""`rayclip serve --ray`: the same HTTP app through Ray Serve, a build kept in shards spread over
deployments.

One Serve application per shard (`rayclip-shard-NNNNN`, no HTTP route), each replica mapping its
shard from a local file (knn.load_shard: in place from a local root, from this machine's cache of
an object store), `replicas` copies of each; and the ingress application (`rayclip`, route /):
create_app's FastAPI app, built in its replica, whose Searcher encodes each query once and asks the
shards through their deployment handles (knn.ShardedIndex merges their top k). Filters, collapse,
caption search, query arithmetic, the API key, load shedding and clip-retrieval's routes are the
app's own, so they behave as under `rayclip serve`.

A shard replica serves whichever build the ingress names (it loads a newly published build's shard
on its first query); a build with more shards than were deployed at start needs a restart.
A build that is not kept in shards is searched in the ingress itself.

Each application must run within --deploy-timeout: Serve itself waits for ever for a replica the
cluster cannot place; deploy takes Serve down again and says, in one line, what Serve reported.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from ..errors import UserError
from ..options import ServeOptions
from ..query import knn
from ..store import catalog, storage
from ..store.catalog import BuildInfo

INGRESS_APP = "rayclip"
SHARD_APP = "rayclip-shard-{:05d}"
SHARD_DEPLOYMENT = "Shard"
# Fractions of a CPU: Serve reserves them per replica; FAISS and the encoder use what the machine has.
SHARD_CPUS = 0.25
INGRESS_CPUS = 0.5
STATUS_POLL_S = 0.5  # how often deploy asks Serve whether the applications run
# How long a replica may drain its requests (each a few milliseconds) when Serve stops. Serve's own
# default, 20 s, is also how long its shutdown waits for a replica that was never placed.
DRAIN_S = 3


class ShardReplica:
    """One shard of the served model_version's builds, mapped (a Serve replica's state)."""

    def __init__(self, data_dir: str, model_version: str, shard: int):
        self.root, self.model_version, self.shard = storage.location(data_dir), model_version, shard
        self._held: tuple[str, knn.LocalIndex] | None = None
        self._lock = threading.Lock()

    def _index(self, build_id: str) -> knn.LocalIndex:
        with self._lock:  # one load per build, however many queries arrive at once
            if self._held is None or self._held[0] != build_id:
                self._held = (build_id, knn.load_shard(self.root, self.model_version, build_id, self.shard))
            return self._held[1]

    def probe(self, build_id: str, queries: np.ndarray, k: int, allowed: np.ndarray | None, effort: int) -> knn.Probe:
        return self._index(build_id).probe(queries, k, allowed, effort)

    def vectors(self, build_id: str, ids: np.ndarray) -> np.ndarray:
        return self._index(build_id).vectors(ids)


@dataclasses.dataclass(frozen=True)
class RemoteShard:
    """A shard as the ingress's ShardedIndex asks it: its deployment's handle, for one build."""

    handle: object
    build_id: str

    def probe(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, effort: int) -> knn.Probe:
        return self.handle.probe.remote(self.build_id, queries, k, allowed, effort).result()

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return self.handle.vectors.remote(self.build_id, ids).result()


def remote_shard(info: BuildInfo, shard: int) -> RemoteShard:
    """The handle of shard `shard`'s deployment (create_app's `remote_shards`, in the ingress replica)."""
    from ray import serve

    try:
        handle = serve.get_deployment_handle(SHARD_DEPLOYMENT, app_name=SHARD_APP.format(shard))
    except Exception:  # noqa: BLE001 - Serve raises its own kinds for an unknown app
        raise UserError(f"build {info.build_id} has more shards than were deployed; restart `serve --ray`") from None
    return RemoteShard(handle, info.build_id)


class Ingress:
    """The ingress replica: create_app's app, its shards reached through their deployments."""

    def __init__(self, data_dir: str, app_options: dict):
        self.data_dir, self.app_options = data_dir, app_options

    def __serve_build_asgi_app__(self):  # noqa: PLW3201 - Serve's hook, named by Serve
        from .app import create_app

        return create_app(self.data_dir, remote_shards=remote_shard, **self.app_options)


def shard_count(root, model_version: str | None) -> tuple[str, int]:
    """The model_version served and how many shards its CURRENT build is kept in (0: not in shards)."""
    model_version = catalog.pick_indexed(root, model_version)
    info = catalog.build_info(root, model_version, catalog.current_build(root, model_version))
    return model_version, len(info.shards or []) if info.form == "shards" else 0


def deploy(
    data_dir: storage.Location | str | None = None,
    model_version: str | None = ServeOptions.model_version,
    *,
    host: str = ServeOptions.host,
    port: int = ServeOptions.port,
    replicas: int = ServeOptions.replicas,
    deploy_timeout: float = ServeOptions.deploy_timeout,
    **app_options,
) -> int:
    """Start (or join) Ray, start Serve's proxy on host:port, deploy the CURRENT build's shards and the
    ingress; returns the shard count. `app_options` are create_app's. Serve keeps running until
    `shutdown()`. One clear line when Ray Serve is not installed, no cluster can be reached, an
    application fails to deploy or they are not all running within `deploy_timeout` seconds (Serve would
    wait for ever for a replica no node has room for); Serve is taken down again then."""
    try:
        from ray import serve
    except ImportError:
        raise UserError("--ray needs Ray Serve: pip install 'rayclip[serve]'") from None
    from .. import cluster

    root = storage.resolved(data_dir)
    model_version, shards = shard_count(root, model_version)
    try:
        cluster.start_reachable()
    except cluster.UnreachableError as err:
        raise UserError(f"--ray: {err}") from None
    serve.start(http_options={"host": host, "port": port})
    shard = serve.deployment(
        ShardReplica,
        name=SHARD_DEPLOYMENT,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": SHARD_CPUS},
        graceful_shutdown_timeout_s=DRAIN_S,
    )
    ingress = serve.deployment(
        serve.ingress()(Ingress), ray_actor_options={"num_cpus": INGRESS_CPUS}, graceful_shutdown_timeout_s=DRAIN_S
    )
    shard_apps = [
        serve.RunTarget(shard.bind(storage.uri(root), model_version, k), name=SHARD_APP.format(k), route_prefix=None)
        for k in range(shards)
    ]
    served = app_options | {"model_version": model_version}
    ingress_app = serve.RunTarget(ingress.bind(storage.uri(root), served), name=INGRESS_APP, route_prefix="/")
    deadline = time.monotonic() + deploy_timeout
    try:
        for targets in (shard_apps, [ingress_app]):  # the shards run before the ingress asks for their handles
            serve.run_many(targets, wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
            _wait_running([target.name for target in targets], deadline, deploy_timeout)
    except BaseException:  # a Ctrl-C too: nothing half-deployed stays
        serve.shutdown()
        raise
    return shards


def _wait_running(names: list[str], deadline: float, timeout_s: float) -> None:
    """Until Serve reports each application named RUNNING; one line when one failed or time ran out."""
    from ray import serve

    while True:
        applications = serve.status().applications
        status = {name: applications[name].status if name in applications else None for name in names}
        if failed := [name for name, state in status.items() if state == "DEPLOY_FAILED"]:
            said = applications[failed[0]].message.strip().splitlines() or ["no message"]
            raise UserError(f"--ray: Ray Serve could not deploy {failed[0]}: {said[0]} {said[-1]}".strip())
        if all(state == "RUNNING" for state in status.values()):
            return
        if time.monotonic() > deadline:
            pending = next(name for name, state in status.items() if state != "RUNNING")
            why = _why_not_running(applications.get(pending))
            raise UserError(f"--ray: Ray Serve did not start {pending} within {timeout_s:g} s ({why})")
        time.sleep(STATUS_POLL_S)


def _why_not_running(app) -> str:
    """What each replica asks, what the cluster has free, and what Serve says of the application
    (its status as serve.status() gave it; None when Serve has not registered it yet)."""
    import ray

    free = ray.available_resources().get("CPU", 0)
    asks = f"a shard replica asks {SHARD_CPUS:g} CPU, the ingress {INGRESS_CPUS:g}; {free:g} CPU free in the cluster"
    said = [d.message.split(" Use `ray status`")[0] for d in app.deployments.values() if d.message] if app else []
    return "; ".join([asks, *said])


def shutdown() -> None:
    """Take the applications and Serve down (Ray itself stays, for whoever started it)."""
    from ray import serve

    serve.shutdown()
