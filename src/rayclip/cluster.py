"""The one place rayclip starts or joins Ray, with the environment its processes need.

Ray's own usage statistics stay off (RAY_USAGE_STATS_ENABLED=0, unless the user set it), and the
workers' S3 clients get rayclip's retries (storage.retry_env), whether Ray starts here or is joined
at $RAY_ADDRESS (where the workers do not inherit this process's environment: the job's runtime_env
carries it).
"""

from __future__ import annotations

import os

from .store import storage

USAGE_STATS_ENV = "RAY_USAGE_STATS_ENABLED"


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """What every Ray worker of a rayclip job finds in its environment."""
    return {USAGE_STATS_ENV: os.environ.get(USAGE_STATS_ENV, "0"), **storage.retry_env(), **(extra or {})}


def init(extra_env: dict[str, str] | None = None, **options) -> None:
    """ray.init(**options) with worker_env(extra_env) as the job's environment; a no-op when this
    process already joined a cluster (whoever started it chose)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault(USAGE_STATS_ENV, "0")  # read by ray.init itself, and inherited by a local cluster
    ray.init(runtime_env={"env_vars": worker_env(extra_env)}, **options)
