"""Bronze layer: metadata (via img2dataset) or a folder → content-addressed objects + manifest.

The data root is a local folder or an object-store prefix (storage.py); the steps are the same on
both. Order of commits, so that a run killed at any point leaves nothing half-written:
0. URLs the manifest already names are set aside (never handed to img2dataset) unless refetch;
1. img2dataset downloads into bronze/downloads/<run_id>/ (original bytes, no re-encode, one Parquet
   shard of bytes and statuses per few hundred to 10,000 URLs), a work folder the run holds
   (storage.working) and that the next run or `rayclip gc` sweeps;
2. while img2dataset downloads the next shards, each finished shard's images are checked (they
   decode), hashed and put at bronze/objects/<aa>/<sha256>.<ext> unless already there, on a pool of
   threads (one whole write each: content-addressed, so a present key holds these very bytes);
3. the new manifest rows are written as ONE object bronze/manifest/part-<run_id>.<bytes>B.parquet, after
   every object they name is stored (the commit: readers list only committed parts);
4. the run summary is written to bronze/runs/<run_id>.json.
A rerun finds the objects already stored and adds the manifest rows that are still missing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import math
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .. import cluster, faults
from ..errors import UserError
from ..images import DEFAULT_MAX_PIXELS, BadImageError, inspect_image
from ..options import DISTRIBUTORS, IngestOptions
from ..progress import POLL_S, Progress, watch
from ..store import catalog, debris, layout, storage
from ..store.storage import Location

FOLDER_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
URL_COLUMNS = ("URL", "url")
CAPTION_COLUMNS = ("TEXT", "caption", "text")
# img2dataset's shard size: about SHARDS_PER_WORKER shards per worker, so that checking one shard
# overlaps downloading the next, within bounds (tiny shards cost a worker start-up each few).
SHARD_ROWS = (256, 10_000)
SHARDS_PER_WORKER = 8
BYTES_COLUMN = "jpg"  # img2dataset's parquet output names its bytes column so; they are the originals
CHECK_BATCH = 256  # rows of a shard in memory at once while their images are checked


@dataclasses.dataclass
class IngestReport:
    run_id: str
    source: str
    rows_read: int = 0
    skipped_known_urls: int = 0  # already in the manifest: not fetched again (unless refetch)
    downloaded: int = 0
    failed: dict[str, int] = dataclasses.field(default_factory=dict)
    duplicates: int = 0
    stored: int = 0
    manifest_rows_added: int = 0
    already_in_manifest: int = 0
    wall_s: float = 0.0

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"failed_total": self.failed_total}


@dataclasses.dataclass
class Candidate:
    """One sample on its way in: its bytes (or the file that holds them), and what the metadata said."""

    url: str
    caption: str
    data: bytes | None = None  # a download's bytes, straight from img2dataset's shard
    file: Location | None = None  # a folder ingest's file, read when its turn comes
    expected_sha256: str | None = None  # img2dataset's own hash, checked against ours


class Admitted(NamedTuple):
    """What became of one candidate."""

    row: dict | None  # its manifest row; None when refused
    reason: str | None  # why it was refused
    stored: bool  # this run stored its object (else the bytes were there already)


# ---------------------------------------------------------------- reading metadata


def read_metadata(
    path: str | os.PathLike,
    url_col: str | None = IngestOptions.url_col,
    caption_col: str | None = IngestOptions.caption_col,
    limit: int | None = IngestOptions.limit,
) -> pa.Table:
    """Read LAION-style metadata (a local file or a URL) into a table with two string columns: url, caption."""
    source = storage.location(path)
    if not storage.exists(source) or storage.is_dir(source):
        raise UserError(f"metadata file not found: {path}")
    table = _read_table(source, path)
    columns = table.column_names
    url_name = _pick_column(columns, url_col, URL_COLUMNS, "--url-col")
    caption_name = _pick_column(columns, caption_col, CAPTION_COLUMNS, "--caption-col", required=False)
    if table.num_rows == 0:
        raise UserError(f"metadata file {path} has no rows")
    if limit is not None:
        table = table.slice(0, limit)
    urls = table.column(url_name).cast(pa.string())
    captions = (
        table.column(caption_name).cast(pa.string()).fill_null("")
        if caption_name
        else pa.array([""] * table.num_rows, pa.string())
    )
    return pa.table({"url": urls, "caption": captions})


def _read_table(source: Location, shown: str | os.PathLike) -> pa.Table:
    name = source.name.lower().removesuffix(".gz")
    fs, where = storage.arrow(source)
    try:
        if name.endswith(".parquet"):
            return pq.read_table(where, filesystem=fs)
        if name.endswith((".csv", ".tsv", ".jsonl", ".json")):
            with fs.open_input_stream(where, compression="detect") as stream:  # .gz by its name
                if name.endswith((".jsonl", ".json")):
                    import pyarrow.json as pajson

                    return pajson.read_json(stream)
                import pyarrow.csv as pacsv

                delimiter = "\t" if name.endswith(".tsv") else ","
                return pacsv.read_csv(stream, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    except (pa.ArrowInvalid, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read metadata {shown}: {first_line}") from None
    raise UserError(f"unsupported metadata format: {source.name} (use .parquet, .csv, .tsv or .jsonl)")


def _pick_column(
    columns: list[str], asked: str | None, defaults: tuple[str, ...], flag: str, required: bool = True
) -> str | None:
    if asked is not None:
        if asked not in columns:
            raise UserError(f"column {asked!r} not found; columns are: {', '.join(columns)} (pass {flag})")
        return asked
    for name in defaults:
        if name in columns:
            return name
    if required:
        raise UserError(
            f"no URL column ({' or '.join(defaults)}) found; columns are: {', '.join(columns)} (pass {flag})"
        )
    return None


def _url_problem(url: str | None) -> str | None:
    if url is None or not url.strip():
        return "missing url"
    if not url.lower().startswith(("http://", "https://")):
        return "unsupported url scheme"
    return None


# ---------------------------------------------------------------- downloading


def _downloader_env() -> dict[str, str]:
    """Settings img2dataset reads from its environment, in this process and its workers (a user's own
    setting of each wins)."""
    return {
        # Its decode checks (OpenCV) respect our pixel limit too.
        "CV_IO_MAX_IMAGE_PIXELS": os.environ.get("CV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS)),
        # albumentations (imported by img2dataset) otherwise checks the network for a newer release.
        "NO_ALBUMENTATIONS_UPDATE": os.environ.get("NO_ALBUMENTATIONS_UPDATE", "1"),
        # Its writer's S3 clients (fsspec.url_to_fs, no options) take botocore's retries from here.
        **storage.retry_env(),
    }


def _workers(distributor: str, processes: int) -> int:
    """How many shards img2dataset works on at once: its processes, or the Ray cluster's CPUs."""
    # Before img2dataset is imported here: this process runs its reader and writer's bookkeeping too,
    # and its spawned processes inherit this environment.
    os.environ.update(_downloader_env())
    if distributor == "multiprocessing":
        return processes
    import ray

    # Joins $RAY_ADDRESS when set, else starts a local cluster.
    local = {} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}
    cluster.init(_downloader_env(), log_to_driver=False, **local)
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _shard_rows(rows: int, workers: int) -> int:
    low, high = SHARD_ROWS
    return min(high, max(low, math.ceil(rows / (workers * SHARDS_PER_WORKER))))


def _img2dataset(input_file: Location, output_dir: Location, distributor: str, shard_rows: int, **options) -> None:
    from img2dataset import download

    download(
        url_list=storage.uri(input_file),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_folder=storage.uri(output_dir),  # fsspec: a local folder or an object-store prefix
        # One Parquet object per shard, bytes and statuses together: on an object store one write
        # per shard instead of three per image, and one read back.
        output_format="parquet",
        resize_mode="no",
        # Keep the original bytes of every format: media_id is the sha256 of what the server sent.
        disable_all_reencoding=True,
        compute_hash="sha256",
        distributor=distributor,
        number_sample_per_shard=shard_rows,
        enable_wandb=False,
        **options,
    )


def _download_and_admit(
    table: pa.Table,
    work_dir: Location,
    admitter: _Admitter,
    distributor: str,
    processes: int,
    progress: Progress | None,
    **options,
) -> None:
    """Run img2dataset on the url/caption table, admitting each shard as soon as it is finished."""
    input_file, output_dir = work_dir / "input.parquet", work_dir / "out"
    with storage.open_output(input_file) as f:
        pq.write_table(table, f)
    shard_rows = _shard_rows(table.num_rows, _workers(distributor, processes))
    finished = threading.Event()
    # img2dataset stays on this thread (it installs a signal handler); its shards are followed on another.
    with ThreadPoolExecutor(1, thread_name_prefix="rayclip-shards") as follower:
        following = follower.submit(_follow_shards, output_dir, admitter, finished)
        try:
            with watch(lambda: admitter.rows_seen, table.num_rows, progress):
                _img2dataset(input_file, output_dir, distributor, shard_rows, processes_count=processes, **options)
        finally:
            finished.set()
        following.result()
    # A shard img2dataset gave up on (an exception, after its retry) has no output: its rows failed.
    if missing := table.num_rows - admitter.rows_seen:
        admitter.failed["shard failed"] += missing


def _follow_shards(output_dir: Location, admitter: _Admitter, finished: threading.Event) -> None:
    """Admit each shard once img2dataset has finished it (its stats file is written after its parquet)."""
    done: set[str] = set()
    while True:
        last_pass = finished.is_set()  # read before listing: the last pass sees every shard
        for stats in storage.glob(output_dir, layout.IMG2DATASET_SHARD_STATS):
            if stats.name not in done:
                done.add(stats.name)
                admitter.admit_shard(output_dir / stats.name.replace("_stats.json", ".parquet"))
        if last_pass:
            return
        finished.wait(POLL_S)


def _reason(message: str | None) -> str:
    """Group img2dataset's error messages into a few reasons a user can act on."""
    text = (message or "unknown error").strip()
    lower = text.lower()
    if lower.startswith("http error"):
        return "HTTP " + text.split()[2].rstrip(":")
    if "timed out" in lower or "timeout" in lower:
        return "timeout"
    if "unknown url type" in lower:
        return "missing url"
    if "decod" in lower or "assertion" in lower or "image" in lower:
        return "decode error"
    if "refused" in lower or "urlopen error" in lower or "connection" in lower:
        return "connection error"
    return text[:80]


def _folder_candidates(folder: Location, limit: int | None) -> list[Candidate]:
    listed = storage.glob(folder, "**/*")
    names = {storage.uri(p) for p in listed}
    images = [p for p in listed if p.suffix.lower() in FOLDER_EXTENSIONS and not storage.is_dir(p)][:limit]
    candidates = []
    for path in images:
        sidecar = path.with_suffix(".txt")
        caption = ""
        if storage.uri(sidecar) in names:
            caption = storage.read_bytes(sidecar).decode("utf-8", errors="replace").strip()
        # A link's url names the file it points at: where the bytes live (eval ingests links to a split).
        candidates.append(Candidate(url=storage.resolved_url(path), caption=caption, file=path))
    return candidates


# ---------------------------------------------------------------- storing


class _Admitter:
    """Checks, hashes and stores candidates on a pool of threads (decoding, hashing and writing release
    the GIL), and tallies what became of them into the report, the failures and the manifest rows."""

    def __init__(self, root: Location, report: IngestReport, max_pixels: int, progress: Progress | None) -> None:
        self.root, self.report, self.max_pixels, self.progress = root, report, max_pixels, progress
        self.failed: Counter = Counter()
        self.rows: dict[str, list[dict]] = {}  # by shard, joined in shard order at the end
        self.rows_seen = 0  # rows of finished shards (the download's progress)
        self.total = 0  # rows to admit, once known (the store step's progress)
        self.rows_done = 0
        self.claimed: set[str] = set()  # media_ids this run stores: a second URL of the same bytes is a duplicate
        self.lock = threading.Lock()
        self.now = dt.datetime.now(dt.timezone.utc)
        self.pool = ThreadPoolExecutor(thread_name_prefix="rayclip-admit")

    def __enter__(self) -> _Admitter:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.progress and self.rows_done and exc[0] is None:
            self.progress(self.rows_done, self.rows_done)

    def manifest_rows(self) -> list[dict]:
        return [row for shard in sorted(self.rows) for row in self.rows[shard]]

    def admit_shard(self, shard: Location) -> None:
        """One finished img2dataset shard: its failures counted by reason, its successes admitted."""
        with storage.open_input(shard) as f:
            parquet = pq.ParquetFile(f)
            self.rows_seen += parquet.metadata.num_rows
            columns = ["url", "caption", "status", "error_message", "sha256", BYTES_COLUMN]
            for batch in parquet.iter_batches(batch_size=CHECK_BATCH, columns=columns):
                candidates = []
                for row in batch.to_pylist():
                    if row["status"] == "success":
                        candidates.append(
                            Candidate(
                                url=row["url"],
                                caption=row["caption"] or "",
                                data=row[BYTES_COLUMN],
                                expected_sha256=row["sha256"],
                            )
                        )
                    else:
                        self.failed[_reason(row["error_message"])] += 1
                        self.rows_done += 1
                self.admit(shard.name, candidates)

    def admit(self, key: str, candidates: list[Candidate]) -> None:
        rows = self.rows.setdefault(key, [])
        for start in range(0, len(candidates), CHECK_BATCH):  # a batch's futures in memory at once
            for outcome in self.pool.map(self._admit_one, candidates[start : start + CHECK_BATCH]):
                self.rows_done += 1
                if self.progress:
                    self.progress(self.rows_done, max(self.total, self.rows_seen, self.rows_done))
                if outcome.row is None:
                    self.failed[outcome.reason] += 1
                    continue
                self.report.downloaded += 1
                self.report.stored += outcome.stored
                self.report.duplicates += not outcome.stored
                rows.append(outcome.row)

    def _admit_one(self, candidate: Candidate) -> Admitted:
        try:
            data = candidate.data if candidate.data is not None else storage.read_bytes(candidate.file)
        except OSError:  # a folder's file that vanished, or a broken link
            return Admitted(None, "unreadable file", False)
        try:
            ext, width, height = inspect_image(data, self.max_pixels)
        except BadImageError as bad:
            return Admitted(None, str(bad), False)
        media_id = hashlib.sha256(data).hexdigest()
        if candidate.expected_sha256 and candidate.expected_sha256 != media_id:
            return Admitted(None, "hash mismatch", False)
        path = layout.object_relpath(media_id, ext)
        with self.lock:
            first = media_id not in self.claimed
            self.claimed.add(media_id)
        stored = first and storage.put_if_absent(self.root / path, data)
        if stored:
            faults.point("ingest.object_stored")  # some objects stored, the manifest not yet committed
        row = {
            "media_id": media_id,
            "path": path,
            "url": candidate.url,
            "caption": candidate.caption,
            "width": width,
            "height": height,
            "format": ext,
            "size_bytes": len(data),
            "source": self.report.source,
            "run_id": self.report.run_id,
            "ingested_at": self.now,
        }
        return Admitted(row, None, stored)


def _commit_manifest(root: Location, rows: list[dict], report: IngestReport) -> None:
    """Append rows for (media_id, url) pairs not yet in the manifest, as one part written whole."""
    known = catalog.read_manifest(root, ["media_id", "url"])
    seen = set(zip(known.column("media_id").to_pylist(), known.column("url").to_pylist()))
    fresh = []
    for row in rows:
        pair = (row["media_id"], row["url"])
        if pair in seen:
            report.already_in_manifest += 1
            continue
        seen.add(pair)
        fresh.append(row)
    report.manifest_rows_added = len(fresh)
    if not fresh:
        return
    part = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(fresh, schema=catalog.MANIFEST_SCHEMA), part)
    data = part.getvalue().to_pybytes()
    faults.point("ingest.manifest_commit")  # every object stored, the part not yet written
    storage.write_atomic(layout.manifest_part(root, report.run_id, len(data)), data)


def _known_urls(root: Location, table: pa.Table) -> pa.Array:
    """Per row of the url table: is its URL already in the manifest?"""
    known = catalog.read_manifest(root, ["url"]).column("url").combine_chunks()
    return pc.is_in(table.column("url"), value_set=known)


def _finish(root: Location, admitter: _Admitter, report: IngestReport, started: float) -> IngestReport:
    report.failed = dict(admitter.failed.most_common())
    _commit_manifest(root, admitter.manifest_rows(), report)
    report.wall_s = round(time.monotonic() - started, 3)
    storage.write_json_atomic(layout.ingest_run_record(root, report.run_id), report.to_dict())
    return report


# ---------------------------------------------------------------- entry points


def ingest_metadata(
    root: Location | str,
    metadata: str | os.PathLike,
    url_col: str | None = IngestOptions.url_col,
    caption_col: str | None = IngestOptions.caption_col,
    limit: int | None = IngestOptions.limit,
    processes: int = IngestOptions.processes,
    threads: int = IngestOptions.threads,
    timeout: int = IngestOptions.timeout,
    retries: int = IngestOptions.retries,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    refetch: bool = IngestOptions.refetch,
    distributor: str = IngestOptions.distributor,
    progress: Progress | None = None,
    store_progress: Progress | None = None,
) -> IngestReport:
    """Download the images a LAION-style metadata file points at into the bronze layer.

    URLs the manifest already holds are not fetched again unless `refetch` (to re-check them).
    `distributor` is img2dataset's: "multiprocessing" (`processes` on this machine) or "ray" (a task
    per shard on the cluster `ray.init()` joins, $RAY_ADDRESS when set).
    progress(done, total) follows the download, store_progress(done, total) the decode/store step.
    """
    if distributor not in DISTRIBUTORS:
        raise UserError(f"unknown distributor {distributor!r}; use one of: {', '.join(DISTRIBUTORS)}")
    started = time.monotonic()
    root = storage.data_root(root)
    table = read_metadata(metadata, url_col, caption_col, limit)
    name = storage.location(metadata).name
    report = IngestReport(run_id=layout.new_run_id(), source=f"metadata:{name}", rows_read=table.num_rows)
    problems = [_url_problem(u) for u in table.column("url").to_pylist()]
    fetchable = table.filter(pa.array([p is None for p in problems]))
    if not refetch and fetchable.num_rows:
        known = _known_urls(root, fetchable)
        report.skipped_known_urls = pc.sum(known).as_py() or 0
        fetchable = fetchable.filter(pc.invert(known))
    debris.sweep(root, debris.WORK_FOLDERS[:1])  # download folders of killed runs
    # The run holds its work folder until its manifest part is committed.
    with storage.working(layout.downloads_dir(root, report.run_id)) as work_dir:
        with _Admitter(root, report, max_pixels, store_progress) as admitter:
            admitter.failed.update(p for p in problems if p)
            admitter.total = fetchable.num_rows
            if fetchable.num_rows:
                _download_and_admit(
                    fetchable,
                    work_dir,
                    admitter,
                    distributor,
                    processes,
                    progress,
                    thread_count=threads,
                    timeout=timeout,
                    retries=retries,
                )
        return _finish(root, admitter, report, started)


def ingest_folder(
    root: Location | str,
    folder: str | os.PathLike,
    limit: int | None = IngestOptions.limit,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    store_progress: Progress | None = None,
) -> IngestReport:
    """Copy the images under a folder (recursively; local or a URL) into the bronze layer."""
    started = time.monotonic()
    root, source = storage.data_root(root), storage.location(folder)
    if not storage.is_dir(source):
        raise UserError(f"folder not found: {folder}")
    candidates = _folder_candidates(source, limit)
    if not candidates:
        raise UserError(f"no images ({', '.join(sorted(FOLDER_EXTENSIONS))}) found under {folder}")
    report = IngestReport(run_id=layout.new_run_id(), source=f"folder:{source.name}", rows_read=len(candidates))
    with _Admitter(root, report, max_pixels, store_progress) as admitter:
        admitter.total = len(candidates)
        admitter.admit(source.name, candidates)
    return _finish(root, admitter, report, started)
