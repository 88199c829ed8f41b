"""The one place rayclip starts or joins Ray, with the environment its processes need.

Every caller (ingest's ray distributor, embed, captions, the distributed index build, serve --ray)
calls `start`: it joins $RAY_ADDRESS when set, else starts a new local cluster whose node address is
127.0.0.1 (nothing listens beyond loopback). Ray's own usage statistics stay off
(RAY_USAGE_STATS_ENABLED=0, unless the user set it), and the workers' S3 clients get rayclip's
retries (storage.retry_env), whether Ray starts here or is joined at $RAY_ADDRESS (where the workers
do not inherit this process's environment: the job's runtime_env carries it). serve --ray calls
`start_reachable`, which refuses at once, in one line, a $RAY_ADDRESS where nothing answers.
"""

from __future__ import annotations

import os
import socket

from . import faults
from .errors import UserError
from .store import storage

USAGE_STATS_ENV = "RAY_USAGE_STATS_ENABLED"
LOOPBACK = "127.0.0.1"
REACH_TIMEOUT_S = 5


class UnreachableError(UserError):
    """No Ray cluster answers where start() would join or start one (`where`: the address, or why)."""

    def __init__(self, where: str):
        super().__init__(f"no Ray cluster reachable {where}")


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What every Ray worker of a rayclip job finds in its environment: also the fault point the
    command was started with, so that a kill named for a step in a task fires on a joined cluster."""
    kill_at = {faults.KILL_AT_ENV: os.environ[faults.KILL_AT_ENV]} if faults.KILL_AT_ENV in os.environ else {}
    return {USAGE_STATS_ENV: os.environ.get(USAGE_STATS_ENV, "0"), **storage.retry_env(), **kill_at, **(extra or {})}


def joins() -> bool:
    """Whether start() joins an existing cluster ($RAY_ADDRESS) rather than starting one here."""
    return bool(os.environ.get("RAY_ADDRESS"))


def keep_loopback() -> None:
    """Keep loopback as this machine's address in this process's Ray: ray.init rewrites 127.0.0.1,
    both as a new node's address (its services would then listen on every interface) and as the
    address to join (ray-project/ray#59110: a cluster listening on loopback only never answers).
    Ray's single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) leaves loopback alone; its flag
    is read when ray is imported, so it is set on the module."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def start(dashboard: bool = False, verbose: bool = False, extra_env: dict[str, str] | None = None) -> str | None:
    """Join $RAY_ADDRESS when set, else start a local cluster (with its dashboard when asked); a no-op
    when this process already started or joined one (whoever did chose).

    Returns the cluster's dashboard URL, None when it runs without one. Ray Data's own progress bars
    and the workers' logs reach the terminal only when verbose: progress is ours to draw.
    """
    import ray
    import ray.data
    from ray._private.worker import get_dashboard_url

    if not ray.is_initialized():
        ray.data.DataContext.get_current().enable_progress_bars = verbose
        os.environ.setdefault(USAGE_STATS_ENV, "0")  # read by ray.init itself, and inherited by a local cluster
        if joins():
            options = {}
            if os.environ["RAY_ADDRESS"].rpartition(":")[0].strip("[]") in ("localhost", LOOPBACK, "::1"):
                keep_loopback()
        else:
            keep_loopback()
            # address="local": a new cluster, as documented, not the last one `ray start` left on this
            # machine (ray.init's own default joins that, and waits forever if it has died).
            # Loopback: the dashboard has no authentication of its own.
            options = {
                "address": "local",
                "_node_ip_address": LOOPBACK,
                "include_dashboard": dashboard,
                "dashboard_host": LOOPBACK,
            }
        ray.init(runtime_env={"env_vars": worker_env(extra_env)}, log_to_driver=verbose, **options)
    # A UDF's own exception, not Ray Data's UserCodeException around it: the wrapper's chain is lost
    # when it is pickled to the driver, and with it the StoreError whose one line the user gets
    # (storage.refusals_surfaced finds it as the RayTaskError's cause).
    ray.data.DataContext.get_current().raise_original_map_exception = True
    url = get_dashboard_url()
    return (url if "://" in url else f"http://{url}") if url else None


def start_reachable(dashboard: bool = False, verbose: bool = False) -> str | None:
    """start(), refused with one line (UnreachableError) when no cluster answers: at once when
    $RAY_ADDRESS names a host:port (or ray://host:port) where nothing listens, since ray.init would wait
    for it for minutes; else when ray.init gives up."""
    address = os.environ.get("RAY_ADDRESS", "")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():  # else no address (a local cluster starts), or one Ray resolves ("auto")
        try:
            socket.create_connection((host, int(port)), timeout=REACH_TIMEOUT_S).close()
        except OSError as exc:
            raise UnreachableError(f"at $RAY_ADDRESS {address} ({exc.strerror or exc})") from None
    try:
        return start(dashboard, verbose)
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        raise UnreachableError(f"({str(exc).splitlines()[0]})") from None
