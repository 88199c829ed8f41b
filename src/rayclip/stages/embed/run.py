"""One embed run: plan, Ray Data job, commit records, run record (the module's `embed`)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ... import cluster
from ...errors import UserError
from ...model import (
    ModelParts,
    ModelSpec,
    Pixels,
    check_available,
    check_names,
    choose_precision,
    image_tower,
    import_openvino,
    load_model,
)
from ...options import RUNTIMES, EmbedOptions
from ...progress import Progress, watch
from ...store import catalog, debris, layout, silver, storage
from .plan import plan_in_ray, plan_sources, planned_in_driver
from .report import EmbedReport, startup_breakdown
from .sizing import WRITE_TASK_CPUS, actor_resources, choose_decode, decode_task_cpus, default_actors
from .stats_text import remote_wall_s, tasks_executed
from .worker import CALLS_PER_ACTOR, Decoder, EmbedUDF, RunStats, decode_block

POOL_START_TIMEOUT_S = 600  # the whole actor pool must be up before work is dispatched
RECORDS_WAIT_S = 30  # at most, for the stats actor to receive the last batches' records
END_POOL_S = 30  # at most, for the stats actor to end the run's actors
WARM_WORKERS = 2  # task workers started ahead of the writes (a 2-core run's writes ran on two)


class _RunFiles:
    """Names the files Ray writes for a run (layout.silver_file_stem); picklable for the write tasks."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return layout.silver_file_stem(self.run_id, write_uuid, task_index)


def filed_as(spec: ModelSpec, save_as: str | None = EmbedOptions.save_as) -> ModelSpec:
    """The spec whose vectors are filed under model_version `save_as` (--save-as), when one is given."""
    return dataclasses.replace(spec, version=layout.slug(save_as)) if save_as else spec


def _shareable_model(spec: ModelSpec, runtime: str) -> tuple[ModelParts, Pixels, bool]:
    """The model built once (loaded or initialised, at spec.precision) as parts for the actors, and its
    Pixels; with runtime openvino the parts carry its image tower converted, and whether the
    conversion came from this machine's cache."""
    clip = load_model(spec, precision=spec.precision)
    tower, cached = image_tower(spec) if runtime == "openvino" else (None, False)
    return clip.parts(tower), clip.pixels, cached


def embed(
    root: storage.Location | str,
    spec: ModelSpec,
    actors: int | None = EmbedOptions.actors,
    batch_size: int = EmbedOptions.batch_size,
    limit: int | None = EmbedOptions.limit,
    dt: str | None = EmbedOptions.dt,
    blocks: int | None = EmbedOptions.blocks,
    force: bool = EmbedOptions.force,
    gpus_per_actor: float = EmbedOptions.gpus_per_actor,
    precision: str = EmbedOptions.precision,
    save_as: str | None = EmbedOptions.save_as,
    decode: str = EmbedOptions.decode,
    no_captions: bool = EmbedOptions.no_captions,
    runtime: str = EmbedOptions.runtime,
    *,
    progress: Progress | None = None,
    start_ray: Callable[[], object] = cluster.start,
) -> EmbedReport:
    """Embed what the manifest holds and silver lacks for this model; returns the run's signals.

    `actors` defaults to default_actors() of the cluster; `precision` is chosen once, here, so
    every actor of a run computes at the same one (model.choose_precision says what auto picks).
    `runtime` openvino runs the image tower on OpenVINO (model.openvino; CPU actors only).
    The vectors go to partition `dt` under filed_as(spec, save_as).
    progress(done, total) counts rows embedded or failed, as the actors report them.

    Start-up, as short as it goes: a plan small enough for the driver is made before Ray starts (and
    nothing to do imports neither torch nor Ray: `start_ray`, which starts or joins Ray, is called only
    when there is work); the model is built once, here, while Ray starts, and shared with
    every actor through Ray's object store (ClipModel.parts), so an actor only imports and assembles it.
    """
    root, spec = storage.resolved(root), filed_as(spec, save_as)
    started = time.monotonic()
    started_at = time.time()  # the actors report wall-clock times; startup_s is measured against this
    device = "cuda" if gpus_per_actor else "cpu"
    report = EmbedReport(
        run_id=layout.new_run_id(),
        model_version=spec.model_version,
        dt=layout.check_day(dt or layout.today()),
        started_at=started_at,
        decode=choose_decode(decode, gpus_per_actor),
    )
    report.precision, report.device = choose_precision(precision, device), device
    spec = dataclasses.replace(spec, precision=report.precision)
    report.actors, report.batch_size, report.runtime = actors or 0, batch_size, _checked_runtime(runtime, device)

    manifest, silver_files = plan_sources(root, spec.model_version, force)  # an empty manifest fails before Ray starts
    captions_for = None if no_captions else spec.model_version
    planned = planned_in_driver(root, manifest, silver_files, limit, captions_for, force)
    marks = {"plan": time.time()}
    if planned is not None and planned.num_rows == 0:  # answered from the catalog: no torch, no Ray
        if not _recorded_as(root, spec):
            check_names(spec)
        return save_record(root, report)
    check_names(spec)  # a bad name or a missing model fails here, once, not in every actor
    check_available(spec)
    import ray

    with ThreadPoolExecutor(1, "rayclip-model") as builder:
        building = builder.submit(_shareable_model, spec, runtime)  # while Ray starts
        start_ray()
        marks["ray_start"] = time.time()
        if planned is None:
            with storage.refusals_surfaced(root):  # the store giving up in a Ray task: its one line
                work = plan_in_ray(manifest, silver_files, limit)
            report.rows_planned = work.count()
            marks["plan"] = time.time()
        else:
            report.rows_planned = planned.num_rows
        if report.rows_planned == 0:
            return save_record(root, report)
        parts, pixels, report.converted_from_cache = building.result()
        parts = ray.put(parts)  # the driver's copy of the weights goes; the object store's is shared
        marks["model_build"] = time.time()
    report.cluster = ray.get_runtime_context().gcs_address
    resources = ray.cluster_resources()
    report.cluster_cpus = float(resources.get("CPU", 0))
    report.actors = actors = actors or default_actors(resources, gpus_per_actor)
    report.cpus_per_actor, report.torch_threads = actor_resources(resources, actors, gpus_per_actor)
    report.decode_threads = report.torch_threads if gpus_per_actor and report.decode != "tasks" else 1
    report.blocks = blocks or max(actors * 8, int(report.cluster_cpus) * 2 if report.decode == "tasks" else 0)
    report.blocks = min(report.blocks, report.rows_planned)
    stats = ray.remote(num_cpus=0)(RunStats).remote()
    captions = planned is not None and captions_for is not None  # the plan gave its rows their captions
    if planned is not None:  # split here, and described here: from_arrow would ask Ray tasks for each block's
        # metadata, seconds of worker start-up on a fresh cluster; from_blocks reads it in this process
        bounds = [planned.num_rows * i // report.blocks for i in range(report.blocks + 1)]
        work = ray.data.from_blocks([planned.slice(a, b - a) for a, b in zip(bounds, bounds[1:])])
    else:  # split before the actor pool exists: its actors may hold the CPUs that split tasks would need
        work = work.repartition(report.blocks).materialize()
    if report.decode == "tasks":
        decoder = Decoder(storage.uri(root), pixels)
        work = work.map_batches(
            decode_block,
            batch_format="numpy",
            batch_size=None,
            num_cpus=decode_task_cpus(resources, actors, report.cpus_per_actor),
            fn_kwargs={"decoder": decoder, "stats": stats},
        )
    ds = work.map_batches(
        EmbedUDF,
        batch_format="numpy",
        batch_size=batch_size,
        # An actor holds no more batches than it works on at once (one decoding, one encoding):
        # a deeper queue on the first actor up would starve the rest of the pool on small jobs.
        compute=ray.data.ActorPoolStrategy(
            size=actors,
            max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
            max_tasks_in_flight_per_actor=CALLS_PER_ACTOR,
            enable_true_multi_threading=True,
        ),
        num_cpus=report.cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        fn_constructor_kwargs={
            "parts": [parts],
            "model": spec.name,
            "data_root": storage.uri(root),
            "threads": report.torch_threads,
            "decode_threads": report.decode_threads,
            "decode": report.decode,
            "device": device,
            "stats": stats,
        },
    )
    # Ray Data starts pool actors asynchronously by default: with little work the first actor up can
    # take all of it. Waiting for the whole pool makes every actor work (and a pool the cluster cannot
    # place fails after POOL_START_TIMEOUT_S); $RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S, when set, wins.
    if ds.context.wait_for_min_actors_s <= 0:
        ds.context.wait_for_min_actors_s = POOL_START_TIMEOUT_S
    plan = io.StringIO()
    with contextlib.redirect_stdout(plan):
        ds.explain()
    report.plan = plan.getvalue().strip()

    partition = layout.silver_partition(root, spec.model_version, report.dt)
    filesystem, partition_path = storage.arrow(partition)
    marks["submit"] = time.time()
    # The work folder stays held while this run lives: until its commit record exists, a sweep by a
    # concurrent run or `rayclip gc` leaves the run's files alone.
    with storage.working(layout.silver_work_dir(root, report.run_id)):
        with (
            watch(lambda: ray.get(stats.rows_done.remote()), report.rows_planned, progress),
            storage.refusals_surfaced(root),
        ):
            _warm_up()
            try:
                ds.write_parquet(
                    partition_path,
                    filesystem=filesystem,
                    filename_provider=_RunFiles(report.run_id),
                    ray_remote_args={"num_cpus": WRITE_TASK_CPUS},
                )
                _all_recorded(stats, report.rows_planned)  # while the actors live: their records are on the way
            finally:
                _end_pool(stats)
        stats_text = ds.stats()
        report.tasks = tasks_executed(stats_text, "MapBatches(EmbedUDF)")
        report.write_s = round(remote_wall_s(stats_text, "Write"), 3)
        silver.record_model(root, spec.model_version, spec.to_dict())
        committed = silver.commit(root, spec.model_version, layout.EMBEDDINGS, report.dt, report.run_id, "embed")
        if captions:  # after the images: a caption vector is only read for an embedded image
            ray.get(stats.write_captions.remote(storage.uri(root), spec.model_version, report.dt, report.run_id))
            captioned = silver.commit(root, spec.model_version, layout.CAPTIONS, report.dt, report.run_id, "embed")
            report.captions_embedded = captioned["rows"] if captioned else 0
    debris.sweep(root, (debris.SILVER_WORK,))  # files and work folders of killed runs

    workers, failures, seconds, actor_marks = ray.get(stats.summary.remote())
    report.rows_embedded = committed["rows"] if committed else 0
    report.actors_used = len({actor for _, actor in workers})
    report.nodes_used = len({node for node, _ in workers})
    report.rows_failed = len(failures)
    report.failed = dict(Counter(reason for _, reason in failures).most_common())
    report.failed_ids = [{"media_id": m, "reason": r} for m, r in failures[:1000]]
    report.wall_s = round(time.monotonic() - started, 3)
    report.images_per_s = round(report.rows_embedded / report.wall_s, 2) if report.wall_s else 0.0
    report.startup_breakdown = startup_breakdown(started_at, marks | actor_marks)
    report.startup_s = round(min(sum(report.startup_breakdown.values()), report.wall_s), 3)
    steady_s = report.wall_s - report.startup_s
    report.steady_images_per_s = round(report.rows_embedded / steady_s, 2) if steady_s > 0 else 0.0
    report.decode_s = round(seconds.get("decode", 0.0), 3)
    report.encode_s = round(seconds.get("encode", 0.0), 3)
    report.caption_encode_s = round(seconds.get("captions", 0.0), 3)
    report.partition = str(partition.relative_to(root))
    return save_record(root, report)


def _all_recorded(stats, rows: int) -> None:
    """Wait until the stats actor has a record of each of the `rows` planned. The write ends once
    the actors have returned their batches, but the records they sent just before (from another
    caller than this driver: Ray keeps no order between the two) may still be on their way; a
    batch's caption rows come with its record, so then the stats actor holds those too."""
    import ray

    deadline = time.monotonic() + RECORDS_WAIT_S
    while ray.get(stats.rows_done.remote()) < rows and time.monotonic() < deadline:
        time.sleep(0.02)


def _warm_up() -> list:
    """Start now, while the pool's actors import torch (one core each), the processes the run would
    otherwise start once the pool encodes, beside the encoder (about 1.5 s of CPU each; the first
    writes wait for theirs): Ray Data's own actors, which it creates on first use (its stats actor,
    its autoscaling coordinator), and task workers of this job with the write's modules loaded.
    A head start only: the run never waits for it (the tasks' refs, returned, are dropped), and a Ray
    Data without these helpers just loses it."""
    import ray

    with contextlib.suppress(Exception):
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.data._internal.stats import get_or_create_stats_actor

        get_or_create_stats_actor()
        get_or_create_autoscaling_coordinator()
    load = ray.remote(num_cpus=0, max_retries=0)(_load_write_modules)
    return [load.remote() for _ in range(WARM_WORKERS)]


def _load_write_modules() -> None:
    """Nothing, in a task worker that loads this module to run it: what a write task loads (_RunFiles,
    the store, Parquet's writer)."""


def _end_pool(stats) -> None:
    """Done or failed, the run's embed actors end now, their CPUs free for the next job (RunStats.end_actors
    says why). At most END_POOL_S: when the stats actor cannot answer (its node lost), the caller gets
    the run's own outcome, not that failure."""
    import ray

    with contextlib.suppress(ray.exceptions.RayError):
        ray.get(stats.end_actors.remote(), timeout=END_POOL_S)


def _checked_runtime(runtime: str, device: str) -> str:
    """The runtime asked for, when this run can use it: openvino installed, and CPU actors."""
    if runtime not in RUNTIMES:
        raise UserError(f"unknown --runtime {runtime!r}; pick one of {', '.join(RUNTIMES)}")
    if runtime == "openvino":
        if device != "cpu":
            raise UserError("--runtime openvino runs on CPUs: leave out --gpus-per-actor")
        import_openvino()
    return runtime


def _recorded_as(root: storage.Location, spec: ModelSpec) -> bool:
    """Whether silver's record of the model_version names this very model (its names were checked
    when it was embedded, so a run with nothing to do need not import open_clip to check them again)."""
    recorded = catalog.recorded_model(root, spec.model_version)
    return recorded is not None and all(
        recorded.get(key) == getattr(spec, key) for key in ("name", "pretrained", "checkpoint_sha256")
    )


def save_record(root: storage.Location, report: EmbedReport) -> EmbedReport:
    """The run's record (silver/runs/<run_id>.json), written whole each time."""
    catalog.write_run_record(layout.embed_runs_dir(root), report)
    return report
