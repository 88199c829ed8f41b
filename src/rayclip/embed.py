"""Silver layer: Ray Data batch inference from the manifest to versioned Parquet embeddings.

The driver plans the work (one row per media_id not yet embedded for this model_version),
then Ray streams it: from_items(override_num_blocks) → map_batches(EmbedUDF,
compute=ActorPoolStrategy) → write_parquet into a staging folder, which is renamed into
silver/embeddings/model_version=<mv>/dt=<day>/ only when the whole write has succeeded.
Each actor loads the model once; bad images are reported to a small stats actor and skipped.

Decode overlaps encode inside each actor: Ray Data runs two calls per actor at once
(`max_concurrent_calls_per_actor=2`), and a lock lets only one of them encode, so one batch is
read, decoded and preprocessed while the previous one is in the model. (A separate decode stage of
Ray tasks was measured against this and was slower on a 2-core CPU; see the README.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import os
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import catalog, debris, faults, layout, storage
from .errors import UserError
from .model import ModelSpec, check_available, choose_precision, decode_image, load_model
from .progress import Progress, watch

CALLS_PER_ACTOR = 2  # one batch decoding while another encodes
POOL_START_TIMEOUT_S = 600  # the whole actor pool must be up before work is dispatched


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
    blocks: int = 0
    tasks: int = 0
    wall_s: float = 0.0
    images_per_s: float = 0.0
    startup_s: float = 0.0  # from the start of the run until the first batch reached a model
    steady_images_per_s: float = 0.0  # rows over wall_s - startup_s
    decode_s: float = 0.0  # read + decode + preprocess, summed over actors
    encode_s: float = 0.0  # the model's time, summed over actors
    write_s: float = 0.0  # Ray Data's Parquet write tasks, summed
    partition: str = ""
    plan: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def embedded_ids(root: Path, model_version: str) -> pa.Array:
    """media_ids already in silver for this model_version, across every dt partition."""
    files = catalog.silver_files(root, model_version)
    if not files:
        return pa.array([], pa.string())
    return pa.concat_arrays([pq.read_table(f, columns=["media_id"]).column("media_id").combine_chunks() for f in files])


def plan_work(root: Path, model_version: str, limit: int | None = None, force: bool = False) -> pa.Table:
    """(media_id, path) to embed: one row per media_id, minus those already embedded."""
    manifest = catalog.read_manifest(root, ["media_id", "path"])
    if manifest.num_rows == 0:
        raise UserError("the manifest is empty; run `rayclip ingest` first")
    # The manifest can hold a media_id several times (one row per url); its path is the same.
    unique = manifest.group_by("media_id").aggregate([("path", "min")]).rename_columns(["media_id", "path"])
    unique = unique.sort_by("media_id")
    if not force:
        unique = unique.filter(
            pc.invert(pc.is_in(unique.column("media_id"), value_set=embedded_ids(root, model_version)))
        )
    return unique.slice(0, limit) if limit is not None else unique


class RunStats:
    """Collects what the actors did (a Ray actor with no CPU, created per run)."""

    def __init__(self) -> None:
        self.rows_by_worker: Counter = Counter()  # (node_id, actor_id) -> rows embedded
        self.failures: list[tuple[str, str]] = []
        self.seconds: Counter = Counter()  # stage -> seconds, summed over actors
        self.first_encode_at = float("inf")  # wall clock (time.time) of the first batch's encode

    def record(
        self, worker: tuple[str, str], ok: int, failures: list[tuple[str, str]], seconds: dict, encode_at: float
    ) -> None:
        self.rows_by_worker[worker] += ok
        self.failures.extend(failures)
        self.seconds.update(seconds)
        self.first_encode_at = min(self.first_encode_at, encode_at)

    def summary(self) -> tuple[list, list, dict, float]:
        workers = [worker for worker, rows in self.rows_by_worker.items() if rows]
        return workers, self.failures, dict(self.seconds), self.first_encode_at

    def rows_done(self) -> int:
        return sum(self.rows_by_worker.values()) + len(self.failures)


class EmbedUDF:
    """Loads the model once per actor; turns (media_id, path) batches into silver rows.

    Ray Data calls it from CALLS_PER_ACTOR threads at once; decoding runs unlocked, encoding
    under a lock, so the model always has the next batch ready and never shares its cores. When a GPU
    encodes, the actor's CPU threads would idle, and one PIL decoder cannot feed a GPU: the batch is
    then decoded by `decode_threads` threads (Pillow and torch release the GIL while they work).
    """

    def __init__(
        self, spec: dict, data_root: str, threads: int, decode_threads: int, device: str, precision: str, stats
    ) -> None:
        import ray

        self.model = load_model(ModelSpec.from_dict(spec), device=device, threads=threads, precision=precision)
        self.decoders = ThreadPoolExecutor(decode_threads, "rayclip-decode") if decode_threads > 1 else None
        self.root = Path(data_root)
        self.stats = stats
        self.encode_lock = threading.Lock()
        context = ray.get_runtime_context()
        self.worker = (context.get_node_id(), context.get_actor_id())

    def _pixels(self, batch: pa.Table) -> tuple[list[str], object, list[tuple[str, str]]]:
        """Read, decode and preprocess a batch: (media_ids that decoded, pixel tensor, failures)."""
        rows = zip(batch.column("media_id").to_pylist(), batch.column("path").to_pylist())
        decoded = self.decoders.map(self._decode, rows) if self.decoders else map(self._decode, rows)
        pixels, ids, failures = [], [], []
        for media_id, tensor, failure in decoded:
            if failure:
                failures.append((media_id, failure))
            else:
                pixels.append(tensor)
                ids.append(media_id)
        return ids, pixels, failures

    def _decode(self, row: tuple[str, str]) -> tuple[str, object, str | None]:
        """(media_id, preprocessed pixels, None), or (media_id, None, why it failed)."""
        media_id, path = row
        try:
            return media_id, self.model.preprocess(decode_image((self.root / path).read_bytes())), None
        except FileNotFoundError:
            return media_id, None, "missing object"
        except Exception:  # a bad image must not kill the job; it is counted and skipped
            return media_id, None, "decode error"

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        ids, pixels, failures = self._pixels(batch)
        decoded = time.perf_counter()
        with self.encode_lock:
            encode_at = time.time()
            encode_started = time.perf_counter()
            vectors = (
                self.model.encode_pixels(self.model.stack(pixels))
                if pixels
                else np.zeros((0, self.model.dim), np.float32)
            )
            encode_s = time.perf_counter() - encode_started
        seconds = {"decode": decoded - started, "encode": encode_s}
        self.stats.record.remote(self.worker, len(ids), failures, seconds, encode_at)
        return silver_table(ids, vectors)


def silver_table(media_ids: list[str], vectors: np.ndarray) -> pa.Table:
    """The silver schema: media_id, embedding fixed_size_list<float32>[dim], embedded_at."""
    dim = vectors.shape[1]
    now = dt.datetime.now(dt.timezone.utc)
    return pa.table(
        {
            "media_id": pa.array(media_ids, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim),
            "embedded_at": pa.array([now] * len(media_ids), pa.timestamp("us", tz="UTC")),
        }
    )


def init_ray(dashboard: bool = False, verbose: bool = False) -> str | None:
    """Join $RAY_ADDRESS when set, else start a local cluster (with its dashboard when asked).

    Returns the cluster's dashboard URL, None when it runs without one. Ray Data's own progress
    bars and the workers' logs reach the terminal only when verbose: progress is ours to draw.
    """
    import ray
    from ray._private.worker import get_dashboard_url

    if not ray.is_initialized():
        # Set when the cluster is started or joined: a later init_ray() (embed's own) keeps it.
        ray.data.DataContext.get_current().enable_progress_bars = verbose
        if os.environ.get("RAY_ADDRESS"):
            ray.init(log_to_driver=verbose)
        else:
            # Loopback: the dashboard has no authentication of its own.
            ray.init(include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=verbose)
    url = get_dashboard_url()
    return (url if "://" in url else f"http://{url}") if url else None


def default_actors(resources: dict, gpus_per_actor: float = 0.0) -> int:
    """One actor per GPU asked for; on CPUs one actor per two cores (each with two torch threads),
    since one model using two cores beats two models contending for them (and loads once)."""
    if gpus_per_actor:
        return max(1, int(float(resources.get("GPU", 0)) // gpus_per_actor))
    return max(1, int(float(resources.get("CPU", 1))) // 2)


def _actor_resources(resources: dict, actors: int, gpus_per_actor: float) -> tuple[float, int]:
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


def _tasks(stats_text: str, operator: str) -> int:
    """Tasks the operator executed, from Ray Data's stats text."""
    match = re.search(rf"Operator \d+ [^\n]*{re.escape(operator)}[^\n]*: (\d+) tasks executed", stats_text)
    return int(match.group(1)) if match else 0


def _remote_wall_s(stats_text: str, operator: str) -> float:
    """The operator's remote wall time summed over its tasks, from Ray Data's stats text."""
    section = re.search(rf"Operator \d+ [^\n]*{re.escape(operator)}.*?(?=\nOperator \d|\Z)", stats_text, re.S)
    total = re.search(r"Remote wall time: .*?([\d.]+)(ms|s|us) total", section.group(0)) if section else None
    if not total:
        return 0.0
    return float(total.group(1)) / {"s": 1, "ms": 1e3, "us": 1e6}[total.group(2)]


def _commit(staging: Path, partition: Path, run_id: str) -> list[Path]:
    """Make the run's staged files visible in the partition all at once, by one rename.

    Ray writes several files; they are streamed (row group by row group) into one file inside the
    locked staging folder, which is then renamed to dt=<day>/<run_id>.parquet. A new and an existing
    partition take the same path, so a kill at any point leaves silver as it was before the run or
    with the whole run in it, never part of it; the staging folder is debris the next commit sweeps.
    """
    files = sorted(staging.glob("*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in files)
    if not rows:
        return []
    merged = staging / f"{run_id}.parquet"
    with pq.ParquetWriter(merged, pq.read_schema(files[0])) as writer:
        for f in files:
            source = pq.ParquetFile(f)
            for group in range(source.num_row_groups):
                writer.write_table(source.read_row_group(group))
            faults.point("embed.commit")  # part of the run merged, nothing of it visible yet
    partition.mkdir(parents=True, exist_ok=True)
    target = partition / merged.name
    os.replace(merged, target)
    debris.sweep(staging.parent, ("*",))  # staging folders of killed runs (a live run's stays locked)
    return [target]


def embed(
    root: Path,
    spec: ModelSpec,
    actors: int | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    day: str | None = None,
    blocks: int | None = None,
    force: bool = False,
    gpus_per_actor: float = 0.0,
    precision: str = "auto",
    progress: Progress | None = None,
) -> EmbedReport:
    """Embed what the manifest holds and silver lacks for this model; returns the run's signals.

    `actors` defaults to default_actors() of the cluster; `precision` is chosen once, here, so
    every actor of a run computes at the same one (model.choose_precision says what auto picks).
    progress(done, total) counts rows embedded or failed, as the actors report them.
    """
    import ray

    started = time.monotonic()
    started_at = time.time()  # the actors report wall-clock times; startup_s is measured against this
    device = "cuda" if gpus_per_actor else "cpu"
    report = EmbedReport(
        run_id=layout.new_run_id(), model_version=spec.model_version, dt=layout.check_day(day or layout.today())
    )
    report.precision, report.device = choose_precision(precision, device), device
    spec = dataclasses.replace(spec, precision=report.precision)
    work = plan_work(root, spec.model_version, limit, force)
    report.rows_planned = work.num_rows
    report.actors, report.batch_size = actors or 0, batch_size
    if work.num_rows == 0:
        return _save(root, report)
    check_available(spec)  # a missing model fails here, once, not in every actor

    init_ray()
    report.cluster = ray.get_runtime_context().gcs_address
    resources = ray.cluster_resources()
    report.cluster_cpus = float(resources.get("CPU", 0))
    report.actors = actors = actors or default_actors(resources, gpus_per_actor)
    report.cpus_per_actor, report.torch_threads = _actor_resources(resources, actors, gpus_per_actor)
    report.decode_threads = report.torch_threads if gpus_per_actor else 1
    report.blocks = blocks or actors * 8
    stats = ray.remote(num_cpus=0)(RunStats).remote()
    ds = ray.data.from_items(work.to_pylist(), override_num_blocks=min(report.blocks, work.num_rows))
    ds = ds.map_batches(
        EmbedUDF,
        batch_format="pyarrow",
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
            "spec": spec.to_dict(),
            "data_root": str(root),
            "threads": report.torch_threads,
            "decode_threads": report.decode_threads,
            "device": device,
            "precision": report.precision,
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
    # The staging folder stays locked while this run lives: a concurrent run's sweep leaves it alone.
    with storage.working(layout.silver_staging(root, report.run_id)) as staging:
        with watch(lambda: ray.get(stats.rows_done.remote()), work.num_rows, progress):
            ds.write_parquet(str(staging), ray_remote_args={"num_cpus": 0.1})
        stats_text = ds.stats()
        report.tasks = _tasks(stats_text, "MapBatches(EmbedUDF)")
        report.write_s = round(_remote_wall_s(stats_text, "Write"), 3)
        storage.write_json_atomic(layout.silver_model_file(root, spec.model_version), spec.to_dict())
        files = _commit(staging, partition, report.run_id)

    workers, failures, seconds, first_encode_at = ray.get(stats.summary.remote())
    report.rows_embedded = sum(pq.read_metadata(f).num_rows for f in files)
    report.actors_used = len({actor for _, actor in workers})
    report.nodes_used = len({node for node, _ in workers})
    report.rows_failed = len(failures)
    report.failed = dict(Counter(reason for _, reason in failures).most_common())
    report.failed_ids = [{"media_id": m, "reason": r} for m, r in failures[:1000]]
    report.wall_s = round(time.monotonic() - started, 3)
    report.images_per_s = round(report.rows_embedded / report.wall_s, 2) if report.wall_s else 0.0
    report.startup_s = round(min(max(first_encode_at - started_at, 0.0), report.wall_s), 3)
    steady_s = report.wall_s - report.startup_s
    report.steady_images_per_s = round(report.rows_embedded / steady_s, 2) if steady_s > 0 else 0.0
    report.decode_s = round(seconds.get("decode", 0.0), 3)
    report.encode_s = round(seconds.get("encode", 0.0), 3)
    report.partition = str(partition.relative_to(root))
    return _save(root, report)


def _save(root: Path, report: EmbedReport) -> EmbedReport:
    storage.write_json_atomic(layout.embed_runs_dir(root) / f"{report.run_id}.json", report.to_dict())
    return report
