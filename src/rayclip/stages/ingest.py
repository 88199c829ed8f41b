"""Bronze layer: metadata (via img2dataset), a folder, or shards already downloaded (WebDataset tars,
img2dataset's output) → content-addressed objects + manifest.

The data root is a local folder or an object-store prefix (storage.py); the steps are the same on
both. Order of commits, so that a run killed at any point leaves nothing half-written:
0. URLs the manifest already names are set aside (never handed to img2dataset) unless refetch;
1. img2dataset downloads into bronze/downloads/<run_id>/ (original bytes, no re-encode, one Parquet
   shard of bytes and statuses per few hundred to 10,000 URLs), a work folder the run holds
   (storage.working) and that the next run or `rayclip gc` sweeps;
2. while img2dataset downloads the next shards, each finished shard's images are checked (they
   decode), hashed and put at bronze/objects/<aa>/<sha256>.<ext> unless already there, on a pool of
   threads (one whole write each: content-addressed, so a present key holds these very bytes);
3. each finished shard's new manifest rows are written as ONE object
   bronze/manifest/part-<run_id>-<n>.<bytes>B.parquet, after every object they name is stored (the
   commit: readers list only committed parts; a killed run keeps the shards it finished);
4. the run summary is written to bronze/runs/<run_id>.json.
A rerun finds the objects already stored and adds the manifest rows that are still missing.

Shards (ingest_webdataset, ingest_img2dataset_output) skip step 1: their samples are read in order,
one shard at a time, and go through the same check, hash, store and commit (steps 2 to 4).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import itertools
import json
import math
import os
import re
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
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
from ..store.catalog import Refused
from ..store.storage import Location

FOLDER_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
URL_COLUMNS = ("URL", "url")
CAPTION_COLUMNS = ("TEXT", "caption", "text")
# img2dataset's shard size: about SHARDS_PER_WORKER shards per worker, so that checking one shard
# overlaps downloading the next, within bounds (tiny shards cost a worker start-up each few).
SHARD_ROWS = (256, 10_000)
SHARDS_PER_WORKER = 8
# img2dataset's parquet output names its bytes column by its encode_format (ours: jpg, whatever the
# bytes are; with disable_all_reencoding they are the originals).
BYTES_COLUMNS = ("jpg", "png", "webp")
CHECK_BATCH = 256  # rows of a shard in memory at once while their images are checked
PART_ROWS = 10_000  # a folder's manifest rows held before they are committed as a part (a shard's, at most)
MANIFEST_ROW_GROUP = 8_192  # a manifest part's streaming readers (export) decode one row group at a time
# Why a sample of a shard never reached the image check.
NO_IMAGE = Refused("no image member")  # a sample (files sharing a key) without an image file
TRUNCATED = Refused("truncated tar")  # a tar cut short: the samples before the cut are kept, this counts the cut
SHARD_GLOB_CHARS = "*?["
# webdataset's shard ranges: {00000..00099} (zero-padded like the first bound) and {a,b} alternatives.
_BRACES = re.compile(r"\{(\d+\.\.\d+|[^{}]*,[^{}]*)\}")


@dataclasses.dataclass
class IngestReport:
    run_id: str
    source: str
    rows_read: int = 0
    skipped_known_urls: int = 0  # already in the manifest: not fetched again (unless refetch)
    admitted: int = 0  # arrived whole (downloaded, copied or read from a shard) and passed the image checks
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

    cluster.start(extra_env=_downloader_env())
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


# ---------------------------------------------------------------- reading shards


def expand_braces(pattern: str) -> list[str]:
    """webdataset's shard spec: `shards/{00000..00099}.tar` (a range, zero-padded as its first bound is)
    and `{a,b}` alternatives, several or nested; other text, globs included, is kept as written."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    if span := re.fullmatch(r"(\d+)\.\.(\d+)", body):
        first, last = span.groups()
        choices = [f"{i:0{len(first)}d}" for i in range(int(first), int(last) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    # Nested braces expand inside out, so an outer alternative can come twice: each name once, in order.
    return list(dict.fromkeys(expanded for choice in choices for expanded in expand_braces(head + choice + tail)))


def shard_locations(pattern: str) -> list[Location]:
    """The shards a pattern names (braces expanded, then globs matched; local or an object store), in order."""
    found: list[Location] = []
    for written in expand_braces(pattern):
        if not any(c in written for c in SHARD_GLOB_CHARS):
            found.append(storage.location(written))
            continue
        cut = min(written.index(c) for c in SHARD_GLOB_CHARS if c in written)
        base = written[:cut].rpartition("/")[0]
        found += storage.glob(storage.location(base or "."), written[len(base) + 1 if base else 0 :])
    if not found:
        raise UserError(f"no shards match {pattern}")
    missing = [shard for shard in found if not storage.exists(shard)]
    if missing:
        raise UserError(f"{len(missing)} of the {len(found)} shards {pattern} names do not exist, e.g. {missing[0]}")
    return found


def _shard_candidate(key: str, members: dict[str, bytes], origin: str) -> Candidate | Refused:
    """One sample of a shard (its files by extension) as a Candidate: the image file's bytes as they are,
    the caption from .txt (else .json's), the url from .json (else where the sample lies); or NO_IMAGE."""
    image = next((ext for ext in members if "." + ext.rsplit(".", 1)[-1] in FOLDER_EXTENSIONS), None)
    if image is None:
        return NO_IMAGE
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    text = members["txt"].decode("utf-8", errors="replace") if "txt" in members else meta.get("caption")
    return Candidate(
        url=meta.get("url") or f"{origin}#{key}",
        caption=str(text or "").strip(),
        data=members[image],
        # rayclip's own exports name the sha256 of these very bytes; img2dataset's `sha256` is of the
        # download, which differs once it resized or re-encoded, so it is not a check here.
        expected_sha256=meta.get("media_id"),
    )


def _grouped(files: Iterable[tuple[str, Callable[[], bytes]]], origin: str) -> Iterator[Candidate | Refused]:
    """webdataset's grouping: consecutive files whose names agree up to the first dot of the file name
    are one sample; each file's bytes are read when its turn comes."""
    key, members = None, {}
    for name, read in files:
        folder, _, file_name = name.rpartition("/")
        stem, _, ext = file_name.partition(".")
        sample = f"{folder}/{stem}" if folder else stem
        if sample != key and members:
            yield _shard_candidate(key, members, origin)
            members = {}
        key = sample
        members[ext.lower()] = read()
    if members:
        yield _shard_candidate(key, members, origin)


def _tar_samples(tar: Location) -> Iterator[Candidate | Refused]:
    """A plain tar's samples in order, then TRUNCATED if it was cut short (a sample the cut split is dropped)."""
    with storage.open_input(tar) as f:
        pending: list[Candidate | Refused] = []  # one sample behind: the last is kept once the tar proves whole
        try:
            with tarfile.open(fileobj=f, mode="r|") as archive:
                files = ((m.name, archive.extractfile(m).read) for m in archive if m.isfile())
                for sample in _grouped(files, storage.uri(tar)):
                    yield from pending
                    pending = [sample]
                # tarfile ends quietly at a header cut short; a whole tar ends with two zero blocks.
                whole = storage.file_size(f) >= archive.offset + 2 * tarfile.BLOCKSIZE
        except (tarfile.ReadError, EOFError):  # cut inside a file: the samples grouped before it are whole
            yield from pending
            yield TRUNCATED
            return
        yield from pending if whole else [TRUNCATED]


def _files_samples(folder: Location) -> Iterator[Candidate | Refused]:
    """img2dataset's `files` format: one folder per shard of key.jpg, key.txt and key.json."""
    files = storage.glob(folder, "*")
    yield from _grouped(((p.name, lambda p=p: storage.read_bytes(p)) for p in files), storage.uri(folder))


def _parquet_samples(shard: Location, check_hash: bool) -> Iterator[Candidate | Refused]:
    """img2dataset's per-shard Parquet: a row it failed on as its reason; a success as a Candidate when
    the bytes are in it (its `parquet` format; beside tars and folders the file holds no bytes)."""
    with storage.open_input(shard) as f:
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        data = next((c for c in BYTES_COLUMNS if c in names), None)
        wanted = ["key", "url", "caption", "txt", "status", "error_message", "sha256", "media_id", data]
        for batch in parquet.iter_batches(batch_size=CHECK_BATCH, columns=[c for c in wanted if c in names]):
            for row in batch.to_pylist():
                if row.get("status") != "success":
                    yield Refused(_reason(row.get("error_message")))
                elif data is not None:
                    yield Candidate(
                        url=row.get("url") or f"{storage.uri(shard)}#{row.get('key')}",
                        caption=row.get("caption") or row.get("txt") or "",
                        data=row[data],
                        expected_sha256=row.get("media_id") or (row.get("sha256") if check_hash else None),
                    )


def _img2dataset_shards(folder: Location) -> list[Callable[[], Iterator[Candidate | Refused]]]:
    """The shards of an img2dataset output folder, whatever its output_format: NNNNN.tar (webdataset),
    NNNNN/ (files) or NNNNN.parquet alone (parquet); beside a tar or a folder, NNNNN.parquet lists
    the rows img2dataset failed on, counted by the same reasons as a download here."""
    children = storage.children(folder)
    names = {child.name for child in children}
    shards = []
    for child in children:
        stem, _, ext = child.name.partition(".")
        sidecar = folder / f"{stem}.parquet"
        if ext == "tar":
            body = functools.partial(_tar_samples, child)
        elif not ext and storage.is_dir(child):
            body = functools.partial(_files_samples, child)
        elif ext == "parquet" and {f"{stem}.tar", stem}.isdisjoint(names):
            shards.append(functools.partial(_parquet_samples, child, check_hash=False))
            continue
        else:
            continue
        failures = (functools.partial(_failures, sidecar),) if sidecar.name in names else ()
        shards.append(_chained(*failures, body))
    if not shards:
        raise UserError(f"no img2dataset shards (NNNNN.tar, NNNNN/ or NNNNN.parquet) under {folder}")
    return shards


def _failures(sidecar: Location) -> Iterator[Refused]:
    return (sample for sample in _parquet_samples(sidecar, check_hash=False) if isinstance(sample, Refused))


def _chained(*parts: Callable[[], Iterator]) -> Callable[[], Iterator]:
    return lambda: itertools.chain.from_iterable(part() for part in parts)


# ---------------------------------------------------------------- storing


class _Admitter:
    """Checks, hashes and stores candidates on a pool of threads (decoding, hashing and writing release
    the GIL), and tallies what became of them into the report, the failures and the manifest rows."""

    def __init__(self, root: Location, report: IngestReport, max_pixels: int, progress: Progress | None) -> None:
        self.root, self.report, self.max_pixels, self.progress = root, report, max_pixels, progress
        self.failed: Counter = Counter()
        # The manifest rows not yet committed: one shard's at most, so memory does not grow with the run.
        self.pending: list[pa.RecordBatch] = []
        self.parts = 0  # manifest parts this run committed
        self.rows_seen = 0  # rows of finished shards (the download's progress)
        self.total = 0  # rows to admit, once known (the store step's progress)
        self.rows_done = 0
        # media_ids stored since the last part: a second URL of the same bytes is a duplicate (across
        # parts, the store's put_if_absent finds the object and says the same)
        self.claimed: set[str] = set()
        self.lock = threading.Lock()
        self.now = dt.datetime.now(dt.timezone.utc)
        self.pool = ThreadPoolExecutor(thread_name_prefix="rayclip-admit")

    def __enter__(self) -> _Admitter:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.progress and self.rows_done and exc[0] is None:
            self.progress(self.rows_done, self.rows_done)

    def commit(self) -> None:
        """The pending manifest rows, committed as the run's next part (every object they name is stored)."""
        if not self.pending:
            return
        rows = pa.Table.from_batches(self.pending, schema=catalog.MANIFEST_SCHEMA)
        if _commit_manifest(self.root, rows, self.report, self.parts):
            self.parts += 1
        self.pending, self.claimed = [], set()

    def admit_shard(self, shard: Location) -> None:
        """One finished img2dataset shard: its failures counted by reason, its successes admitted."""
        with storage.open_input(shard) as f:
            self.rows_seen += pq.ParquetFile(f).metadata.num_rows
        self.admit_samples(_parquet_samples(shard, check_hash=True))

    def admit_samples(self, samples: Iterable[Candidate | Refused]) -> None:
        """One shard's samples in their order: a Candidate is admitted (CHECK_BATCH at a time), a reason
        counted as a failure; then the shard's manifest rows are committed."""
        batch: list[Candidate] = []
        for sample in samples:
            if isinstance(sample, Refused):
                self.failed[sample.reason] += 1
                self.rows_done += 1
                continue
            batch.append(sample)
            if len(batch) == CHECK_BATCH:
                self.admit(batch)
                batch = []
        self.admit(batch)
        self.commit()

    def admit(self, candidates: list[Candidate]) -> None:
        """Check, hash and store the candidates; their manifest rows wait for the next part (committed
        here once PART_ROWS are pending: a folder is one long shard)."""
        for start in range(0, len(candidates), CHECK_BATCH):  # a batch's futures in memory at once
            rows = []
            for outcome in self.pool.map(self._admit_one, candidates[start : start + CHECK_BATCH]):
                self.rows_done += 1
                if self.progress:
                    self.progress(self.rows_done, max(self.total, self.rows_seen, self.rows_done))
                if outcome.row is None:
                    self.failed[outcome.reason] += 1
                    continue
                self.report.admitted += 1
                self.report.stored += outcome.stored
                self.report.duplicates += not outcome.stored
                rows.append(outcome.row)
            self.pending.append(pa.RecordBatch.from_pylist(rows, schema=catalog.MANIFEST_SCHEMA))
            if sum(batch.num_rows for batch in self.pending) >= PART_ROWS:
                self.commit()

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


def _commit_manifest(root: Location, rows: pa.Table, report: IngestReport, number: int) -> bool:
    """Append rows for (media_id, url) pairs not yet in the manifest as the run's part `number`,
    written whole; False when every pair was known (no part)."""
    known = _known_pairs(root, rows.column("media_id"))
    numbered = rows.append_column("row", pa.array(range(rows.num_rows), pa.int64()))
    firsts = numbered.group_by(["media_id", "url"], use_threads=False).aggregate([("row", "min")])
    first = pc.is_in(numbered.column("row"), value_set=firsts.column("row_min"))
    fresh = rows.filter(pc.and_(first, pc.invert(pc.is_in(_pairs(rows), value_set=known))))
    report.already_in_manifest += rows.num_rows - fresh.num_rows
    report.manifest_rows_added += fresh.num_rows
    if not fresh.num_rows:
        return False
    faults.point("ingest.manifest_commit")  # a shard's objects stored, its part not yet written
    catalog.write_manifest_part(root, report.run_id, number, fresh, MANIFEST_ROW_GROUP)
    return True


def _known_pairs(root: Location, media_ids: pa.ChunkedArray) -> pa.Array:
    """The manifest's (media_id, url) pairs for these media_ids, read a batch at a time: memory follows
    the part being committed, not the manifest (which this run's earlier parts are in)."""
    wanted = media_ids.unique()
    pairs = [
        _pairs(batch.filter(pc.is_in(batch.column("media_id"), value_set=wanted)))
        for batch in catalog.iter_manifest(root, ["media_id", "url"])
    ]
    return pa.chunked_array(pairs, pa.string()).combine_chunks()


def _pairs(table: pa.Table) -> pa.ChunkedArray:
    """Each row's (media_id, url) as one string, the manifest's key."""
    return pc.binary_join_element_wise(table.column("media_id"), pc.fill_null(table.column("url"), ""), "\n")


def _known_urls(root: Location, table: pa.Table) -> pa.Array:
    """Per row of the url table: is its URL already in the manifest?"""
    known = catalog.read_manifest(root, ["url"]).column("url").combine_chunks()
    return pc.is_in(table.column("url"), value_set=known)


def _finish(root: Location, admitter: _Admitter, report: IngestReport, started: float) -> IngestReport:
    report.failed = dict(admitter.failed.most_common())
    admitter.commit()  # what a folder left pending
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
    # The run holds its work folder until its last manifest part is committed.
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
        admitter.admit(candidates)
    return _finish(root, admitter, report, started)


def ingest_webdataset(
    root: Location | str,
    pattern: str | list[str],
    limit: int | None = IngestOptions.limit,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Progress | None = None,
) -> IngestReport:
    """Ingest WebDataset tar shards (`shards/{00000..00099}.tar`, globs; local or an object store), or
    several such patterns or paths (what a shell makes of an unquoted glob): each sample's image file
    keeps its bytes, its .txt its caption and its .json the url. Nothing is fetched.
    progress(done, total) counts shards."""
    patterns = [pattern] if isinstance(pattern, str) else pattern
    tars = [tar for each in patterns for tar in shard_locations(each)]
    shards = [functools.partial(_tar_samples, tar) for tar in tars]
    return _ingest_shards(root, f"webdataset:{patterns[0].rpartition('/')[2]}", shards, limit, max_pixels, progress)


def ingest_img2dataset_output(
    root: Location | str,
    folder: str | os.PathLike,
    limit: int | None = IngestOptions.limit,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Progress | None = None,
) -> IngestReport:
    """Ingest what img2dataset wrote (output_format webdataset, files or parquet; local or an object
    store), with its per-shard Parquet's failures counted by reason. Nothing is fetched.
    progress(done, total) counts shards."""
    source = storage.location(folder)
    if not storage.is_dir(source):
        raise UserError(f"folder not found: {folder}")
    return _ingest_shards(root, f"img2dataset:{source.name}", _img2dataset_shards(source), limit, max_pixels, progress)


def _ingest_shards(
    root: Location | str,
    source: str,
    shards: list[Callable[[], Iterator[Candidate | Refused]]],
    limit: int | None,
    max_pixels: int,
    progress: Progress | None,
) -> IngestReport:
    """Every sample of the shards, one shard at a time, through the admitter (at most `limit` samples)."""
    started, root = time.monotonic(), storage.data_root(root)
    report = IngestReport(run_id=layout.new_run_id(), source=source)
    with _Admitter(root, report, max_pixels, None) as admitter:
        for done, samples in enumerate(shards):
            if progress:
                progress(done, len(shards))
            left = None if limit is None else limit - report.rows_read
            if left == 0:
                break
            admitter.admit_samples(_counted(itertools.islice(samples(), left), report))
        if progress:
            progress(len(shards), len(shards))
    return _finish(root, admitter, report, started)


def _counted(samples: Iterator[Candidate | Refused], report: IngestReport) -> Iterator[Candidate | Refused]:
    for sample in samples:
        report.rows_read += 1
        yield sample
