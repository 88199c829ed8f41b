"""`rayclip export`: a subset of the data root out as shards, shaped as img2dataset writes its datasets.

What is selected: with a query (texts, images, stored media_ids; `k`, or every result scoring at
least `min_score`), the query service's results over the CURRENT build, `where` filtering inside the
search exactly as `rayclip search` does; with `where` alone (or nothing), every bronze manifest row
it keeps, no index needed. A sample is the stored object's original bytes (its extension as
stored), its caption and its metadata (url, caption, media_id, width, height, …, score with a query).

The shards are img2dataset's (webdataset tars, parquet, or a folder as its `files`), written by
store/shards, so `rayclip ingest --img2dataset-output` reads any of the three back.

Streaming: the driver holds one shard's metadata and READ_AHEAD objects' bytes (on an object store
also the shard being uploaded), plus, with a query, the selected ids and scores; never every row
or every byte. The manifest is read a batch at a time (catalog.iter_manifest).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa

from . import faults
from .errors import UserError
from .options import EXPORT_FORMATS, ExportOptions, SearchOptions
from .progress import Progress
from .query.searcher import Searcher
from .query.service import QueryService
from .query.terms import Term
from .store import catalog, layout, shards, storage
from .store.catalog import Refused
from .store.shards.write import WRITERS, ShardWriter
from .store.storage import Location

READ_AHEAD = 64  # objects read at once (threads: an object store's latency overlaps)
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
    mapping = searcher.mapping
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
    """The metadata of every sample: a shard's (shards.metadata_schema) of the source's columns, and the score."""
    schema = shards.metadata_schema([f for f in source if f.name not in DROPPED])
    return schema.append(pa.field("score", pa.float64())) if scored else schema


def _read_object(root: Location, row: dict) -> bytes | Refused:
    """A row's stored bytes, or why they cannot be exported (catalog.read_object's reasons, as embed's)."""
    return catalog.read_object(root, row["path"], row["media_id"])


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
    started, root, target = time.monotonic(), storage.resolved(root), storage.location(to)
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
        total, schema, batches = len(results), searcher.mapping.table.schema, _query_rows(searcher, results)
    else:
        total, schema = (
            sum(catalog.parquet_metadata(p).num_rows for p in catalog.manifest_parts(root)),
            catalog.MANIFEST_SCHEMA,
        )
        batches = _manifest_rows(root, where)
    writer = WRITERS[format](target, samples_per_shard, _meta_schema(schema, bool(terms)))
    _write(root, batches, writer, report, total, progress)
    report.wall_s = round(time.monotonic() - started, 3)
    faults.point("export.finish")  # every shard written, no run record yet
    catalog.write_run_record(layout.export_runs_dir(root), report)
    return report


def _write(
    root: Location, batches: Batches, writer: ShardWriter, report: ExportReport, total: int, progress: Progress | None
) -> None:
    """Each selected row's stored bytes into the shards, READ_AHEAD objects read at once; the counts into report."""
    from concurrent.futures import ThreadPoolExecutor

    failed, looked = Counter(), 0
    with writer, ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="rayclip-export") as pool:
        for considered, rows in batches:
            for start in range(0, len(rows), READ_AHEAD):
                chunk = rows[start : start + READ_AHEAD]
                for row, data in zip(chunk, pool.map(functools.partial(_read_object, root), chunk)):
                    if isinstance(data, Refused):
                        failed[data.reason] += 1
                    else:
                        writer.add(row, data, extension=row["path"].rpartition(".")[2])
            report.selected += len(rows)
            looked += considered
            if progress:
                progress(min(looked, total), total)
    if progress:
        progress(total, total)
    report.exported, report.shards, report.image_bytes = writer.samples, writer.shards, writer.image_bytes
    report.failed = dict(failed.most_common())
