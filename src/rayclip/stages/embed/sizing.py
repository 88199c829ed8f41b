"""How big a run's pieces are: actors, their CPUs and threads, where images are decoded, what a
decode task asks for."""

from __future__ import annotations

from ...errors import UserError
from ...options import DECODES, EmbedOptions

WRITE_TASK_CPUS = 0.1  # what a Parquet write task asks for: it mostly waits on the store


def default_actors(resources: dict, gpus_per_actor: float = 0.0) -> int:
    """One actor per GPU asked for; on CPUs one actor per two cores (each with two torch threads),
    since one model using two cores beats two models contending for them (and loads once)."""
    if gpus_per_actor:
        return max(1, int(float(resources.get("GPU", 0)) // gpus_per_actor))
    return max(1, int(float(resources.get("CPU", 1))) // 2)


def actor_resources(resources: dict, actors: int, gpus_per_actor: float) -> tuple[float, int]:
    """CPUs per actor and its torch threads: leave a quarter of the CPUs for the write tasks.

    Asking for more than the cluster has would leave actors pending forever, so it is refused.
    """
    cpus = float(resources.get("CPU", 1))
    gpus = float(resources.get("GPU", 0))
    if gpus_per_actor * actors > gpus:
        raise UserError(
            f"{actors} actors x {gpus_per_actor} GPU need {gpus_per_actor * actors} GPUs; the cluster has {gpus}"
        )
    per_actor = round(min(1.0, cpus * 0.75 / actors), 3) if not gpus_per_actor else 1.0
    threads = max(1, int(cpus // actors))
    return per_actor, threads


def choose_decode(decode: str = EmbedOptions.decode, gpus_per_actor: float = EmbedOptions.gpus_per_actor) -> str:
    """Where images are decoded: `auto` → "tasks" (Ray Data CPU tasks over the CPUs the actors leave)
    for GPU actors, "actor" (inside the actor, overlapped with its encode) on CPUs, where bench_embed
    measured it faster; "gpu" needs GPU actors (it decodes JPEGs on theirs)."""
    if decode not in DECODES:
        raise UserError(f"unknown --decode {decode!r}; pick one of {', '.join(DECODES)}")
    if decode == "gpu" and not gpus_per_actor:
        raise UserError("--decode gpu decodes JPEGs on the actors' GPUs: give --gpus-per-actor too (or --decode auto)")
    if decode == "auto":
        return "tasks" if gpus_per_actor else "actor"
    return decode


def decode_task_cpus(resources: dict, actors: int, cpus_per_actor: float) -> float:
    """CPUs a decode task asks for: a whole one where the actors leave several (a GPU node), else a
    share of what they leave, two tasks beside the write tasks."""
    free = float(resources.get("CPU", 1)) - actors * cpus_per_actor
    return 1.0 if free >= 2 else round(max((free - WRITE_TASK_CPUS) / 2, 0.05), 3)
