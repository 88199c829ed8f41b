"""`rayclip export`: a subset of the data root out as shards, shaped as img2dataset writes its datasets.

What is selected: with a query (texts, images, stored media_ids; `k`, or every result scoring at
least `min_score`), the query service's results over the CURRENT build, `where` filtering inside the
search exactly as `rayclip search` does; with `where` alone (or nothing), every bronze manifest row
it keeps, no index needed. A sample is the stored object's original bytes (its extension as
stored), its caption and its metadata (url, caption, media_id, width, height, …, score with a query).

img2dataset's layout: shard i is `{i:05d}`, the j-th sample of it has key
`i * 10**ceil(log10(samples_per_shard)) + j`, zero-padded (000000000, 000000001, …, 000010000):
- webdataset: `00000.tar` of `{key}.{ext}`, `{key}.txt`, `{key}.json`, then `00000.parquet` (metadata);
- parquet: `00000.parquet`, the metadata and the bytes (column `jpg`, img2dataset's name, whatever
  the format: the `format` column says which);
- folder: `00000/{key}.{ext}`, `.txt`, `.json`, then `00000.parquet` (img2dataset's `files` format).
Each file is written whole through storage.open_output (a temporary name and a rename locally, one
PUT on an object store); a shard's `.parquet` comes last, so `rayclip ingest --img2dataset-output`
reads any of the three back.

Streaming: the driver holds one shard's metadata and READ_AHEAD objects' bytes (on an object store
also the shard being uploaded), plus, with a query, the selected ids and scores; never every row
or every byte. The manifest is read a batch at a time (catalog.iter_manifest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import io
import json
import math
import tarfile
import time
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from . import faults
from .errors import UserError
from .options import EXPORT_FORMATS, ExportOptions, SearchOptions
from .progress import Progress
from .query.searcher import Searcher, Term
from .query.service import QueryService
from .store import catalog, layout, storage
from .store.catalog import Refused
from .store.storage import Location

SHARD_DIGITS = 5  # img2dataset's oom_shard_count: 00000.tar
BYTES_COLUMN = "jpg"  # img2dataset's parquet output names its bytes column by encode_format, jpg by default
READ_AHEAD = 64  # objects read at once (threads: an object store's latency overlaps)
FLUSH_ROWS = 256  # parquet format: rows (with their bytes) per row group
QUERY_DEPTH = 1024  # min_score: results asked for first, four times more while all of them still score enough
DROPPED = {"path", "faiss_id", "run_id"}  # where the data root keeps things: not the exported sample's business


@dataclasses.dataclass
class ExportReport:
    run_id: str
    target: str
    format: str
    selection: str
    selected: int = 0
    exported: int = 0
    shards: int = 0
    image_bytes: int = 0
    failed: dict[str, int] = dataclasses.field(default_factory=dict)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- selecting

Batches = Iterator[tuple[int, list[dict]]]  # (rows looked at, the rows kept of them)


def _ranked(searcher: Searcher, terms: list[Term], k: int, min_score: float | None, where: str | None) -> list:
    """The query's results: the top k, or (min_score) every one scoring at least min_score."""
    if min_score is None:
        return searcher.find([terms], SearchOptions(k=k, where=where))[0]
    depth = QUERY_DEPTH
    while True:
        results = searcher.find([terms], SearchOptions(k=depth, where=where))[0]
        if len(results) < depth or results[-1].score < min_score:
            return [r for r in results if r.score >= min_score]
        depth *= 4


def _query_rows(searcher: Searcher, results: list) -> Batches:
    """The results with their mapping rows, READ_AHEAD at a time (the ids of one build, the Searcher's own)."""
    mapping = searcher.mapping_rows
    columns = [name for name in mapping.table.column_names if name != "faiss_id"]
    for start in range(0, len(results), READ_AHEAD):
        chosen = results[start : start + READ_AHEAD]
        rows = mapping.rows([r.faiss_id for r in chosen], columns)
        yield len(chosen), [row | {"score": r.score} for row, r in zip(rows, chosen)]


def _manifest_rows(root: Location, where: str | None) -> Batches:
    from .query import filters

    kept = None if where is None else filters.parse_filter(where, catalog.MANIFEST_SCHEMA)
    for batch in catalog.iter_manifest(root):
        table = pa.Table.from_batches([batch])
        yield batch.num_rows, (table if kept is None else table.filter(kept)).to_pylist()


def _meta_schema(source: pa.Schema, scored: bool) -> pa.Schema:
    """The metadata columns of every sample (img2dataset's key, status and error_message first); times as ISO text."""
    fields = [pa.field(name, pa.string()) for name in ("key", "status", "error_message")]
    for f in source:
        if f.name not in DROPPED:
            fields.append(pa.field(f.name, pa.string() if pa.types.is_timestamp(f.type) else f.type))
    fields += [
        pa.field(n, t) for n, t in (("format", pa.string()), ("size_bytes", pa.int64())) if n not in source.names
    ]
    return pa.schema(fields + ([pa.field("score", pa.float64())] if scored else []))


def _plain(value: object) -> object:
    return value.isoformat() if isinstance(value, dt.datetime) else value


# ---------------------------------------------------------------- writing


class _Shards:
    """Samples into numbered shards of `per_shard`, img2dataset's keys and names; each file written whole.
    A subclass writes one format: open_shard, write_sample, close_shard (and abort_shard on a failure)."""

    def __init__(self, target: Location, per_shard: int, schema: pa.Schema, report: ExportReport) -> None:
        self.target, self.per_shard, self.schema, self.report = target, per_shard, schema, report
        self.key_digits = math.ceil(math.log10(per_shard))  # img2dataset's oom_sample_per_shard
        self.shard, self.count, self.meta = 0, 0, []

    def __enter__(self) -> _Shards:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None:
            if self.count:
                self.abort_shard(exc)
        elif self.count:
            self._finish_shard()

    @property
    def name(self) -> str:
        return f"{self.shard:0{SHARD_DIGITS}d}"

    def add(self, row: dict, data: bytes) -> None:
        if self.count == 0:
            self.open_shard()
        key = f"{self.shard * 10**self.key_digits + self.count:0{self.key_digits + SHARD_DIGITS}d}"
        extension = row["path"].rpartition(".")[2]
        fixed = {"key": key, "status": "success", "error_message": None, "format": extension}
        meta = {name: _plain(row.get(name)) for name in self.schema.names} | fixed | {"size_bytes": len(data)}
        self.write_sample(key, extension, data, meta)
        self.meta.append(meta)
        self.count += 1
        self.report.exported += 1
        self.report.image_bytes += len(data)
        if self.count == self.per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self.close_shard()
        self.shard, self.count, self.meta = self.shard + 1, 0, []
        self.report.shards += 1

    def write_sidecar(self) -> None:
        """img2dataset's per-shard Parquet of every sample's metadata, written after the shard's data."""
        with storage.open_output(self.target / f"{self.name}.parquet") as f:
            pq.write_table(pa.Table.from_pylist(self.meta, schema=self.schema), f)

    @staticmethod
    def sample_files(key: str, extension: str, data: bytes, meta: dict) -> list[tuple[str, bytes]]:
        caption = (meta.get("caption") or "").encode()
        return [
            (f"{key}.{extension}", data),
            (f"{key}.txt", caption),
            (f"{key}.json", json.dumps(meta, indent=4).encode()),
        ]

    def open_shard(self) -> None: ...

    def write_sample(self, key: str, extension: str, data: bytes, meta: dict) -> None: ...

    def close_shard(self) -> None: ...

    def abort_shard(self, exc: tuple) -> None: ...


class _TarShards(_Shards):
    """webdataset: a tar per shard, streamed into its output file as samples come."""

    def open_shard(self) -> None:
        self.output = contextlib.ExitStack()
        self.tar = tarfile.open(
            fileobj=self.output.enter_context(storage.open_output(self.target / f"{self.name}.tar")), mode="w"
        )

    def write_sample(self, key: str, extension: str, data: bytes, meta: dict) -> None:
        for name, content in self.sample_files(key, extension, data, meta):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(content), int(time.time()), 0o444
            self.tar.addfile(info, io.BytesIO(content))

    def close_shard(self) -> None:
        self.tar.close()
        self.output.close()
        self.write_sidecar()

    def abort_shard(self, exc: tuple) -> None:
        self.output.__exit__(*exc)  # open_output leaves nothing behind


class _FolderShards(_Shards):
    """img2dataset's `files`: a folder per shard, each file written whole."""

    def write_sample(self, key: str, extension: str, data: bytes, meta: dict) -> None:
        for name, content in self.sample_files(key, extension, data, meta):
            storage.write_atomic(self.target / self.name / name, content)

    def close_shard(self) -> None:
        self.write_sidecar()


class _ParquetShards(_Shards):
    """img2dataset's `parquet`: the metadata and the bytes, FLUSH_ROWS rows per row group."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.with_bytes = self.schema.append(pa.field(BYTES_COLUMN, pa.binary()))

    def open_shard(self) -> None:
        self.output = contextlib.ExitStack()
        file = self.output.enter_context(storage.open_output(self.target / f"{self.name}.parquet"))
        self.writer = pq.ParquetWriter(file, self.with_bytes)
        self.buffer: list[dict] = []

    def write_sample(self, key: str, extension: str, data: bytes, meta: dict) -> None:
        self.buffer.append(meta | {BYTES_COLUMN: data})
        if len(self.buffer) == FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            self.writer.write_table(pa.Table.from_pylist(self.buffer, schema=self.with_bytes))
        self.buffer = []

    def close_shard(self) -> None:
        self._flush()
        self.writer.close()
        self.output.close()

    def abort_shard(self, exc: tuple) -> None:
        # Closed first, or its finaliser writes a footer into the file open_output has closed; a
        # writer whose own write failed may fail again here, and the file goes either way.
        with contextlib.suppress(Exception):
            self.writer.close()
        self.output.__exit__(*exc)


WRITERS = {"webdataset": _TarShards, "parquet": _ParquetShards, "folder": _FolderShards}


def _read_object(root: Location, row: dict) -> bytes | Refused:
    """A row's stored bytes, or why they cannot be exported (catalog.read_object's reasons, as embed's)."""
    data, why = catalog.read_object(root, row["path"], row["media_id"])
    return data if why is None else Refused(why)


# ---------------------------------------------------------------- the command


def export(
    root: Location | str | None,
    to: str,
    terms: list[Term] | None = None,
    format: str = ExportOptions.format,  # noqa: A002 - the flag's name
    samples_per_shard: int = ExportOptions.samples_per_shard,
    min_score: float | None = ExportOptions.min_score,
    k: int = SearchOptions.k,
    where: str | None = SearchOptions.where,
    model_version: str | None = SearchOptions.model_version,
    precision: str = SearchOptions.precision,
    progress: Progress | None = None,
) -> ExportReport:
    """Write the samples a query (`terms`; `k` or `min_score`), a filter (`where`) or both select into
    `to` (a local folder or an object-store prefix, new or empty) as `format` shards; the run record is
    saved under the data root's exports/runs/. progress(done, total) counts the rows looked at."""
    started, root, target = time.monotonic(), storage.data_root(root), storage.location(to)
    if format not in EXPORT_FORMATS:
        raise UserError(f"unknown format {format!r}; use one of: {', '.join(EXPORT_FORMATS)}")
    if min_score is not None and not terms:
        raise UserError("--min-score needs a query: --q TEXT, --image FILE or --like MEDIA_ID")
    if storage.exists(target) and storage.children(target):
        raise UserError(f"{to} is not empty; export into a new or empty folder")
    shown = " ".join(term.title for term in terms or []).lstrip("+ ") or "every manifest row"
    report = ExportReport(
        layout.new_run_id(), storage.uri(target), format, shown + (f" where {where}" if where else "")
    )
    if terms:
        searcher = QueryService(root, model_version, precision=precision).searcher(model_version)
        results = _ranked(searcher, terms, k, min_score, where)
        total, schema, batches = len(results), searcher.mapping.schema, _query_rows(searcher, results)
    else:
        total, schema = (
            sum(catalog.parquet_metadata(p).num_rows for p in catalog.manifest_parts(root)),
            catalog.MANIFEST_SCHEMA,
        )
        batches = _manifest_rows(root, where)
    _write(
        root,
        batches,
        WRITERS[format](target, samples_per_shard, _meta_schema(schema, bool(terms)), report),
        total,
        progress,
    )
    report.wall_s = round(time.monotonic() - started, 3)
    faults.point("export.finish")  # every shard written, no run record yet
    storage.write_json_atomic(layout.run_record(layout.export_runs_dir(root), report.run_id), report.to_dict())
    return report


def _write(root: Location, batches: Batches, shards: _Shards, total: int, progress: Progress | None) -> None:
    from concurrent.futures import ThreadPoolExecutor

    failed, looked = Counter(), 0
    with shards, ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="rayclip-export") as pool:
        for considered, rows in batches:
            for start in range(0, len(rows), READ_AHEAD):
                chunk = rows[start : start + READ_AHEAD]
                for row, data in zip(chunk, pool.map(functools.partial(_read_object, root), chunk)):
                    if isinstance(data, Refused):
                        failed[data.reason] += 1
                    else:
                        shards.add(row, data)
            shards.report.selected += len(rows)
            looked += considered
            if progress:
                progress(min(looked, total), total)
    if progress:
        progress(total, total)
    shards.report.failed = dict(failed.most_common())
