"""The embed run's record (silver/runs/<run_id>.json) and how its start-up is cut into phases."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EmbedReport:
    run_id: str
    model_version: str
    dt: str
    rows_planned: int = 0
    rows_embedded: int = 0
    rows_failed: int = 0
    failed: dict[str, int] = dataclasses.field(default_factory=dict)
    failed_ids: list[dict] = dataclasses.field(default_factory=list)  # the first 1000: media_id, reason
    cluster: str = ""  # the GCS address of the Ray cluster that ran the job
    cluster_cpus: float = 0.0
    actors: int = 0
    actors_used: int = 0  # actors that embedded at least one row
    nodes_used: int = 0
    cpus_per_actor: float = 0.0
    torch_threads: int = 0
    decode_threads: int = 0  # images an actor decodes at once: its CPU threads when a GPU encodes
    batch_size: int = 0
    precision: str = ""  # what the model computed in: fp32, bf16 or fp16
    device: str = ""  # where the actors ran the model: cpu, or cuda with --gpus-per-actor
    decode: str = ""  # where images were decoded: actor, tasks or gpu (choose_decode)
    runtime: str = ""  # what ran the image tower: torch or openvino (--runtime)
    converted_from_cache: bool = False  # openvino: the converted tower came from this machine's cache
    blocks: int = 0
    tasks: int = 0
    wall_s: float = 0.0
    images_per_s: float = 0.0
    started_at: float = 0.0  # wall clock (time.time) when the run started
    startup_s: float = 0.0  # from the start of the run until the first batch reached a model
    # startup_s phase by phase along its critical path (STARTUP_PHASES; they add up to startup_s)
    # (and, for a whole command, OUTSIDE_PHASES: outside wall_s and startup_s)
    startup_breakdown: dict[str, float] = dataclasses.field(default_factory=dict)
    steady_images_per_s: float = 0.0  # rows over wall_s - startup_s
    decode_s: float = 0.0  # read + decode + preprocess, summed over actors
    encode_s: float = 0.0  # the model's time, summed over actors
    write_s: float = 0.0  # Ray Data's Parquet write tasks, summed
    captions_embedded: int = 0  # new captions of the images, encoded by the same actors, committed
    caption_encode_s: float = 0.0  # the text tower's time in the actors, summed (not in encode_s)
    partition: str = ""
    plan: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def physical_plan(self) -> str:
        """The last of the plans ds.explain() prints (logical, optimized, physical, optimized physical)."""
        marker = "-------- Physical Plan (Optimized) --------"
        return marker + self.plan.split(marker, 1)[1] if marker in self.plan else self.plan


# Outside the run's own clock, when a whole command is measured (pipeline.embed_command): process
# start until the run's clock starts, and from its stop until the command returns (Ray shut down).
OUTSIDE_PHASES = ("before_run", "after_run")
# Start-up's phases, each named by the event that ends it: the work planned, Ray up, the model built
# (in the driver, while Ray starts), the job submitted (blocks split, the actor pool asked for), an
# actor's process up with Python, Ray and rayclip loaded, torch and open_clip imported, the model
# assembled from the shared parts, its first batch encoding.
STARTUP_PHASES = ("plan", "ray_start", "model_build", "submit", "actor_process", "imports", "model_load", "first_batch")


def startup_breakdown(started_at: float, marks: dict[str, float]) -> dict[str, float]:
    """Start-up's timeline cut at the wall-clock times (time.time) the phases ended, in the order they
    did: each phase gets the seconds since the one before ended, so they add up to the last mark
    minus started_at (a phase that overlapped an earlier one gets only what it added)."""
    breakdown, reached = {}, started_at
    for phase, at in sorted(((p, marks[p]) for p in STARTUP_PHASES if p in marks), key=lambda mark: mark[1]):
        breakdown[phase] = round(max(0.0, at - reached), 3)
        reached = max(reached, at)
    return breakdown
