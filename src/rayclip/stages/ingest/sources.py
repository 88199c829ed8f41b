"""The entry points, one per source an ingest reads: LAION-style metadata (downloaded by
img2dataset), a folder of images, WebDataset tars, and what img2dataset wrote. Each makes the run's
report and admitter, hands its samples over, and finishes the run."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from ...errors import UserError
from ...images import DEFAULT_MAX_PIXELS
from ...options import DISTRIBUTORS, IngestOptions
from ...progress import Progress
from ...store import debris, layout, storage
from ...store.catalog import Refused
from ...store.shards import IMAGE_EXTENSIONS, Sample
from ...store.shards.read import Shard, img2dataset_shards, webdataset_shards
from ...store.storage import Location
from .admit import Admitter, IngestReport, known_urls
from .download import download_and_admit
from .metadata import read_metadata, url_problem


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
    root = storage.resolved(root)
    table = read_metadata(metadata, url_col, caption_col, limit)
    name = storage.location(metadata).name
    report = IngestReport(run_id=layout.new_run_id(), source=f"metadata:{name}", rows_read=table.num_rows)
    problems = [url_problem(u) for u in table.column("url").to_pylist()]
    fetchable = table.filter(pa.array([p is None for p in problems]))
    if not refetch and fetchable.num_rows:
        known = known_urls(root, fetchable)
        report.skipped_known_urls = pc.sum(known).as_py() or 0
        fetchable = fetchable.filter(pc.invert(known))
    debris.sweep(root, debris.WORK_FOLDERS[:1])  # download folders of killed runs
    # The run holds its work folder until its last manifest part is committed.
    with storage.working(layout.downloads_dir(root, report.run_id)) as work_dir:
        with Admitter(root, report, max_pixels, store_progress) as admitter:
            admitter.failed.update(p.reason for p in problems if p)
            admitter.total = fetchable.num_rows
            if fetchable.num_rows:
                download_and_admit(
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
        return admitter.finish(started)


def ingest_folder(
    root: Location | str,
    folder: str | os.PathLike,
    limit: int | None = IngestOptions.limit,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    store_progress: Progress | None = None,
) -> IngestReport:
    """Copy the images under a folder (recursively; local or a URL) into the bronze layer."""
    started = time.monotonic()
    root, source = storage.resolved(root), storage.location(folder)
    if not storage.is_dir(source):
        raise UserError(f"folder not found: {folder}")
    samples = _folder_samples(source, limit)
    if not samples:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found under {folder}")
    report = IngestReport(run_id=layout.new_run_id(), source=f"folder:{source.name}", rows_read=len(samples))
    with Admitter(root, report, max_pixels, store_progress) as admitter:
        admitter.total = len(samples)
        admitter.admit(samples)
    return admitter.finish(started)


def _folder_samples(folder: Location, limit: int | None) -> list[Sample]:
    """The folder's images (at most `limit`), each with the caption of its name.txt sidecar if any."""
    listed = storage.glob(folder, "**/*")
    names = {storage.uri(p) for p in listed}
    images = [p for p in listed if p.suffix.lower() in IMAGE_EXTENSIONS and not storage.is_dir(p)][:limit]
    samples = []
    for path in images:
        sidecar = path.with_suffix(".txt")
        caption = ""
        if storage.uri(sidecar) in names:
            caption = storage.read_bytes(sidecar).decode("utf-8", errors="replace").strip()
        # A link's url names the file it points at: where the bytes live (eval ingests links to a split).
        samples.append(Sample(url=storage.resolved_url(path), caption=caption, file=path))
    return samples


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
    shards = [shard for each in patterns for shard in webdataset_shards(each)]
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
    return _ingest_shards(root, f"img2dataset:{source.name}", img2dataset_shards(source), limit, max_pixels, progress)


def _ingest_shards(
    root: Location | str,
    source: str,
    shards: list[Shard],
    limit: int | None,
    max_pixels: int,
    progress: Progress | None,
) -> IngestReport:
    """Every sample of the shards, one shard at a time, through the admitter (at most `limit` samples)."""
    started, root = time.monotonic(), storage.resolved(root)
    report = IngestReport(run_id=layout.new_run_id(), source=source)
    with Admitter(root, report, max_pixels, None) as admitter:
        for done, samples in enumerate(shards):
            if progress:
                progress(done, len(shards))
            left = None if limit is None else limit - report.rows_read
            if left == 0:
                break
            admitter.admit_samples(_counted(itertools.islice(samples(), left), report))
        if progress:
            progress(len(shards), len(shards))
    return admitter.finish(started)


def _counted(samples: Iterator[Sample | Refused], report: IngestReport) -> Iterator[Sample | Refused]:
    for sample in samples:
        report.rows_read += 1
        yield sample
