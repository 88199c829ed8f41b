"""A build's mapping table: row i describes faiss_id i (media_id, embedded_at, what the manifest says,
the best clip_score over its captions).

A full build writes it in parts, one task per part of faiss_ids (each joins only its own media_ids
with the manifest, read a batch at a time), and one task concatenates the parts in order into
mapping.parquet (the contract) and mapping.arrow (the serving copy a mapped server maps), so no
process holds every row. An incremental build, which holds its rows already, joins and writes in one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ... import faults
from ...store import catalog, layout, storage
from ...store.storage import Location
from . import parts
from .made import UNIQUE_KEY_CHARS

FIRSTS = ["path", "url", "caption", "width", "height", "source", "ingested_at"]  # the manifest's, per media_id


def sources(root: Location, media_ids: pa.Array | None = None) -> pa.Table:
    """One row per media_id from the manifest (only these media_ids, when given): its first (path, url,
    caption, size, source, time) and how many rows name it."""
    columns = ["media_id", *FIRSTS]
    batches = [
        batch if media_ids is None else batch.filter(pc.is_in(batch.column("media_id"), value_set=media_ids))
        for batch in catalog.iter_manifest(root, columns, batch_rows=65_536)
    ]
    schema = pa.schema([catalog.MANIFEST_SCHEMA.field(c) for c in columns])
    manifest = pa.Table.from_batches(batches, schema).sort_by("ingested_at")
    return (
        manifest.group_by("media_id", use_threads=False)
        .aggregate([(name, "first") for name in FIRSTS] + [("url", "count")])
        .rename_columns(["media_id", *FIRSTS, "source_count"])
    )


def clip_scores(root: Location, model_version: str) -> pa.Table:
    """media_id, caption_id, clip_score: the newest score of every (image, caption) pair in silver."""
    keys = ["media_id", "caption_id"]
    scores = catalog.silver_latest(root, model_version, layout.CLIP_SCORES, keys, ["clip_score"], "scored_at")
    if scores is None:
        return pa.schema([(k, pa.string()) for k in keys] + [("clip_score", pa.float32())]).empty_table()
    return scores


def join(rows: pa.Table, root: Location, scores: pa.Table, media_ids: pa.Array | None = None) -> pa.Table:
    """(faiss_id, media_id, embedded_at) joined with what the manifest says and the best clip_score
    over each media_id's captions (null: none scored), ordered by faiss_id. `media_ids`: the only
    ones to read from the manifest (a part's), else all."""
    best = scores.group_by("media_id").aggregate([("clip_score", "max")])
    best = pa.table({"media_id": best["media_id"], "clip_score": best["clip_score_max"]})
    mapping = rows.join(sources(root, media_ids), "media_id", join_type="left outer")
    return mapping.join(best, "media_id", join_type="left outer").sort_by("faiss_id")


def write(folder: Location, mapping: pa.Table) -> list[Location]:
    """The whole mapping written as mapping.parquet and its Arrow copy; returns the files."""
    catalog.write_served_table(layout.mapping_file(folder), layout.mapping_arrow_file(folder), mapping)
    return [layout.mapping_file(folder), layout.mapping_arrow_file(folder)]


# The steps of a full build (parts.Runner runs them).
def map_part(root: Location, model_version: str, folder: Location, part: int, source: parts.Rows, first: int) -> int:
    """Step: the mapping rows of faiss_ids first.. (its silver rows `source`), written as a part file."""
    read = [
        catalog.read_parquet(f, ["media_id", "embedded_at"]).take(pa.array(rows))
        for f, rows in zip(source.files, source.rows)
    ]
    chosen = pa.concat_tables(read)
    rows = pa.table(
        {
            "faiss_id": pa.array(np.arange(first, first + chosen.num_rows, dtype=np.int64)),
            "media_id": chosen.column("media_id"),
            "embedded_at": chosen.column("embedded_at"),
        }
    )
    ids = chosen.column("media_id").combine_chunks()
    mapping = join(rows, root, _scores_of(clip_scores(root, model_version), ids), ids)
    with storage.open_output(layout.mapping_part_file(folder, part)) as f:
        pq.write_table(mapping, f)
    faults.point("index.map")  # a mapping part written, mapping.parquet not yet
    return mapping.num_rows


def concat(folder: Location, count: int) -> tuple[int, int]:
    """Step: the `count` mapping parts, in order, streamed into mapping.parquet and mapping.arrow a row
    group at a time; returns (rows written, distinct media_ids among them). The distinct count compares
    each media_id's last UNIQUE_KEY_CHARS hex digits (128 bits of a sha256; the last, not the first:
    ids that share a prefix, as zero-padded counters do, still differ there), not the whole string,
    so the check holds UNIQUE_ROW_BYTES a row rather than every media_id."""
    files = [layout.mapping_part_file(folder, part) for part in range(count)]
    schema = catalog.parquet_metadata(files[0]).schema.to_arrow_schema()
    written, keys = 0, []
    with catalog.served_table_writer(layout.mapping_file(folder), layout.mapping_arrow_file(folder), schema) as write:
        for f in files:
            with storage.open_input(f) as part:
                for batch in pq.ParquetFile(part).iter_batches(batch_size=catalog.SERVED_BATCH_ROWS):
                    write(batch)
                    written += batch.num_rows
                    keys.append(pc.utf8_slice_codeunits(batch.column("media_id"), -UNIQUE_KEY_CHARS))
    distinct = pc.count_distinct(pa.chunked_array(keys, pa.string())).as_py() if keys else 0
    return written, distinct


def _scores_of(scores: pa.Table, media_ids: pa.Array) -> pa.Table:
    return scores.filter(pc.is_in(scores.column("media_id"), value_set=media_ids))
