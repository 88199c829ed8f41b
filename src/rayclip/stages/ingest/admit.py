"""Admission: each sample checked (it decodes), hashed and stored at bronze/objects/<aa>/<sha256>.<ext>
unless already there, on a pool of threads; then the manifest rows of what was admitted committed
as one part (every object it names stored first), and the run's record written last.

Every source ends here: a download's finished shards, a folder's files, the samples of shards.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ... import faults
from ...images import BadImageError, inspect_image
from ...progress import Progress
from ...store import catalog, layout, storage
from ...store.catalog import Refused
from ...store.shards import Sample
from ...store.shards.read import parquet_samples
from ...store.storage import Location

CHECK_BATCH = 256  # rows of a shard in memory at once while their images are checked
PART_ROWS = 10_000  # a folder's manifest rows held before they are committed as a part (a shard's, at most)
MANIFEST_ROW_GROUP = 8_192  # a manifest part's streaming readers (export) decode one row group at a time


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


class Admitted(NamedTuple):
    """A sample taken: its manifest row, and whether this run stored its object."""

    row: dict
    stored: bool  # this run stored its object (else the bytes were there already)


class Admitter:
    """Checks, hashes and stores samples on a pool of threads (decoding, hashing and writing release
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

    def __enter__(self) -> Admitter:
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

    def finish(self, started: float) -> IngestReport:
        """The run's end (it began at monotonic `started`): what is still pending committed, then its
        record written (bronze/runs/<run_id>.json)."""
        self.report.failed = dict(self.failed.most_common())
        self.commit()  # what a folder left pending
        self.report.wall_s = round(time.monotonic() - started, 3)
        catalog.write_run_record(layout.ingest_runs_dir(self.root), self.report)
        return self.report

    def admit_shard(self, shard: Location) -> None:
        """One finished img2dataset shard: its failures counted by reason, its successes admitted."""
        with storage.open_input(shard) as f:
            self.rows_seen += pq.ParquetFile(f).metadata.num_rows
        self.admit_samples(parquet_samples(shard, check_hash=True))

    def admit_samples(self, samples: Iterable[Sample | Refused]) -> None:
        """One shard's samples in their order: a Sample is admitted (CHECK_BATCH at a time), a refusal
        counted as a failure; then the shard's manifest rows are committed."""
        batch: list[Sample] = []
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

    def admit(self, samples: list[Sample]) -> None:
        """Check, hash and store the samples; their manifest rows wait for the next part (committed
        here once PART_ROWS are pending: a folder is one long shard)."""
        for start in range(0, len(samples), CHECK_BATCH):  # a batch's futures in memory at once
            rows = []
            for outcome in self.pool.map(self._admit_one, samples[start : start + CHECK_BATCH]):
                self.rows_done += 1
                if self.progress:
                    self.progress(self.rows_done, max(self.total, self.rows_seen, self.rows_done))
                if isinstance(outcome, Refused):
                    self.failed[outcome.reason] += 1
                    continue
                self.report.admitted += 1
                self.report.stored += outcome.stored
                self.report.duplicates += not outcome.stored
                rows.append(outcome.row)
            self.pending.append(pa.RecordBatch.from_pylist(rows, schema=catalog.MANIFEST_SCHEMA))
            if sum(batch.num_rows for batch in self.pending) >= PART_ROWS:
                self.commit()

    def _admit_one(self, sample: Sample) -> Admitted | Refused:
        try:
            data = sample.data if sample.data is not None else storage.read_bytes(sample.file)
        except OSError:  # a folder's file that vanished, or a broken link
            return Refused("unreadable file")
        try:
            ext, width, height = inspect_image(data, self.max_pixels)
        except BadImageError as bad:
            return Refused(str(bad))
        media_id = hashlib.sha256(data).hexdigest()
        if sample.expected_sha256 and sample.expected_sha256 != media_id:
            return Refused("hash mismatch")
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
            "url": sample.url,
            "caption": sample.caption,
            "width": width,
            "height": height,
            "format": ext,
            "size_bytes": len(data),
            "source": self.report.source,
            "run_id": self.report.run_id,
            "ingested_at": self.now,
        }
        return Admitted(row, stored)


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


def known_urls(root: Location, table: pa.Table) -> pa.Array:
    """Per row of the url table: is its URL already in the manifest?"""
    known = catalog.read_manifest(root, ["url"]).column("url").combine_chunks()
    return pc.is_in(table.column("url"), value_set=known)
