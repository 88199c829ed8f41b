"""Bronze layer: metadata (via img2dataset) or a local folder → content-addressed objects + manifest.

Order of commits, so that a run killed at any point leaves nothing half-written:
0. URLs the manifest already names are set aside (never handed to img2dataset) unless refetch;
1. img2dataset downloads into bronze/downloads/<run_id>/ (original bytes, no re-encode), a work
   folder the run holds locked (storage.working) and that the next run or `rayclip gc` sweeps;
2. each valid image is renamed (atomic) to bronze/objects/<aa>/<sha256>.<ext>;
3. the new manifest rows are written into the work folder and renamed into bronze/manifest/
   (the commit: readers list only committed parts);
4. the run summary is written to bronze/runs/<run_id>.json.
A rerun finds the objects already stored and adds the manifest rows that are still missing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import catalog, debris, faults, layout, storage
from .errors import UserError
from .model import DEFAULT_MAX_PIXELS, BadImageError, inspect_image
from .progress import Progress, watch

FOLDER_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
URL_COLUMNS = ("URL", "url")
CAPTION_COLUMNS = ("TEXT", "caption", "text")


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
    """One sample on its way in: where its bytes are now, and what the metadata said of it."""

    file: Path
    url: str
    caption: str
    expected_sha256: str | None = None  # img2dataset's own hash, checked against ours
    movable: bool = False  # a download we own may be renamed; a user's file is copied


# ---------------------------------------------------------------- reading metadata


def read_metadata(
    path: Path, url_col: str | None = None, caption_col: str | None = None, limit: int | None = None
) -> pa.Table:
    """Read LAION-style metadata into a table with two string columns: url, caption."""
    if not path.is_file():
        raise UserError(f"metadata file not found: {path}")
    table = _read_table(path)
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


def _read_table(path: Path) -> pa.Table:
    name = path.name.lower().removesuffix(".gz")
    try:
        if name.endswith(".parquet"):
            return pq.read_table(path)
        if name.endswith((".csv", ".tsv")):
            import pyarrow.csv as pacsv

            delimiter = "\t" if name.endswith(".tsv") else ","
            return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
        if name.endswith((".jsonl", ".json")):
            import pyarrow.json as pajson

            return pajson.read_json(path)
    except (pa.ArrowInvalid, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read metadata {path}: {first_line}") from None
    raise UserError(f"unsupported metadata format: {path.name} (use .parquet, .csv, .tsv or .jsonl)")


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


def _download(
    table: pa.Table,
    work_dir: Path,
    processes: int,
    threads: int,
    timeout: int,
    retries: int,
    progress: Progress | None = None,
) -> Path:
    """Run img2dataset on the url/caption table; returns its output folder."""
    # Decode checks in the img2dataset workers (OpenCV) respect this limit too.
    os.environ.setdefault("CV_IO_MAX_IMAGE_PIXELS", str(DEFAULT_MAX_PIXELS))
    # albumentations (imported by img2dataset) otherwise checks the network for a newer release.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    input_file = work_dir / "input.parquet"
    output_dir = work_dir / "out"
    pq.write_table(table, input_file)
    # img2dataset has no callback: count the per-sample .json files its workers have written.
    with watch(lambda: sum(1 for _ in output_dir.glob("*/*.json")), table.num_rows, progress):
        _img2dataset(input_file, output_dir, processes, threads, timeout, retries)
    return output_dir


def _img2dataset(input_file: Path, output_dir: Path, processes: int, threads: int, timeout: int, retries: int) -> None:
    from img2dataset import download

    download(
        url_list=str(input_file),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_folder=str(output_dir),
        output_format="files",
        resize_mode="no",
        # Keep the original bytes of every format: media_id is the sha256 of what the server sent.
        disable_all_reencoding=True,
        compute_hash="sha256",
        processes_count=processes,
        thread_count=threads,
        timeout=timeout,
        retries=retries,
        number_sample_per_shard=10_000,
        enable_wandb=False,
    )


def _download_candidates(output_dir: Path, failed: Counter) -> Iterator[Candidate]:
    """Read img2dataset's per-shard parquet: successes become candidates, failures reasons."""
    files = {p.stem: p for p in output_dir.glob("*/*") if p.suffix not in (".txt", ".json")}
    for shard in sorted(output_dir.glob("*.parquet")):
        rows = pq.read_table(shard, columns=["key", "url", "caption", "status", "error_message", "sha256"])
        for row in rows.to_pylist():
            if row["status"] == "success" and row["key"] in files:
                yield Candidate(
                    file=files[row["key"]],
                    url=row["url"],
                    caption=row["caption"] or "",
                    expected_sha256=row["sha256"],
                    movable=True,
                )
            else:
                failed[_reason(row["error_message"])] += 1


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


def _folder_candidates(folder: Path, limit: int | None) -> Iterator[Candidate]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file())
    for path in images[:limit]:
        sidecar = path.with_suffix(".txt")
        caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""
        # A link's url names the file it points at: where the bytes live (eval ingests links to a split).
        yield Candidate(file=path, url=path.resolve().as_uri(), caption=caption)


# ---------------------------------------------------------------- storing


def _store(root: Path, candidate: Candidate, data: bytes, media_id: str, ext: str) -> bool:
    """Put the bytes at their content address; False when they were already stored."""
    target = root / layout.object_relpath(media_id, ext)
    if target.exists():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    if candidate.movable:
        os.replace(candidate.file, target)
    else:
        storage.write_atomic(target, data)
    return True


def _admit(
    root: Path,
    candidates: list[Candidate],
    report: IngestReport,
    failed: Counter,
    max_pixels: int,
    progress: Progress | None = None,
) -> list[dict]:
    """Validate and store each candidate, counting failures by reason; returns the new manifest rows."""
    now = dt.datetime.now(dt.timezone.utc)
    rows = []
    for done, candidate in enumerate(candidates):
        if progress:
            progress(done, len(candidates))
        data = candidate.file.read_bytes()
        try:
            ext, width, height = inspect_image(data, max_pixels)
        except BadImageError as bad:
            failed[str(bad)] += 1
            continue
        media_id = hashlib.sha256(data).hexdigest()
        if candidate.expected_sha256 and candidate.expected_sha256 != media_id:
            failed["hash mismatch"] += 1
            continue
        report.downloaded += 1
        if _store(root, candidate, data, media_id, ext):
            report.stored += 1
            faults.point("ingest.object_stored")  # some objects renamed, the manifest not yet committed
        else:
            report.duplicates += 1
        rows.append(
            {
                "media_id": media_id,
                "path": layout.object_relpath(media_id, ext),
                "url": candidate.url,
                "caption": candidate.caption,
                "width": width,
                "height": height,
                "format": ext,
                "size_bytes": len(data),
                "source": report.source,
                "run_id": report.run_id,
                "ingested_at": now,
            }
        )
    if progress:
        progress(len(candidates), len(candidates))
    return rows


def _commit_manifest(root: Path, rows: list[dict], report: IngestReport, work_dir: Path) -> None:
    """Append rows for (media_id, url) pairs not yet in the manifest, as one part renamed into place."""
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
    target = layout.manifest_dir(root) / f"part-{report.run_id}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = work_dir / target.name  # outside bronze/manifest: no reader lists it until the rename
    pq.write_table(pa.Table.from_pylist(fresh, schema=catalog.MANIFEST_SCHEMA), staged)
    faults.point("ingest.manifest_commit")
    os.replace(staged, target)


def _known_urls(root: Path, table: pa.Table) -> pa.Array:
    """Per row of the url table: is its URL already in the manifest?"""
    known = catalog.read_manifest(root, ["url"]).column("url").combine_chunks()
    return pc.is_in(table.column("url"), value_set=known)


def _finish(root: Path, rows: list[dict], report: IngestReport, started: float, work_dir: Path) -> IngestReport:
    _commit_manifest(root, rows, report, work_dir)
    report.wall_s = round(time.monotonic() - started, 3)
    storage.write_json_atomic(layout.ingest_runs_dir(root) / f"{report.run_id}.json", report.to_dict())
    return report


# ---------------------------------------------------------------- entry points


def ingest_metadata(
    root: Path,
    metadata: Path,
    url_col: str | None = None,
    caption_col: str | None = None,
    limit: int | None = None,
    processes: int = 1,
    threads: int = 16,
    timeout: int = 10,
    retries: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    refetch: bool = False,
    progress: Progress | None = None,
    store_progress: Progress | None = None,
) -> IngestReport:
    """Download the images a LAION-style metadata file points at into the bronze layer.

    URLs the manifest already holds are not fetched again unless `refetch` (to re-check them).
    progress(done, total) follows the download, store_progress(done, total) the decode/store step.
    """
    started = time.monotonic()
    table = read_metadata(metadata, url_col, caption_col, limit)
    report = IngestReport(run_id=layout.new_run_id(), source=f"metadata:{metadata.name}", rows_read=table.num_rows)
    problems = [_url_problem(u) for u in table.column("url").to_pylist()]
    failed = Counter(p for p in problems if p)
    fetchable = table.filter(pa.array([p is None for p in problems]))
    if not refetch and fetchable.num_rows:
        known = _known_urls(root, fetchable)
        report.skipped_known_urls = pc.sum(known).as_py() or 0
        fetchable = fetchable.filter(pc.invert(known))
    debris.sweep(root, debris.WORK_FOLDERS[:1])  # download folders of killed runs
    with storage.working(layout.downloads_dir(root, report.run_id)) as work_dir:
        rows: list[dict] = []
        if fetchable.num_rows:
            output_dir = _download(fetchable, work_dir, processes, threads, timeout, retries, progress)
            candidates = list(_download_candidates(output_dir, failed))
            rows = _admit(root, candidates, report, failed, max_pixels, store_progress)
        report.failed = dict(failed.most_common())
        return _finish(root, rows, report, started, work_dir)


def ingest_folder(
    root: Path,
    folder: Path,
    limit: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    store_progress: Progress | None = None,
) -> IngestReport:
    """Copy the images under a local folder (recursively) into the bronze layer."""
    started = time.monotonic()
    if not folder.is_dir():
        raise UserError(f"folder not found: {folder}")
    candidates = list(_folder_candidates(folder, limit))
    if not candidates:
        raise UserError(f"no images ({', '.join(sorted(FOLDER_EXTENSIONS))}) found under {folder}")
    report = IngestReport(run_id=layout.new_run_id(), source=f"folder:{folder.name}", rows_read=len(candidates))
    failed: Counter = Counter()
    with storage.working(layout.downloads_dir(root, report.run_id)) as work_dir:
        rows = _admit(root, candidates, report, failed, max_pixels, store_progress)
        report.failed = dict(failed.most_common())
        return _finish(root, rows, report, started, work_dir)
