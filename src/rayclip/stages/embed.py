"""Silver layer: Ray Data batch inference from the manifest to versioned Parquet embeddings.

Ray Data plans the work (one row per media_id of the manifest not yet embedded for this
model_version: read_parquet of the manifest and of silver's ids, one sort-based aggregation by media_id)
and streams it: repartition(blocks) → map_batches(EmbedUDF, compute=ActorPoolStrategy) →
write_parquet into silver/embeddings/model_version=<mv>/dt=<day>/ on the data root's own
filesystem, local or an object store. The driver holds block references, never the rows.
The run's files are silver data only once its commit record, written last, names them.
Each actor loads the model once, reads the image bytes through storage and reports bad images to a
small stats actor, which are skipped.

Decode overlaps encode inside each actor: Ray Data runs two calls per actor at once
(`max_concurrent_calls_per_actor=2`), and a lock lets only one of them encode, so one batch is
read, decoded and preprocessed while the previous one is in the model. (A separate decode stage of
Ray tasks was measured against this and was slower on a 2-core CPU; see the README.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .. import cluster
from ..errors import UserError
from ..images import decode_batch, decode_image
from ..model import (
    ClipModel,
    ModelParts,
    ModelSpec,
    Pixels,
    check_available,
    check_names,
    choose_precision,
    import_model_libraries,
    load_model,
)
from ..options import DECODES, EmbedOptions
from ..progress import Progress, watch
from ..store import catalog, debris, layout, silver, storage

# In an actor: when its worker process had Python, Ray and this module loaded (the actor's own start).
IMPORTED_AT = time.time()
CALLS_PER_ACTOR = 2  # one batch decoding while another encodes
WRITE_TASK_CPUS = 0.1  # what a Parquet write task asks for: it mostly waits on the store
POOL_START_TIMEOUT_S = 600  # the whole actor pool must be up before work is dispatched
DRIVER_PLAN_ROWS = 250_000  # manifest + silver rows the driver plans in memory (bench_plan: 412 MB peak at 217k)


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


def _read_parquet(files: list[storage.Location], columns: list[str]):
    """A Ray dataset of these Parquet files' columns, read on the data root's own filesystem."""
    import ray

    filesystem = storage.arrow(files[0])[0]
    paths = [storage.arrow(f)[1] for f in files]
    # partitioning=None: silver's dt=… folders must not come back as columns.
    return ray.data.read_parquet(paths, filesystem=filesystem, partitioning=None).select_columns(columns)


def _tagged(batch: pa.Table, embedded: int) -> pa.Table:
    """(media_id, path, embedded): the manifest's rows with 0, silver's ids with 1 and no path."""
    path = batch.column("path") if "path" in batch.column_names else pa.nulls(batch.num_rows, pa.string())
    return pa.table(
        {
            "media_id": batch.column("media_id"),
            "path": path,
            "embedded": pa.array(np.full(batch.num_rows, embedded, np.int8)),
        }
    )


def _not_embedded(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.equal(batch.column("embedded"), 0)).select(["media_id", "path"])


def _manifest_parts(root: storage.Location) -> list[storage.Location]:
    """The committed manifest parts; none is one clear line, before Ray starts."""
    parts = catalog.manifest_parts(root)
    if not parts:
        raise UserError("the manifest is empty; run `rayclip ingest` first")
    return parts


def plan_work(root: storage.Location, model_version: str, limit: int | None = None, force: bool = False):
    """(media_id, path) to embed, one row per media_id (the smallest path among its manifest rows),
    minus those already embedded, sorted by media_id: a Ray dataset. `limit` takes the first rows.

    Up to DRIVER_PLAN_ROWS manifest and silver rows, the driver plans with pyarrow: a Ray Data
    shuffle costs seconds of task start-up however few rows it has. Above, Ray Data plans and the
    rows never come to the driver."""
    import ray

    manifest, silver_files = _plan_sources(root, model_version, force)
    planned = _planned_in_driver(root, manifest, silver_files, limit)
    return ray.data.from_arrow(planned) if planned is not None else _plan_in_ray(manifest, silver_files, limit)


def _plan_sources(root: storage.Location, model_version: str, force: bool) -> tuple[list, list]:
    """The manifest parts and the silver files (none with force) a plan reads."""
    return _manifest_parts(root), [] if force else catalog.silver_files(root, model_version)


def _planned_in_driver(
    root: storage.Location,
    manifest: list,
    silver_files: list,
    limit: int | None,
    captions_for: str | None = None,
    force: bool = False,
) -> pa.Table | None:
    """plan_work's rows as a table, when the driver plans them (no Ray needed); None when Ray Data must.
    With `captions_for` (a model_version), from the same read of the manifest, each row's new
    captions too (_with_new_captions)."""
    if not plans_in_driver(manifest, silver_files):
        return None
    rows = catalog.read_manifest(root, ["media_id", "path"] + (["caption"] if captions_for else []))
    planned = _plan_in_driver(root, silver_files, rows).slice(0, limit)
    if captions_for and planned.num_rows:
        planned = _with_new_captions(root, captions_for, planned, rows, force)
    return planned


def _plan_in_ray(manifest: list, silver_files: list, limit: int | None):
    work = _plan_streaming(manifest, silver_files)
    return work.limit(limit).materialize() if limit is not None and limit < work.count() else work


def plans_in_driver(manifest: list[storage.Location], silver_files: list[storage.Location]) -> bool:
    """Whether plan_work plans these manifest parts and silver files in the driver: the rows their
    Parquet footers count are at most DRIVER_PLAN_ROWS."""
    return sum(_each(lambda f: catalog.parquet_metadata(f).num_rows, manifest + silver_files)) <= DRIVER_PLAN_ROWS


def _each(read: Callable, files: list[storage.Location]) -> list:
    """read(file) for every file, many at once: on an object store each is a round trip."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(read, files))


def _plan_in_driver(root: storage.Location, silver_files: list[storage.Location], manifest: pa.Table) -> pa.Table:
    unique = manifest.group_by("media_id").aggregate([("path", "min")]).rename_columns(["media_id", "path"])
    if silver_files:
        done = pa.concat_tables(_each(lambda f: catalog.read_parquet(f, ["media_id"]), silver_files)).column("media_id")
        unique = unique.filter(pc.invert(pc.is_in(unique.column("media_id"), value_set=done.combine_chunks())))
    return unique.sort_by("media_id")


def _with_new_captions(root: storage.Location, model_version: str, planned: pa.Table, manifest: pa.Table, force: bool):
    """The planned rows with `captions`: the caption texts the run encodes beside each image, every
    non-blank caption of the planned images that silver lacks for this model_version (all with
    force) on the first row (by media_id) that carries it. Captions of images embedded before are
    left to the caption stage, as are those of images that fail to decode."""
    carried = manifest.filter(pc.is_in(manifest["media_id"], value_set=planned["media_id"]))
    carried = carried.filter(pc.invert(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(carried["caption"]), ""), True)))
    first = carried.group_by("caption").aggregate([("media_id", "min")])
    stored = None if force else catalog.read_silver(root, model_version, layout.CAPTIONS, ["caption_id"])
    known = set(stored["caption_id"].to_pylist()) if stored is not None else set()
    by_row: dict[str, list[str]] = {}
    for text, owner in zip(first["caption"].to_pylist(), first["media_id_min"].to_pylist()):
        if layout.caption_id(text) not in known:
            by_row.setdefault(owner, []).append(text)
    texts = [by_row.get(media_id, []) for media_id in planned["media_id"].to_pylist()]
    return planned.append_column("captions", pa.array(texts, pa.list_(pa.string())))


def _plan_streaming(manifest: list[storage.Location], silver_files: list[storage.Location]):
    """The manifest and silver's ids are read by Ray Data and grouped by media_id in one sort-based
    aggregation: min(path) and max(embedded) (1 when silver has it); the driver holds block
    references only."""
    from ray.data.aggregate import Max, Min
    from ray.data.context import ShuffleStrategy

    tagged = _read_parquet(manifest, ["media_id", "path"]).map_batches(
        _tagged, batch_format="pyarrow", fn_kwargs={"embedded": 0}, batch_size=None
    )
    if silver_files:
        ids = _read_parquet(silver_files, ["media_id"]).map_batches(
            _tagged, batch_format="pyarrow", fn_kwargs={"embedded": 1}, batch_size=None
        )
        tagged = tagged.union(ids)
    # The sort-based shuffle: Ray tasks only (a hash shuffle's aggregator actors take seconds to start
    # even for a small manifest), and its output is sorted by media_id, so --limit takes the smallest.
    tagged.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    grouped = tagged.groupby("media_id").aggregate(
        Min("path", alias_name="path"), Max("embedded", alias_name="embedded")
    )
    return grouped.map_batches(_not_embedded, batch_format="pyarrow", batch_size=None).materialize()


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


class RunStats:
    """Collects what the actors did (a Ray actor with no CPU, created per run)."""

    def __init__(self) -> None:
        self.rows_by_worker: Counter = Counter()  # (node_id, actor_id) -> rows embedded
        self.failures: list[tuple[str, str]] = []
        self.seconds: Counter = Counter()  # stage -> seconds, summed over actors
        self.started: dict[tuple[str, str], dict[str, float]] = {}  # worker -> its start-up marks
        self.first_encode: dict[tuple[str, str], float] = {}  # worker -> wall clock of its first encode

    def actor_started(self, worker: tuple[str, str], marks: dict[str, float]) -> None:
        self.started[worker] = marks

    def record_decode(self, failures: list[tuple[str, str]], seconds: float) -> None:
        """What a decode task (decode="tasks") did: its failures and its seconds."""
        self.failures.extend(failures)
        self.seconds["decode"] += seconds

    def record(
        self, worker: tuple[str, str], ok: int, failures: list[tuple[str, str]], seconds: dict, encode_at: float
    ) -> None:
        self.rows_by_worker[worker] += ok
        self.failures.extend(failures)
        self.seconds.update(seconds)
        self.first_encode[worker] = min(self.first_encode.get(worker, encode_at), encode_at)

    def summary(self) -> tuple[list, list, dict, dict]:
        """(workers that embedded rows, failures, seconds by stage, the start-up marks of the actor
        that encoded first, its first encode included)."""
        workers = [worker for worker, rows in self.rows_by_worker.items() if rows]
        first = min(self.first_encode, key=self.first_encode.get, default=None)
        marks = self.started.get(first, {}) | {"first_batch": self.first_encode[first]} if first else {}
        return workers, self.failures, dict(self.seconds), marks

    def rows_done(self) -> int:
        return sum(self.rows_by_worker.values()) + len(self.failures)


class Decoder:
    """(media_id, path) rows → the model's uint8 input pixels: read from the store (only bytes that hash
    to their media_id), decode (rayclip.images, the one decode path), resize and crop (the model's
    `pixels`). The same code in an actor (decode="actor", "gpu") and in a decode task ("tasks").

    With `device`, JPEGs are decoded together on it (images.decode_batch) and the rest as always.
    `threads` read (and, without a device, decode) that many images at once: Pillow and torch release
    the GIL while they work. Picklable: the store client and the threads are made where it runs.
    """

    def __init__(self, data_root: str, pixels: Callable, threads: int = 1, device: str | None = None) -> None:
        self.data_root, self.pixels, self.threads, self.device = data_root, pixels, threads, device
        self._start()

    def _start(self) -> None:
        self._root = storage.location(self.data_root)  # this process's own client for the data root
        self._pool = ThreadPoolExecutor(self.threads, "rayclip-decode") if self.threads > 1 else None

    def __getstate__(self) -> dict:
        return {key: self.__dict__[key] for key in ("data_root", "pixels", "threads", "device")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start()

    def _map(self, function: Callable, items: Iterable) -> list:
        return list(self._pool.map(function, items) if self._pool else map(function, items))

    def __call__(self, media_ids: Iterable[str], paths: Iterable[str]) -> tuple[list[str], object, list]:
        """(media_ids that decoded, their pixels as one uint8 NCHW tensor or None, (media_id, why) failures)."""
        read = self._map(self._read, zip(media_ids, paths))
        if self.device:
            pictures = iter(decode_batch([data for _, data, _ in read if data is not None], self.device))
            shaped = [(m, None, why) if data is None else self._shaped(m, next(pictures)) for m, data, why in read]
        else:
            shaped = self._map(self._decoded, read)
        ids = [media_id for media_id, tensor, _ in shaped if tensor is not None]
        tensors = [tensor.to(self.device) if self.device else tensor for _, tensor, _ in shaped if tensor is not None]
        failures = [(media_id, why) for media_id, tensor, why in shaped if tensor is None]
        return ids, self.pixels.stack(tensors) if tensors else None, failures

    def _read(self, row: tuple[str, str]) -> tuple[str, bytes | None, str | None]:
        media_id, path = row
        data, why = catalog.read_object(self._root, path, media_id)  # a store that gives up fails the job
        return media_id, data, why

    def _decoded(self, read: tuple[str, bytes | None, str | None]) -> tuple[str, object, str | None]:
        media_id, data, why = read
        if data is None:
            return media_id, None, why
        try:
            picture = decode_image(data)
        except Exception as exc:  # a bad image must not kill the job; it is counted and skipped
            picture = exc
        return self._shaped(media_id, picture)

    def _shaped(self, media_id: str, picture) -> tuple[str, object, str | None]:
        if isinstance(picture, Exception):
            return media_id, None, "decode error"
        return media_id, self.pixels(picture), None


def decode_block(batch: dict, decoder: Decoder, stats) -> dict:
    """decode="tasks": a Ray Data task's block of (media_id, path) rows → (media_id, uint8 pixels) for
    the actors, which only normalise and encode; failures go to the run's stats."""
    started = time.perf_counter()
    ids, pixels, failures = decoder(batch["media_id"], batch["path"])
    stats.record_decode.remote(failures, time.perf_counter() - started)
    pixels = pixels.numpy() if pixels is not None else np.zeros((0, 3, *decoder.pixels.size), np.uint8)
    return {"media_id": np.array(ids, dtype=object), "pixels": pixels}


class EmbedUDF:
    """Rebuilds the model once per actor from the run's shared parts; turns batches into silver rows.

    A batch is either (media_id, path) rows, which the actor reads and decodes itself (decode="actor"
    or "gpu"), or (media_id, pixels) from the decode tasks ("tasks"), which it only normalises and
    encodes. Ray Data calls it from CALLS_PER_ACTOR threads at once; decoding runs unlocked, encoding
    under a lock, so the model always has the next batch ready and never shares its cores. When a GPU
    encodes, the actor's CPU threads would idle, and one PIL decoder cannot feed a GPU: an actor that
    decodes then reads and decodes a batch on `decode_threads` threads.
    """

    def __init__(
        self,
        parts,
        data_root: str,
        threads: int,
        decode_threads: int,
        decode: str,
        device: str,
        stats,
        caption_rows=None,
    ) -> None:
        import ray

        marks = {"actor_process": IMPORTED_AT}
        import_model_libraries()
        marks["imports"] = time.time()
        parts = ray.get(parts[0]) if isinstance(parts, list) else parts  # [ObjectRef]: Ray passes it unresolved
        self.model = ClipModel.from_parts(parts, device=device, threads=threads)
        marks["model_load"] = time.time()
        jpegs_on = device if decode == "gpu" else None
        self.decoder = Decoder(data_root, self.model.pixels, decode_threads, jpegs_on)
        self.stats, self.caption_rows = stats, caption_rows
        self.encode_lock = threading.Lock()
        context = ray.get_runtime_context()
        self.worker = (context.get_node_id(), context.get_actor_id())
        if stats is not None:
            stats.actor_started.remote(self.worker, marks)

    def __call__(self, batch: dict) -> pa.Table:
        started = time.perf_counter()
        if "pixels" in batch:  # decoded by the decode tasks
            ids, pixels, failures = list(batch["media_id"]), batch["pixels"], []
        else:
            ids, pixels, failures = self.decoder(batch["media_id"], batch["path"])
        decoded = time.perf_counter()
        texts = _captions_of(batch, ids) if self.caption_rows is not None else []
        with self.encode_lock:
            encode_at = time.time()
            encode_started = time.perf_counter()
            vectors = self.model.encode_uint8(pixels) if ids else np.zeros((0, self.model.dim), np.float32)
            encoded = time.perf_counter()
            if texts:  # the same model's text tower, in the same turn at the cores
                text_ids = pa.array([layout.caption_id(text) for text in texts], pa.string())
                rows = silver.captions_table(text_ids, pa.array(texts, pa.string()), self.model.encode_texts(texts))
                self.caption_rows.add.remote(rows)
        seconds = {"decode": decoded - started, "encode": encoded - encode_started}
        seconds["captions"] = time.perf_counter() - encoded
        self.stats.record.remote(self.worker, len(ids), failures, seconds, encode_at)
        return silver.embeddings_table(ids, vectors)


def _captions_of(batch: dict, ids: list[str]) -> list[str]:
    """The new caption texts the batch's decoded images carry (its `captions` column, when planned)."""
    if "captions" not in batch:
        return []
    by_id = dict(zip(batch["media_id"], batch["captions"]))
    return [str(text) for media_id in ids for text in by_id[media_id]]


class CaptionRows:
    """The caption rows a run's actors encode (a Ray actor with no CPU, per run), written as the run's
    files of the captions table once the images are committed."""

    def __init__(self) -> None:
        self.tables: list[pa.Table] = []

    def add(self, rows: pa.Table) -> None:
        self.tables.append(rows)

    def write(self, data_root: str, model_version: str, day: str, run_id: str) -> int:
        """The rows in files of silver.CAPTION_ROWS_PER_FILE (not yet committed); how many."""
        if not self.tables:
            return 0
        rows, per_file = pa.concat_tables(self.tables), silver.CAPTION_ROWS_PER_FILE
        files = (rows.slice(start, per_file) for start in range(0, rows.num_rows, per_file))
        silver.write_files(storage.location(data_root), model_version, layout.CAPTIONS, day, run_id, files)
        return rows.num_rows


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


class _RunFiles:
    """Names the files Ray writes for a run (layout.silver_file_stem); picklable for the write tasks."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return layout.silver_file_stem(self.run_id, write_uuid, task_index)


def filed_as(spec: ModelSpec, save_as: str | None = EmbedOptions.save_as) -> ModelSpec:
    """The spec whose vectors are filed under model_version `save_as` (--save-as), when one is given."""
    return dataclasses.replace(spec, version=layout.slug(save_as)) if save_as else spec


def _shareable_model(spec: ModelSpec) -> tuple[ModelParts, Pixels]:
    """The model built once (loaded or initialised, at spec.precision) as parts for the actors, and its Pixels."""
    clip = load_model(spec, precision=spec.precision)
    return clip.parts(), clip.pixels


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


def _decode_task_cpus(resources: dict, actors: int, cpus_per_actor: float) -> float:
    """CPUs a decode task asks for: a whole one where the actors leave several (a GPU node), else a
    share of what they leave, two tasks beside the write tasks."""
    free = float(resources.get("CPU", 1)) - actors * cpus_per_actor
    return 1.0 if free >= 2 else round(max((free - WRITE_TASK_CPUS) / 2, 0.05), 3)


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
    *,
    progress: Progress | None = None,
    start_ray: Callable[[], object] = cluster.start,
) -> EmbedReport:
    """Embed what the manifest holds and silver lacks for this model; returns the run's signals.

    `actors` defaults to default_actors() of the cluster; `precision` is chosen once, here, so
    every actor of a run computes at the same one (model.choose_precision says what auto picks).
    The vectors go to partition `dt` under filed_as(spec, save_as).
    progress(done, total) counts rows embedded or failed, as the actors report them.

    Start-up, as short as it goes: a plan small enough for the driver is made before Ray starts (and
    nothing to do imports neither torch nor Ray: `start_ray`, which starts or joins Ray, is called only
    when there is work); the model is built once, here, while Ray starts, and shared with
    every actor through Ray's object store (ClipModel.parts), so an actor only imports and assembles it.
    """
    root, spec = storage.data_root(root), filed_as(spec, save_as)
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
    report.actors, report.batch_size = actors or 0, batch_size

    manifest, silver_files = _plan_sources(root, spec.model_version, force)  # an empty manifest fails before Ray starts
    captions_for = None if no_captions else spec.model_version
    planned = _planned_in_driver(root, manifest, silver_files, limit, captions_for, force)
    marks = {"plan": time.time()}
    if planned is not None and planned.num_rows == 0:  # answered from the catalog: no torch, no Ray
        if not _recorded_as(root, spec):
            check_names(spec)
        return save_record(root, report)
    check_names(spec)  # a bad name or a missing model fails here, once, not in every actor
    check_available(spec)
    import ray

    with ThreadPoolExecutor(1, "rayclip-model") as builder:
        building = builder.submit(_shareable_model, spec)  # while Ray starts
        start_ray()
        marks["ray_start"] = time.time()
        if planned is None:
            with storage.refusals_surfaced(root):  # the store giving up in a Ray task: its one line
                work = _plan_in_ray(manifest, silver_files, limit)
            report.rows_planned = work.count()
            marks["plan"] = time.time()
        else:
            report.rows_planned = planned.num_rows
        if report.rows_planned == 0:
            return save_record(root, report)
        parts, pixels = building.result()
        parts = ray.put(parts)  # the driver's copy of the weights goes; the object store's is shared
        marks["model_build"] = time.time()
    report.cluster = ray.get_runtime_context().gcs_address
    resources = ray.cluster_resources()
    report.cluster_cpus = float(resources.get("CPU", 0))
    report.actors = actors = actors or default_actors(resources, gpus_per_actor)
    report.cpus_per_actor, report.torch_threads = _actor_resources(resources, actors, gpus_per_actor)
    report.decode_threads = report.torch_threads if gpus_per_actor and report.decode != "tasks" else 1
    report.blocks = blocks or max(actors * 8, int(report.cluster_cpus) * 2 if report.decode == "tasks" else 0)
    report.blocks = min(report.blocks, report.rows_planned)
    stats = ray.remote(num_cpus=0)(RunStats).remote()
    caption_rows = ray.remote(num_cpus=0)(CaptionRows).remote() if planned is not None and captions_for else None
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
            num_cpus=_decode_task_cpus(resources, actors, report.cpus_per_actor),
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
            "data_root": storage.uri(root),
            "threads": report.torch_threads,
            "decode_threads": report.decode_threads,
            "decode": report.decode,
            "device": device,
            "stats": stats,
            "caption_rows": caption_rows,
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
            ds.write_parquet(
                partition_path,
                filesystem=filesystem,
                filename_provider=_RunFiles(report.run_id),
                ray_remote_args={"num_cpus": WRITE_TASK_CPUS},
            )
        stats_text = ds.stats()
        report.tasks = _tasks(stats_text, "MapBatches(EmbedUDF)")
        report.write_s = round(_remote_wall_s(stats_text, "Write"), 3)
        silver.record_model(root, spec.model_version, spec.to_dict())
        committed = silver.commit(root, spec.model_version, layout.EMBEDDINGS, report.dt, report.run_id, "embed")
        if caption_rows is not None:  # after the images: a caption vector is only read for an embedded image
            ray.get(caption_rows.write.remote(storage.uri(root), spec.model_version, report.dt, report.run_id))
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


def _recorded_as(root: storage.Location, spec: ModelSpec) -> bool:
    """Whether silver's record of the model_version names this very model (its names were checked
    when it was embedded, so a run with nothing to do need not import open_clip to check them again)."""
    if not storage.exists(layout.silver_model_file(root, spec.model_version)):
        return False
    recorded = catalog.silver_model(root, spec.model_version)
    return all(recorded.get(key) == getattr(spec, key) for key in ("name", "pretrained", "checkpoint_sha256"))


def save_record(root: storage.Location, report: EmbedReport) -> EmbedReport:
    """The run's record (silver/runs/<run_id>.json), written whole each time."""
    storage.write_json_atomic(layout.embed_run_record(root, report.run_id), report.to_dict())
    return report
