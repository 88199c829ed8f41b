"""`rayclip embed` as a chain of two stages: the image embeddings, then the caption stage, each with
its own run record and log; as a whole command, Ray shut down after and the record completed."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..options import EmbedOptions
from ..store import layout
from ..store.storage import Location
from .runner import QUIET, Hooks, run_stage

if TYPE_CHECKING:
    from ..model import ModelSpec
    from ..stages.captions import CaptionReport
    from ..stages.embed import EmbedReport


def embed_silver(
    root: Location,
    spec: ModelSpec,
    no_captions: bool = EmbedOptions.no_captions,
    *,
    hooks: Hooks = QUIET,
    dashboard: bool = False,
    **options,
) -> tuple[EmbedReport, CaptionReport | None]:
    """`rayclip embed`: the image embeddings (embed.embed with these options: unless `no_captions`,
    the same actors encode the new captions of the images they embed), then, unless `no_captions`,
    the caption stage (captions.embed_captions, same model_version, partition and actors): the
    captions left (of images embedded before) and the clip_scores of the embedded images. Each is a
    stage with its own run record and log (silver/runs/, silver/caption_runs/)."""
    from ..stages import captions, embed

    embedded = run_stage(
        embed.embed, root, spec, hooks=hooks, runs_dir=layout.embed_runs_dir(root), progress={"progress": "embed"},
        ray=True, dashboard=dashboard, no_captions=no_captions, **options,
    )  # fmt: skip
    if no_captions:
        return embedded, None
    # The caption stage runs on CPUs: the precision asked for, resolved for a CPU (a GPU run's fp16
    # would not suit it), with the image run's actors, batch size and --force; image_run: with --force,
    # the captions the image run's actors just encoded are not encoded a second time.
    shared = {name: options[name] for name in ("actors", "batch_size", "force", "precision") if name in options}
    captioned = run_stage(
        captions.embed_captions, root, embed.filed_as(spec, options.get("save_as")), dt=embedded.dt,
        image_run=embedded.run_id, hooks=hooks, runs_dir=layout.caption_runs_dir(root),
        progress={"progress": "captions"}, **shared,
    )  # fmt: skip
    return embedded, captioned


def embed_command(
    root: Location,
    spec: ModelSpec,
    no_captions: bool = EmbedOptions.no_captions,
    *,
    hooks: Hooks = QUIET,
    dashboard: bool = False,
    **options,
) -> tuple[EmbedReport, CaptionReport | None]:
    """`rayclip embed` as a whole command: embed_silver, then Ray shut down if this call started or
    joined it (the commits are written: nothing needs it), and the image run's record completed with
    what its own clock leaves out: startup_breakdown's before_run (this process's start until the
    run's clock started) and after_run (the run's clock stopped until now: captions, Ray's shut-down)."""
    from ..stages import embed

    joined_before = _ray_connected()  # a caller's session (a test's, a notebook's) stays up
    embedded, captioned = embed_silver(root, spec, no_captions, hooks=hooks, dashboard=dashboard, **options)
    if not joined_before and _ray_connected():
        import ray

        ray.shutdown()
    process_started_at = _process_started_at()
    if process_started_at is not None:
        embedded.startup_breakdown["before_run"] = round(embedded.started_at - process_started_at, 3)
    embedded.startup_breakdown["after_run"] = round(time.time() - embedded.started_at - embedded.wall_s, 3)
    embed.save_record(root, embedded)
    return embedded, captioned


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # never imported: never connected
    return ray is not None and ray.is_initialized()


def _process_started_at() -> float | None:
    """When this process started (wall clock), from Linux's /proc; None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
